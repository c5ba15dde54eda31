"""Method configs and the registry that maps a method name to its config class.

A method is one file in ``qpass/methods``: a frozen dataclass config registered with
:func:`register_method`, and the ``LinearMethodBase`` it builds. Every module of this
package is imported on first lookup, so adding a method touches nothing else.
"""

import dataclasses
import importlib
import pkgutil
import typing
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple, Type

import torch
from torch.nn import Parameter

from qpass.kernels.reference import gate_up_halves, gate_up_runs, tile_word_columns, word_rows
from qpass.layers.quantize_base import LinearMethodBase
from qpass.layers.utils import set_weight_attrs
from qpass.ops import FUSED_ACTIVATIONS

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_REGISTRY: Dict[str, Type["QuantConfig"]] = {}


class QuantConfig:
    """Base of every method's config: a frozen dataclass whose fields are its options."""

    name: ClassVar[str]

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "QuantConfig":
        """Build a config from keyword options, checking each name and type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ValueError(
                f"method {cls.name!r} has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {', '.join(sorted(fields)) or '(none)'}"
            )
        hints = typing.get_type_hints(cls)
        for key, value in options.items():
            expected = hints[key]
            ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
            if not ok:
                raise TypeError(
                    f"option {key!r} of method {cls.name!r} must be {expected.__name__}, "
                    f"got {type(value).__name__} {value!r}"
                )
        config = cls(**options)
        config.validate()
        return config

    def validate(self) -> None:
        """Check option values; raise ValueError naming the option and what is allowed."""

    def for_layer(self, name: str, in_features: int, out_features: int) -> Tuple[Optional["QuantConfig"], str]:
        """The config to use for one linear, or None to keep it in float; and a log line
        saying what was changed and why ("" when nothing was)."""
        return self, ""

    def get_linear_method(self) -> LinearMethodBase:
        raise NotImplementedError

    def calibrate(self, model, plan, calib, device=None):
        """A ``qpass.calib.base.Calibration`` for the plan's linears from the batches ``calib``
        (None when the user gave none), computed on ``device`` if given; methods without
        calibration return None."""
        return None


class OpLinearMethod(LinearMethodBase):
    """Base of the methods whose ``apply`` is one ``torch.ops.qpass`` op: the op computes the
    epilogues (``QuantLinear.activation``) and takes a bias shaped as its output, the residual
    that the lowering folds into it."""

    fused_activations = FUSED_ACTIVATIONS
    residual_bias = True

    def __init__(self, quant_config: QuantConfig):
        self.quant_config = quant_config


class W4A16LinearMethod(OpLinearMethod):
    """Base of the methods whose runtime tensors are the W4A16 op's (``qweight`` ``[K / 8, N]``, ``scales`` and
    ``zeros`` ``[K / group_size, N]``). Under "silu_mul" their columns go in alternating runs of
    ``gate_up_run`` gate and up columns (``layer.up_run``, which ``apply`` passes to the op): the batch-1 GEMV
    then reads a program's gate and up columns as one 128-byte run a word row, not two 64-byte halves of two
    (the decode step's gate_up op 22.3 -> 19.2 us, H200, bench/NOTES-kernels.md, thirty-fifth session).
    ``qweight``'s words then go in column tiles (``reference.tile_word_columns``), each tile's words one run:
    the warp-level MMA kernel pulls a warp's next words into L2 with one bulk prefetch (the decode step at
    16 rows 1060.8 -> 1017.7 us, H200, forty-third session).
    ``checkpoint_tensors`` gives them back as ``[K / 8, N]`` and ``[gate | up]`` (``columns_as_halves``)."""

    gate_up_run = 16  # the GEMV's tile under "silu_mul": 16 output columns, 16 gate and 16 up weight columns
    runtime_columns = ("qweight", "scales", "zeros")

    def process_activation(self, layer: torch.nn.Module, current_run: Optional[int] = None) -> None:
        """Lay the runtime tensors out for ``layer.activation``, ``qweight``'s words in column tiles:
        ``QuantLinear.set_activation`` calls this on a finalised layer, ``process_weights_after_loading`` at its
        end on tensors just repacked (``[K / 8, N]``, ``current_run`` 0: ``[gate | up]``). A layer with a bias
        keeps its halves (the bias is the layer's, loaded as they are)."""
        n = layer.scales.shape[1]
        fits = n % (2 * self.gate_up_run) == 0 and layer.bias is None
        run = self.gate_up_run if layer.activation == "silu_mul" and fits else 0
        current = layer.up_run if current_run is None else current_run
        for name in self.runtime_columns:
            param = getattr(layer, name)
            if run != current:
                param.data = gate_up_runs(gate_up_halves(word_rows(param.data), current), run)
            if name == "qweight":
                param.data = tile_word_columns(param.data)
        layer.up_run = run

    def columns_as_halves(self, layer: torch.nn.Module, runtime: torch.Tensor) -> torch.Tensor:
        """A runtime tensor of ``layer`` as ``[rows, N]`` with its columns as ``[gate | up]``, as the checkpoint
        has them."""
        return gate_up_halves(word_rows(runtime), layer.up_run)


def register_method(name: str):
    """Class decorator: make a config class available as ``qpass.quantize(model, name)``."""

    def register(cls: Type[QuantConfig]) -> Type[QuantConfig]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def _import_builtin_methods() -> None:
    package = importlib.import_module("qpass.methods")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"qpass.methods.{info.name}")


def method_names() -> Tuple[str, ...]:
    _import_builtin_methods()
    return tuple(sorted(_REGISTRY))


def get_config(method: str, options: Optional[Mapping[str, Any]] = None) -> QuantConfig:
    """The validated config of ``method`` with ``options``."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a name such as 'awq', got {type(method).__name__}")
    known = method_names()
    if method not in _REGISTRY:
        raise ValueError(f"unknown quantization method {method!r}; known methods: {', '.join(known)}")
    return _REGISTRY[method].from_options(dict(options or {}))


def register_per_channel_weights(layer: torch.nn.Module, out_features: int, in_features: int,
                                 weight_dtype: torch.dtype, scale_name: str, scale_dtype: torch.dtype,
                                 extra_weight_attrs: Mapping[str, Any]) -> None:
    """``qweight`` ``[out, in]`` of ``weight_dtype`` and one scale per output channel,
    the layout of the per-channel methods (int8, fp8), with their loader metadata."""
    qweight = Parameter(torch.empty(out_features, in_features, dtype=weight_dtype), requires_grad=False)
    scale = Parameter(torch.empty(out_features, dtype=scale_dtype), requires_grad=False)
    set_weight_attrs(qweight, {"input_dim": 1, "output_dim": 0})
    set_weight_attrs(scale, {"output_dim": 0})
    for name, param in (("qweight", qweight), (scale_name, scale)):
        set_weight_attrs(param, extra_weight_attrs)
        layer.register_parameter(name, param)
