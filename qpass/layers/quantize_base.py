"""The quantization plugin contract: the names, signatures and lifecycle of vLLM, SGLang
and pymllm, so that a method written for them drops in here.

1. A quantization algorithm subclasses :class:`LinearMethodBase`.
2. Every linear layer holds a ``quant_method``.
3. The layer's ``__init__`` calls ``quant_method.create_weights(layer, ...)``, which
   registers the parameters (packed weights, scales, zero points...) on the layer.
4. Checkpoint tensors load through each parameter's ``weight_loader``.
5. After loading, ``quant_method.process_weights_after_loading(layer)`` runs once for
   every module that has a ``quant_method`` (repack, transpose, calibrate, clean up).
6. ``layer.forward`` calls ``quant_method.apply(layer, x, bias)``.
"""

from abc import ABC, abstractmethod
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch.nn import Parameter

from qpass.layers.utils import set_weight_attrs


class QuantizeMethodBase(ABC):
    """Base class for all quantization methods (linear, embedding, MoE, ...)."""

    @abstractmethod
    def create_weights(self, layer: torch.nn.Module, *args, **kwargs):
        """Create and register the quantized parameters on ``layer``."""
        raise NotImplementedError

    @abstractmethod
    def apply(self, layer: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
        """Run the quantized forward with the parameters made by :meth:`create_weights`."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Convert loaded parameters to the runtime form. The default does nothing."""
        return


class LinearMethodBase(QuantizeMethodBase):
    """Base class for quantization methods of linear layers."""

    @abstractmethod
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
        """Register the weights of a linear with ``input_size_per_partition`` inputs and
        ``sum(output_partition_sizes)`` outputs on this tensor-parallel rank."""
        raise NotImplementedError

    @abstractmethod
    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Return ``x @ W.T + bias`` of shape ``(*, sum(output_partition_sizes))``."""
        raise NotImplementedError


class UnquantizedLinearMethod(LinearMethodBase):
    """Full-precision weight ``(out, in)`` and ``F.linear``: the method of every layer left
    in float, so that the layer code has one path."""

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
        weight = Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0})
        layer.register_parameter("weight", weight)
        set_weight_attrs(weight, extra_weight_attrs)

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)
