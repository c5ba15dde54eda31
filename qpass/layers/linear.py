"""The quantized stub that replaces a linear: it owns a ``quant_method``, lets it create
the parameters, loads tensors through their ``weight_loader`` and calls ``apply``.

One stub may stand for several original linears that read the same input (q/k/v,
gate/up): each is a *shard* of ``output_partition_sizes``, loaded by its index or name.
Tensor parallelism follows vLLM: ``parallel="column"`` splits the outputs across ranks,
``"row"`` splits the inputs (the caller all-reduces the partial outputs).

``qpass.passes.lower`` may also fold the residual add after the layer (``residual``) and
the RMSNorm before it (``norm_weight``, ``norm_eps``) into its call, for methods whose ops
compute them (``residual_bias``, ``apply_after_rms_norm``).

``activation`` ("none" unless ``qpass.passes.lower`` folded ``silu(gate) * up`` or a GELU
into the layer) is an epilogue the method's ``apply`` passes to its op: with "silu_mul" the
layer returns ``silu(gate) * up`` of its ``[gate | up]`` outputs, half as many columns; with
"gelu" or "gelu_tanh", GELU of its outputs. Methods list the epilogues their ops compute in
``fused_activations``.
"""

from typing import List, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import Parameter

from qpass.kernels.common import output_columns
from qpass.kernels.reference import rms_norm
from qpass.layers.quantize_base import LinearMethodBase
from qpass.layers.utils import set_weight_attrs

ShardId = Union[int, str, None]


