"""``qpass.load``: fill a fresh skeleton of the model from a checkpoint, tensor by tensor.

Only ``config.json``, ``model.safetensors.index.json`` (JSON) and safetensors files are
read. Each tensor is read from its memory-mapped file when it is loaded and handed to its
parameter's ``weight_loader``, so peak memory is the quantized model plus one tensor.
Everything is loaded into a new model built by ``qpass.api.skeleton`` (the caller's
model, which may be on the meta device, is never changed): an error leaves nothing
half-loaded, and names the file and the tensor.
"""

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from torch import nn

from qpass.api import lower_graph, skeleton
from qpass.io.formats import CheckpointError, Recipe, layer_record, recipe_for
from qpass.io.save import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, stub_config
from qpass.layers.linear import QuantLinear
from qpass.layers.quantize_base import UnquantizedLinearMethod
from qpass.passes.capture import symbolic_graph
from qpass.passes.finalise import finalise
from qpass.passes.load import load_float_shard
from qpass.passes.plan import find_sites, matches

# Float dtypes a checkpoint tensor may be cast between (as load_state_dict does); any
# other difference of dtype (int4 packed in int32, int8, float8) is an error.
CASTABLE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# A reader gives one original linear's checkpoint tensors for the stub's parameters:
# reader(linear name, parameter names, files) -> {parameter: (key for messages, tensor)}
Reader = Callable[[str, Sequence[str], "CheckpointFiles"], Dict[str, Tuple[str, torch.Tensor]]]


def load(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    method: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    skip: Sequence[str] = (),
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
    merge: bool = True,
    tp_rank: int = 0,
    tp_size: int = 1,
    tp_plan: Optional[Mapping[str, str]] = None,
    **options: Any,
) -> nn.Module:
    """The quantized model of ``model``'s architecture with the checkpoint at ``path``.

    - A quantized checkpoint (qpass, AutoAWQ GEMM, GPTQ, compressed-tensors) decides the
      methods from its config.json; ``model`` only gives the structure (meta is fine).
    - A float checkpoint (no quantization_config) is quantized tensor by tensor with
      ``method``, its ``options``, ``skip`` and ``overrides``, as ``qpass.quantize`` would.
    - ``device``: where the loaded tensors go (default: the model's, or the CPU for meta).
    - ``tp_rank``/``tp_size``/``tp_plan``: load one tensor-parallel rank. ``tp_plan`` maps
      layer patterns to "column" or "row"; matching stubs hold only this rank's slice,
      everything else is loaded whole. Running a rank needs the serving engine's
      collectives (gather for column, all-reduce for row).
    """
    folder = Path(path)
    with CheckpointFiles(folder) as files:
        config_file = folder / CONFIG_FILE
        qconfig = read_json(config_file).get("quantization_config") if config_file.exists() else None
        linear_names = linear_site_names(model, merge)
        reader: Reader = native_tensors
        if isinstance(qconfig, Mapping) and qconfig.get("quant_method") == "compressed-tensors":
            from qpass.io.compressed_tensors import compressed_recipe, compressed_tensors

            if skip or overrides or options or method not in (None, "awq"):
                raise CheckpointError(f"{config_file}: a compressed-tensors checkpoint loads as awq, as its config "
                                      "says: method=, skip=, overrides= and options cannot be given")
            recipe, reader = compressed_recipe(str(config_file), qconfig, linear_names, files.keys()), compressed_tensors
        else:
            recipe = recipe_for(str(config_file), qconfig, linear_names, files.keys(), method, options, skip, overrides)
        device = torch.device(device) if device is not None else model_device(model)
        new = skeleton(model, recipe.method, skip=recipe.skip, overrides=recipe.overrides, merge=merge,
                       device=device, **recipe.options)
        if tp_size != 1 or tp_plan:
            parallelise(new, tp_plan or {}, tp_rank, tp_size, device)
        stubs = {name: m for name, m in new.named_modules() if isinstance(m, QuantLinear)}
        check_layers(str(config_file), stubs, recipe)
        aliases = tie_aliases(model)
        for stub in stubs.values():
            load_stub(stub, files, recipe, reader, aliases)
        load_other_tensors(new, stubs, files, aliases, device)
        files.check_all_read()
    retie(new, aliases)
    check_nothing_on_meta(new, folder)
    return lower_graph(finalise(new))


