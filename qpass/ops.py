"""The ``torch.ops.qpass.*`` operators that every method's ``apply`` calls.

Each is a ``torch.library.triton_op``: a schema, a fake implementation for tracing, and a
body that torch.compile can see into. On CPU the body is the plain-torch reference of
``qpass.kernels.reference``; on CUDA it launches the Triton kernels of ``qpass.kernels``. Some
GEMMs the bodies call as opaque ``torch.library.custom_op``s, which torch.compile runs as they are:
W4A16's weight in chunks for large M (two CUDA streams) and its Gluon kernels (source Inductor
cannot copy), and each op's calls whose kernel splits K (``<op>_split_k``: a workspace kept
between calls, which a compiled graph could not keep).

A ``bias`` is ``[N]``, or shaped as the output: a residual added in the epilogue, so that
``x + linear(h)`` costs no launch of its own either. The W4A16 and FP8 ops may also take the
RMSNorm before them (``norm_weight``, ``norm_eps``), which W4A16's GEMV and FP8's quantization of x
compute as they read x.

Each takes ``activation`` (``qpass.kernels.common.ACTIVATIONS``: "none", "silu_mul", "gelu",
"gelu_tanh"): an epilogue computed inside the op, so that ``silu(gate) * up`` after a merged
gate/up linear, or the GELU after an MLP's first linear, costs no launch of its own
(``qpass.passes.lower`` folds it in). With "silu_mul" the N output columns are
``[gate | up]`` and the op returns ``[..., N / 2]``.

The methods call them through this module's functions of the same names (``w4a16_linear``, ...),
which in plain eager use run the op's body without torch's dispatcher (``_eager_fast_path``);
``torch.ops.qpass.*`` is the same computation, a call of it from ported code included.
"""

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled
from torch.library import triton_op
from triton.runtime import KernelInterface

from qpass.inductor_launch import compile_with_launch_options
from qpass.kernel_analysis import cache_kernel_analysis
from qpass.kernels import common as common_kernels
from qpass.kernels import fp8 as fp8_kernels
from qpass.kernels import reference
from qpass.kernels.common import ACTIVATIONS, output_columns
from qpass.kernels import w4a16 as w4a16_kernels
from qpass.kernels import w8a16 as w8a16_kernels
from qpass.kernels.replay import Replayed

# The epilogues every op computes: what the methods built on these ops list as fused_activations.
FUSED_ACTIVATIONS = tuple(a for a in ACTIVATIONS if a != "none")

# torch.compile analyses each launch site of a kernel; one analysis per specialization will do
cache_kernel_analysis(kernel for module in (common_kernels, fp8_kernels, w4a16_kernels, w8a16_kernels)
                      for kernel in vars(module).values() if isinstance(kernel, KernelInterface))
# and drops the launch options (programmatic dependent launch, register budgets) of the kernels that take them
compile_with_launch_options([w4a16_kernels.w4a16_gemv_kernel, w4a16_kernels.w4a16_warp_mma_kernel,
                             w4a16_kernels.rms_norm_kernel, common_kernels.zero_kernel])


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (a view costs an eager call 1-2 us)


def _out_shape(x: torch.Tensor, n: int, activation: str):
    return (*x.shape[:-1], output_columns(activation, n))


def _flat_bias(bias: Optional[torch.Tensor], x: torch.Tensor, n: int) -> Optional[torch.Tensor]:
    """A bias ``[n]`` as it is; one of more dims (a residual) broadcast to the GEMM's output
    ``[..., n]`` and flattened to ``[M, n]`` as x is."""
    if bias is None or bias.dim() == 1:
        return bias
    return torch.broadcast_to(bias, (*x.shape[:-1], n)).reshape(-1, n)


def _run(cuda_kernel, cpu_reference, x: torch.Tensor, n: int, *args, bias: Optional[torch.Tensor], activation: str,
         **kwargs) -> torch.Tensor:
    """The Triton kernel on CUDA, the plain-torch reference elsewhere, on ``x`` flattened
    to ``[M, K]``; the result shaped as ``x`` with ``n`` (or ``n / 2``) outputs."""
    implementation = cuda_kernel if x.is_cuda else cpu_reference
    out = implementation(_flatten(x), *args, _flat_bias(bias, x, n), activation=activation, **kwargs)
    return out if x.dim() == 2 else out.reshape(_out_shape(x, n, activation))


