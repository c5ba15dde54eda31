"""FP8 W8A8: float8_e4m3fn weights ``[N, K]`` with one float32 scale per output channel;
activations quantized per token to float8_e4m3fn with scale ``amax / 448`` at run time.

Two launches: ``_quantize_rows_kernel`` (one program per token: the row's amax, then the
row divided by its scale, correctly rounded, then rounded to fp8) and ``_fp8_mma_kernel``
(fp8 x fp8 on the tensor cores, float32 accumulation, both scales applied to the
accumulator). Split K as in the other kernels when the tiles alone would leave the GPU idle,
reduced inside the kernel (``common.store_output``). At its large-M tile on sm_90 and later the
TMA copies x's and the weight's tiles in (``MmaConfig.tma``); elsewhere, and traced, they are
loaded through pointers. Where an RMSNorm comes before the linear,
the quantization computes it as it reads the row, so its output is never written.

Up to ``w8a16.GEMV_MAX_M`` rows the product is a GEMV bound by the weight's bytes, one a weight as
W8A16's; a tensor-core tile there would be at least 16 rows, 15 of them padding. W8A16's GEMV
(``w8a16.w8_gemv_kernel``) runs it on the fp8 weights, from the same quantized activations given
to it in fp16 (every e4m3 value is exact there), the products summed in float32.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from triton.tools.tensor_descriptor import TensorDescriptor

from . import w8a16
from .common import (MmaConfig, bias_rows, capability, cdiv, grouped_tile_index, inv_rms_of_squares,
                     next_power_of_2, normed, norm_weight_as_x, output_columns, row_inv_rms, shared_memory, sm_count,
                     split_for, split_k_workspace, split_range, store_output, traced_split)
from .replay import launch, new_empty

FP8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn


@triton.jit
def _round_to_e4m3(v):
    """Round float32 to the nearest float8_e4m3fn value (ties to even), still as float32.

    The cast to fp8 that follows is then exact: it rounds the same way on every backend
    (Triton's interpreter rounds 124.3 to 64, not 128)."""
    bits = v.to(tl.int32, bitcast=True)
    # Normal range: keep 3 of the 23 mantissa bits, rounding half to even.
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 = 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    # Subnormal range (|v| < 2**-6): multiples of 2**-9; adding 1.5 * 2**14 rounds there. On |v|
    # with v's sign put back, so what rounds to zero keeps it (-0.0, as torch's cast gives).
    magnitude = (tl.abs(v) + 24576.0) - 24576.0
    subnormal = (magnitude.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)


@triton.jit
def _divide(x, d, d_inverse):
    """x / d correctly rounded, from d's correctly rounded reciprocal: q = x * (1 / d) is within
    an ulp, and one FMA with the exact remainder x - q d rounds it right (Markstein). About 3x
    faster than ``div_rn`` per element, which made the quantization ALU-bound (H200: 4096 x 14336
    in 95 us against 50)."""
    q = x * d_inverse
    # (the FMAs would make x = -0.0 into +0.0: torch's division keeps the sign, and so does q)
    return tl.where(x == 0, q, tl.math.fma(tl.math.fma(-q, d, x), d_inverse, q))


@triton.jit
def _rounded(v, ROUND_BY_CAST: tl.constexpr):
    """v within the fp8 range, rounded to float8_e4m3fn values unless the cast after rounds."""
    if not ROUND_BY_CAST:
        v = _round_to_e4m3(v)
    return tl.clamp(v, -FP8_MAX, FP8_MAX)


@triton.jit
def _row_block(x_row, g_ptr, cols, mask, stride_xk, inv_rms, HAS_NORM: tl.constexpr):
    """x's values at ``cols`` of a row, in float32; with HAS_NORM its RMSNorm's (``common.normed``)."""
    x = tl.load(x_row + cols * stride_xk, mask=mask, other=0)
    if HAS_NORM:
        g = tl.load(g_ptr + cols, mask=mask, other=0).to(tl.float32)
        x = normed(x.to(tl.float32), inv_rms, g, x.dtype)
    return x.to(tl.float32)


@triton.jit
def _quantize_rows_kernel(x_ptr, g_ptr, xq_ptr, scale_ptr, K, stride_xm, stride_xk, stride_qm, eps,
                          BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr, ROUND_BY_CAST: tl.constexpr,
                          HAS_NORM: tl.constexpr):
    """Row ``program_id`` of x quantized per token; xq's dtype float8_e4m3fn, or float16 for the
    same values (exact), as the GEMV reads them. ROUND_BY_CAST: the cast to float8_e4m3fn rounds (on a GPU,
    ``cvt.rn.satfinite``: to nearest even, as ``_round_to_e4m3`` does in some 15 instructions a value, which kept
    the kernel at 2.5 TB/s). The same bytes either way; H100, us (bench/results/ab-fp8-quantize-cast-h100.json):
    4096 x 14336 65.3 -> 60.2, 4096 x 4096 20.1 -> 17.1. HAS_NORM: the row's RMSNorm (norm weight ``g_ptr``, ``eps``)
    is what is quantized, as ``reference.rms_norm`` rounds it, so that the normed x is never written."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    if ONE_PASS:  # the row fits in registers: read it once (|x| and max are exact in its own dtype)
        x = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0)
        if HAS_NORM:
            xf = x.to(tl.float32)
            inv_rms = inv_rms_of_squares(xf * xf, K, eps)
            x = normed(xf, inv_rms, tl.load(g_ptr + offs, mask=offs < K, other=0).to(tl.float32), x.dtype)
        amax = tl.max(tl.abs(x), axis=0).to(tl.float32)
    else:  # the row again for each pass, from L1 / L2
        inv_rms = row_inv_rms(x_row, K, stride_xk, eps, BLOCK_K) if HAS_NORM else 1.0
        amax_k = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xk = _row_block(x_row, g_ptr, k0 + offs, k0 + offs < K, stride_xk, inv_rms, HAS_NORM)
            amax_k = tl.maximum(amax_k, tl.abs(xk))
        amax = tl.max(amax_k, axis=0)
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
    scale_inverse = tl.math.div_rn(1.0, scale)
    tl.store(scale_ptr + row, scale)
    if ONE_PASS:
        xq = _rounded(_divide(x.to(tl.float32), scale, scale_inverse), ROUND_BY_CAST)
        tl.store(xq_ptr + row * stride_qm + offs, xq.to(xq_ptr.dtype.element_ty), mask=offs < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            mask = k0 + offs < K
            xk = _row_block(x_row, g_ptr, k0 + offs, mask, stride_xk, inv_rms, HAS_NORM)
            xq = _rounded(_divide(xk, scale, scale_inverse), ROUND_BY_CAST)
            tl.store(xq_ptr + row * stride_qm + k0 + offs, xq.to(xq_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_tile(operand, ptrs, first_row, rows_on, stride, k0, K, offs_k, TMA: tl.constexpr, EVEN_K: tl.constexpr):
    """An fp8 operand's tile at columns ``k0 + offs_k``: by TMA from the tensor descriptor ``operand``, its rows from
    ``first_row + rows_on`` (the copy fills rows and columns past the tensor's end with zeros), or loaded through
    ``ptrs`` (its rows at column 0), ``rows_on`` rows of ``stride`` on."""
    if TMA:
        tile = operand.load([first_row + rows_on, k0])
    elif EVEN_K:
        tile = tl.load(ptrs + rows_on * stride + k0)
    else:
        tile = tl.load(ptrs + rows_on * stride + k0, mask=((k0 + offs_k) < K)[None, :], other=0.0)
    return tile


@triton.jit
def _fp8_mma_kernel(
    a, b, a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N_OUT, N_UP, K,
    stride_am, stride_bn, stride_bm, stride_om, stride_on, stride_wm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    TMA: tl.constexpr,
):
    """x's fp8 values ``a`` ``[M, K]`` times the weight's ``b`` ``[N, K]``: pointers, or with TMA tensor descriptors
    of blocks ``[BLOCK_M, BLOCK_K]`` and ``[BLOCK_N, BLOCK_K]``."""
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile_index(pid, M, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if TMA:
        a_ptrs, b_ptrs = a, b  # (not read)
    else:
        # Out-of-range rows and columns read row 0 again (always valid) and are never stored.
        a_ptrs = a + (offs_m % M)[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b + (offs_n % N_OUT)[:, None] * stride_bn + offs_k[None, :]

    k_tiles = tl.cdiv(K, BLOCK_K)
    tile_start, tile_end = split_range(tl.program_id(1), k_tiles, SPLIT_K, 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = acc
    for t in range(tile_start, tile_end):
        k0 = t * BLOCK_K
        x_tile = _fp8_tile(a, a_ptrs, pid_m * BLOCK_M, 0, stride_am, k0, K, offs_k, TMA, EVEN_K)
        w_tile = _fp8_tile(b, b_ptrs, pid_n * BLOCK_N, 0, stride_bn, k0, K, offs_k, TMA, EVEN_K)
        acc = tl.dot(x_tile, tl.trans(w_tile), acc)
        if ACTIVATION == "silu_mul":
            up_tile = _fp8_tile(b, b_ptrs, pid_n * BLOCK_N, N_UP, stride_bn, k0, K, offs_k, TMA, EVEN_K)
            acc_up = tl.dot(x_tile, tl.trans(up_tile), acc_up)
    mask_m = offs_m < M
    mask_n = offs_n < N_OUT
    a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0)[:, None]
    acc *= a_scale * tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0)[None, :]
    if ACTIVATION == "silu_mul":
        acc_up *= a_scale * tl.load(b_scale_ptr + N_UP + offs_n, mask=mask_n, other=0)[None, :]
    store_output(acc, acc_up, offs_m[:, None], offs_n[None, :], mask_m[:, None] & mask_n[None, :], pid, M, N_UP,
                 bias_ptr, out_ptr, ws_ptr, stride_bm, stride_om, stride_on, stride_wm, SPLIT_K, HAS_BIAS, ACTIVATION)


def shared_bytes(cfg: MmaConfig, activation: str = "none") -> int:
    """The shared memory of ``_fp8_mma_kernel``'s pipeline at ``cfg``: each of its stages holds an fp8 tile of x and
    one of the weight, two under "silu_mul" (gate and up), and copied by TMA an 8-byte barrier for each weight tile,
    as Triton 3.6 allots them for sm_90."""
    weight_tiles = 2 if activation == "silu_mul" else 1
    return cfg.num_stages * (cfg.block_m + weight_tiles * cfg.block_n) * cfg.block_k + (
        8 * cfg.num_stages * weight_tiles if cfg.tma else 0)


def _within_shared_memory(cfg: MmaConfig, activation: str, limit: int) -> MmaConfig:
    """``cfg`` with fewer stages (two at least), then fewer columns, until its pipeline fits ``limit`` bytes."""
    while shared_bytes(cfg, activation) > limit and cfg.block_n > 16:
        if cfg.num_stages > 2:
            cfg = cfg._replace(num_stages=cfg.num_stages - 1)
        else:
            cfg = cfg._replace(block_n=cfg.block_n // 2)
    return cfg


def pick_config(M: int, N: int, K: int, device: torch.device, activation: str = "none"):
    """The kernel and its block shapes for a problem of N output columns: W8A16's GEMV up to ``w8a16.GEMV_MAX_M``
    rows (its picks: the same bytes a weight), else the tensor-core kernel's, tuned on the H100
    (bench/NOTES-kernels.md), cut to the device's shared memory (``_within_shared_memory``)."""
    if M <= w8a16.GEMV_MAX_M:
        return w8a16.pick_config(M, N, K, device, packed=device.type == "cuda")
    sms = sm_count(device)
    if M <= 16:
        cfg = MmaConfig(16, 64, 256, 1, num_warps=4, num_stages=4)
    elif M <= 64:
        cfg = MmaConfig(64, 64, 128, 1, num_warps=4, num_stages=4)
    elif M <= 256:
        cfg = MmaConfig(64, 128, 128, 1, num_warps=4, num_stages=4)
    elif cdiv(M, 128) * cdiv(N, 256) >= sms:
        # H100, M = 4096, the GEMM alone, us, 3 stages and groups of 8 row tiles -> 4 and 16 (bench/results/
        # ab-fp8-quantize-cast-h100.json): 4096² 113.2 -> 112.1, 4096x6144 169.4 -> 169.5, 4096x28672 831.6 -> 790.0,
        # 14336x4096 362.0 -> 362.3. Under silu_mul 128 output columns, whose gate and up tiles make the same
        # 128 x 256 of MMAs a step (four stages of 256 columns would need 320 KB). Tiles copied by TMA, the op at
        # 4096 rows, fp16, H100, us, pointers -> TMA, in turns (ab-fp8-tma-h100.json; outputs identical): 4096²
        # 121.2 -> 118.1, 4096x6144 178.2 -> 177.1, 4096x28672 822.8 -> 821.1, 14336x4096 406.6 -> 378.9.
        cfg = MmaConfig(128, 128 if activation == "silu_mul" else 256, 128, 1, num_warps=8, num_stages=4, group_m=16,
                        tma=_copies_by_tma(device))
    else:  # large M, few 128x256 tiles: smaller tiles rather than float32 partial sums
        cfg = MmaConfig(64, 128, 128, 1, num_warps=4, num_stages=4)
    cfg = _within_shared_memory(cfg, activation, shared_memory(device))
    if M > 256:  # (K unsplit)
        return cfg
    tiles = cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n)
    return cfg._replace(split_k=split_for(tiles, cdiv(K, cfg.block_k), sms))


def _copies_by_tma(device: torch.device) -> bool:
    """Whether ``device`` has the TMA unit: an sm_90 or later GPU. On the CPU (the interpreter) the picks are the
    H100's."""
    return device.type != "cuda" or capability(device)[0] >= 9


def tma_ok(qweight: torch.Tensor) -> bool:
    """Whether the TMA copies tiles of x's fp8 rows ``[M, K]`` (contiguous) and of the weight's: rows of whole 16
    bytes, contiguous, the weight 16-byte aligned (a real tensor: traced calls copy through pointers)."""
    return qweight.shape[1] % 16 == 0 and qweight.stride(0) % 16 == 0 and qweight.data_ptr() % 16 == 0


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
                  norm_weight: Optional[torch.Tensor] = None, norm_eps: float = 0.0):
    """float ``[M, K]`` -> (float8_e4m3fn ``[M, K]``, float32 scale ``[M]``), per token; ``dtype``
    float16: the same values in fp16, as the GEMV reads them. With ``norm_weight`` ``[K]``, of
    ``reference.rms_norm(x, norm_weight in x's dtype, norm_eps)``, computed as the rows are read."""
    M, K = x.shape
    if norm_weight is not None and norm_weight.shape != (K,):
        raise ValueError(f"fp8 quantization of x {tuple(x.shape)} after an RMSNorm: norm_weight has shape "
                         f"{tuple(norm_weight.shape)}, expected ({K},)")
    xq = new_empty((M, K), dtype, x.device)
    scale = new_empty((M,), torch.float32, x.device)
    block_k = min(next_power_of_2(K), 16384)
    # H200: M = 4096, 4 warps 50 us at K = 14336 (16 warps 62), 16.2 at 4096 (8 warps 16.0); 1 to 128 rows of
    # K = 14336, 16 warps 3.3-3.8 us against 3.8-4.8 (bench/results/ab-fp8-gemv-h200.json). The row bound is one
    # pick_config has already, so torch.compile's guards on M add no recompile.
    num_warps = 16 if K > 8192 and M <= 64 else 4
    g = x if norm_weight is None else norm_weight_as_x(norm_weight, x)  # x: any pointer; never read
    launch(
        _quantize_rows_kernel, (M,),
        x, g, xq, scale, K, x.stride(0), x.stride(1), xq.stride(0), float(norm_eps), BLOCK_K=block_k,
        ONE_PASS=block_k >= K, ROUND_BY_CAST=x.is_cuda and dtype == torch.float8_e4m3fn,
        HAS_NORM=norm_weight is not None, num_warps=num_warps,
    )
    return xq, scale