class CheckpointFiles:
    """The checkpoint's safetensors files, open memory-mapped; tracks which keys were read."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.file_of: Dict[str, str] = {}
        self.listing = folder  # the index, or the one file: what a missing tensor is missing from
        self.read: set = set()
        self._stack = contextlib.ExitStack()
        self._handles: Dict[str, Any] = {}

    def __enter__(self) -> "CheckpointFiles":
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _open(self) -> None:
        index_file = self.folder / INDEX_FILE
        if index_file.exists():
            self.listing = index_file
            index = read_json(index_file)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_file}: weight_map must map tensor names to file names")
            for name in sorted(set(weight_map.values())):
                if Path(name).name != name or not name.endswith(".safetensors"):
                    raise CheckpointError(f"{index_file}: {name!r} is not a safetensors file name in the folder")
            files = {name: [k for k, v in weight_map.items() if v == name] for name in sorted(set(weight_map.values()))}
        elif (self.folder / SINGLE_FILE).exists():
            self.listing = self.folder / SINGLE_FILE
            files = {SINGLE_FILE: None}
        else:
            raise CheckpointError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}")
        for name, listed in files.items():
            file = self.folder / name
            try:
                handle = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                keys = list(handle.keys())
            except Exception as err:  # safetensors raises its own error types for every corruption
                raise CheckpointError(f"{file}: not a readable safetensors file: {err}") from None
            if listed is not None and set(keys) != set(listed):
                extra, absent = sorted(set(keys) - set(listed)), sorted(set(listed) - set(keys))
                raise CheckpointError(f"{file}: tensors do not match {INDEX_FILE}: not indexed {extra[:5]}, "
                                      f"indexed but absent {absent[:5]}")
            self._handles[name] = handle
            self.file_of.update({k: name for k in keys})

    def keys(self) -> List[str]:
        return list(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def where(self, key: str) -> str:
        return str(self.folder / self.file_of[key]) if key in self.file_of else str(self.folder)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.file_of:
            raise CheckpointError(f"{self.listing}: the checkpoint has no tensor {key!r}")
        try:
            tensor = self._handles[self.file_of[key]].get_tensor(key)
        except Exception as err:
            raise CheckpointError(f"{self.where(key)}: tensor {key!r} cannot be read: {err}") from None
        self.read.add(key)
        return tensor

    def check_all_read(self) -> None:
        unread = sorted(set(self.file_of) - self.read)
        if unread:
            raise CheckpointError(
                f"{self.where(unread[0])}: unexpected tensor {unread[0]!r}: the model has no place for it"
                + (f" (and {len(unread) - 1} more: {unread[1:6]})" if len(unread) > 1 else "")
            )


def read_json(file: Path) -> Dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def linear_site_names(model: nn.Module, merge: bool) -> List[str]:
    """The original linears' names, found as ``skeleton`` finds them."""
    graph = symbolic_graph(model) if merge else None
    return [site.name for site in find_sites(model, graph, graph is not None)]


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def parallelise(model: nn.Module, tp_plan: Mapping[str, str], tp_rank: int, tp_size: int, device) -> None:
    """Replace the stubs that ``tp_plan`` names by this rank's column- or row-parallel stubs."""
    if tp_size > 1 and not tp_plan:
        raise ValueError("tp_size > 1 needs tp_plan: layer patterns -> 'column' or 'row'")
    for path, stub in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]:
        names = [path, *stub.shard_names]
        style = next((s for pattern, s in tp_plan.items() if any(matches(n, [pattern]) for n in names)), None)
        if style is None:
            continue
        with torch.device(device):
            ranked = QuantLinear(stub.input_size, stub.output_partition_sizes, stub.bias is not None, stub.params_dtype,
                                 stub.quant_method, shard_names=stub.shard_names, parallel=style,
                                 tp_rank=tp_rank, tp_size=tp_size)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, ranked)


