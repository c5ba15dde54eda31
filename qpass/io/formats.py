"""``config.json``'s ``quantization_config``: what qpass writes, and how a checkpoint's
config (qpass's own, AutoAWQ's, GPTQ's) becomes the arguments of ``qpass.api.skeleton``.

What qpass writes, for the method most of the linears use (the *headline*):

- awq: AutoAWQ's fields ``quant_method: "awq"``, ``bits``, ``group_size``, ``zero_point``,
  ``version: "gemm"``; tensors ``<linear>.qweight`` int32 ``[K, N/8]``, ``.qzeros`` int32
  ``[K/G, N/8]``, ``.scales`` ``[K/G, N]`` (what AutoAWQ, transformers and vLLM read).
- gptq: GPTQ's fields ``quant_method: "gptq"``, ``bits``, ``group_size``, ``desc_act``,
  ``sym``, ``checkpoint_format: "gptq"``; tensors as the gptq method's checkpoint layout
  (``qweight`` ``[K/8, N]``, ``qzeros``, ``scales``, ``g_idx``).
- any other method (int8, fp8): ``quant_method: "qpass"``, ``method`` and the method's
  options; tensors are the method's own parameters under the original linear's name
  (int8: ``<linear>.qweight`` int8 ``[N, K]`` and ``<linear>.scales`` ``[N]``; fp8:
  ``.qweight`` float8_e4m3fn ``[N, K]`` and ``.weight_scale`` float32 ``[N]``). For a
  peer-readable int8/fp8 checkpoint save with ``format="compressed-tensors"``.

Always, ``modules_to_not_convert`` lists the linears kept in float, and the ``qpass``
field records every linear's method and options (``None`` for float), so that mixed
methods (overrides) and per-layer group sizes round-trip exactly; peers ignore it.
"""

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from qpass.methods.base import QuantConfig, get_config

QPASS_FIELD = "qpass"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file and the tensor."""


def layer_record(config: Optional[QuantConfig]) -> Optional[Dict[str, Any]]:
    """One linear's entry in the ``qpass`` field: its method and options, or None (float)."""
    if config is None:
        return None
    return {"method": config.name, **dataclasses.asdict(config)}


