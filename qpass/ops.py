"""The ``torch.ops.qpass.*`` operators that every method's ``apply`` calls.

Each is a ``torch.library.triton_op``: a schema, a fake implementation for tracing, and a
body that torch.compile can see into. On CPU the body is the plain-torch reference of
``qpass.kernels.reference``; on CUDA it launches the Triton kernels of ``qpass.kernels``.
"""

from typing import Optional

import torch
from torch.library import triton_op

from qpass.kernels import reference


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


@triton_op("qpass::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    out = reference.w4a16_linear(_flatten(x), qweight, scales, zeros, group_size, bias)
    return out.reshape(*x.shape[:-1], qweight.shape[1])


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias=None):
    return x.new_empty(*x.shape[:-1], qweight.shape[1])


@triton_op("qpass::w8a16_linear", mutates_args=())
def w8a16_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    out = reference.w8a16_linear(_flatten(x), qweight, scales, bias)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


@w8a16_linear.register_fake
def _(x, qweight, scales, bias=None):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@triton_op("qpass::fp8_linear", mutates_args=())
def fp8_linear(
    x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    return reference.fp8_linear(x, qweight, weight_scale, bias)


@fp8_linear.register_fake
def _(x, qweight, weight_scale, bias=None):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])
