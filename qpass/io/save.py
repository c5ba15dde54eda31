"""``qpass.save``: a quantized model as safetensors + ``config.json`` that peers read.

Every quantized stub is written in its method's checkpoint layout (``checkpoint_tensors``
unpacks the kernels' layout), split back into one set of tensors per original linear
(``<linear>.qweight``, ...), so a merged q/k/v stub saves as q_proj, k_proj and v_proj.
The split is generic: each parameter's ``output_dim``, ``packed_dim`` and
``packed_factor`` say where the shards lie. Everything else is saved as it is.
"""

import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Tuple, Union

import torch
from safetensors.torch import save_file
from torch import nn

from qpass.io.formats import layer_record, quantization_config
from qpass.layers.linear import QuantLinear
from qpass.layers.quantize_base import UnquantizedLinearMethod

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
PER_INPUT_BUFFERS = ("input_scale",)  # one value per input: the same for every shard


def save(model: nn.Module, path: Union[str, os.PathLike], *, max_shard_size: Union[int, str] = "5GB",
         format: str = "qpass") -> None:
    """Write ``model`` (the result of ``qpass.quantize`` or ``qpass.load``) to ``path``.

    - ``max_shard_size``: bytes (int) or a string such as "500MB"; above it the tensors are
      split over ``model-0000i-of-0000n.safetensors`` files with ``model.safetensors.index.json``.
    - ``format``: "qpass" (AutoAWQ/GPTQ conventions, see ``qpass.io.formats``) or
      "compressed-tensors" (the pack-quantized / int-quantized / float-quantized formats
      of compressed-tensors and vLLM).
    """
    stubs = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not stubs:
        raise ValueError(f"{type(model).__name__} has no qpass stubs: quantize it (qpass.quantize) before saving")
    layers = {shard: layer_record(stub_config(stub, path)) for path, stub in stubs.items() for shard in stub.shard_names}
    if format == "qpass":
        qconfig = quantization_config(layers)
        tensors = checkpoint_items(model, stubs)
    elif format == "compressed-tensors":
        from qpass.io.compressed_tensors import compressed_config, to_compressed

        qconfig = compressed_config(layers)
        tensors = to_compressed(checkpoint_items(model, stubs), layers)
    else:
        raise ValueError(f"format must be 'qpass' or 'compressed-tensors', got {format!r}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    write_shards(tensors, out, parse_size(max_shard_size))
    write_config(model, out, qconfig)


def stub_config(stub: QuantLinear, path: str):
    method = stub.quant_method
    if isinstance(method, UnquantizedLinearMethod):
        return None
    config = getattr(method, "quant_config", None)
    if config is None:
        raise TypeError(f"stub {path!r}: {type(method).__name__} has no quant_config to record in config.json")
    return config


def checkpoint_items(model: nn.Module, stubs: Dict[str, QuantLinear]) -> Iterator[Tuple[str, torch.Tensor]]:
    """(key, tensor) of the whole checkpoint, one stub at a time. A model tensor under
    several names (tied weights) is written once, under the first, as Hugging Face does:
    the loader ties it again from the model."""
    owned = {t.data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel()}
    seen = set()
    for key, tensor in _all_items(model, stubs):
        if tensor.data_ptr() in owned:  # computed tensors are never deduplicated: their memory is reused
            identity = (tensor.data_ptr(), tensor.shape, tensor.dtype)
            if identity in seen:
                continue
            seen.add(identity)
        yield key, tensor


def _all_items(model: nn.Module, stubs: Dict[str, QuantLinear]) -> Iterator[Tuple[str, torch.Tensor]]:
    inside_stub = tuple(f"{p}." for p in stubs)
    for prefix, module in model.named_modules():
        if prefix in stubs:
            yield from linear_tensors(module, prefix)
            continue
        if prefix.startswith(inside_stub):
            continue
        dot = f"{prefix}." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                yield dot + name, param.detach()
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield dot + name, buffer


def linear_tensors(stub: QuantLinear, path: str) -> Iterator[Tuple[str, torch.Tensor]]:
    """The stub's checkpoint tensors as ``<original linear>.<name>``, one set per shard."""
    if stub.tp_size != 1:
        raise ValueError(f"stub {path!r} is tensor-parallel rank {stub.tp_rank} of {stub.tp_size}: save the whole model")
    layout = checkpoint_params(stub)
    tensors = stub.state_dict()
    for name, tensor in tensors.items():
        if name in PER_INPUT_BUFFERS:
            for shard in stub.shard_names:
                yield f"{shard}.{name}", tensor.detach().clone()
            continue
        if name not in layout:
            raise ValueError(
                f"stub {path!r}: {type(stub.quant_method).__name__} gives tensor {name!r} that is not one of its "
                f"checkpoint parameters {sorted(layout)}; the method needs a checkpoint_tensors() to be saved"
            )
        if tuple(tensor.shape) != tuple(layout[name].shape):
            raise ValueError(f"stub {path!r}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"checkpoint layout says {tuple(layout[name].shape)}")
        for shard, part in zip(stub.shard_names, split_by_shard(tensor.detach(), layout[name], stub.output_partition_sizes)):
            yield f"{shard}.{name}", part
    missing = sorted(set(layout) - set(tensors))
    if missing:
        raise ValueError(f"stub {path!r}: state_dict lacks checkpoint tensors {missing}")


def checkpoint_params(stub: QuantLinear) -> Dict[str, nn.Parameter]:
    """The stub's parameters as first created (checkpoint layout, with their loading
    attributes), built on the meta device: finalised stubs hold the kernels' layout."""
    with torch.device("meta"):
        twin = QuantLinear(stub.input_size, stub.output_partition_sizes, stub.bias is not None, stub.params_dtype,
                           stub.quant_method, shard_names=stub.shard_names)
    return dict(twin.named_parameters(recurse=False))


def split_by_shard(tensor: torch.Tensor, param: nn.Parameter, sizes: List[int]) -> List[torch.Tensor]:
    """One tensor per shard: the shard's slice along ``output_dim`` (in packed units where
    the output dim is packed); tensors with no output dim (g_idx) go whole to every shard."""
    if len(sizes) == 1:
        return [tensor]
    dim = getattr(param, "output_dim", None)
    if dim is None:
        return [tensor.clone() for _ in sizes]
    factor = getattr(param, "packed_factor", 1) if getattr(param, "packed_dim", None) == dim else 1
    # clone: safetensors refuses views that share one storage
    return [part.clone() for part in tensor.split([s // factor for s in sizes], dim=dim)]


def write_shards(items: Iterator[Tuple[str, torch.Tensor]], out: Path, max_bytes: int) -> None:
    """Write the tensors in files of at most ``max_bytes`` (one tensor may exceed it alone),
    holding one file's tensors at a time. Files are written under temporary names and
    renamed once all are written, so a failed save leaves the folder's checkpoint as it was."""
    shards: List[Tuple[Path, List[str]]] = []
    current: Dict[str, torch.Tensor] = {}
    size = 0

    def flush():
        temp = out / f"model-{len(shards) + 1:05d}.safetensors.tmp"
        shards.append((temp, list(current)))
        save_file(current, str(temp), metadata={"format": "pt"})

    try:
        for key, tensor in items:
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_bytes:
                flush()
                current, size = {}, 0
            current[key] = tensor.contiguous()
            size += nbytes
        if current or not shards:
            flush()
    except BaseException:
        for temp, _ in shards:
            temp.unlink(missing_ok=True)
        raise
    for stale in [SINGLE_FILE, INDEX_FILE, *(p.name for p in out.glob("model-*-of-*.safetensors"))]:
        (out / stale).unlink(missing_ok=True)  # a stale shard or index would be read with the new files
    if len(shards) == 1:
        os.replace(shards[0][0], out / SINGLE_FILE)
        return
    weight_map, total = {}, 0
    for i, (temp, keys) in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(temp, out / name)
        weight_map.update({k: name for k in keys})
        total += (out / name).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))


def write_config(model: nn.Module, out: Path, qconfig: dict) -> None:
    """config.json: the model's Hugging Face config (if any) with the quantization_config."""
    hf_config = getattr(model, "config", None)
    fields = dict(hf_config.to_dict()) if hasattr(hf_config, "to_dict") else {}
    fields["quantization_config"] = qconfig
    (out / CONFIG_FILE).write_text(json.dumps(fields, indent=2, sort_keys=True, default=str))


_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size: Union[int, str]) -> int:
    """Bytes of an int or of "500MB", "2GiB"..."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        text = size.strip().upper()
        for unit in sorted(_UNITS, key=len, reverse=True):
            if text.endswith(unit):
                number = text[: -len(unit)].strip()
                try:
                    value = float(number) * _UNITS[unit]
                except ValueError:
                    break
                if value > 0:
                    return int(value)
                break
    raise ValueError(f"max_shard_size must be a positive number of bytes or a string like '5GB', got {size!r}")
