"""W8A16: int8 weights ``[N, K]`` (nn.Linear's orientation) with one scale per output
channel, fp16/bf16 (or fp32) activations. ``out = (x @ q.T) * scales``.

- ``_w8a16_gemv_kernel`` (M of a few rows): each program owns ``BLOCK_N`` weight rows of one
  activation row and streams them along K with 16-byte loads; the per-channel scale is
  applied once at the end. Bound by the bytes of ``qweight``.
- ``_w8a16_mma_kernel`` (larger M): int8 tiles converted to the activation dtype (exact:
  |q| <= 128) and fed to ``tl.dot``; the scale multiplies the accumulator.

Both split K when the tiles alone would leave the GPU idle; the programs of a tile add
their partial sums into a float32 workspace and the last to arrive finishes the tile
(``common.store_output``).
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import MmaConfig, output_columns, sm_count, split_for, split_k_workspace, store_output


@triton.jit
def _gemv_partial(x_row, qw_ptr, offs_n, mask_n, k_start, k_end, stride_xk, stride_qn, stride_qk,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr):
    """float32 sum over k in [k_start, k_end) of x[k] * q[n, k] for the rows offs_n of qweight: [BLOCK_N]."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < k_end
        if EVEN_N:
            mask_w = mask_k[None, :]
        else:
            mask_w = mask_n[:, None] & mask_k[None, :]
        q = tl.load(qw_ptr + offs_n[:, None] * stride_qn + ks[None, :] * stride_qk, mask=mask_w, other=0)
        x = tl.load(x_row + ks * stride_xk, mask=mask_k, other=0).to(tl.float32)
        # 0x4B000080 + q is the float32 2**23 + 128 + q for -128 <= q < 128.
        w = (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        acc += x[None, :] * w
    return tl.sum(acc, axis=1)


@triton.jit
def _w8a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, b_ptr, out_ptr, ws_ptr,
    M, N_OUT, N_UP, K,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_om, stride_on, stride_wm,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_N: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    x_row = x_ptr + pid_m * stride_xm
    acc = _gemv_partial(x_row, qw_ptr, offs_n, mask_n, k_start, k_end, stride_xk, stride_qn, stride_qk,
                        BLOCK_N, BLOCK_K, EVEN_N)
    acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)
    acc_up = acc
    if SILU_MUL:
        acc_up = _gemv_partial(x_row, qw_ptr + N_UP * stride_qn, offs_n, mask_n, k_start, k_end, stride_xk,
                               stride_qn, stride_qk, BLOCK_N, BLOCK_K, EVEN_N)
        acc_up *= tl.load(s_ptr + N_UP + offs_n, mask=mask_n, other=0).to(tl.float32)
    rows = pid_m + tl.arange(0, 1)
    store_output(acc[None, :], acc_up[None, :], rows, offs_n, rows < M, mask_n, pid_m * tl.num_programs(1) + pid_n,
                 M, N_UP, b_ptr, out_ptr, ws_ptr, stride_om, stride_on, stride_wm, SPLIT_K, HAS_BIAS, SILU_MUL)


