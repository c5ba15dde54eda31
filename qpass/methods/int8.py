"""int8: W8A16, symmetric int8 weights with one scale per output channel.

``qweight`` int8 ``[N, K]`` and ``scales`` ``[N]`` in the model dtype: the checkpoint
layout and the kernel's are the same, so nothing is repacked after loading.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from qpass import ops
from qpass.calib.rtn import quantize_per_channel_int8
from qpass.methods.base import OpLinearMethod, QuantConfig, register_method, register_per_channel_weights


@register_method("int8")
@dataclass(frozen=True)
class Int8Config(QuantConfig):
    def get_linear_method(self) -> "Int8LinearMethod":
        return Int8LinearMethod(self)


class Int8LinearMethod(OpLinearMethod):
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
        register_per_channel_weights(layer, sum(output_partition_sizes), input_size_per_partition, torch.int8,
                                     "scales", params_dtype, extra_weight_attrs)

    def quantize_weight(self, weight: torch.Tensor) -> Dict[str, torch.Tensor]:
        q, scales = quantize_per_channel_int8(weight)
        return {"qweight": q, "scales": scales.to(weight.dtype)}

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.w8a16_linear(x, layer.qweight, layer.scales, bias, layer.activation)
