"""The plugin contract: the seed's names and signatures, and a method written only
against it (as one would port it from vLLM or SGLang) running through qpass.quantize."""

import inspect
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch.nn import Parameter

import qpass
from qpass.layers import quantize_base
from qpass.layers.quantize_base import LinearMethodBase, QuantizeMethodBase, UnquantizedLinearMethod
from qpass.layers.utils import set_weight_attrs
from models import Block, relative_error, seeded


def test_names_and_signatures_match_the_seed():
    assert issubclass(LinearMethodBase, QuantizeMethodBase)
    assert issubclass(UnquantizedLinearMethod, LinearMethodBase)
    assert QuantizeMethodBase.__abstractmethods__ == {"create_weights", "apply"}
    create = inspect.signature(LinearMethodBase.create_weights)
    assert list(create.parameters) == ["self", "layer", "input_size_per_partition", "output_partition_sizes",
                                       "input_size", "output_size", "params_dtype", "extra_weight_attrs"]
    apply = inspect.signature(LinearMethodBase.apply)
    assert list(apply.parameters) == ["self", "layer", "x", "bias"] and apply.parameters["bias"].default is None
    assert list(inspect.signature(QuantizeMethodBase.process_weights_after_loading).parameters) == ["self", "layer"]
    assert quantize_base.set_weight_attrs is set_weight_attrs


# --- A method in the style of vLLM's: it knows nothing of qpass but the contract. ---
class PerTensorInt8LinearMethod(LinearMethodBase):
    """int8 weights with one scale per logical weight (per q, k, v shard)."""

    calls: List[str] = []

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        self.calls.append("create_weights")
        weight = Parameter(torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=torch.int8),
                           requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, **extra_weight_attrs})
        layer.register_parameter("weight", weight)
        shard_scales = Parameter(torch.empty(len(output_partition_sizes), dtype=torch.float32), requires_grad=False)
        set_weight_attrs(shard_scales, {"weight_loader": self.load_shard_scale})
        layer.register_parameter("shard_scales", shard_scales)
        layer.logical_widths = output_partition_sizes

    @staticmethod
    def load_shard_scale(param, loaded_weight, loaded_shard_id=None):
        index = loaded_shard_id if isinstance(loaded_shard_id, int) else 0
        param.data[index] = loaded_weight

    def quantize_weight(self, weight):
        scale = weight.abs().max().float() / 127
        return {"weight": torch.round(weight / scale).to(torch.int8), "shard_scales": scale}

    def process_weights_after_loading(self, layer):
        self.calls.append("process_weights_after_loading")
        per_row = torch.repeat_interleave(layer.shard_scales.data, torch.tensor(layer.logical_widths))
        layer.row_scales = Parameter(per_row, requires_grad=False)

    def apply(self, layer, x, bias: Optional[torch.Tensor] = None):
        self.calls.append("apply")
        return torch.nn.functional.linear(x, layer.weight.to(x.dtype) * layer.row_scales.to(x.dtype).unsqueeze(1), bias)


@qpass.register_method("test_per_tensor_int8")
@dataclass(frozen=True)
class PerTensorInt8Config(qpass.QuantConfig):
    def get_linear_method(self):
        return PerTensorInt8LinearMethod()


def test_a_ported_method_runs_through_the_pipeline_in_lifecycle_order():
    PerTensorInt8LinearMethod.calls.clear()
    model = seeded(Block)
    q = qpass.quantize(model, "test_per_tensor_int8")
    x = torch.randn(2, 5, 256)
    out = q(x)
    calls = PerTensorInt8LinearMethod.calls
    stubs = 4  # q/k/v merged, o, gate/up merged, down
    assert calls[: 2 * stubs] == ["create_weights", "process_weights_after_loading"] * stubs
    assert calls[2 * stubs:] == ["apply"] * stubs
    assert relative_error(out, model(x)) < 0.02
    # a float state dict loads through the same method's loaders
    other = seeded(Block, seed=5)
    q.load_state_dict(other.state_dict())
    assert relative_error(q(x), other(x)) < 0.02


def test_a_name_registered_twice_is_rejected():
    import pytest

    with pytest.raises(ValueError, match="already registered"):
        qpass.register_method("awq")(PerTensorInt8Config)
