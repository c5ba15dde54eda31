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


# Gradients flow to the activations (weights are frozen), so quantized models can sit
# inside training graphs (adapters, distillation) and compile with autograd on.
def _setup_context(ctx, inputs, output):
    ctx.weights = inputs[1:]
    ctx.has_bias = inputs[-1] is not None


def _w4a16_backward(ctx, grad):
    qweight, scales, zeros, group_size, _ = ctx.weights
    w = reference.dequantize_w4(qweight, scales, zeros, group_size)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad @ w.t().to(grad.dtype), None, None, None, None, grad_bias


def _w8a16_backward(ctx, grad):
    qweight, scales, _ = ctx.weights
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return (grad * scales.to(grad.dtype)) @ qweight.to(grad.dtype), None, None, grad_bias


def _fp8_backward(ctx, grad):
    qweight, weight_scale, _ = ctx.weights
    w = qweight.float() * weight_scale.float().unsqueeze(1)  # straight through the activation rounding
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad @ w.to(grad.dtype), None, None, grad_bias


w4a16_linear.register_autograd(_w4a16_backward, setup_context=_setup_context)
w8a16_linear.register_autograd(_w8a16_backward, setup_context=_setup_context)
fp8_linear.register_autograd(_fp8_backward, setup_context=_setup_context)