def fp8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    norm_weight: Optional[torch.Tensor] = None,
    norm_eps: float = 0.0,
    config=None,
    split_k_linear_op=None,
) -> torch.Tensor:
    """``fp8(x [M, K]) @ qweight.T`` scaled per token and per channel (+ bias) -> ``[M, N]``
    in x.dtype. ``activation`` (``common.ACTIVATIONS``), computed in float32 before the cast:
    "silu_mul" reads the N columns as ``[gate | up]`` and gives ``silu(gate) * up``
    ``[M, N // 2]``; "gelu" / "gelu_tanh" apply GELU. With ``norm_weight``, of the RMSNorm of x
    (``reference.rms_norm``), which the quantization of x computes as it reads it (``quantize_rows``).
    ``config`` (an ``MmaConfig`` or a ``w8a16.GemvConfig``) overrides the tuned choice; for sweeps.
    ``split_k_linear_op``: what runs a traced call whose kernel splits K, on ``(x, qweight, weight_scale, bias,
    activation, norm_weight, norm_eps)`` (``common.traced_split``; ``w4a16.w4a16_linear`` says why)."""
    M, K = x.shape
    N = qweight.shape[0]
    n_out = output_columns(activation, N)
    assert qweight.shape[1] == K and qweight.stride(1) == 1 and weight_scale.shape == (N,)
    if M == 0:
        return x.new_empty((0, n_out))
    cfg = config or pick_config(M, n_out, K, x.device, activation)
    if split_k_linear_op is not None and config is None and traced_split(cfg, x, N):
        return split_k_linear_op(x, qweight, weight_scale, bias, activation, norm_weight, norm_eps)
    # (the picks fit already; a config given must be checked here)
    if (config is not None and isinstance(cfg, MmaConfig) and x.is_cuda
            and shared_bytes(cfg, activation) > shared_memory(x.device)):
        raise ValueError(f"{cfg} under activation {activation!r} needs {shared_bytes(cfg, activation)} bytes of shared "
                         f"memory a program; {x.device} has {shared_memory(x.device)}: fewer stages or smaller blocks")
    if isinstance(cfg, MmaConfig) and cfg.tma and is_fake(x):
        # traced, pointers: Inductor (torch 2.11) keeps no descriptor of a tensor made inside the op, as x's fp8 rows
        cfg = cfg._replace(tma=False)
    if isinstance(cfg, MmaConfig) and cfg.tma and not (tma_ok(qweight) and _copies_by_tma(x.device)):
        if config is not None:
            raise ValueError(f"{cfg} copies x and the weight by TMA (an sm_90 or later GPU): needs K a multiple of 16 "
                             f"and the weight's rows of whole 16 bytes, 16-byte aligned; got qweight "
                             f"{tuple(qweight.shape)} strides {qweight.stride()} offset {qweight.storage_offset()} "
                             f"(its address {qweight.data_ptr() % 16} bytes past a multiple of 16) on {x.device}")
        cfg = cfg._replace(tma=False)
    if isinstance(cfg, w8a16.GemvConfig):
        xq, x_scale = quantize_rows(x, torch.float16, norm_weight, norm_eps)
        return w8a16.w8_gemv(xq, qweight, weight_scale, bias, activation, cfg, x_scale, out_dtype=x.dtype)
    xq, x_scale = quantize_rows(x, torch.float8_e4m3fn, norm_weight, norm_eps)
    out = new_empty((M, n_out), x.dtype, x.device)
    bias, stride_bm = bias_rows(bias, M, N)
    has_bias = bias is not None
    grid = (cdiv(M, cfg.block_m) * cdiv(n_out, cfg.block_n), cfg.split_k)
    ws = split_k_workspace(M, N, grid[0], cfg.split_k, out)
    a, b = xq, qweight
    if cfg.tma:
        a = TensorDescriptor.from_tensor(xq, [cfg.block_m, cfg.block_k])
        b = TensorDescriptor.from_tensor(qweight, [cfg.block_n, cfg.block_k])
    launch(
        _fp8_mma_kernel, grid,
        a, b, x_scale, weight_scale, bias if has_bias else weight_scale, out, ws, M, n_out, N - n_out, K,
        xq.stride(0), qweight.stride(0), stride_bm, out.stride(0), out.stride(1), N,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        SPLIT_K=cfg.split_k, EVEN_K=K % cfg.block_k == 0, HAS_BIAS=has_bias, ACTIVATION=activation, TMA=cfg.tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