def _opaque_gemm(name: str, gemm):
    """``gemm`` (``x [M, K], qweight, scales [K / group_size, N], ...`` -> ``[M, N]``) as the op ``qpass::<name>``,
    which torch.compile calls as it is instead of tracing into it. Returns what the W4A16 entry point calls: the op
    where a tracer may be watching (``wrap_triton`` on), else ``gemm`` itself, whose launches an eager call's replay
    records (``kernels.replay``; the op's dispatch is a torch op, which a replay cannot repeat). H100, fp16, an eager
    call of the op with its opaque GEMM -> replayed, us (bench/NOTES-kernels.md, eighty-fourth session): 4096^2 at 24
    / 128 / 1024 rows 103.6 / 231.8 / 192.7 -> 27.1 / 61.8 / 61.4, against cuBLAS's 13.7 / 13.1 / 46.9."""
    op = torch.library.custom_op(f"qpass::{name}", gemm, mutates_args=())
    op.register_fake(lambda x, qweight, scales, *args: x.new_empty((x.shape[0], scales.shape[1])))

    @functools.wraps(gemm)
    def call(*args):
        return op(*args) if is_wrap_triton_enabled() else gemm(*args)

    return call


# The W4A16 op's GEMMs that torch.compile cannot trace: the weight in chunks for large M (two CUDA
# streams), and 17 to 256 rows on Hopper, to 1024 where the TMA kernel's tiles fill whole waves (Gluon
# kernels, whose source Inductor cannot copy).
w4a16_dequantize_matmul = _opaque_gemm("w4a16_dequantize_matmul", w4a16_kernels.dequantize_matmul)
w4a16_wgmma_matmul = _opaque_gemm("w4a16_wgmma_matmul", w4a16_kernels.wgmma_matmul)
w4a16_wgmma_tma_matmul = _opaque_gemm("w4a16_wgmma_tma_matmul", w4a16_kernels.wgmma_tma_matmul)


def _w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    norm_weight: Optional[torch.Tensor] = None,
    norm_eps: float = 0.0,
    up_run: int = 0,
) -> torch.Tensor:
    return _run(_w4a16_kernels, reference.w4a16_linear, x, scales.shape[1], qweight, scales, zeros, group_size,
                bias=bias, activation=activation, norm_weight=norm_weight, norm_eps=norm_eps, up_run=up_run)


w4a16_linear_op = triton_op("qpass::w4a16_linear", _w4a16_linear, mutates_args=())


def _w4a16_fake(x, qweight, scales, zeros, group_size, bias=None, activation="none", norm_weight=None, norm_eps=0.0,
                up_run=0):
    return x.new_empty(_out_shape(x, scales.shape[1], activation))


w4a16_linear_op.register_fake(_w4a16_fake)


def _w8a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
) -> torch.Tensor:
    return _run(_w8a16_kernels, reference.w8a16_linear, x, qweight.shape[0],
                qweight, scales, bias=bias, activation=activation)


w8a16_linear_op = triton_op("qpass::w8a16_linear", _w8a16_linear, mutates_args=())


def _w8_fake(x, qweight, scale, bias=None, activation="none"):
    """W8A16's and FP8's (qweight ``[N, K]``)."""
    return x.new_empty(_out_shape(x, qweight.shape[0], activation))


w8a16_linear_op.register_fake(_w8_fake)


def _fp8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    norm_weight: Optional[torch.Tensor] = None,
    norm_eps: float = 0.0,
) -> torch.Tensor:
    return _run(_fp8_kernels, reference.fp8_linear, x, qweight.shape[0],
                qweight, weight_scale, bias=bias, activation=activation, norm_weight=norm_weight, norm_eps=norm_eps)


fp8_linear_op = triton_op("qpass::fp8_linear", _fp8_linear, mutates_args=())


def _fp8_fake(x, qweight, weight_scale, bias=None, activation="none", norm_weight=None, norm_eps=0.0):
    return _w8_fake(x, qweight, weight_scale, bias, activation)


fp8_linear_op.register_fake(_fp8_fake)


