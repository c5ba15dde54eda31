"""GPTQ: W4A16, int4 weights chosen by GPTQ's error-compensating rounding (``qpass.calib.gptq``).

Parameters are created in the GPTQ checkpoint layout that AutoGPTQ and GPTQModel write
(their "gptq", a.k.a. v1, format) and vLLM/transformers read, with K = in_features and
N = out_features:

- ``qweight`` int32 ``[K // 8, N]``: packed along K, nibble j of word i = row 8i+j;
- ``qzeros`` int32 ``[K // G, N // 8]``: packed along N, nibble j of word i = column 8i+j,
  each holding the zero point **minus one** (v1; 7 for symmetric 4-bit, so
  ``0x77777777``). A zero point of 0 cannot be stored that way, so asymmetric groups
  here use zero points 1..15;
- ``scales`` ``[K // G, N]`` in the model dtype;
- ``g_idx`` int32 ``[K]``: the group of each input channel; ``k // G`` unless the
  weights were quantized in activation order (``desc_act``).

``w[k, n] = (q[k, n] - (qzeros[g_idx[k], n] + 1)) * scales[g_idx[k], n]``.

``process_weights_after_loading`` repacks into the kernels' W4A16 runtime layout
(``qpass.kernels.reference``); with act-order it sorts the rows by group and keeps the
permutation (``perm``), which ``apply`` applies to the input channels.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch.nn import Parameter

from qpass import ops
from qpass.calib.rtn import quantize_groupwise
from qpass.kernels.reference import pack_int4_rows, unpack_int4_rows
from qpass.layers.utils import set_weight_attrs
from qpass.methods.awq import MIN_GROUP_SIZE, PACK_FACTOR, warn_uncalibrated_once, with_fitting_group_size
from qpass.methods.base import QuantConfig, W4A16LinearMethod, register_method


def pack_columns(z: torch.Tensor) -> torch.Tensor:
    """int ``[R, N]`` of values 0..15 -> int32 ``[R, N // 8]``, nibble j = column 8i+j."""
    return pack_int4_rows(z.t()).t().contiguous()


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, N // 8]`` -> int32 ``[R, N]``; inverse of :func:`pack_columns`."""
    return unpack_int4_rows(packed.t().contiguous()).t().to(torch.int32).contiguous()


def quantize_rtn(weight: torch.Tensor, group_size: int, sym: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest ``(q [N, K], scales [N, K/G], zeros [N, K/G])`` with the zero
    points the v1 checkpoint can store (1..15)."""
    q, scales, zeros = quantize_groupwise(weight, 4, group_size, symmetric=sym)
    if not sym and bool((zeros == 0).any()):
        n, k = weight.shape
        zeros = zeros.clamp(min=1)
        w = weight.float().reshape(n, k // group_size, group_size)
        q = (torch.round(w / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, scales, zeros


def checkpoint_from_quantized(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                              dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """GPTQ checkpoint tensors of ``q [N, K]`` (0..15), ``scales``/``zeros`` ``[N, K/G]``."""
    return {
        "qweight": pack_int4_rows(q.t()),
        "qzeros": pack_columns((zeros - 1).t()),
        "scales": scales.t().to(dtype).contiguous(),
        "g_idx": g_idx.to(torch.int32),
    }


@register_method("gptq")
@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    bits: int = 4
    group_size: int = 128  # -1: one group over all inputs
    # Act-order: columns quantized by decreasing Hessian diagonal, recorded in g_idx. The default:
    # on SmolLM2 (tests/test_calib_real.py) GPTQ without it came out worse than rounding to nearest.
    desc_act: bool = True
    sym: bool = True
    damp_percent: float = 0.01
    # Tokens whose input norm exceeds this multiple of the median count with it in the
    # Hessian (qpass.calib.gptq.hessian says why); 0: the plain 2 X^T X / n.
    token_norm_cap: float = 2.0

    def validate(self) -> None:
        if self.bits != 4:
            raise ValueError(f"gptq supports bits=4 only, got bits={self.bits}")
        if self.group_size != -1 and (self.group_size < MIN_GROUP_SIZE or self.group_size % PACK_FACTOR):
            raise ValueError(f"gptq group_size must be -1 or a multiple of {PACK_FACTOR} and >= {MIN_GROUP_SIZE}, "
                             f"got {self.group_size}")
        if not 0 < self.damp_percent <= 1:
            raise ValueError(f"gptq damp_percent must be in (0, 1], got {self.damp_percent}")
        if not (self.token_norm_cap == 0 or self.token_norm_cap >= 1):
            raise ValueError(f"gptq token_norm_cap must be 0 (off) or >= 1 (a multiple of the median token norm), "
                             f"got {self.token_norm_cap}")

    def for_layer(self, name, in_features, out_features):
        if out_features % PACK_FACTOR or in_features % PACK_FACTOR:
            return None, (f"{name}: kept in float: in_features {in_features} and out_features {out_features} "
                          f"must be multiples of {PACK_FACTOR}")
        if self.group_size == -1:
            return self, ""
        return with_fitting_group_size(self, name, in_features)

    def groups_of(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def get_linear_method(self) -> "GPTQLinearMethod":
        return GPTQLinearMethod(self)

    def calibrate(self, model, plan, calib, device=None):
        if calib is None:
            warn_uncalibrated_once("gptq")
            return None
        from qpass.calib.gptq import calibrate_gptq

        return calibrate_gptq(model, plan, calib, self, device)


class GPTQLinearMethod(W4A16LinearMethod):
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
        group_size = self.quant_config.groups_of(input_size_per_partition)
        if input_size_per_partition % group_size or input_size_per_partition % PACK_FACTOR:
            raise ValueError(f"gptq: input size per partition {input_size_per_partition} is not a multiple of "
                             f"group_size {group_size} and of {PACK_FACTOR}")
        if self.quant_config.desc_act and input_size_per_partition != input_size:
            raise ValueError(f"gptq: desc_act (act-order, the default) weights cannot be split along the inputs "
                             f"(row parallel: {input_size_per_partition} of {input_size}); quantize with "
                             f"desc_act=False for row-parallel layers")
        for size in output_partition_sizes:
            if size % PACK_FACTOR:
                raise ValueError(f"gptq: output partition size {size} is not a multiple of {PACK_FACTOR}")
        k, n = input_size_per_partition, sum(output_partition_sizes)
        groups = k // group_size
        params = {
            "qweight": (torch.empty(k // PACK_FACTOR, n, dtype=torch.int32),
                        {"input_dim": 0, "output_dim": 1, "packed_dim": 0, "packed_factor": PACK_FACTOR}),
            "qzeros": (torch.empty(groups, n // PACK_FACTOR, dtype=torch.int32),
                       {"input_dim": 0, "output_dim": 1, "packed_dim": 1, "packed_factor": PACK_FACTOR}),
            "scales": (torch.empty(groups, n, dtype=params_dtype), {"input_dim": 0, "output_dim": 1}),
            "g_idx": (torch.empty(k, dtype=torch.int32), {"input_dim": 0}),
        }
        for name, (data, attrs) in params.items():
            param = Parameter(data, requires_grad=False)
            set_weight_attrs(param, attrs)
            set_weight_attrs(param, extra_weight_attrs)
            layer.register_parameter(name, param)

    def quantize_weight(self, weight: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Checkpoint tensors of a float weight ``[N, K]`` by round-to-nearest (no calibration)."""
        k = weight.shape[1]
        group_size = self.quant_config.groups_of(k)
        q, scales, zeros = quantize_rtn(weight, group_size, self.quant_config.sym)
        g_idx = torch.arange(k, device=weight.device) // group_size
        return checkpoint_from_quantized(q, scales, zeros, g_idx, weight.dtype)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        k = layer.g_idx.shape[0]
        group_size = self.quant_config.groups_of(k)
        g_idx = layer.g_idx.data.long()
        q = unpack_int4_rows(layer.qweight.data)
        zeros = (unpack_columns(layer.qzeros.data) + 1).to(layer.scales.dtype)  # v1: stored zero - 1
        perm = None
        if not torch.equal(g_idx, torch.arange(k, device=g_idx.device) // group_size):
            counts = torch.bincount(g_idx, minlength=k // group_size)
            if g_idx.min() < 0 or counts.numel() != k // group_size or bool((counts != group_size).any()):
                raise ValueError(f"gptq: g_idx [{k}] must give each of the {k // group_size} groups exactly "
                                 f"{group_size} input channels; got counts {counts.tolist()}")
            perm = torch.argsort(g_idx, stable=True)  # rows sorted by group: groups contiguous
            q = q[perm]
        del layer.qweight, layer.qzeros
        layer.register_parameter("qweight", Parameter(pack_int4_rows(q), requires_grad=False))
        layer.register_parameter("zeros", Parameter(zeros, requires_grad=False))
        layer.register_parameter("perm", None if perm is None else Parameter(perm, requires_grad=False))
        self.process_activation(layer, current_run=0)

    def checkpoint_tensors(self, layer: torch.nn.Module) -> Dict[str, torch.Tensor]:
        """The checkpoint layout of a finalised layer (inverse of the repack above)."""
        q = unpack_int4_rows(self.columns_as_halves(layer, layer.qweight.data))
        if layer.perm is not None:
            unsorted = torch.empty_like(q)
            unsorted[layer.perm.data] = q
            q = unsorted
        return {
            "qweight": pack_int4_rows(q),
            "qzeros": pack_columns(self.columns_as_halves(layer, layer.zeros.data).to(torch.int32) - 1),
            "scales": self.columns_as_halves(layer, layer.scales.data),
            "g_idx": layer.g_idx.data,
        }

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._linear(layer, x, bias, None, 0.0)

    def apply_after_rms_norm(self, layer: torch.nn.Module, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``apply`` to the RMSNorm of x, computed by the op (``QuantLinear.forward``)."""
        return self._linear(layer, x, bias, norm_weight, eps)

    def _linear(self, layer, x, bias, norm_weight, eps):
        if layer.perm is not None:  # (the norm's scale is per row: its weight takes x's permutation)
            x = x.index_select(-1, layer.perm)
            norm_weight = None if norm_weight is None else norm_weight.index_select(-1, layer.perm)
        group_size = self.quant_config.groups_of(layer.g_idx.shape[0])
        return ops.w4a16_linear(x, layer.qweight, layer.scales, layer.zeros, group_size, bias, layer.activation,
                                norm_weight, eps, layer.up_run)