def quantization_config(layers: Mapping[str, Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """``quantization_config`` for a model whose original linears have ``layers`` records."""
    quantized = [json.dumps(r, sort_keys=True) for r in layers.values() if r is not None]
    if not quantized:
        raise ValueError("the model has no quantized linear: nothing for a quantization_config to describe")
    headline = json.loads(Counter(quantized).most_common(1)[0][0])
    method = headline.pop("method")
    return {
        **_headline_fields(method, headline),
        "modules_to_not_convert": sorted(name for name, r in layers.items() if r is None),
        QPASS_FIELD: {"format_version": FORMAT_VERSION, "method": method, "options": headline, "layers": dict(layers)},
    }


def _headline_fields(method: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    if method == "awq":
        return {"quant_method": "awq", "bits": options["bits"], "group_size": options["group_size"],
                "zero_point": options["zero_point"], "version": "gemm"}
    if method == "gptq":
        return {"quant_method": "gptq", "bits": options["bits"], "group_size": options["group_size"],
                "desc_act": options["desc_act"], "sym": options["sym"], "checkpoint_format": "gptq"}
    return {"quant_method": "qpass", "method": method, **options}


@dataclass
class Recipe:
    """How to build the skeleton a checkpoint loads into."""

    method: str
    options: Dict[str, Any]
    skip: List[str] = field(default_factory=list)
    overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    float_checkpoint: bool = False  # tensors are the float model's ``<linear>.weight``
    layers: Optional[Dict[str, Optional[Dict[str, Any]]]] = None  # qpass's per-linear records


def exact_pattern(name: str) -> str:
    """An fnmatch pattern matching ``name`` only (brackets quote the wildcards)."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def recipe_for(
    config_file: str,
    qconfig: Optional[Mapping[str, Any]],
    linear_names: Sequence[str],
    keys: Sequence[str],
    method: Optional[str],
    options: Mapping[str, Any],
    skip: Sequence[str],
    overrides: Optional[Mapping[str, Mapping[str, Any]]],
) -> Recipe:
    """The skeleton arguments for a checkpoint: from its ``quantization_config``, or for
    a float checkpoint (none) from the caller's ``method``, options, skip and overrides."""
    if qconfig is None:
        if method is None:
            raise CheckpointError(
                f"{config_file}: no quantization_config, so this is a float checkpoint: pass method= "
                "(and its options) to quantize it while loading"
            )
        return Recipe(method, dict(options), list(skip), dict(overrides or {}), float_checkpoint=True)
    if not isinstance(qconfig, Mapping):
        raise CheckpointError(f"{config_file}: quantization_config must be an object, got {type(qconfig).__name__}")
    if skip or overrides or options:
        raise CheckpointError(
            f"{config_file}: the checkpoint is quantized; its quantization_config decides methods and options, "
            "so skip=, overrides= and method options cannot be given"
        )
    if QPASS_FIELD in qconfig:
        recipe = _qpass_recipe(config_file, qconfig[QPASS_FIELD], linear_names)
    else:
        recipe = _peer_recipe(config_file, qconfig, linear_names, keys)
    if method is not None and method != recipe.method:
        raise CheckpointError(f"{config_file}: the checkpoint is quantized with {recipe.method!r}, not {method!r}")
    return recipe


def _qpass_recipe(config_file: str, record: Any, linear_names: Sequence[str]) -> Recipe:
    try:
        version, method, options, layers = (record["format_version"], record["method"], record["options"],
                                            record["layers"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{config_file}: quantization_config.{QPASS_FIELD} lacks {err}") from None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{config_file}: qpass format_version {version!r}; this qpass reads {FORMAT_VERSION}")
    if not isinstance(layers, dict):
        raise CheckpointError(f"{config_file}: quantization_config.{QPASS_FIELD}.layers must be an object")
    unknown = sorted(set(layers) - set(linear_names))
    absent = sorted(set(linear_names) - set(layers))
    if unknown or absent:
        raise CheckpointError(
            f"{config_file}: the config's layers do not match the model's linears: "
            f"{_few(unknown)} not in the model, {_few(absent)} not in the config"
        )
    headline = {"method": method, **options}
    skip = [exact_pattern(n) for n, r in layers.items() if r is None]
    overrides = {exact_pattern(n): r for n, r in layers.items() if r is not None and r != headline}
    for name, r in overrides.items():
        if not isinstance(r, dict) or "method" not in r:
            raise CheckpointError(f"{config_file}: layer {name!r}: record {r!r} has no method")
    return Recipe(method, dict(options), skip, overrides, layers=layers)


def _peer_recipe(config_file: str, qconfig: Mapping[str, Any], linear_names: Sequence[str],
                 keys: Sequence[str]) -> Recipe:
    """AutoAWQ / GPTQ configs: the method's options are the config's fields of the same
    name; the linears kept in float are those stored as ``<name>.weight`` (peers list
    them in modules_to_not_convert only sometimes)."""
    quant_method = qconfig.get("quant_method")
    if quant_method == "awq" and str(qconfig.get("version", "gemm")).lower() != "gemm":
        raise CheckpointError(f"{config_file}: AWQ version {qconfig['version']!r}: qpass reads the GEMM layout only")
    if quant_method == "gptq" and qconfig.get("checkpoint_format", "gptq") != "gptq":
        raise CheckpointError(
            f"{config_file}: GPTQ checkpoint_format {qconfig['checkpoint_format']!r}: qpass reads 'gptq' only")
    if quant_method not in ("awq", "gptq"):
        raise CheckpointError(f"{config_file}: quant_method {quant_method!r} is not one qpass reads "
                              "(awq, gptq, compressed-tensors, or a qpass checkpoint)")
    cls = type(get_config(quant_method))
    options = {f.name: qconfig[f.name] for f in dataclasses.fields(cls) if f.name in qconfig}
    key_set = set(keys)
    float_layers = [n for n in linear_names if f"{n}.weight" in key_set and f"{n}.qweight" not in key_set]
    return Recipe(quant_method, options, [exact_pattern(n) for n in float_layers])


def _few(names: Sequence[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