def _split_k_twin(op, body, fake):
    """``op`` (``torch.ops.qpass.<name>``) again as ``qpass::<name>_split_k``, which torch.compile calls as it is
    instead of tracing into it: ``body``, the op's implementation, run for real. The op's kernels hand it a traced
    call whose kernel splits K (their ``split_k_linear_op``): the split's programs meet in a workspace kept between
    calls (``kernels.common.split_k_workspace``), which a compiled graph cannot keep (it would zero a fresh one at
    every run: a launch more)."""
    schema = op.default._schema

    def run(*args, **kwargs):
        with set_wrap_triton_enabled(False):
            return body(*args, **kwargs)

    arguments = str(schema)[str(schema).index("("):]
    twin = torch.library.custom_op(f"{schema.name}_split_k", run, mutates_args=(), schema=arguments)
    twin.register_fake(fake)
    return twin


w4a16_linear_split_k = _split_k_twin(torch.ops.qpass.w4a16_linear, _w4a16_linear, _w4a16_fake)
w8a16_linear_split_k = _split_k_twin(torch.ops.qpass.w8a16_linear, _w8a16_linear, _w8_fake)
fp8_linear_split_k = _split_k_twin(torch.ops.qpass.fp8_linear, _fp8_linear, _fp8_fake)

# The kernels' entry points, replaying each input signature's launches where they run for real (an eager call's
# host time); W4A16's untraceable GEMMs and the traced calls that split K through the opaque ops (bound once, not at
# every call).
_w4a16_kernels = Replayed(functools.partial(
    w4a16_kernels.w4a16_linear, chunked_dequantize_matmul=w4a16_dequantize_matmul,
    wgmma_matmul_op=w4a16_wgmma_matmul, wgmma_tma_matmul_op=w4a16_wgmma_tma_matmul,
    split_k_linear_op=w4a16_linear_split_k))
_w8a16_kernels = Replayed(functools.partial(w8a16_kernels.w8a16_linear, split_k_linear_op=w8a16_linear_split_k))
_fp8_kernels = Replayed(functools.partial(fp8_kernels.fp8_linear, split_k_linear_op=fp8_linear_split_k))


# Gradients flow to the activations (weights are frozen), so quantized models can sit
# inside training graphs (adapters, distillation) and compile with autograd on. With a
# fused activation the backward recomputes the linear's output (the op with "none")
# rather than the forward keeping it: the point of the fusion is not to write it.
def _setup_context(ctx, inputs, output):
    x, *rest = inputs
    ctx.x = x if rest[-1] != "none" else None  # kept only to recompute a fused activation's input
    ctx.rest = rest


def _normed_setup_context(activation_at: int, ctx, inputs, output):
    """``_setup_context`` for the ops that take the norm before them, ``activation`` at ``inputs[activation_at]``
    and ``norm_weight`` after it."""
    x, *rest = inputs
    activation, norm_weight = inputs[activation_at], inputs[activation_at + 1]
    ctx.x = x if activation != "none" or norm_weight is not None else None  # and for a fused norm's gradient
    ctx.rest = rest


def _pre_activation_grad(grad: torch.Tensor, activation: str, linear_out, up_run: int = 0) -> torch.Tensor:
    """The gradient at the linear's output ``[..., N]`` from the gradient after the epilogue;
    ``linear_out()`` recomputes that output (under "silu_mul" gate and up in runs of ``up_run``)."""
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
    gate, up = reference.gate_up_halves(out, up_run).chunk(2, dim=-1)
    sigmoid = torch.sigmoid(gate)
    grad_gate = grad_out * up * sigmoid * (1 + gate * (1 - sigmoid))
    return reference.gate_up_runs(torch.cat([grad_gate, grad_out * F.silu(gate)], dim=-1), up_run).to(grad.dtype)