class QuantLinear(nn.Module):
    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool,
        params_dtype: torch.dtype,
        quant_method: LinearMethodBase,
        *,
        shard_names: Optional[Sequence[str]] = None,
        parallel: Optional[str] = None,
        tp_rank: int = 0,
        tp_size: int = 1,
    ):
        super().__init__()
        if parallel not in (None, "column", "row"):
            raise ValueError(f"parallel must be None, 'column' or 'row', got {parallel!r}")
        if parallel is None and tp_size != 1:
            raise ValueError(f"tp_size={tp_size} needs parallel='column' or 'row'")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} is outside 0..{tp_size - 1}")
        split_outputs = parallel == "column"
        split_inputs = parallel == "row"
        for size in output_sizes if split_outputs else ():
            if size % tp_size:
                raise ValueError(f"output size {size} does not split across tp_size={tp_size}")
        if split_inputs and input_size % tp_size:
            raise ValueError(f"input size {input_size} does not split across tp_size={tp_size}")
        self.input_size = input_size
        self.output_size = sum(output_sizes)
        self.output_partition_sizes: List[int] = [s // tp_size if split_outputs else s for s in output_sizes]
        self.input_size_per_partition = input_size // tp_size if split_inputs else input_size
        self.shard_names = list(shard_names) if shard_names is not None else [str(i) for i in range(len(output_sizes))]
        if len(self.shard_names) != len(output_sizes):
            raise ValueError(f"{len(self.shard_names)} shard names for {len(output_sizes)} output sizes")
        self.parallel, self.tp_rank, self.tp_size = parallel, tp_rank, tp_size
        self.params_dtype = params_dtype
        self.quant_method = quant_method
        self.activation = "none"
        self.finalised = False
        self._create_weights()
        if bias:
            self.bias = Parameter(torch.empty(sum(self.output_partition_sizes), dtype=params_dtype), requires_grad=False)
            set_weight_attrs(self.bias, {"output_dim": 0, "weight_loader": self.weight_loader})
        else:
            self.register_parameter("bias", None)
        self.register_buffer("input_scale", None)
        self._register_state_dict_hook(_checkpoint_layout_state_dict)

    def _create_weights(self) -> None:
        self.quant_method.create_weights(
            self,
            self.input_size_per_partition,
            self.output_partition_sizes,
            self.input_size,
            self.output_size,
            self.params_dtype,
            weight_loader=self.weight_loader,
        )

    def reset_weights(self) -> None:
        """Back to the freshly created (checkpoint) parameters, ready for a new load."""
        for name, _ in list(self.named_parameters(recurse=False)):
            if name != "bias":
                delattr(self, name)
        self._create_weights()
        self.finalised = False

    def shard_index(self, shard_id: ShardId) -> Optional[int]:
        if shard_id is None:
            return None
        if isinstance(shard_id, str):
            if shard_id not in self.shard_names:
                raise KeyError(f"no shard {shard_id!r}; shards are {self.shard_names}")
            return self.shard_names.index(shard_id)
        if not 0 <= shard_id < len(self.output_partition_sizes):
            raise IndexError(f"shard {shard_id} is outside 0..{len(self.output_partition_sizes) - 1}")
        return shard_id

    def weight_loader(self, param: Parameter, loaded_weight: torch.Tensor, loaded_shard_id: ShardId = None) -> None:
        """Copy one checkpoint tensor (a whole shard, unsplit across ranks) into ``param``:
        the shard's rows or columns, this rank's slice, respecting packing and groups."""
        shard = self.shard_index(loaded_shard_id)
        target = param.data
        output_dim = getattr(param, "output_dim", None)
        input_dim = getattr(param, "input_dim", None)
        packed_dim = getattr(param, "packed_dim", None)
        factor = getattr(param, "packed_factor", 1)
        if output_dim is not None:
            sizes = [s // factor for s in self.output_partition_sizes] if packed_dim == output_dim else self.output_partition_sizes
            if shard is not None:
                target = target.narrow(output_dim, sum(sizes[:shard]), sizes[shard])
            if self.parallel == "column" and self.tp_size > 1:
                width = target.shape[output_dim]
                loaded_weight = _take_slice(self, loaded_weight, output_dim, width, param)
        if input_dim is not None and self.parallel == "row" and self.tp_size > 1:
            width = target.shape[input_dim]
            loaded_weight = _take_slice(self, loaded_weight, input_dim, width, param)
        if loaded_weight.shape != target.shape:
            where = f" shard {self.shard_names[shard]!r}" if shard is not None else ""
            raise ValueError(
                f"{_param_name(self, param)}{where}: checkpoint tensor has shape {tuple(loaded_weight.shape)}, "
                f"expected {tuple(target.shape)}"
            )
        if loaded_weight.dtype != target.dtype and not (loaded_weight.is_floating_point() and target.is_floating_point()):
            raise TypeError(
                f"{_param_name(self, param)}: checkpoint tensor has dtype {loaded_weight.dtype}, expected {target.dtype}"
            )
        target.copy_(loaded_weight)
        self.finalised = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Load this layer's own tensors through their ``weight_loader`` (whole tensors, no
        shard id), starting from fresh checkpoint-layout parameters if already finalised."""
        own = {key[len(prefix):]: key for key in state_dict if key.startswith(prefix) and "." not in key[len(prefix):]}
        fed_from_float = self.__dict__.pop("_fed_from_float", False)
        if not own:
            if not fed_from_float:
                missing_keys.extend(prefix + name for name, _ in self.named_parameters(recurse=False))
            return
        if self.finalised:
            self.reset_weights()
        params = dict(self.named_parameters(recurse=False))
        for name, param in params.items():
            if name not in own:
                missing_keys.append(prefix + name)
                continue
            try:
                param.weight_loader(param, state_dict[own[name]])
            except (ValueError, TypeError) as err:
                error_msgs.append(f"{prefix + name}: {err}")
        unexpected_keys.extend(key for name, key in own.items() if name not in params)

    def finalise(self) -> None:
        """Run ``process_weights_after_loading`` once after a load."""
        if not self.finalised:
            self.quant_method.process_weights_after_loading(self)
            self.finalised = True

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 0.0) -> torch.Tensor:
        """``linear(x)``; with ``residual``, ``residual + linear(x)``; with ``norm_weight``,
        ``linear(rms_norm(x))`` (``qpass.kernels.reference.rms_norm``): the folds of
        ``qpass.passes.lower``, computed in the op where the method can (``residual_problem``,
        ``input_norm_problem``)."""
        if not self.finalised:
            raise RuntimeError(
                "QuantLinear used before process_weights_after_loading: load its weights, then call "
                "qpass.passes.finalise.finalise(model)"
            )
        bias = self.bias if self.parallel != "row" or self.tp_rank == 0 else None
        fold_residual = (residual is not None and residual.dtype == x.dtype and self.residual_problem() is None
                         and residual.shape == (*x.shape[:-1], output_columns(self.activation,
                                                                              sum(self.output_partition_sizes))))
        if fold_residual:  # the op adds it in its epilogue, as a bias shaped as the output
            bias = residual
        if norm_weight is not None and norm_weight.dtype == x.dtype and self.input_norm_problem() is None:
            out = self.quant_method.apply_after_rms_norm(self, x, norm_weight, norm_eps, bias)
        else:
            if norm_weight is not None:
                x = rms_norm(x, norm_weight, norm_eps)
            if self.input_scale is not None:
                x = x * self.input_scale
            out = self.quant_method.apply(self, x, bias)
        if residual is not None and not fold_residual:  # broadcast, or another dtype: as ``residual + out`` would
            out = residual + out
        return out

    def residual_problem(self) -> Optional[str]:
        """Why ``residual + self(x)`` cannot be computed by this layer's op, or None where it can."""
        if not getattr(self.quant_method, "residual_bias", False):
            return f"{type(self.quant_method).__name__} does not take a bias shaped as its output (residual_bias)"
        if self.parallel == "row":
            return "a row-parallel layer has partial sums: the residual is added after the all-reduce"
        if self.activation != "none":
            return f"the residual comes after the layer's activation {self.activation!r}, the bias before it"
        if self.bias is not None:  # (unfolded, Inductor fuses the add with what reads the sum, a LayerNorm)
            return "the layer has a bias: joining the residual to it would cost an add of its own"
        return None

    def input_norm_problem(self) -> Optional[str]:
        """Why ``self(rms_norm(x))`` cannot be computed by this layer's op, or None where it can."""
        if not hasattr(self.quant_method, "apply_after_rms_norm"):
            return f"{type(self.quant_method).__name__} has no apply_after_rms_norm"
        if self.parallel == "row":
            return "a row-parallel layer reads a slice of the row the norm reduces"
        if self.input_scale is not None:
            return "the layer scales its input (input_scale) after the norm"
        return None

    def activation_problem(self, activation: str) -> Optional[str]:
        """Why ``activation`` cannot be fused into this layer, or None where it can."""
        if activation == "none":
            return None
        supported = getattr(self.quant_method, "fused_activations", ())
        if activation not in supported:
            return (f"{type(self.quant_method).__name__} cannot fuse activation {activation!r}: its "
                    f"fused_activations are {tuple(supported)}")
        if self.parallel == "row":
            return f"activation {activation!r} needs whole outputs; a row-parallel layer has partial sums"
        if activation != "silu_mul":
            return None
        halves = self.output_partition_sizes
        if self.tp_size > 1 and not (len(halves) == 2 and halves[0] == halves[1]):
            return (f"activation {activation!r} on a column-parallel layer needs two equal output partitions "
                    f"[gate, up], got {halves}")
        if sum(halves) % 2:
            return f"activation {activation!r} needs an even number of outputs [gate | up], got {sum(halves)}"
        return None

    def set_activation(self, activation: str) -> None:
        """Have ``apply`` compute ``activation`` in the op's epilogue ("none" or one of the
        method's ``fused_activations``); a finalised layer's method may lay its tensors out for it
        (its ``process_activation``, where it has one)."""
        problem = self.activation_problem(activation)
        if problem is not None:
            raise ValueError(problem)
        self.activation = activation
        if self.finalised and hasattr(self.quant_method, "process_activation"):
            self.quant_method.process_activation(self)

    def set_input_scale(self, scale: torch.Tensor) -> None:
        """Multiply inputs by ``scale`` (per input channel) before ``apply``: AWQ's scales
        where no preceding op can absorb them."""
        if scale.shape != (self.input_size_per_partition,):
            raise ValueError(f"input scale has shape {tuple(scale.shape)}, expected ({self.input_size_per_partition},)")
        self.input_scale = scale.to(self.params_dtype)

    def extra_repr(self) -> str:
        method = type(self.quant_method).__name__
        parts = f"in={self.input_size}, out={self.output_partition_sizes}, method={method}"
        if self.activation != "none":
            parts += f", activation={self.activation}"
        if self.tp_size > 1:
            parts += f", {self.parallel} rank {self.tp_rank}/{self.tp_size}"
        return parts


def _take_slice(layer, tensor, dim, width, param):
    """This rank's slice of a whole (unsplit) checkpoint tensor."""
    if tensor.shape[dim] != width * layer.tp_size:
        raise ValueError(
            f"{_param_name(layer, param)}: checkpoint tensor has {tensor.shape[dim]} along dim {dim}; "
            f"expected {width * layer.tp_size} to split in {layer.tp_size} slices of {width}"
        )
    return tensor.narrow(dim, layer.tp_rank * width, width)


def _param_name(layer: nn.Module, param: Parameter) -> str:
    for name, p in layer.named_parameters(recurse=False):
        if p is param:
            return f"{type(layer.quant_method).__name__} parameter {name!r}"
    return "parameter"


def _checkpoint_layout_state_dict(module: QuantLinear, state_dict, prefix, local_metadata):
    """state_dict() always shows the checkpoint layout, whatever the kernels run on."""
    to_checkpoint = getattr(module.quant_method, "checkpoint_tensors", None)
    if not module.finalised or to_checkpoint is None:
        return state_dict
    runtime = [name for name, _ in module.named_parameters(recurse=False) if name != "bias"]
    for name in runtime:
        state_dict.pop(prefix + name, None)
    for name, tensor in to_checkpoint(module).items():
        state_dict[prefix + name] = tensor
    return state_dict

