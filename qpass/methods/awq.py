"""AWQ: W4A16, int4 weights in groups along the input dimension with integer zero points.

Parameters are created in AutoAWQ's GEMM checkpoint layout (what AutoAWQ, vLLM and
transformers read and write), with K = in_features and N = out_features:

- ``qweight`` int32 ``[K, N // 8]``: eight int4 values of one row per word, columns
  ``8j .. 8j+7`` in the nibble order ``AWQ_PACK_ORDER``;
- ``qzeros`` int32 ``[K // G, N // 8]``: the zero points, packed the same way;
- ``scales`` ``[K // G, N]`` in the model dtype.

``process_weights_after_loading`` repacks them into the kernels' runtime layout
(``qpass.kernels.reference``); ``checkpoint_tensors`` gives the checkpoint layout back.
Without calibration data the weights are rounded to nearest; with it, the scales and
clipping of ``qpass.calib.awq`` choose what is rounded, and GPTQ's rounding (``rounding``)
how.
"""

import logging
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch
from torch.nn import Parameter

from qpass import ops
from qpass.calib.rtn import quantize_groupwise
from qpass.kernels.reference import pack_int4_rows, unpack_int4_rows
from qpass.layers.utils import set_weight_attrs
from qpass.methods.base import QuantConfig, W4A16LinearMethod, register_method

log = logging.getLogger("qpass")