def check_layers(config_file: str, stubs: Dict[str, QuantLinear], recipe: Recipe) -> None:
    """Each linear got the method and options the config records for it."""
    if recipe.layers is None:
        return
    for path, stub in stubs.items():
        built = layer_record(stub_config(stub, path))
        for name in stub.shard_names:
            if built != recipe.layers.get(name):
                raise CheckpointError(f"{config_file}: layer {name!r} is recorded as {recipe.layers.get(name)} "
                                      f"but the model's shapes give {built}")


def native_tensors(name: str, param_names: Sequence[str], files: CheckpointFiles) -> Dict[str, Tuple[str, torch.Tensor]]:
    """Tensors stored under the stub's own parameter names: ``<linear>.<parameter>``."""
    return {p: (f"{name}.{p}", files.get(f"{name}.{p}")) for p in param_names}


def load_stub(stub: QuantLinear, files: CheckpointFiles, recipe: Recipe, reader: Reader,
              aliases: Dict[str, List[str]]) -> None:
    params = dict(stub.named_parameters(recurse=False))
    from_float = recipe.float_checkpoint or isinstance(stub.quant_method, UnquantizedLinearMethod)
    per_input: Dict[str, Tuple[str, torch.Tensor]] = {}
    for shard, name in enumerate(stub.shard_names):
        if from_float:
            load_float_linear(stub, shard, name, files, aliases)
            continue
        tensors = reader(name, [p for p in params if p != "bias"], files)
        if stub.bias is not None:
            tensors["bias"] = (f"{name}.bias", files.get(f"{name}.bias"))
        for pname, (key, tensor) in tensors.items():
            param = params[pname]
            check_dtype(files, key, tensor, param.dtype)
            if len(stub.shard_names) > 1 and getattr(param, "output_dim", None) is None:
                check_same_for_every_shard(files, key, tensor, per_input.setdefault(pname, (key, tensor)))
            try:
                param.weight_loader(param, tensor, shard)
            except (ValueError, TypeError, KeyError) as err:
                raise CheckpointError(f"{files.where(key)}: tensor {key!r}: {err} "
                                      "(does config.json's quantization_config match the tensors?)") from None
    load_input_scale(stub, files)


def load_float_linear(stub: QuantLinear, shard: int, name: str, files: CheckpointFiles,
                      aliases: Dict[str, List[str]]) -> None:
    key = resolve(f"{name}.weight", files, aliases)
    weight = files.get(key)
    check_dtype(files, key, weight, stub.params_dtype)
    bias = None
    if stub.bias is not None:
        bias = files.get(f"{name}.bias")
        check_dtype(files, f"{name}.bias", bias, stub.params_dtype)
    try:
        load_float_shard(stub, shard, weight, bias)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{files.where(key)}: tensor {key!r}: {err}") from None


def load_input_scale(stub: QuantLinear, files: CheckpointFiles) -> None:
    """qpass's per-input AWQ scales of a stub (``<linear>.input_scale``), if saved."""
    keys = [f"{name}.input_scale" for name in stub.shard_names]
    present = [k for k in keys if k in files]
    if not present:
        return
    if len(present) != len(keys):
        raise CheckpointError(f"{files.where(present[0])}: tensor {present[0]!r}: the merged linears "
                              f"{stub.shard_names} must all have an input_scale or none")
    first = files.get(keys[0])
    for key in keys[1:]:
        check_same_for_every_shard(files, key, files.get(key), (keys[0], first))
    check_dtype(files, keys[0], first, stub.params_dtype)
    try:
        stub.set_input_scale(first.to(next(stub.parameters()).device))
    except ValueError as err:
        raise CheckpointError(f"{files.where(keys[0])}: tensor {keys[0]!r}: {err}") from None


