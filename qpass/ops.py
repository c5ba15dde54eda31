"""The ``torch.ops.qpass.*`` operators that every method's ``apply`` calls.

Each is a ``torch.library.triton_op``: a schema, a fake implementation for tracing, and a
body that torch.compile can see into. On CPU the body is the plain-torch reference of
``qpass.kernels.reference``; on CUDA it launches the Triton kernels of ``qpass.kernels``.

Each takes ``activation`` (``qpass.kernels.common.ACTIVATIONS``: "none", "silu_mul", "gelu",
"gelu_tanh"): an epilogue computed inside the op, so that ``silu(gate) * up`` after a merged
gate/up linear, or the GELU after an MLP's first linear, costs no launch of its own
(``qpass.passes.lower`` folds it in). With "silu_mul" the N output columns are
``[gate | up]`` and the op returns ``[..., N / 2]``.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch.library import triton_op
from triton.runtime import KernelInterface

from qpass.kernel_analysis import cache_kernel_analysis
from qpass.kernels import fp8 as fp8_kernels
from qpass.kernels import reference
from qpass.kernels.common import ACTIVATIONS, output_columns
from qpass.kernels import w4a16 as w4a16_kernels
from qpass.kernels import w8a16 as w8a16_kernels

# The epilogues every op computes: what the methods built on these ops list as fused_activations.
FUSED_ACTIVATIONS = tuple(a for a in ACTIVATIONS if a != "none")

# torch.compile analyses each launch site of a kernel; one analysis per specialization will do
cache_kernel_analysis(kernel for module in (fp8_kernels, w4a16_kernels, w8a16_kernels)
                      for kernel in vars(module).values() if isinstance(kernel, KernelInterface))


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _out_shape(x: torch.Tensor, n: int, activation: str):
    return (*x.shape[:-1], output_columns(activation, n))


def _run(cuda_kernel, cpu_reference, x: torch.Tensor, n: int, *args, activation: str) -> torch.Tensor:
    """The Triton kernel on CUDA, the plain-torch reference elsewhere, on ``x`` flattened
    to ``[M, K]``; the result shaped as ``x`` with ``n`` (or ``n / 2``) outputs."""
    implementation = cuda_kernel if x.is_cuda else cpu_reference
    return implementation(_flatten(x), *args, activation=activation).reshape(_out_shape(x, n, activation))


@triton_op("qpass::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
) -> torch.Tensor:
    return _run(w4a16_kernels.w4a16_linear, reference.w4a16_linear, x, qweight.shape[1],
                qweight, scales, zeros, group_size, bias, activation=activation)


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias=None, activation="none"):
    return x.new_empty(_out_shape(x, qweight.shape[1], activation))


@triton_op("qpass::w8a16_linear", mutates_args=())
def w8a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
) -> torch.Tensor:
    return _run(w8a16_kernels.w8a16_linear, reference.w8a16_linear, x, qweight.shape[0],
                qweight, scales, bias, activation=activation)


@w8a16_linear.register_fake
def _(x, qweight, scales, bias=None, activation="none"):
    return x.new_empty(_out_shape(x, qweight.shape[0], activation))


@triton_op("qpass::fp8_linear", mutates_args=())
def fp8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
) -> torch.Tensor:
    return _run(fp8_kernels.fp8_linear, reference.fp8_linear, x, qweight.shape[0],
                qweight, weight_scale, bias, activation=activation)


@fp8_linear.register_fake
def _(x, qweight, weight_scale, bias=None, activation="none"):
    return x.new_empty(_out_shape(x, qweight.shape[0], activation))


# Gradients flow to the activations (weights are frozen), so quantized models can sit
# inside training graphs (adapters, distillation) and compile with autograd on. With a
# fused activation the backward recomputes the linear's output (the op with "none")
# rather than the forward keeping it: the point of the fusion is not to write it.
def _setup_context(ctx, inputs, output):
    x, *rest = inputs
    ctx.x = x if rest[-1] != "none" else None  # kept only to recompute a fused activation's input
    ctx.rest = rest


def _pre_activation_grad(grad: torch.Tensor, activation: str, linear_out) -> torch.Tensor:
    """The gradient at the linear's output ``[..., N]`` from the gradient after the epilogue;
    ``linear_out()`` recomputes that output."""
    if activation == "none":
        return grad
    grad_out, out = grad.float(), linear_out().float()
    if activation == "gelu":  # d/dx x Phi(x) = Phi(x) + x phi(x)
        phi = torch.exp(-0.5 * out * out) * 0.3989422804014327
        return (grad_out * (0.5 * (1 + torch.erf(out * 0.7071067811865476)) + out * phi)).to(grad.dtype)
    if activation == "gelu_tanh":  # x sigmoid(2 u), u = sqrt(2 / pi) (x + 0.044715 x^3)
        sigmoid = torch.sigmoid(1.5957691216057308 * (out + 0.044715 * out**3))
        du = 1.5957691216057308 * (1 + 3 * 0.044715 * out * out)
        return (grad_out * (sigmoid + out * sigmoid * (1 - sigmoid) * du)).to(grad.dtype)
    gate, up = out.chunk(2, dim=-1)
    sigmoid = torch.sigmoid(gate)
    grad_gate = grad_out * up * sigmoid * (1 + gate * (1 - sigmoid))
    return torch.cat([grad_gate, grad_out * F.silu(gate)], dim=-1).to(grad.dtype)


def _bias_grad(grad: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return grad.reshape(-1, grad.shape[-1]).sum(0) if bias is not None else None


def _w4a16_backward(ctx, grad):
    qweight, scales, zeros, group_size, bias, activation = ctx.rest
    grad = _pre_activation_grad(
        grad, activation, lambda: torch.ops.qpass.w4a16_linear(ctx.x, qweight, scales, zeros, group_size, bias))
    w = reference.dequantize_w4(qweight, scales, zeros, group_size)
    return grad @ w.t().to(grad.dtype), None, None, None, None, _bias_grad(grad, bias), None


def _w8a16_backward(ctx, grad):
    qweight, scales, bias, activation = ctx.rest
    grad = _pre_activation_grad(grad, activation, lambda: torch.ops.qpass.w8a16_linear(ctx.x, qweight, scales, bias))
    return (grad * scales.to(grad.dtype)) @ qweight.to(grad.dtype), None, None, _bias_grad(grad, bias), None


def _fp8_backward(ctx, grad):
    qweight, weight_scale, bias, activation = ctx.rest
    grad = _pre_activation_grad(grad, activation, lambda: torch.ops.qpass.fp8_linear(ctx.x, qweight, weight_scale, bias))
    w = qweight.float() * weight_scale.float().unsqueeze(1)  # straight through the activation rounding
    return grad @ w.to(grad.dtype), None, None, _bias_grad(grad, bias), None


w4a16_linear.register_autograd(_w4a16_backward, setup_context=_setup_context)
w8a16_linear.register_autograd(_w8a16_backward, setup_context=_setup_context)
fp8_linear.register_autograd(_fp8_backward, setup_context=_setup_context)