# Nibble i of a packed word holds column AWQ_PACK_ORDER[i] of its block of eight.
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PACK_FACTOR = 8
MIN_GROUP_SIZE = 32
ROUNDINGS = ("gptq", "nearest")


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """int ``[R, N]`` of values 0..15 -> int32 ``[R, N // 8]`` in AutoAWQ's order."""
    r, n = q.shape
    blocks = q.to(torch.int32).reshape(r, n // PACK_FACTOR, PACK_FACTOR)[:, :, list(AWQ_PACK_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    return (blocks << shifts).sum(dim=-1, dtype=torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, N // 8]`` in AutoAWQ's order -> int32 ``[R, N]`` of values 0..15."""
    r, n8 = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF
    unordered = torch.empty_like(nibbles)
    unordered[:, :, list(AWQ_PACK_ORDER)] = nibbles
    return unordered.reshape(r, n8 * PACK_FACTOR)


def checkpoint_from_quantized(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                              dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """AWQ checkpoint tensors of ``q [N, K]`` (0..15), ``scales``/``zeros`` ``[N, K/G]``."""
    return {"qweight": pack_awq(q.t()), "qzeros": pack_awq(zeros.t()), "scales": scales.t().to(dtype).contiguous()}


@register_method("awq")
@dataclass(frozen=True)
class AWQConfig(QuantConfig):
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    # How calibrated weights meet the int4 grid that the scale and clipping searches chose:
    # "gptq" rounds them with GPTQ's error compensation (act-order over AWQ's own groups, so
    # the checkpoint is plain AWQ); "nearest" is AutoAWQ's rounding. On real models "gptq"
    # recovers more (bench/NOTES-calibration.md): all-MiniLM-L6-v2 0.985 against 0.974.
    rounding: str = "gptq"

    def validate(self) -> None:
        if self.bits != 4:
            raise ValueError(f"awq supports bits=4 only, got bits={self.bits}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"awq rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.group_size < MIN_GROUP_SIZE or self.group_size % PACK_FACTOR:
            raise ValueError(
                f"awq group_size must be a multiple of {PACK_FACTOR} and >= {MIN_GROUP_SIZE}, "
                f"got {self.group_size}"
            )

    def for_layer(self, name, in_features, out_features):
        if out_features % PACK_FACTOR:
            return None, f"{name}: kept in float: out_features {out_features} is not a multiple of {PACK_FACTOR}"
        return with_fitting_group_size(self, name, in_features)

    def get_linear_method(self) -> "AWQLinearMethod":
        return AWQLinearMethod(self)

    def calibrate(self, model, plan, calib, device=None):
        if calib is None:
            warn_uncalibrated_once("awq")
            return None
        from qpass.calib.awq import calibrate_awq

        return calibrate_awq(model, plan, calib, self, device)


_WARNED_UNCALIBRATED = set()


def warn_uncalibrated_once(method: str) -> None:
    """Say once per process that a calibrating method ran without data."""
    if method not in _WARNED_UNCALIBRATED:
        _WARNED_UNCALIBRATED.add(method)
        log.warning("qpass: %s without calibration data (calib=None): weights are rounded to nearest", method)


def fitting_group_size(group_size: int, in_features: int) -> Optional[int]:
    """The group size to use where ``group_size`` does not divide ``in_features``: halve it
    until it does (576 with 128 gives 64), stopping at MIN_GROUP_SIZE."""
    while group_size >= MIN_GROUP_SIZE:
        if in_features % group_size == 0:
            return group_size
        group_size //= 2
    return None


def with_fitting_group_size(config: QuantConfig, name: str, in_features: int) -> Tuple[Optional[QuantConfig], str]:
    """``for_layer``'s answer for a config with a ``group_size``: itself, a copy with the
    ``fitting_group_size`` of the layer's ``in_features``, or None (kept in float) where none fits;
    and the log line that says which."""
    group_size = fitting_group_size(config.group_size, in_features)
    if group_size is None:
        return None, (f"{name}: kept in float: in_features {in_features} has no group size "
                      f">= {MIN_GROUP_SIZE} that divides it (halving from {config.group_size})")
    if group_size != config.group_size:
        return (replace(config, group_size=group_size),
                f"{name}: group_size {config.group_size} does not divide in_features {in_features}; using {group_size}")
    return config, ""


class AWQLinearMethod(W4A16LinearMethod):
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: List[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        group_size = self.quant_config.group_size
        if input_size_per_partition % group_size:
            raise ValueError(
                f"awq: input size per partition {input_size_per_partition} is not a multiple of "
                f"group_size {group_size}"
            )
        for size in output_partition_sizes:
            if size % PACK_FACTOR:
                raise ValueError(f"awq: output partition size {size} is not a multiple of {PACK_FACTOR}")
        out = sum(output_partition_sizes)
        groups = input_size_per_partition // group_size
        packed = {"input_dim": 0, "output_dim": 1, "packed_dim": 1, "packed_factor": PACK_FACTOR}
        params = {
            "qweight": (torch.empty(input_size_per_partition, out // PACK_FACTOR, dtype=torch.int32), packed),
            "qzeros": (torch.empty(groups, out // PACK_FACTOR, dtype=torch.int32), packed),
            "scales": (torch.empty(groups, out, dtype=params_dtype), {"input_dim": 0, "output_dim": 1}),
        }
        for name, (data, attrs) in params.items():
            param = Parameter(data, requires_grad=False)
            set_weight_attrs(param, attrs)
            set_weight_attrs(param, extra_weight_attrs)
            layer.register_parameter(name, param)

    def quantize_weight(self, weight: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Checkpoint tensors of a float weight ``[N, K]`` by round-to-nearest."""
        cfg = self.quant_config
        q, scales, zeros = quantize_groupwise(weight, cfg.bits, cfg.group_size, symmetric=not cfg.zero_point)
        return checkpoint_from_quantized(q, scales, zeros, weight.dtype)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        q = unpack_awq(layer.qweight.data)
        zeros = unpack_awq(layer.qzeros.data).to(layer.scales.dtype)
        del layer.qweight, layer.qzeros
        layer.register_parameter("qweight", Parameter(pack_int4_rows(q), requires_grad=False))
        layer.register_parameter("zeros", Parameter(zeros, requires_grad=False))
        self.process_activation(layer, current_run=0)

    def checkpoint_tensors(self, layer: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """The checkpoint layout of a finalised layer (inverse of the repack above)."""
        return {
            "qweight": pack_awq(unpack_int4_rows(self.columns_as_halves(layer, layer.qweight.data))),
            "qzeros": pack_awq(self.columns_as_halves(layer, layer.zeros.data).to(torch.int32)),
            "scales": self.columns_as_halves(layer, layer.scales.data),
        }

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.w4a16_linear(
            x, layer.qweight, layer.scales, layer.zeros, self.quant_config.group_size, bias, layer.activation,
            up_run=layer.up_run
        )

    def apply_after_rms_norm(self, layer: torch.nn.Module, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``apply`` to the RMSNorm of x, computed by the op (``QuantLinear.forward``)."""
        return ops.w4a16_linear(
            x, layer.qweight, layer.scales, layer.zeros, self.quant_config.group_size, bias, layer.activation,
            norm_weight, eps, layer.up_run
        )
