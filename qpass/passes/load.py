"""Load: route tensors into the stubs through each parameter's ``weight_loader``.

Float weights are quantized on the way in by the method's ``quantize_weight`` (or taken
from calibration), then loaded shard by shard like a checkpoint's tensors. The same
route serves ``load_state_dict`` of the original model's float state dict on the
rewritten model, through the hooks installed by :func:`install_state_dict_hooks`.
"""

from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from qpass.layers.linear import QuantLinear
from qpass.layers.quantize_base import UnquantizedLinearMethod
from qpass.passes.finalise import finalise


def checkpoint_tensors_from_float(stub: QuantLinear, weight: torch.Tensor) -> Dict[str, torch.Tensor]:
    """What a checkpoint would hold for one float weight ``[out, in]`` under the stub's method."""
    method = stub.quant_method
    if isinstance(method, UnquantizedLinearMethod):
        return {"weight": weight}
    quantize_weight = getattr(method, "quantize_weight", None)
    if quantize_weight is None:
        raise TypeError(
            f"{type(method).__name__} has no quantize_weight: it loads pre-quantized checkpoints only, "
            "not float weights"
        )
    return quantize_weight(weight)


def load_shard(stub: QuantLinear, shard: int, tensors: Mapping[str, torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    """Load one shard's checkpoint tensors (and bias) through the weight loaders."""
    params = dict(stub.named_parameters(recurse=False))
    for name, tensor in tensors.items():
        if name not in params:
            raise KeyError(f"{type(stub.quant_method).__name__} has no parameter {name!r}; it has {sorted(params)}")
        params[name].weight_loader(params[name], tensor, shard)
    if bias is not None:
        stub.bias.weight_loader(stub.bias, bias, shard)


def load_float_shard(stub: QuantLinear, shard: int, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    with torch.no_grad():
        load_shard(stub, shard, checkpoint_tensors_from_float(stub, weight.detach()), bias)


FLOAT_KEYS_ATTR = "_qpass_float_keys"


def install_state_dict_hooks(model: nn.Module, stub_paths: List[str]) -> None:
    """Let ``model.load_state_dict`` take the original model's float state dict: each
    ``<linear>.weight`` / ``.bias`` goes to its stub's shard, quantized on the way in,
    and the stubs are finalised after the load."""
    float_keys = {}
    for path in stub_paths:
        stub = model.get_submodule(path)
        for shard, name in enumerate(stub.shard_names):
            if isinstance(stub.quant_method, UnquantizedLinearMethod) and name == path:
                continue  # its own keys are the original's: the stub loads them itself
            float_keys[f"{name}.weight"] = (path, shard, "weight")
            if stub.bias is not None:
                float_keys[f"{name}.bias"] = (path, shard, "bias")
    setattr(model, FLOAT_KEYS_ATTR, float_keys)
    if not getattr(model, "_qpass_hooks_installed", False):
        model.register_load_state_dict_pre_hook(_load_float_keys)
        model.register_load_state_dict_post_hook(_finalise_after_load)
        model._qpass_hooks_installed = True


def _load_float_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    float_keys = getattr(module, FLOAT_KEYS_ATTR, {})
    # A stub is fed from float when a float weight of it is present; its bias key alone is
    # ambiguous (a quantized checkpoint has "<name>.bias" too) and loads with the stub itself.
    fed = {path for key, (path, _, kind) in float_keys.items() if kind == "weight" and prefix + key in state_dict}
    by_stub: Dict[str, Dict[int, Dict[str, torch.Tensor]]] = {}
    for key, (path, shard, kind) in float_keys.items():
        if path in fed and prefix + key in state_dict:
            by_stub.setdefault(path, {}).setdefault(shard, {})[kind] = state_dict.pop(prefix + key)
    for path, shards in by_stub.items():
        stub = module.get_submodule(path)
        if stub.finalised:
            stub.reset_weights()
        stub._fed_from_float = True
        for shard, name in enumerate(stub.shard_names):
            tensors = shards.get(shard, {})
            if "weight" not in tensors:
                missing_keys.append(f"{prefix}{name}.weight")
                continue
            try:
                load_float_shard(stub, shard, tensors["weight"], tensors.get("bias"))
            except (ValueError, TypeError, KeyError) as err:
                error_msgs.append(f"{prefix}{name}: {err}")


def _finalise_after_load(module, incompatible_keys):
    finalise(module)