def check_same_for_every_shard(files, key, tensor, first: Tuple[str, torch.Tensor]) -> None:
    """A merged stub holds one copy of a per-input tensor (g_idx, input scales): the
    linears it merges must agree on it."""
    first_key, first_tensor = first
    if first_key != key and (first_tensor.shape != tensor.shape or not torch.equal(first_tensor, tensor)):
        raise CheckpointError(f"{files.where(key)}: tensor {key!r} differs from {first_key!r}, and qpass merged "
                              "the two linears into one stub; load with merge=False")


def check_dtype(files: CheckpointFiles, key: str, tensor: torch.Tensor, expected: torch.dtype) -> None:
    if tensor.dtype != expected and not (tensor.dtype in CASTABLE_FLOATS and expected in CASTABLE_FLOATS):
        raise CheckpointError(f"{files.where(key)}: tensor {key!r} has dtype {tensor.dtype}, expected {expected}")


def tie_aliases(model: nn.Module) -> Dict[str, List[str]]:
    """name -> the other names of the same parameter (tied weights), from the caller's model."""
    names_of: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    return {name: [n for n in names if n != name] for names in names_of.values() if len(names) > 1 for name in names}


def resolve(key: str, files: CheckpointFiles, aliases: Dict[str, List[str]]) -> str:
    """``key``, or the name it is tied to where the checkpoint stores it under that name."""
    if key in files:
        return key
    return next((alias for alias in aliases.get(key, ()) if alias in files), key)


def load_other_tensors(model: nn.Module, stubs: Dict[str, QuantLinear], files: CheckpointFiles,
                       aliases: Dict[str, List[str]], device: torch.device) -> None:
    """Norms, embeddings, persistent buffers: assigned (the skeleton's may be on meta);
    a tensor shared by several names gets one new tensor for all of them."""
    inside_stub = tuple(f"{p}." for p in stubs)
    assigned: Dict[int, torch.Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        if prefix in stubs or prefix.startswith(inside_stub):
            continue
        dot = f"{prefix}." if prefix else ""
        for name, current in list(module._parameters.items()):
            if current is not None:
                if id(current) not in assigned:
                    value = checkpoint_value(files, resolve(dot + name, files, aliases), current, device)
                    assigned[id(current)] = nn.Parameter(value, requires_grad=current.requires_grad)
                module._parameters[name] = assigned[id(current)]
        for name, current in list(module._buffers.items()):
            if current is not None and name not in module._non_persistent_buffers_set:
                if id(current) not in assigned:
                    assigned[id(current)] = checkpoint_value(files, resolve(dot + name, files, aliases), current, device)
                module._buffers[name] = assigned[id(current)]


def checkpoint_value(files: CheckpointFiles, key: str, current: torch.Tensor, device: torch.device) -> torch.Tensor:
    tensor = files.get(key)
    if tensor.shape != current.shape:
        raise CheckpointError(f"{files.where(key)}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                              f"the model expects {tuple(current.shape)}")
    check_dtype(files, key, tensor, current.dtype)
    return tensor.to(device=device, dtype=current.dtype)


def retie(model: nn.Module, aliases: Dict[str, List[str]]) -> None:
    """Tie again what the caller's model ties, where the skeleton split it (a float stub's
    weight tied to an embedding): every name then holds the first name's parameter."""
    params = dict(model.named_parameters(remove_duplicate=False))
    done = set()
    for name, others in aliases.items():
        group = [n for n in [name, *others] if n in params and n not in done]
        done.update(group)
        if len(group) < 2:
            continue
        source = params[group[0]]
        for other in group[1:]:
            if params[other] is not source and params[other].shape == source.shape and params[other].dtype == source.dtype:
                owner, _, leaf = other.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, leaf, source)


def check_nothing_on_meta(model: nn.Module, folder: Path) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CheckpointError(
            f"{folder}: {left[:5]} stay on the meta device: the checkpoint has no tensor for them (non-persistent "
            "buffers are not saved: build the model with its buffers on a real device, e.g. accelerate's "
            "init_empty_weights(include_buffers=False))"
        )
