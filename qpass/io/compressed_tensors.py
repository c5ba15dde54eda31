"""compressed-tensors' ``pack-quantized`` format (what llm-compressor writes and vLLM
serves), for 4-bit group-wise weights: converted to and from qpass's AWQ layout tensor by
tensor, so ``qpass.save(..., format="compressed-tensors")`` writes it and ``qpass.load``
reads it.

Per linear, with K inputs, N outputs and groups of G:

- ``weight_packed`` int32 ``[N, K/8]``: value + 8 of eight consecutive inputs per word,
  input ``8i + j`` in nibble ``j``;
- ``weight_scale`` ``[N, K/G]``;
- ``weight_zero_point`` int32 ``[N/8, K/G]``: zero point + 8, packed the same way along N
  (absent for symmetric schemes: zero point 0);
- ``weight_shape`` int64 ``[2]``: ``(N, K)``.

Stored nibbles are the unsigned int4 values AWQ stores, so ``(q - z) * s`` is the same
weight in both. Mixed methods other than awq are refused by the writer.
"""

import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from qpass.io.formats import CheckpointError, Recipe, exact_pattern
from qpass.methods.awq import pack_awq, unpack_awq

FORMAT = "pack-quantized"
SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)
TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def pack_sequential(values: torch.Tensor) -> torch.Tensor:
    """int ``[R, C]`` of 0..15 -> int32 ``[R, C/8]``, column ``8i + j`` in nibble ``j``."""
    r, c = values.shape
    return (values.to(torch.int32).reshape(r, c // 8, 8) << SHIFTS).sum(dim=-1, dtype=torch.int32)


def unpack_sequential(packed: torch.Tensor) -> torch.Tensor:
    r, c8 = packed.shape
    return ((packed.unsqueeze(-1) >> SHIFTS) & 0xF).reshape(r, c8 * 8)


def compressed_config(layers: Mapping[str, Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """The quantization_config compressed-tensors writes: one config group per distinct
    group size, targeting the linears by name; float linears in ``ignore``."""
    groups: Dict[int, List[str]] = {}
    for name, record in layers.items():
        if record is None:
            continue
        if record["method"] != "awq":
            raise ValueError(f"format='compressed-tensors' writes awq layers only; {name!r} is {record['method']}")
        groups.setdefault(record["group_size"], []).append(name)
    if not groups:
        raise ValueError("the model has no quantized linear: nothing for a quantization_config to describe")
    config_groups = {
        f"group_{i}": {
            "targets": names,
            "weights": {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group",
                        "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax"},
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
        for i, (group_size, names) in enumerate(sorted(groups.items()))
    }
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": sorted(n for n, r in layers.items() if r is None),
            "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {}}


def to_compressed(items: Iterator[Tuple[str, torch.Tensor]],
                  layers: Mapping[str, Optional[Dict[str, Any]]]) -> Iterator[Tuple[str, torch.Tensor]]:
    """qpass checkpoint items -> pack-quantized items, converting each quantized linear
    once its qweight, qzeros and scales have passed (a stub yields them together)."""
    pending: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in items:
        linear, _, leaf = key.rpartition(".")
        if layers.get(linear) is None or leaf in ("bias", "input_scale"):
            if leaf == "input_scale":
                raise ValueError(f"{key}: compressed-tensors has no input scales; save with format='qpass'")
            yield key, tensor
            continue
        parts = pending.setdefault(linear, {})
        parts[leaf] = tensor
        if len(parts) == 3:
            del pending[linear]
            for suffix, converted in awq_to_compressed(parts).items():
                yield f"{linear}.{suffix}", converted


def awq_to_compressed(parts: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    q = unpack_awq(parts["qweight"])  # [K, N]
    zeros = unpack_awq(parts["qzeros"])  # [K/G, N]
    return {
        "weight_packed": pack_sequential(q.t().contiguous()),
        "weight_scale": parts["scales"].t().contiguous(),
        "weight_zero_point": pack_sequential(zeros).t().contiguous(),
        "weight_shape": torch.tensor([q.shape[1], q.shape[0]], dtype=torch.int64),
    }


def compressed_recipe(config_file: str, qconfig: Mapping[str, Any], linear_names: Sequence[str],
                      keys: Sequence[str]) -> Recipe:
    """awq options per linear from the config groups: int, 4 bits, group strategy."""
    fmt = qconfig.get("format")
    if fmt != FORMAT:
        raise CheckpointError(f"{config_file}: compressed-tensors format {fmt!r}: qpass reads {FORMAT!r} only")
    ignore = qconfig.get("ignore") or []
    layers: Dict[str, Optional[Dict[str, Any]]] = {name: None for name in linear_names}
    for group_name, group in (qconfig.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        scheme = (weights.get("type"), weights.get("num_bits"), weights.get("strategy"))
        if scheme != ("int", 4, "group") or group.get("input_activations") or group.get("format", FORMAT) != FORMAT:
            raise CheckpointError(f"{config_file}: config group {group_name!r}: scheme {scheme}: qpass reads "
                                  "4-bit int group-wise weights with float activations only")
        for name in linear_names:
            if layers[name] is None and targets_match(name, group.get("targets", [])) and not targets_match(name, ignore):
                layers[name] = {"method": "awq", "bits": 4, "group_size": weights["group_size"], "zero_point": True}
    quantized = [r for r in layers.values() if r is not None]
    if not quantized:
        raise CheckpointError(f"{config_file}: no config group targets a linear of the model")
    headline = quantized[0]
    options = {k: v for k, v in headline.items() if k != "method"}
    return Recipe("awq", options, skip=[exact_pattern(n) for n, r in layers.items() if r is None],
                  overrides={exact_pattern(n): r for n, r in layers.items() if r is not None and r != headline})


def targets_match(name: str, targets: Sequence[str]) -> bool:
    """compressed-tensors' targets: "Linear" (every linear), "re:<regex>", or a name."""
    for target in targets:
        if target == "Linear" or target == name:
            return True
        if target.startswith("re:") and re.match(target[3:], name):
            return True
    return False


def compressed_tensors(name: str, param_names: Sequence[str], files) -> Dict[str, Tuple[str, torch.Tensor]]:
    """One linear's awq tensors (qweight, qzeros, scales) from its pack-quantized tensors."""
    if set(param_names) != {"qweight", "qzeros", "scales"}:
        raise CheckpointError(f"{files.listing}: {name!r}: compressed-tensors loads into awq parameters only")
    packed_key, scale_key, zero_key, shape_key = (f"{name}.{t}" for t in TENSORS)
    packed, scale = files.get(packed_key), files.get(scale_key)
    shape = files.get(shape_key)
    if packed.dtype != torch.int32 or packed.dim() != 2 or scale.dim() != 2:
        raise CheckpointError(f"{files.where(packed_key)}: tensor {packed_key!r}: expected int32 [N, K/8] with a 2-d "
                              f"scale, got {packed.dtype} {tuple(packed.shape)} and scale {tuple(scale.shape)}")
    n, k = packed.shape[0], packed.shape[1] * 8
    if shape.tolist() != [n, k]:
        raise CheckpointError(f"{files.where(shape_key)}: tensor {shape_key!r} says {shape.tolist()}, "
                              f"{packed_key!r} holds [{n}, {k}]")
    groups = scale.shape[1]
    if zero_key in files:
        zero_packed = files.get(zero_key)
        if zero_packed.dtype != torch.int32 or tuple(zero_packed.shape) != (n // 8, groups):
            raise CheckpointError(f"{files.where(zero_key)}: tensor {zero_key!r} has {zero_packed.dtype} "
                                  f"{tuple(zero_packed.shape)}, expected torch.int32 {(n // 8, groups)}")
        zeros = unpack_sequential(zero_packed.t().contiguous())  # [K/G, N]
    else:
        zeros = torch.full((groups, n), 8, dtype=torch.int32)  # symmetric: zero point 0, stored + 8
    return {
        "qweight": (packed_key, pack_awq(unpack_sequential(packed).t().contiguous())),
        "qzeros": (zero_key, pack_awq(zeros)),
        "scales": (scale_key, scale.t().contiguous()),
    }