def _bias_grad(grad: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The gradient of a bias ``[N]`` or of one shaped as the output (a residual)."""
    return grad.sum_to_size(bias.shape).to(bias.dtype) if bias is not None else None


def _rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, eps: float, grad: torch.Tensor):
    """Gradients of x and of the weight of ``reference.rms_norm`` from the gradient at its output
    (in float32, through y = x r g with r = 1 / sqrt(mean(x^2) + eps))."""
    xf, scaled = x.float(), grad.float() * weight.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    grad_x = r * scaled - xf * r.pow(3) * (scaled * xf).mean(-1, keepdim=True)
    grad_weight = (grad.float() * xf * r).reshape(-1, x.shape[-1]).sum(0)
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)


def _w4a16_backward(ctx, grad):
    qweight, scales, zeros, group_size, bias, activation, norm_weight, norm_eps, up_run = ctx.rest
    grad = _pre_activation_grad(grad, activation, lambda: torch.ops.qpass.w4a16_linear(
        ctx.x, qweight, scales, zeros, group_size, bias, "none", norm_weight, norm_eps), up_run)
    w = reference.dequantize_w4(qweight, scales, zeros, group_size)
    grad_x, grad_norm_weight = grad @ w.t().to(grad.dtype), None
    if norm_weight is not None:
        grad_x, grad_norm_weight = _rms_norm_backward(ctx.x, norm_weight, norm_eps, grad_x)
    return grad_x, None, None, None, None, _bias_grad(grad, bias), None, grad_norm_weight, None, None


def _w8a16_backward(ctx, grad):
    qweight, scales, bias, activation = ctx.rest
    grad = _pre_activation_grad(grad, activation, lambda: torch.ops.qpass.w8a16_linear(ctx.x, qweight, scales, bias))
    return (grad * scales.to(grad.dtype)) @ qweight.to(grad.dtype), None, None, _bias_grad(grad, bias), None


def _fp8_backward(ctx, grad):
    qweight, weight_scale, bias, activation, norm_weight, norm_eps = ctx.rest
    grad = _pre_activation_grad(grad, activation, lambda: torch.ops.qpass.fp8_linear(
        ctx.x, qweight, weight_scale, bias, "none", norm_weight, norm_eps))
    w = qweight.float() * weight_scale.float().unsqueeze(1)  # straight through the activation rounding
    grad_x, grad_norm_weight = grad @ w.to(grad.dtype), None
    if norm_weight is not None:
        grad_x, grad_norm_weight = _rms_norm_backward(ctx.x, norm_weight, norm_eps, grad_x)
    return grad_x, None, None, _bias_grad(grad, bias), None, grad_norm_weight, None


w4a16_linear_op.register_autograd(_w4a16_backward, setup_context=functools.partial(_normed_setup_context, 6))
w8a16_linear_op.register_autograd(_w8a16_backward, setup_context=_setup_context)
fp8_linear_op.register_autograd(_fp8_backward, setup_context=functools.partial(_normed_setup_context, 4))


def _plain_eager(tensors) -> bool:
    """Whether nothing would see an op call on ``tensors`` but the op's body: no torch.compile, tracer,
    profiler, torch.func transform or Python mode (fake tensors, FlopCounterMode, ``with torch.device``), no
    tensor subclass but ``Parameter``, no meta tensor (the ops' fake implementation), and no gradient to record."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None or torch.autograd._profiler_enabled():
        return False
    record_grad = torch.is_grad_enabled()
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_meta and not (record_grad and t.requires_grad)
               for t in tensors)


def _eager_fast_path(op, body):
    """``op`` (``torch.ops.qpass.<name>``) as a function that, where ``_plain_eager``, calls ``body``, the op's
    implementation, itself, as the op's CUDA backend does (Triton kernels launched directly, not through
    ``wrap_triton``'s higher-order op), and there the kernels' entry points replay each input signature's launches
    (``qpass.kernels.replay``). Models run without torch.compile (Hugging Face's ``generate``) pay the host's time at
    every linear: on an H200's host, one token, 4096 x 4096, us a call through the dispatcher -> past it, with
    neither 120 -> 95 (W4A16), 97 -> 78 (W8A16), 147 -> 127 (FP8), against 19 for ``F.linear``; with the replay
    56 -> 40, 51 -> 36, 73 -> 56, against 18 (``bench/eager.py``, bench/NOTES-e2e.md)."""

    @functools.wraps(body)
    def call(*args, **kwargs):
        if _plain_eager([a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]):
            with set_wrap_triton_enabled(False):
                return body(*args, **kwargs)
        return op(*args, **kwargs)

    return call


w4a16_linear = _eager_fast_path(torch.ops.qpass.w4a16_linear, _w4a16_linear)
w8a16_linear = _eager_fast_path(torch.ops.qpass.w8a16_linear, _w8a16_linear)
fp8_linear = _eager_fast_path(torch.ops.qpass.fp8_linear, _fp8_linear)