@triton.jit
def _w8a16_mma_kernel(
    x_ptr, qw_ptr, s_ptr, b_ptr, out_ptr, ws_ptr,
    M, N_OUT, N_UP, K,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_om, stride_on, stride_wm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N_OUT, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows and columns read row 0 again (always valid) and are never stored.
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    qw_ptrs = qw_ptr + (offs_n % N_OUT)[:, None] * stride_qn + offs_k[None, :] * stride_qk
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty

    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    tile_start = pid_k * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = acc
    for t in range(tile_start, tile_end):
        k0 = t * BLOCK_K
        if EVEN_K:
            x = tl.load(x_ptrs + k0 * stride_xk)
            q = tl.load(qw_ptrs + k0 * stride_qk)
        else:
            mask_k = (k0 + offs_k) < K
            x = tl.load(x_ptrs + k0 * stride_xk, mask=mask_k[None, :], other=0)
            q = tl.load(qw_ptrs + k0 * stride_qk, mask=mask_k[None, :], other=0)
        acc = tl.dot(x, tl.trans(q.to(DTYPE)), acc, input_precision=DOT_PRECISION)
        if SILU_MUL:
            if EVEN_K:
                q_up = tl.load(qw_ptrs + N_UP * stride_qn + k0 * stride_qk)
            else:
                q_up = tl.load(qw_ptrs + N_UP * stride_qn + k0 * stride_qk, mask=mask_k[None, :], other=0)
            acc_up = tl.dot(x, tl.trans(q_up.to(DTYPE)), acc_up, input_precision=DOT_PRECISION)
    mask_n = offs_n < N_OUT
    acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    if SILU_MUL:
        acc_up *= tl.load(s_ptr + N_UP + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    store_output(acc, acc_up, offs_m, offs_n, offs_m < M, mask_n, pid, M, N_UP, b_ptr, out_ptr, ws_ptr,
                 stride_om, stride_on, stride_wm, SPLIT_K, HAS_BIAS, SILU_MUL)


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


GEMV_MAX_M = 2


def pick_config(M: int, N: int, K: int, device: torch.device):
    """The kernel and its block shapes for a problem; tuned on the H100 (bench/NOTES-kernels.md)."""
    sms = sm_count(device)
    if M <= GEMV_MAX_M:  # H100 sweep, 2026-11-24: the best of 18 block shapes per weight shape
        if K >= 8192:
            return GemvConfig(4, 1024, 1, num_warps=4, num_stages=2)
        if N >= 16384:
            return GemvConfig(16, 256, 1, num_warps=4, num_stages=2)
        return GemvConfig(8, 512, 1, num_warps=4, num_stages=2)
    if M <= 16:
        cfg = MmaConfig(16, 64, 128, 1, num_warps=4, num_stages=4)
    elif M <= 64:
        cfg = MmaConfig(64, 64, 128, 1, num_warps=4, num_stages=4)
    elif M <= 256:
        cfg = MmaConfig(64, 128, 64, 1, num_warps=4, num_stages=4)
    else:
        cfg = MmaConfig(128, 256, 64, 1, num_warps=8, num_stages=3)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    return cfg._replace(split_k=split_for(tiles, triton.cdiv(K, cfg.block_k), sms))


def w8a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    config=None,
) -> torch.Tensor:
    """``(x [M, K] @ qweight.T) * scales (+ bias)`` -> ``[M, N]`` in x.dtype.

    ``activation="silu_mul"``: the N columns are ``[gate | up]`` and the result is
    ``silu(gate) * up`` ``[M, N // 2]``, computed in float32 before the cast.
    ``config`` (a ``GemvConfig`` or ``MmaConfig``) overrides the tuned choice; for sweeps.
    """
    M, K = x.shape
    N = qweight.shape[0]
    n_out = output_columns(activation, N)
    assert qweight.shape[1] == K and scales.shape == (N,)
    if M == 0:
        return x.new_empty((0, n_out))
    cfg = config or pick_config(M, n_out, K, x.device)
    out = torch.empty((M, n_out), device=x.device, dtype=x.dtype)
    has_bias = bias is not None
    if isinstance(cfg, GemvConfig):
        grid = (M, triton.cdiv(n_out, cfg.block_n), cfg.split_k)
        kernel, meta = _w8a16_gemv_kernel, dict(EVEN_N=n_out % cfg.block_n == 0)
    else:
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(n_out, cfg.block_n), cfg.split_k)
        kernel = _w8a16_mma_kernel
        meta = dict(BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, EVEN_K=K % cfg.block_k == 0,
                    DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    ws = split_k_workspace(M, N, grid[0] * (grid[1] if len(grid) == 3 else 1), cfg.split_k, out)
    torch.library.wrap_triton(kernel)[grid](
        x, qweight, scales, bias if has_bias else scales, out, ws, M, n_out, N - n_out, K,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), out.stride(0), out.stride(1), N,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k, HAS_BIAS=has_bias,
        SILU_MUL=activation == "silu_mul", num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta,
    )
    return out
