"""fp8: W8A8, float8_e4m3fn weights with one float32 scale per output channel, and
activations quantized per token at run time (scale = amax / 448) inside the op.

``qweight`` float8_e4m3fn ``[N, K]`` and ``weight_scale`` float32 ``[N]``: the layout of
compressed-tensors' and vLLM's per-channel FP8 checkpoints, which the kernels read as is.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from qpass import ops
from qpass.kernels.reference import FP8_MAX
from qpass.methods.base import OpLinearMethod, QuantConfig, register_method, register_per_channel_weights


@register_method("fp8")
@dataclass(frozen=True)
class FP8Config(QuantConfig):
    def get_linear_method(self) -> "FP8LinearMethod":
        return FP8LinearMethod(self)


class FP8LinearMethod(OpLinearMethod):
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
        register_per_channel_weights(layer, sum(output_partition_sizes), input_size_per_partition, torch.float8_e4m3fn,
                                     "weight_scale", torch.float32, extra_weight_attrs)

    def quantize_weight(self, weight: torch.Tensor) -> Dict[str, torch.Tensor]:
        amax = weight.float().abs().amax(dim=1).clamp(min=1e-12)
        scale = amax / FP8_MAX
        q = (weight.float() / scale.unsqueeze(1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {"qweight": q, "weight_scale": scale}

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.fp8_linear(x, layer.qweight, layer.weight_scale, bias, layer.activation)

    def apply_after_rms_norm(self, layer: torch.nn.Module, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``apply`` to the RMSNorm of x, which the op computes as it quantizes x (``QuantLinear.forward``)."""
        return ops.fp8_linear(x, layer.qweight, layer.weight_scale, bias, layer.activation, norm_weight, eps)
