"""W4A16: group-wise int4 weights, fp16/bf16 (or fp32) activations.

Layout (see ``reference.py``): ``qweight`` int32 ``[K // 8, N]`` with row ``k`` in nibble
``k % 8``, or those words in column tiles (``common.WORD_TILE``); ``scales``/``zeros``
``[K // group_size, N]`` in the activation dtype, the zeros integers; ``w = (q - zero) * scale``.

Seven paths, chosen by M (``pick_config``):

- ``w4a16_gemv.w4a16_gemv_kernel`` (M = 1, and 2 on small weights): no tensor cores; the words
  dequantized two weights an instruction by inline PTX (``int4_pairs``; see that module).
- ``w4a16_warp_mma.w4a16_warp_mma_kernel`` (M up to 16, fp16/bf16 on a GPU): the same
  dequantization feeding warp-level ``mma.sync`` from registers, one lane's loads being its
  MMA fragments (inline PTX; see that module). Reads the weight at the GEMV's rate for any
  M up to 8.
- ``w4a16_wgmma.w4a16_wgmma_kernel`` (17 to 32 rows, fp16/bf16 on Hopper; to 64 where the TMA cannot
  read the words): warpgroup MMA from registers in Gluon, the dequantization writing the MMA's operand
  registers themselves (see that module); the residual and activation after it, as for cuBLAS below.
- ``w4a16_wgmma_tma.w4a16_wgmma_tma_rs_kernel`` (33 to 128 rows, fp16/bf16 on Hopper, words the TMA reads:
  ``wgmma_tma_words_ok``): the same register operand, with x, the words, scales and zeros copied in by TMA.
- ``w4a16_wgmma_tma.w4a16_wgmma_tma_kernel`` (65 to 128 rows where the TMA cannot read the words): x's tiles
  copied into shared memory by TMA, the weights dequantized into shared memory beside them, ``wgmma`` from
  both (see that module); residual and activation after it too. From 129 to 256 rows its warp-specialized
  form (``w4a16_wgmma_tma_ws_kernel``): one warp copies x, the words, scales and zeros by TMA, four warps
  dequantize, the kernel's warps run the MMAs; to 1024 rows where its tiles fill whole waves, or fill one and leave
  a tail, split in K over the second or left to the dequantized weight + cuBLAS (``_wgmma_tma_tail``).
- ``_w4a16_mma_kernel`` (larger M, or inputs the other kernels cannot read): unpacks the
  transposed tile ``[BLOCK_N, BLOCK_K]`` (each word's nibbles joined in the registers that
  loaded it), dequantizes it in the activation dtype and feeds ``tl.dot``. ``SWAP_AB``
  computes the transposed product, the weight tile as the left operand, which the Hopper MMA
  reads from registers: no trip through shared memory between dequantization and MMA (each
  step's wgmmas finish before the next step's dequantization: ``common.mma_accumulate``); there,
  for fp16 and bf16 on a GPU, inline PTX dequantizes two weights an instruction (PACKED).
- ``_w4a16_dequantize_kernel`` + cuBLAS (M > 128; on Hopper past 256, where the kernel above does not run;
  ``dequantize_matmul``): writes the fp16/bf16 weight once, then ``torch.mm``. Where the GEMM is compute-bound, one
  extra pass over 2 bytes per weight costs less than the dequantization inside the fused kernel's main loop (which
  Triton does not overlap with the tensor cores well enough: about 0.5x of cuBLAS). From 1024 rows in chunks of
  columns, each dequantized on a side stream while cuBLAS multiplies the one before.

From 257 to 511 rows on Hopper x's rows may go in two parts, the first 256 and the rest, each by its own pick, where
that beats one pick for all of them (``RowSplitConfig``, ``_rows_apart``).

The GEMV computes the RMSNorm of x itself when given its weight (``w4a16_gemv``); the other paths
run the norm as a pass of its own. A bias may be shaped as the output (a residual, ``common.bias_rows``).

The GEMV, the warp-level and the tensor-core kernels may split K over ``SPLIT_K`` programs when
the (M, N) tiles alone would leave the GPU idle; the programs of a tile add their partial sums
into a float32 workspace kept between calls (``split_k_workspace``) and the last to arrive finishes
the tile and leaves the workspace at zero again (``store_output``): no launch before it, none after.
That same epilogue computes the ``activation``: GELU, or ``"silu_mul"`` (columns ``[gate | up]``,
result ``silu(gate) * up``), each program computing matching gate and up tiles (the GEMV in one
pass over K, its gate columns then its up columns as one tile). The Gluon kernels split K their own
way (the wgmma kernel into a workspace each launch leaves zero, ``split_k_workspace``; the TMA
kernels into that workspace too, finished by one launch after, ``common.split_total_kernel``) and,
like dequantize + cuBLAS, leave a residual and the activation to one pointwise pass after them
(fused by Inductor under torch.compile).
"""

import contextlib
import importlib.util
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from .common import (MAX_UNROLLED_STEPS, activated, asm_constant, bias_rows, capability, cdiv, dependent_launch,
                     grouped_tile, inv_rms_of_squares, launch_dependent_grids, mma_accumulate, mma_zeros,
                     next_power_of_2, normed, norm_weight_as_x, output_columns, register_budget, row_inv_rms, sm_count,
                     split_for, split_k_workspace, split_range, split_total_kernel, store_output, traced_split,
                     triton_interpreted, unrolled_steps, wait_for_prior_grids, WORD_TILE, word_columns, word_offsets,
                     word_strides)
from .int4_pairs import NIBBLE_PAIRS_OUT, bf16_nibble_pairs, f16_nibble_pairs, zero_bf16x2, zero_f16x2
from .reference import activation_after_gemm, check_up_run, gate_up_halves
from .replay import join_rows, launch, new_empty, rows_of
from .w4a16_gemv import w4a16_gemv_kernel
from .w4a16_warp_mma import warp_mma_columns, w4a16_warp_mma_kernel


# The asm of the tensor-core tile's weights (composed once here: Triton takes an asm string as a constant);
# outputs $0..$7: the weights of nibbles 0..7; q_j holds nibbles j and j + 4
_WORD_WEIGHTS_F16 = asm_constant("""
        {
        .reg .b32 t, q0, q1, q2, q3, sixteenth;
        mov.b32 sixteenth, 0x2C002C00;""" + f16_nibble_pairs("$8", 1.0, "$9", "$10") + """
        mul.rn.f16x2 q0, q0, $11;
        mul.rn.f16x2 q1, q1, $11;
        mul.rn.f16x2 q2, q2, $11;
        mul.rn.f16x2 q3, q3, $11;""" + NIBBLE_PAIRS_OUT)
_WORD_WEIGHTS_BF16 = asm_constant("""
        {
        .reg .b32 t1, t2, t3, q0, q1, q2, q3, one, nz;
        mov.b32 one, 0x3F803F80;
        mov.b32 nz, 0x80008000;""" + bf16_nibble_pairs("$8", "$9") + """
        fma.rn.bf16x2 q0, q0, $10, nz;
        fma.rn.bf16x2 q1, q1, $10, nz;
        fma.rn.bf16x2 q2, q2, $10, nz;
        fma.rn.bf16x2 q3, q3, $10, nz;""" + NIBBLE_PAIRS_OUT)


@triton.jit
def _dequantize_tile(q, scale, zero, DTYPE: tl.constexpr):
    """int4 codes q (int32, any 2-D shape), scale/zero broadcastable -> DTYPE. ``q - zero`` is
    exact (integers in [-15, 15]); the one rounding is the scale's."""
    if DTYPE == tl.float16:  # 0x6400 | q is 1024 + q in fp16
        return ((q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - (zero + 1024.0)) * scale
    # bf16 and fp32 through fp32 (0x4B000000 | q is 2**23 + q): Triton's interpreter miscomputes
    # arithmetic on bf16 values made by a bitcast.
    codes = (q | 0x4B000000).to(tl.float32, bitcast=True) - (zero.to(tl.float32) + 8388608.0)
    return (codes * scale.to(tl.float32)).to(DTYPE)


@triton.jit
def _w4a16_dequantize_kernel(
    qw_ptr, s_ptr, z_ptr, w_ptr, K, N, first_column,
    stride_qk, stride_qn, stride_qt, stride_sg, stride_sn, stride_wk, stride_wn,
    GROUP_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, TILE: tl.constexpr,
):
    """The weight's columns ``first_column`` to ``first_column + N`` ``[K, N]`` in the activation dtype, for cuBLAS
    at large M."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < K // 8)[:, None] & (offs_n < N)[None, :]
    columns = first_column + offs_n
    words = tl.load(qw_ptr + rows[:, None] * stride_qk + word_offsets(columns, stride_qn, stride_qt, TILE)[None, :],
                    mask=mask, other=0)
    sz_offs = ((rows * 8) // GROUP_SIZE)[:, None] * stride_sg + columns[None, :] * stride_sn
    scale = tl.load(s_ptr + sz_offs, mask=mask, other=0)
    zero = tl.load(z_ptr + sz_offs, mask=mask, other=0)
    for j in tl.static_range(8):
        w = _dequantize_tile((words >> (4 * j)) & 0xF, scale, zero, w_ptr.dtype.element_ty)
        tl.store(w_ptr + (rows * 8 + j)[:, None] * stride_wk + offs_n[None, :] * stride_wn, w, mask=mask)


@triton.jit
def rms_norm_kernel(x_ptr, g_ptr, out_ptr, K, stride_xm, stride_xk, stride_om, eps, BLOCK_K: tl.constexpr,
                    ONE_PASS: tl.constexpr, PDL: tl.constexpr = False):
    """Row ``program_id`` of ``reference.rms_norm``: x times 1 / rms in float32, rounded to x's dtype, times g (in
    x's dtype), rounded once. ONE_PASS: the row fits one block, read once. PDL: launched with programmatic
    dependent launch (``common.dependent_launch``), so that the kernel after it (the linear it feeds) starts its
    weights' loads while it runs; g, which no kernel writes, is read before the wait, off the chain's path."""
    if PDL:
        launch_dependent_grids()
    row = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_K)
    if ONE_PASS:
        mask = offs < K
        g = tl.load(g_ptr + offs, mask=mask, other=0).to(tl.float32)
    if PDL:  # (added to the row, not to the pointer, whose alignment Triton would then no longer know)
        row += wait_for_prior_grids()
    x_row = x_ptr + row * stride_xm
    out_row = out_ptr + row * stride_om
    if ONE_PASS:
        x = tl.load(x_row + offs * stride_xk, mask=mask, other=0).to(tl.float32)
        scale = inv_rms_of_squares(x * x, K, eps)
        tl.store(out_row + offs, normed(x, scale, g, dtype), mask=mask)
    else:
        scale = row_inv_rms(x_row, K, stride_xk, eps, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):  # (the row again, from L1 / L2)
            cols = k0 + offs
            mask = cols < K
            x = tl.load(x_row + cols * stride_xk, mask=mask, other=0).to(tl.float32)
            g = tl.load(g_ptr + cols, mask=mask, other=0).to(tl.float32)
            tl.store(out_row + cols, normed(x, scale, g, dtype), mask=mask)


@triton.jit
def _along_rows(v0, v1, v2, v3, v4, v5, v6, v7):
    """Eight ``[R, C]`` tiles, one a nibble of each word -> ``[R, 8 C]``, nibble j of word c at
    column 8 c + j.

    The tiles are joined in registers, so each thread keeps the values of the words it loaded
    and the reshape moves no data: Triton then converts the tile straight to the register
    operand of the tensor-core instruction (no trip through shared memory)."""
    # join appends the new axis last, so the outermost join picks bit 0 of j, the innermost bit 2
    tile = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    return tl.reshape(tile, (v0.shape[0], v0.shape[1] * 8))


@triton.jit
def _pair(value):
    """A 16-bit ``value`` (fp16 or bf16), twice, in one 32-bit register."""
    return tl.inline_asm_elementwise("mov.b32 $0, {$1, $1};", "=r,h", [value], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _word_weights_f16(words, z_low, z_high, scale_pair):
    """The eight fp16 weights ``(q_j - z) * scale`` of each word (nibble j): four half2 of nibbles
    (j, j + 4), q - z exact (``f16_nibble_pairs``), then one HMUL2 a pair by the scale: the
    rounding of ``_dequantize_tile``, in 13 instructions for 8 weights."""
    return tl.inline_asm_elementwise(
        _WORD_WEIGHTS_F16,
        "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r,r", [words, z_low, z_high, scale_pair],
        dtype=(tl.float16,) * 8, is_pure=True, pack=1,
    )


@triton.jit
def _word_weights_bf16(words, z_128, scale_pair):
    """``_word_weights_f16`` for bf16 (``z_128`` from ``zero_bf16x2``): q - z exact
    (``bf16_nibble_pairs``), then one fma with -0 multiplies by the scale (one rounding, as
    ``_dequantize_tile``'s)."""
    return tl.inline_asm_elementwise(
        _WORD_WEIGHTS_BF16,
        "=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", [words, z_128, scale_pair],
        dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1,
    )


@triton.jit
def _mma_weight_tile(qw_ptrs, s_ptr, z_ptr, offs_n, mask_n, k0, stride_qk, stride_sg, stride_sn,
                     GROUP_SIZE: tl.constexpr, EVEN_N: tl.constexpr, DTYPE: tl.constexpr, PACKED: tl.constexpr):
    """The dequantized weight tile at row k0 and columns offs_n, transposed: ``[BLOCK_N, BLOCK_K]``
    (qw_ptrs: the ``[BLOCK_N, BLOCK_K // 8]`` word pointers of row 0). PACKED (fp16 or bf16 on a
    GPU): by inline PTX, two weights an instruction, with the same result."""
    if EVEN_N:
        words = tl.load(qw_ptrs + (k0 // 8) * stride_qk)
    else:
        words = tl.load(qw_ptrs + (k0 // 8) * stride_qk, mask=mask_n[:, None], other=0)
    g = k0 // GROUP_SIZE
    scale = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0)[:, None]
    zero = tl.load(z_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0)[:, None]
    if PACKED and DTYPE == tl.float16:
        z_low, z_high = zero_f16x2(zero, False)
        w0, w1, w2, w3, w4, w5, w6, w7 = _word_weights_f16(words, z_low, z_high, _pair(scale))
        tile = _along_rows(w0, w1, w2, w3, w4, w5, w6, w7)
    elif PACKED:
        w0, w1, w2, w3, w4, w5, w6, w7 = _word_weights_bf16(words, zero_bf16x2(zero), _pair(scale))
        tile = _along_rows(w0, w1, w2, w3, w4, w5, w6, w7)
    else:
        codes = _along_rows(words & 0xF, (words >> 4) & 0xF, (words >> 8) & 0xF, (words >> 12) & 0xF,
                            (words >> 16) & 0xF, (words >> 20) & 0xF, (words >> 24) & 0xF, (words >> 28) & 0xF)
        tile = _dequantize_tile(codes, scale, zero, DTYPE)
    return tile


@triton.jit
def _w4a16_mma_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr,
    M, N_OUT, N_UP, K,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_qt, stride_sg, stride_sn, stride_bm, stride_om, stride_on,
    stride_wm, TILE: tl.constexpr,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr,
    EVEN_N: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr,
    PACKED: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m, offs_n = grouped_tile(pid, M, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    mask_n = offs_n < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    word_rows = tl.arange(0, BLOCK_K // 8)[None, :] * stride_qk
    qw_ptrs = qw_ptr + word_offsets(offs_n, stride_qn, stride_qt, TILE)[:, None] + word_rows
    qw_up_ptrs = qw_ptr + word_offsets(offs_n + N_UP, stride_qn, stride_qt, TILE)[:, None] + word_rows
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty

    k_tiles = K // BLOCK_K  # BLOCK_K divides group_size, which divides K
    tile_start, tile_end = split_range(tl.program_id(1), k_tiles, SPLIT_K, 1)
    acc = mma_zeros(BLOCK_M, BLOCK_N, SWAP_AB)
    acc_up = acc
    for t in range(tile_start, tile_end):
        k0 = t * BLOCK_K
        x = tl.load(x_ptrs + k0 * stride_xk)
        w_t = _mma_weight_tile(qw_ptrs, s_ptr, z_ptr, offs_n, mask_n, k0, stride_qk, stride_sg, stride_sn,
                               GROUP_SIZE, EVEN_N, DTYPE, PACKED)
        acc = mma_accumulate(acc, x, w_t, SWAP_AB, DOT_PRECISION)
        if ACTIVATION == "silu_mul":
            w_up_t = _mma_weight_tile(qw_up_ptrs, s_ptr, z_ptr, offs_n + N_UP, mask_n, k0, stride_qk,
                                      stride_sg, stride_sn, GROUP_SIZE, EVEN_N, DTYPE, PACKED)
            acc_up = mma_accumulate(acc_up, x, w_up_t, SWAP_AB, DOT_PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)
    store_output(acc, acc_up, offs_m[:, None], offs_n[None, :], (offs_m < M)[:, None] & mask_n[None, :], pid, M,
                 N_UP, b_ptr, out_ptr, ws_ptr, stride_bm, stride_om, stride_on, stride_wm, SPLIT_K, HAS_BIAS,
                 ACTIVATION)


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int  # K per loop step: a power of two, at least 16
    split_k: int
    num_warps: int
    packed_f16: bool = True  # half2 dequantization (inline PTX) where x is fp16 on a GPU
    packed_bf16: bool = True  # bf16x2 dequantization (inline PTX) where x is bf16 on a GPU
    unrolled: bool = False  # the packed paths' loop over K unrolled where every split is whole steps
    # (``common.unrolled_steps``)
    maxnreg: int = 0  # registers a thread for ptxas (0: its own choice; ``common.register_budget``)


def _packed_ok(x: torch.Tensor) -> bool:
    """The packed paths read x 8 values at a time: fp16 or bf16 on a GPU, rows contiguous and
    16-byte aligned."""
    # (storage_offset, not data_ptr: under torch.compile x is a fake tensor; allocations are aligned)
    return (x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda and not triton_interpreted()
            and x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.storage_offset() % 8 == 0)


_TRITON_AFTER_3_6 = tuple(int(part) for part in triton.__version__.split(".")[:2]) > (3, 6)


def gemv_groups_first(cfg: GemvConfig) -> bool:
    """Whether the GEMV's packed tile has its groups on its first axis (``GROUPS_FIRST``), its rows on the second:
    under Triton after 3.6, at 8 warps or more. Triton 3.9 spreads 16 warps over both axes of ``[rows, groups]``
    (warpsPerCTA [8, 2, 1]), so the sums cross warps twice (5 CTA barriers at 4096^2); on ``[groups, rows]`` it puts
    them on the groups (3 barriers), as 3.6 does on ``[rows, groups]`` (2). H100, one row, the picks' kernels
    compiled for sm_90 (bench/NOTES-kernels.md, seventy-eighth session), Triton 3.9, us, ``[rows, groups]`` ->
    ``[groups, rows]`` with the rows' sums taken first, fp16 / bf16: 4096^2 (16 warps) 5.52 / 5.39 -> 4.10 / 4.17,
    4096x6144 (8) 5.46 / 5.55 -> 4.66 / 4.85, 14336x4096 (16) 9.79 / 10.32 -> 8.69 / 9.24; Triton 3.6 takes 3.96 /
    3.98, 4.76 / 4.82, 8.58 / 9.07. The 4-warp tiles, mixed, keep theirs (4096x28672 24.93 / 25.61 -> 24.77 / 25.36,
    silu_mul on runs of 16 23.36 / 26.08 -> 25.05 / 25.12). Triton 3.6 on ``[groups, rows]`` takes 5 barriers where
    it takes 2, and loses (4096^2 fp16 3.87 -> 5.47). Triton 3.7 and 3.8 are not measured."""
    return _TRITON_AFTER_3_6 and cfg.num_warps >= 8


def gemv_meta(cfg: GemvConfig, x: torch.Tensor, K: int, group_size: int, two_runs: bool = False) -> dict:
    """The GEMV kernel's tile constexprs for x ``[M, K]``, which dequantization it runs:
    PACKED_F16 / PACKED_BF16 (inline PTX, two weights a register) or neither (float32), and
    UNROLLED_STEPS (``common.unrolled_steps``; the packed paths only); GROUPS_FIRST, the packed tile's order
    (``gemv_groups_first``); and ``cfg.maxnreg``'s launch
    arguments (``register_budget``) for the packed paths only, which the budgets were measured on: the float32
    path needs more registers a thread (sm_90, Triton 3.6, the 4096x28672 one-row pick: 230 of ptxas's own
    choice; at its budget of 72, 223 spill stores and 417 us against 73 on the H100; bench/NOTES-kernels.md,
    seventy-fifth session). Nor where a program's columns lie in ``two_runs`` (gate and up of ``[gate | up]``
    under silu_mul), whose addresses take more registers: at 72 the 4096 -> 2 x 14336 pick spills (408 bytes a
    thread under Triton 3.6), and on the H100 with Triton 3.9 takes 52.68 us against 45.55 with ptxas's choice
    (3.6: 81.14 against 82.11; seventy-sixth session)."""
    word_rows = cfg.block_k // 8
    group_rows = math.gcd(group_size // 8 & -(group_size // 8), word_rows)  # a power of two
    packed = group_rows >= 2 and _packed_ok(x)
    packed_f16 = packed and cfg.packed_f16 and x.dtype == torch.float16
    packed_bf16 = packed and cfg.packed_bf16 and x.dtype == torch.bfloat16
    packed_path = packed_f16 or packed_bf16
    return dict(GROUP_ROWS=group_rows, GROUPS=word_rows // group_rows,
                EVEN_K=(K // 8) % (cfg.split_k * word_rows) == 0, PACKED_F16=packed_f16, PACKED_BF16=packed_bf16,
                GROUPS_FIRST=packed_path and gemv_groups_first(cfg),
                UNROLLED_STEPS=unrolled_steps(cfg.unrolled and packed_path, K // 8, cfg.split_k, word_rows),
                **register_budget(cfg.maxnreg if packed_path and not two_runs else 0))


class MmaConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    swap_ab: bool
    num_warps: int
    num_stages: int
    group_m: int = 8


class WarpMmaConfig(NamedTuple):
    """The warp-level MMA kernel (``w4a16_warp_mma``) for M <= 16."""

    num_warps: int
    split_k: int
    row_tiles: int  # 8-row tiles of x a program covers (1 or 2); more rows take more programs
    column_warps: int = 1  # warps side by side on blocks of a warp's columns; each block's warps take turns over K
    unrolled: bool = False  # each warp's loop over its groups unrolled (``warp_mma_unrolled_iterations``)
    maxnreg: int = 0  # registers a thread for ptxas (0: its own choice; ``warp_mma_registers``)
    prefetch_groups: int = 0  # each warp's words pulled into L2 this many groups ahead (``warp_mma_prefetch``)
    loop_unroll: int = 1  # where not ``unrolled``: the loop's body repeated this many times an iteration
    column_blocks: int = 4  # a warp's 16-column MMA blocks: 4 (64 weight columns) or 2 (32)


def warp_mma_most_warps(cfg: WarpMmaConfig) -> int:
    """The most warps a column block of the warp-level MMA kernel takes: 8, and a warp's sums, 4 a block and 8-row
    tile, in whole pairs a warp (``_shared_sums``)."""
    return min(8, 2 * cfg.column_blocks * cfg.row_tiles)


def warp_mma_ok(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, n_out: int) -> bool:
    """What the warp-level MMA kernel reads as 16- and 8-byte vectors must be aligned so: x as
    for the packed GEMV, weight rows, columns and tiles in fours, groups of whole 64-row steps."""
    N = word_columns(qweight)
    stride_qn, stride_qt, _ = word_strides(qweight)
    return (_packed_ok(x) and x.shape[0] <= WARP_MMA_MAX_M and group_size % 64 == 0 and N % 4 == 0 and n_out % 4 == 0
            and stride_qn == 1 and qweight.stride(0) % 4 == 0 and stride_qt % 4 == 0
            and qweight.storage_offset() % 4 == 0
            and scales.stride(1) == 1 and scales.stride(0) % 4 == 0 and scales.storage_offset() % 4 == 0
            and zeros.storage_offset() % 4 == 0 and scales.dtype == zeros.dtype == x.dtype)


class WgmmaConfig(NamedTuple):
    """The Hopper kernel (``w4a16_wgmma``) for 17 to 32 rows (64 where the TMA cannot read the words): x's rows a
    program, 64 weight columns a warpgroup, K split over programs by chunks of 128 rows."""

    block_m: int
    warpgroups: int
    split_k: int
    scaled: bool = False  # the weights scaled in x's dtype before the MMA, not exact (one accumulator)


class WgmmaTmaConfig(NamedTuple):
    """The Hopper kernels with x by TMA (``w4a16_wgmma_tma``): a ``block_m`` x ``block_n`` output tile a program,
    x's steps in ``stages`` shared buffers filled by TMA, K split over programs by steps of 64. The weights
    through shared memory for 129 to 256 rows, and to 1024 where its tiles fill whole waves (``_wgmma_tma_waves``):
    with ``dequant_warps`` > 0 warp-specialized, that many warps dequantizing beside the ``num_warps`` of the MMAs,
    every operand by TMA (words, scales and zeros as ``wgmma_tma_words_ok`` allows). With ``registers``, for 33 to
    128 rows, the weights as the MMA's register operand (one warpgroup, ``block_n`` 64; every operand by TMA too),
    and with ``loader_warp`` too, warp-specialized: a warp of its own issues the copies (``_wgmma_registers_config``).
    Warp-specialized, ``split_from_column`` > 0 splits K only in the tiles from that column on, which run after the
    whole tiles before it; ``dequantized_from_column`` > 0 leaves the columns from there to the dequantized weight and
    cuBLAS instead (tails of a wave, ``_wgmma_tma_waves``). ``maxnreg``: the registers a thread of the
    warp-specialized register-fed kernel, which set how many of its programs an SM holds (``rs_ws_registers``); 0
    for ``RS_WS_REGISTERS``, two (64- and 128-row tiles; 256-row tiles take ``RS_WS_256_REGISTERS``, one, from 129 to
    512 rows: ``_register_fed_one_wave``).
    """

    block_m: int
    block_n: int
    stages: int
    split_k: int
    num_warps: int = 8
    dequant_warps: int = 0
    registers: bool = False
    loader_warp: bool = False
    split_from_column: int = 0
    dequantized_from_column: int = 0
    maxnreg: int = 0


def wgmma_ok(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             group_size: int) -> bool:
    """Whether the Hopper kernels read these inputs: fp16/bf16 x on an sm_90 GPU with a Triton that has
    Gluon, contiguous rows of x, the weight and its scales and zeros, K in whole chunks (``wgmma_chunks``),
    and x as the TMA reads it (``_packed_ok``: rows of whole 16 bytes, 16-byte aligned)."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _hopper(x.device)
            and wgmma_chunks(x.shape[1], group_size) and _packed_ok(x) and word_strides(qweight)[0] == 1
            and scales.stride(1) == 1 and scales.dtype == zeros.dtype == x.dtype)


def wgmma_chunks(K: int, group_size: int) -> bool:
    """Whether K splits into the Hopper kernel's chunks of 128 rows, each within one group or two of 64."""
    return K % 128 == 0 and (group_size == 64 or group_size % 128 == 0)


# Gluon, which the Hopper kernel is written in (Triton 3.6 and 3.9 have it), looked up without importing it
_GLUON = importlib.util.find_spec("triton.experimental.gluon") is not None


def _hopper(device: torch.device) -> bool:
    """Whether ``device`` runs the Hopper kernel: an sm_90 GPU, and Gluon in this Triton."""
    return device.type == "cuda" and _GLUON and capability(device) == (9, 0)


def wgmma_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, bias: Optional[torch.Tensor], block_m: int, warpgroups: int,
                 split_k: int, scaled: bool = False) -> torch.Tensor:
    """``WgmmaConfig``'s GEMM, ``x @ w (+ bias [N])`` -> ``[M, N]`` in x.dtype (``w4a16_wgmma``, imported
    here at the first call)."""
    from .w4a16_wgmma import w4a16_wgmma_kernel

    M, K = x.shape
    N = word_columns(qweight)
    _, stride_qt, tile = word_strides(qweight)
    out = new_empty((M, N), x.dtype, x.device)
    grid = (cdiv(N, 64 * warpgroups), cdiv(M, block_m), split_k)
    # split, the sums and a count per output tile; unsplit never read
    sums = split_k_workspace(M, N, grid[0] * grid[1], split_k, out)
    launch(
        w4a16_wgmma_kernel, grid, x, qweight, scales, zeros, bias if bias is not None else scales, out, sums, M, N, K,
        x.stride(0), qweight.stride(0), stride_qt, scales.stride(0), out.stride(0), TILE=tile, GROUP_SIZE=group_size,
        BLOCK_M=block_m,
        WARPGROUPS=warpgroups, SPLIT_K=split_k, HAS_BIAS=bias is not None, BF16=x.dtype == torch.bfloat16,
        SCALED=scaled, num_warps=4 * warpgroups)
    return out


def after_gemm(out: torch.Tensor, residual: Optional[torch.Tensor], activation: str, up_run: int) -> torch.Tensor:
    """``activation_after_gemm(out + residual, activation, up_run)`` after a GEMM that has neither in its epilogue
    (``out`` ``[M, N]``, rows contiguous; ``residual`` None or ``[M, N]``). Traced (fake tensors: torch.compile), those
    torch ops, which Inductor fuses with what follows though the GEMM is an opaque op; run for real, one launch
    (``_after_gemm_kernel``) into a recorded buffer, which an eager call's replay repeats where torch ops would stop
    it (``replay``): o, down and gate_up of a Llama layer at 17 to 1024 rows. bench/e2e.py's 16 Llama-3-8B layers
    run eagerly, bf16, H100, ms a step, those torch ops -> this launch: 64 rows 17.57 -> 5.82, a 1024-token prefill
    25.07 -> 19.02 (bench/NOTES-kernels.md, eighty-fifth session)."""
    if residual is None and activation == "none":
        return out
    M, N = out.shape
    if is_fake(out) or residual is not None and (activation == "silu_mul" or residual.shape != out.shape):
        return activation_after_gemm(out if residual is None else out + residual, activation, up_run)
    n_out = output_columns(activation, N)
    y = new_empty((M, n_out), out.dtype, out.device)
    r = residual if residual is not None else out  # (never read without one)
    block_n = 64
    launch(_after_gemm_kernel, (cdiv(M, 16), cdiv(n_out, block_n)), out, r, y, M, n_out, out.stride(0),
           r.stride(0), r.stride(1), y.stride(0), UP_RUN=up_run, HAS_RESIDUAL=residual is not None,
           ACTIVATION=activation, BLOCK_M=16, BLOCK_N=block_n)
    return y


@triton.jit
def _after_gemm_kernel(out_ptr, r_ptr, y_ptr, M, N_OUT, stride_om, stride_rm, stride_rn, stride_ym,
                       UP_RUN: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``after_gemm``'s launch: y ``[M, N_OUT]`` from out (and the residual), rounded as the torch ops round (the sum
    in out's dtype, the activation in float32). Under "silu_mul" the gate and up columns of output column j are
    ``reference.gate_up_halves``': j and j + N_OUT, or in runs of UP_RUN."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < M) & (cols < N_OUT)
    gate, up = cols, cols + N_OUT
    if UP_RUN > 0:
        gate = cols // UP_RUN * (2 * UP_RUN) + cols % UP_RUN
        up = gate + UP_RUN
    acc = _summed(out_ptr, r_ptr, rows, gate, mask, stride_om, stride_rm, stride_rn, HAS_RESIDUAL)
    acc_up = acc
    if ACTIVATION == "silu_mul":
        acc_up = _summed(out_ptr, r_ptr, rows, up, mask, stride_om, stride_rm, stride_rn, HAS_RESIDUAL)
    tl.store(y_ptr + rows * stride_ym + cols, activated(acc, acc_up, ACTIVATION).to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _summed(out_ptr, r_ptr, rows, cols, mask, stride_om, stride_rm, stride_rn, HAS_RESIDUAL: tl.constexpr):
    """out's values at ``rows``, ``cols`` (plus the residual's, the sum rounded to out's dtype), in float32."""
    value = tl.load(out_ptr + rows * stride_om + cols, mask=mask, other=0)
    if HAS_RESIDUAL:
        residual = tl.load(r_ptr + rows * stride_rm + cols * stride_rn, mask=mask, other=0)
        value = (value.to(tl.float32) + residual.to(tl.float32)).to(value.dtype)
    return value.to(tl.float32)


def x_in_halves(M: int, block_m: int, warp_specialized: bool) -> bool:
    """Whether the TMA kernels copy x in two boxes of half a tile's rows, each moved back to end within x
    (``w4a16_wgmma_tma._x_halves``): where the last tile reaches 24 rows or more past x's end, or, warp-specialized,
    all its second half but a sixteenth. A box copied that far past its tensor's end takes the TMA long enough to
    stall the kernels' steps; the warp-specialized kernel, its copies in a warp of their own four steps ahead, hides
    all but the farthest. H200, fp16, us, one box -> halves on 4096², 4096x6144, 4096x28672, 14336x4096
    (bench/NOTES-kernels.md, fifty-fifth session): 33 rows (64-row tile) 13.0 / 16.7 / 64.5 / 25.4 -> 12.0 / 15.1 /
    50.2 / 26.4; 40 rows 12.8 / 15.4 / 52.7 / 25.1 -> 12.1 / 15.1 / 50.2 / 26.4; 65 rows (128) 19.7 / 26.1 / 91.3 /
    34.4 -> 15.1 / 20.6 / 64.1 / 34.4; 96 rows 16.4 / 22.4 / 80.5 / 35.7 -> 16.5 / 21.1 / 66.6 / 36.2; 104 rows 16.8
    / 21.8 / 74.2 / 36.0 -> 16.7 / 22.0 / 69.2 / 36.0; warp-specialized, 256-row tile, 129 rows 22.5 / 32.2 /
    132.6 / 49.9 -> 21.8 / 32.2 / 104.7 / 51.3, 160 rows 22.7 / 33.3 / 108.7 / 49.8 -> 22.9 / 33.4 / 112.4 / 52.3.
    Halves cost a second copy a step: where the tile reaches less far past x, or not at all, one box. Not for the
    single-partition kernel, whose copies of x run two steps ahead: 65 rows on 4096x28672 76.2 -> 71.1, but 1-5%
    slower from 80 to 200 rows and on 4096², 14336x4096."""
    past_end = cdiv(M, block_m) * block_m - M
    return past_end >= (block_m // 2 - block_m // 32 if warp_specialized else 24)


# shared memory a program may take on Hopper (227 KB)
HOPPER_SHARED_BYTES = 232448


def check_wgmma_tma_config(cfg: WgmmaTmaConfig):
    """Raise ValueError where the TMA kernel cannot take ``cfg``'s shape: 4 or 8 warps, whose MMA rows
    (16 a warp) tile ``block_m``, a power of two up to 256; ``block_n`` 32 to 256 columns, a warp's 32
    lanes a column each; at least 2 stages, and x's stages and three weight tiles within Hopper's shared
    memory. Warp-specialized (``dequant_warps`` 4 or 8): ``block_n`` 64 or 128 (whole runs of 64 words), at
    most 64 float32 sums a thread of the MMAs' warps with 8 dequantizing warps, 128 with 4 (the registers
    the partitions share), and at least 3 stages of x, words, scales, zeros and the weight tile each (the
    dequantizing warps signal a tile once they hold the next step's stage, which with 2 stages the MMAs would
    only free after that signal). With ``registers``:
    one warpgroup on 64 columns, a stage of x, words, scales and zeros each; ``loader_warp`` only with ``registers``,
    ``maxnreg`` a multiple of 8 from ``rs_ws_registers(4)`` (64 rows) or ``RS_WS_REGISTERS`` (128 rows: ptxas asks 94
    or more), either also 0 (``RS_WS_REGISTERS``), or from ``RS_WS_256_REGISTERS`` (256 rows: ptxas asks 158)."""
    if cfg.split_from_column and not (cfg.dequant_warps and cfg.split_k > 1 and cfg.split_from_column > 0
                                      and cfg.split_from_column % cfg.block_n == 0):
        raise ValueError(f"{cfg}: split_from_column splits the warp-specialized kernel's tiles from that column on: "
                         f"needs dequant_warps, split_k > 1 and a positive multiple of block_n")
    if cfg.dequantized_from_column and not (cfg.dequant_warps and cfg.split_k == 1 and cfg.dequantized_from_column > 0
                                            and cfg.dequantized_from_column % cfg.block_n == 0):
        raise ValueError(f"{cfg}: dequantized_from_column leaves the columns from there to the dequantized weight and "
                         f"cuBLAS: needs dequant_warps, split_k 1 and a positive multiple of block_n")
    if cfg.loader_warp and not cfg.registers:
        raise ValueError(f"{cfg}: loader_warp is the warp-specialized form of the kernel with the weights in "
                         f"registers: needs registers=True")
    least = {64: rs_ws_registers(4), 128: RS_WS_REGISTERS}.get(cfg.block_m, RS_WS_256_REGISTERS)
    if (cfg.maxnreg or cfg.block_m > 128 and cfg.loader_warp) and not (
            cfg.loader_warp and cfg.maxnreg % 8 == 0 and least <= cfg.maxnreg <= 255):
        raise ValueError(f"{cfg}: maxnreg is the warp-specialized register-fed kernel's (loader_warp) registers a "
                         f"thread: needs loader_warp and a multiple of 8 from {least} (block_m {cfg.block_m}) to 255")
    rows_a_pass = 16 * cfg.num_warps
    column_warps = cfg.block_n // 32
    if cfg.registers:
        shared = cfg.stages * (cfg.block_m * 64 * 2 + 64 * (8 * 4 + 2 * 2))
        fits = cfg.block_n == 64 and cfg.num_warps == 4 and not cfg.dequant_warps
        needs = "registers with block_n 64, num_warps 4 and no dequant_warps, stages * (block_m * 128 + 2304) bytes"
        rows_a_pass = 16  # (block_m is the MMA's N side)
    elif cfg.dequant_warps:
        sums = cfg.block_m * cfg.block_n // (32 * cfg.num_warps)
        shared = cfg.stages * (cfg.block_m * 64 * 2 + cfg.block_n * (64 * 2 + 8 * 4 + 2 * 2))
        fits = (cfg.dequant_warps in (4, 8) and cfg.block_n in (64, 128) and cfg.stages >= 3
                and sums <= (64 if cfg.dequant_warps == 8 else 128))
        needs = ("dequant_warps 4 or 8 with block_n 64 or 128 and block_m * block_n / (32 * num_warps) at most "
                 "64 (8) or 128 (4), at least 3 stages, stages * (block_m * 128 + block_n * 164) bytes of shared "
                 "memory")
    else:
        shared = (cfg.stages * cfg.block_m + 3 * cfg.block_n) * 64 * 2
        fits = True
        needs = "(stages * block_m + 3 * block_n) * 128 bytes of shared memory"
    if (cfg.num_warps not in (4, 8) or cfg.block_m not in (64, 128, 256) or cfg.block_m < rows_a_pass
            or cfg.block_n not in (32, 64, 128, 256) or cfg.num_warps % column_warps or cfg.stages < 2
            or cfg.split_k < 1 or shared > HOPPER_SHARED_BYTES or not fits):
        raise ValueError(f"{cfg}: needs num_warps 4 or 8, block_m 64, 128 or 256 and at least 16 * num_warps, "
                         f"block_n 32, 64, 128 or 256 with block_n / 32 dividing num_warps, stages >= 2, "
                         f"split_k >= 1 and {needs} at most {HOPPER_SHARED_BYTES} (this one: {shared})")


def wgmma_tma_words_ok(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> bool:
    """Whether the warp-specialized kernel's TMA reads these: words in column tiles of ``WORD_TILE`` whose runs
    are contiguous (``[N / 64, K / 8, 64]`` in memory) or in contiguous rows of whole 16 bytes, scales and zeros
    in contiguous rows of whole 16 bytes, each 16-byte aligned (by storage offset: allocations are)."""
    if qweight.dim() == 3:
        words = qweight.shape[2] == WORD_TILE and qweight.stride() == (WORD_TILE, qweight.shape[0] * WORD_TILE, 1)
    else:
        words = qweight.stride(1) == 1 and qweight.stride(0) % 4 == 0
    return (words and qweight.storage_offset() % 4 == 0
            and all(t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.storage_offset() % 8 == 0 for t in (scales, zeros)))


def wgmma_tma_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int, bias: Optional[torch.Tensor], block_m: int, block_n: int, stages: int,
                     split_k: int, num_warps: int = 8, dequant_warps: int = 0, registers: bool = False,
                     loader_warp: bool = False, split_from_column: int = 0,
                     dequantized_from_column: int = 0, maxnreg: int = 0) -> torch.Tensor:
    """``WgmmaTmaConfig``'s GEMM, ``x @ w (+ bias [N])`` -> ``[M, N]`` in x.dtype (``w4a16_wgmma_tma``,
    imported here at the first call).

    Split, the programs add their float32 sums into the workspace kept between calls (``split_k_workspace``) and
    one launch after (``split_total_kernel``) adds the bias, casts and leaves the workspace zero. H200, us, fresh
    zeros, the kernel, then the bias added and the cast (three launches, two without a bias) -> this, at the picks'
    splits from 33 to 256 rows (bench/NOTES-kernels.md, fifty-sixth session): 0.97x the time over 36 cases (0.93 to
    1.00), 0.83x with a bias (0.73 to 0.92); fp16 4096² at 64 rows 13.7 -> 12.8, 128 rows 17.8 -> 16.9, with a
    bias 21.5 -> 17.3. Read back and finished by each tile's last program instead (as ``wgmma_matmul``), the
    register-fed kernel takes 222-244 registers (145 without), too many for three programs an SM: 0.91 to 1.53x.
    With ``split_from_column`` only the tail's columns are split, their sums in a workspace of those columns and the
    finishing launch writing only theirs; with ``dequantized_from_column``, ``_fused_then_dequantized``."""
    M = x.shape[0]
    N = word_columns(qweight)
    for name, first in (("split_from_column", split_from_column), ("dequantized_from_column", dequantized_from_column)):
        if first >= N:
            raise ValueError(f"{name} {first}: the tail's first column must be within the weight's {N} columns")
    if dequantized_from_column:
        return _fused_then_dequantized(x, qweight, scales, zeros, group_size, bias, dequantized_from_column, block_m,
                                       block_n, stages, num_warps, dequant_warps)
    out = new_empty((M, N), x.dtype, x.device)  # (no view of a tensor below, where a replay can avoid one)
    if split_k == 1:
        wgmma_tma_launch(x, qweight, scales, zeros, group_size, bias, out, None, block_m, block_n, stages, split_k,
                         num_warps, dequant_warps, registers, loader_warp, maxnreg=maxnreg)
        return out
    # the split columns' float32 sums (all of them, or the tail's) at the workspace's start
    width = N - split_from_column
    sums = split_k_workspace(M, width, 0, split_k, out)
    wgmma_tma_launch(x, qweight, scales, zeros, group_size, bias, out, sums, block_m, block_n, stages, split_k,
                     num_warps, dequant_warps, registers, loader_warp, split_from_column, maxnreg)
    tail_bias = _columns_from(bias, split_from_column) if bias is not None else out
    block = split_total_block(registers and loader_warp)
    launch(split_total_kernel, (cdiv(M * width, block),), sums, tail_bias, _columns_from(out, split_from_column),
           M * width, width, N, BLOCK=block, HAS_BIAS=bias is not None, **dependent_launch(x))
    return out


def _columns_from(t: torch.Tensor, first: int) -> torch.Tensor:
    """``t[..., first:]``, or ``t`` itself from column 0 (no view: a replay repeats no torch op)."""
    return t[..., first:] if first else t


def split_total_block(gemm_launched_dependent: bool) -> int:
    """``split_total_kernel``'s values a program after a split TMA GEMM: 256 where the GEMM let it launch early
    (programmatic dependent launch: the warp-specialized register-fed kernel), so that many small programs, queued
    while the GEMM runs, take each SM as the GEMM's programs leave it; else 1024, fewer programs to launch once the
    GEMM is done. H100, fp16, the op, us, 1024 -> 256 (bench/NOTES-kernels.md, eighty-second session): 4096² at 33 /
    64 / 128 rows 10.62 / 10.35 / 14.53 -> 9.49 / 9.57 / 13.27, 4096x6144 at 48 / 64 rows 12.19 / 12.42 -> 11.52 /
    11.79, 14336x4096 at 33 / 128 rows 23.19 / 32.57 -> 22.24 / 31.40. After the single-partition kernel, launched
    once the GEMM is done, 256 lost: 4096x6144 at 128 rows 19.24 -> 20.69."""
    return 256 if gemm_launched_dependent else 1024


def _fused_then_dequantized(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                            group_size: int, bias: Optional[torch.Tensor], first: int, block_m: int, block_n: int,
                            stages: int, num_warps: int, dequant_warps: int) -> torch.Tensor:
    """``x @ w (+ bias)`` with the warp-specialized kernel on the weight's columns before ``first`` (unsplit) and the
    dequantized weight + cuBLAS on the rest, whose dequantization runs on the side stream beside the kernel (one CTA
    an SM leaves room for its programs) and only its GEMM after. H100, fp16, us, the dequantized weight in chunks of
    columns -> this (bench/NOTES-kernels.md, seventieth session): 4096x6144 at 1024 rows 91.0 -> 83.2 (cuBLAS 81.4),
    5120² 94.1 -> 85.7; the tail's dequantization before the kernel instead: 88.5, 88.8. The tail's GEMM on the side
    stream too, right after its dequantization, to take SMs as the kernel's last wave leaves them (ninety-ninth
    session, 9 rounds, 1024 rows): 4096x28672 421.9 -> 414.1 (bf16 404.4 -> 407.9), 4096x6144 83.5 -> 83.4,
    4096x14336 204.3 -> 202.1, each within its rounds' spread of 5-10%: not taken."""
    M, K = x.shape
    N = word_columns(qweight)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    rest = torch.empty((K, N - first), device=x.device, dtype=x.dtype)
    main, side = torch.cuda.current_stream(x.device), _side_stream(x.device)
    side.wait_stream(main)  # the inputs are written on the main stream
    with torch.cuda.stream(side):
        dequantize = DequantMmConfig()
        _dequantize_into(rest, qweight, scales, zeros, group_size, dequantize.block_r, dequantize.block_n, first)
    head = qweight[:, : first // qweight.shape[2]] if qweight.dim() == 3 else qweight[:, :first]
    wgmma_tma_launch(x, head, scales[:, :first], zeros[:, :first], group_size,
                     None if bias is None else bias[:first], out[:, :first], None, block_m, block_n, stages, 1,
                     num_warps, dequant_warps, False)
    main.wait_stream(side)
    if bias is None:
        torch.mm(x, rest, out=out[:, first:])
    else:
        torch.addmm(bias[first:], x, rest, out=out[:, first:])
    return out


def wgmma_tma_launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int, bias: Optional[torch.Tensor], out: torch.Tensor, sums: Optional[torch.Tensor],
                     block_m: int, block_n: int, stages: int, split_k: int, num_warps: int, dequant_warps: int,
                     registers: bool, loader_warp: bool = False, split_from_column: int = 0, maxnreg: int = 0):
    """Launch ``WgmmaTmaConfig``'s kernel: ``x @ w (+ bias)`` into ``out`` ``[M, N]`` (rows contiguous, x's
    dtype), or, with K split, the programs' float32 sums added into ``sums`` (contiguous float32 that starts with
    them, row-major ``[M, N]``; its values before kept; the bias left to the caller). With ``split_from_column``
    (warp-specialized), only the tiles from that column on are split, into ``sums`` ``[M, N - split_from_column]``,
    and the tiles before it go whole into ``out`` with the bias. The descriptors of views (the words as runs, the
    sums' rows) are made from the tensors' own shapes and strides: a view would be a torch op, which an eager call's
    replay cannot repeat (``replay``)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .w4a16_wgmma_tma import (w4a16_wgmma_tma_kernel, w4a16_wgmma_tma_rs_kernel, w4a16_wgmma_tma_rs_ws_kernel,
                                  w4a16_wgmma_tma_ws_kernel)

    tail = split_k > 1 and split_from_column > 0
    assert (split_k == 1) == (sums is None) and (dequant_warps or not tail)
    M, K = x.shape
    N = word_columns(qweight)
    _, stride_qt, tile = word_strides(qweight)
    x_tiles = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    x_desc = TensorDescriptor.from_tensor(x, [block_m, 64], x_tiles)
    grid = (cdiv(N, block_n), cdiv(M, block_m), split_k)
    if tail:  # the whole tiles, then the tail's splits (``w4a16_wgmma_tma._tail_program_tile``)
        grid = (cdiv(M, block_m) * (split_from_column // block_n + split_k * cdiv(N - split_from_column, block_n)),)
    width = N - split_from_column  # the columns whose sums go to ``sums``
    stride_om = out.stride(0)
    if split_k > 1 and not tail:  # the bias and out left to the caller
        bias, out, stride_om = None, sums, width
    b = bias if bias is not None else scales
    if dequant_warps or registers:
        # the words as runs: a column tile's K / 8 x 64 words each (the tiles' first two axes swapped), or one of
        # K / 8 x N in rows (an axis of one before them)
        if qweight.dim() == 3:
            shape, strides = [qweight.shape[i] for i in (1, 0, 2)], [qweight.stride(i) for i in (1, 0, 2)]
            block = [block_n // WORD_TILE, 8, WORD_TILE]
        else:
            shape, strides = [1, *qweight.shape], [qweight.shape[0] * qweight.stride(0), *qweight.stride()]
            block = [1, 8, block_n]
        w_desc = TensorDescriptor(
            qweight, shape, strides, block, gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3))
        rows = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
        s_desc, z_desc = (TensorDescriptor.from_tensor(t, [1, block_n], rows) for t in (scales, zeros))
        # and x by half tiles, where its last tile reaches far past x's end (``x_in_halves``; else x's whole tiles,
        # which tell the kernel to copy x in one box)
        x_halves = x_in_halves(M, block_m, dequant_warps > 0)
        x_half_desc = TensorDescriptor.from_tensor(x, [block_m // 2, 64], x_tiles) if x_halves else x_desc
        # the tile written by the TMA unit (``_tile_by_tma``): split, blocks of x's box rows by 32 columns (128
        # bytes, swizzled as the tile in shared memory) added into the float32 sums; unsplit, the tile's rows by 64
        # columns stored, or x's descriptor (never read) where x is copied in halves and the threads store the tile
        sums_desc = None if sums is None else TensorDescriptor(
            sums, [M, width], [width, 1], [block_m // 2 if x_halves else block_m, 32],
            gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2))
        if split_k > 1 and not tail:
            tile_desc = sums_desc
        else:
            tile_desc = x_desc if x_halves else TensorDescriptor.from_tensor(out, [block_m, 64], x_tiles)
        operands = (x_desc, x_half_desc, w_desc, s_desc, z_desc, b, out, tile_desc)
        sizes = (M, N, K, shape[2], stride_om)
        if registers:
            kernel = w4a16_wgmma_tma_rs_ws_kernel if loader_warp else w4a16_wgmma_tma_rs_kernel
            budget = {"maxnreg": maxnreg or RS_WS_REGISTERS} if loader_warp else {}
            # warp-specialized, programmatic dependent launch: its weights' first copies overlap the end of the grid
            # before (w4a16_wgmma_tma's docstring: the single-partition kernel lost with it)
            launch(kernel, grid, *operands, *sizes, GROUP_SIZE=group_size, BLOCK_M=block_m, STAGES=stages,
                   SPLIT_K=split_k, HAS_BIAS=bias is not None, num_warps=4, launch_pdl=loader_warp, **budget)
        else:
            # (tail_desc: the sums' blocks with a tail, else the tile's again, never read)
            launch(w4a16_wgmma_tma_ws_kernel, grid, *operands, sums_desc if tail else tile_desc, *sizes,
                   split_from_column, GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
                   SPLIT_K=split_k, TAIL=tail, HAS_BIAS=bias is not None, DEQUANT_WARPS=dequant_warps,
                   num_warps=num_warps)
    else:
        launch(w4a16_wgmma_tma_kernel, grid, x_desc, qweight, scales, zeros, b, out, M, N, K, qweight.stride(0),
               stride_qt, scales.stride(0), stride_om, TILE=tile, GROUP_SIZE=group_size, BLOCK_M=block_m,
               BLOCK_N=block_n, STAGES=stages, SPLIT_K=split_k, HAS_BIAS=bias is not None,
               BF16=x.dtype == torch.bfloat16, num_warps=num_warps)


def _wgmma_split(tiles: int, K: int, slots: int, min_steps: int = 8, most: int = 16) -> int:
    """The Hopper kernels' K split for ``tiles`` programs: powers of two up to ``most`` while twice the programs
    fit in ``slots`` and a split keeps ``min_steps`` steps of 64."""
    split = 1
    while split < most and tiles * split * 2 <= slots and K // 64 >= min_steps * split * 2:
        split *= 2
    return split


def _wgmma_tma_config(M: int, N: int, K: int, sms: int) -> WgmmaTmaConfig:
    """H200 sweeps (bench/NOTES-kernels.md, twenty-second session; fp16 64-256 rows and bf16 128 and 192 on
    the four Llama shapes; tiles of 64 to 256 rows by 128 or 256 columns, K split 1-8): 128 columns by 128
    rows to 128 rows, K split while the programs fit two an SM; past 128 rows, one tile of 256 rows, K split
    while they fit one an SM (fp16, us, 128-row tiles with their split -> 256: 4096² at 192 rows 27.9 ->
    25.9, 4096x28672 149.4 -> 126.5, 14336x4096 69.6 -> 56.6, 4096x6144 43.8 -> 37.2; a 256-row program's
    split costs more, 4096x6144 split 4 40.8 against 36.2 split 2 at 160 rows). A split keeps 16 steps.
    The 256-row tile warp-specialized, 4 warps dequantizing (forty-fourth session, fp16 at 256 rows, us: 28.4 /
    40.5 / 129.3 / 67.1 -> 27.6 / 37.6 / 115.3 / 58.5 on 4096², 4096x6144, 4096x28672, 14336x4096); at 128 rows
    it loses (19.7 / 29.3 / 74.7 / 39.3 -> 19.4 / 31.3 / 77.5 / 45.0 at best)."""
    if M <= 128:
        return WgmmaTmaConfig(128, 128, 4, _wgmma_split(cdiv(N, 128), K, 2 * sms, min_steps=16))
    tiles = cdiv(M, 256) * cdiv(N, 128)
    return WgmmaTmaConfig(256, 128, 4, _wgmma_split(tiles, K, sms, min_steps=16), dequant_warps=4)


# registers a thread of the warp-specialized register-fed kernel: its loader's partition is padded to a warpgroup, so
# 8 warps at 128 registers fit two programs an SM (ptxas's own choice, 255, fits one); the loader lowers its own to
# 24 and the consumer raises its own to what that frees (``setmaxnreg``)
RS_WS_REGISTERS = 128
# and on 256-row tiles, whose accumulator takes 128 registers a thread of the warpgroup: ptxas asks 158 or more, so one
# program an SM
RS_WS_256_REGISTERS = 168
# and the stages of its 128-row tiles, two programs an SM (149.5 KB of shared memory). H100, fp16, the op, medians of 7
# rounds in turns, us, 3 -> 4 (bench/NOTES-kernels.md, ninety-fifth session): 4096x28672 at 96 / 128 rows 63.36 / 60.02
# -> 61.66 / 58.13 (bf16 at 128 rows 61.91 -> 58.29), 14336x4096 at 128 rows (split 4) 30.68 -> 29.53, 4096² 12.23 ->
# 12.19; 5 and 6 no faster; again in a second call, 4096x12288 at 128 rows 28.70 -> 27.46, 4096x14336 at 80 rows 29.88
# -> 29.37. To 128 rows only (``_wgmma_registers_config``): over all waves past 256 rows 4 stages gain 0-2% at 384 rows
# and lose 5% at 640 (4096x14336: 158.82 -> 167.24), and 64-row tiles (4096x28672 at 64 rows, four an SM: 40.16 ->
# 40.79) and the single-partition kernel (4096x6144 at 128 rows 19.39 -> 19.70) do not gain: those keep 3.
RS_WS_128_STAGES = 4


def rs_ws_registers(programs: int) -> int:
    """Registers a thread with which ``programs`` of the warp-specialized register-fed kernel (8 warps) fit an SM: 128
    for two (``RS_WS_REGISTERS``), 80 for three, 64 for four (64-row tiles only: at 128 rows ptxas asks 94 or more)."""
    return resident_registers(8, programs, 1)


def _wgmma_registers_config(M: int, N: int, K: int, sms: int) -> WgmmaTmaConfig:
    """33 to 128 rows on Hopper: the TMA kernel with the weights as the MMA's register operand, 64 rows a program to
    64, else 128, 3 stages (4 warp-specialized on 128 rows: ``RS_WS_128_STAGES``), K split by powers of two to 8
    while the programs fit 4 an SM (64 rows) or 3 (128) and a split keeps 8 steps. H200 sweeps
    (bench/NOTES-kernels.md, fifty-fourth session; splits 1-8, 3-6 stages), fp16, us, the pick before -> this on
    4096², 4096x6144, 4096x28672, 14336x4096: 64 rows 12.90 / 18.18 / 54.42 / 28.11 -> 12.15 / 15.41 / 48.27 /
    26.09; 96 rows 17.82 / 24.66 / 73.47 / 36.61 -> 15.70 / 19.37 / 76.01 / 35.56; 128 rows 19.24 / 25.96 / 73.25 /
    41.63 -> 16.93 / 20.51 / 70.14 / 35.78.

    Warp-specialized (``loader_warp``) where a split keeps its programs within 90-100% of one wave at two an SM (its
    residency, ``RS_WS_REGISTERS``). H200, fp16, us, the kernel alone, the rule above -> warp-specialized
    (bench/NOTES-kernels.md, sixty-second session): 4096² (split 8 -> 4) at 64 rows 11.01 -> 9.68, 96 rows 13.56 ->
    12.67, 128 rows 14.60 -> 13.49; 14336x4096 (split 4) 23.22 -> 23.21, 33.69 -> 31.61, 34.18 -> 33.72. Where its
    programs fill 73% of that wave, it loses: 4096x6144 at 64 rows 12.92 -> 14.02 (split 2;
    16.56 at 4). Warp-specialized too where its programs, unsplit, need more than one wave at two an SM but at most
    two (seventy-fourth session; H100, us): fp16 4096x28672 at 64 / 96 / 128 rows 49.7 / 72.7 / 69.5 -> 47.7 / 68.4 /
    66.1 (and 50.2 -> 48.3 at 64 rows again; bf16 at 128 rows 68.1 -> 68.5; the H200 in the sixty-second session, with
    the kernels then, had fp16 at 128 rows 67.87 -> 70.62), 8192x28672 at 96 rows 146.9 -> 138.7. Over more waves it
    gains nothing or loses: 4096x128256 at 64 rows (2004 programs) 208.5 -> 207.5, gate_up 4096 -> 2 x 28672 in bf16
    at 128 rows (896) 176.4 -> 189.1.

    64-row tiles take fewer registers (``rs_ws_registers``), so three or four such programs fit an SM: there the
    warp-specialized kernel runs wherever two, three or four programs an SM hold all of a split's programs at once,
    at the split and residency that fill their wave the most (the fewer programs an SM on a tie). H100, fp16, us, the
    pick before -> this (bench/NOTES-kernels.md, seventy-ninth session), at 64 rows: 4096x6144 (split 4, three an SM)
    14.16 -> 11.79, 4096x28672 (unsplit, four an SM) 48.59 -> 39.22, 4096x12288 (split 2, three) 23.66 -> 20.18,
    gate_up 4096 -> 2 x 14336 under silu_mul 71.46 -> 57.83; from the sweep, 4096x14336 (unsplit, two: 85%) 28.87 ->
    21.45, 4096x11008 (split 2, three: 87%) 23.47 -> 18.77, 4096x5120 (split 4, three: 81%) 14.20 -> 10.50; bf16 and
    33 to 48 rows alike. At 96 and 128 rows two 64-row tiles four an SM lose to one of 128 rows two an SM:
    4096x28672 at 128 rows 59.84 against 74.28, 14336x4096 31.71 against 38.49 at best. 128-row tiles are
    warp-specialized unsplit too where they fill 70% of a wave of two an SM (seventy-ninth session, H100, us, 80 /
    128 rows): 4096x14336 (224 tiles) 36.00 / 36.29 -> 30.39 / 29.59 (bf16 at 128: 34.13 -> 30.20), 4096x12288 (192)
    30.30 / 32.12 -> 29.79 / 28.62; at 65%, 4096x11008 (172), no faster (29.16 / 30.20 -> 29.84 / 29.83); split to
    such a fill they lose (4096x6144, split 2: 19.42 -> 20.45; 4096x5120 18.22 -> 19.00)."""
    block_m = 64 if M <= 64 else 128
    tiles = cdiv(N, 64) * cdiv(M, block_m)
    if block_m == 64:
        fills = []  # (how much of its wave a split fills, in twelfths of an SM, the fewer programs an SM, split)
        for programs in (2, 3, 4):
            split = _wgmma_split(tiles, K, programs * sms, most=8)
            if tiles * split <= programs * sms:  # (integers only: M may be a SymInt)
                fills.append((tiles * split * (12 // programs), -programs, split))
        if fills:
            _, programs, split = max(fills)
            return WgmmaTmaConfig(block_m, 64, 3, split, num_warps=4, registers=True, loader_warp=True,
                                  maxnreg=rs_ws_registers(-programs))
    else:
        split = _wgmma_split(tiles, K, 2 * sms, most=8)
        whole = split == 1 and 7 * 2 * sms <= 10 * tiles  # unsplit and 70% of the wave, or more
        if 9 * 2 * sms <= 10 * tiles * split <= 10 * 2 * sms or whole and tiles <= 4 * sms:
            return WgmmaTmaConfig(block_m, 64, RS_WS_128_STAGES, split, num_warps=4, registers=True, loader_warp=True,
                                  maxnreg=rs_ws_registers(2))
    split = _wgmma_split(tiles, K, (4 if block_m == 64 else 3) * sms, most=8)
    return WgmmaTmaConfig(block_m, 64, 3, split, num_warps=4, registers=True)


def _register_fed_one_wave(M: int, N: int, K: int, sms: int) -> Optional[WgmmaTmaConfig]:
    """129 to 512 rows on Hopper: the warp-specialized register-fed kernel on 256-row tiles (64 columns, one program
    an SM, 4 stages) where its programs, K split in two if twice them fit and a split keeps 32 steps, fill 70-100% of
    one wave; else None. One warpgroup's MMAs on 256 rows, each step dequantized under the MMAs of the step before,
    beat the warp-specialized kernel's dequantizing warps and shared weight tile, and the dequantized weight +
    cuBLAS, where the programs are few. H100, the op, medians of 5 rounds in turns, us, the pick before
    (``_wgmma_tma_config`` to 256 rows, then the dequantized weight or ``_wgmma_tma_waves``) -> this, and cuBLAS
    (bench/NOTES-kernels.md, eighty-eighth session): fp16 4096² at 129 / 256 / 384 / 512 rows 23.66 / 25.16 / 34.62
    / 38.32 -> 19.19 / 21.99 / 28.18 / 27.22 (cuBLAS 17.53 / 18.92 / 22.51 / 27.27); 4096x6144 at 129 / 256 rows 32.91
    / 37.85 -> 26.60 / 26.88 (21.14 / 24.60); 8192² at 256 rows 67.83 -> 54.89 (57.83); 14336x4096 at 256 / 512 rows
    56.55 / 106.26 -> 54.37 / 94.92 (66.51 / 92.82); bf16 4096² at 512 rows 38.48 -> 27.63; no slower in 38 cases from
    129 to 512 rows, fp16 and bf16, but by 0.2% (bf16 14336x4096 at 256 rows, 54.96 -> 55.06). Over more than a wave
    it loses to the picks (fp16, 256 rows, best of 3: 4096x28672, 448 programs, 107.71 against 109.91; 4096x14336,
    224, 50.16 against 52.87), and so do splits of 16 steps (4096² at 256 rows, split 4: 25.09 against 21.16)."""
    tiles = cdiv(M, 256) * cdiv(N, 64)
    split = _wgmma_split(tiles, K, sms, min_steps=32, most=2)
    if 7 * sms <= 10 * tiles * split <= 10 * sms:
        return WgmmaTmaConfig(256, 64, 4, split, num_warps=4, registers=True, loader_warp=True,
                              maxnreg=RS_WS_256_REGISTERS)
    return None


def _register_fed_all_waves(M: int, N: int, K: int, sms: int) -> Optional[WgmmaTmaConfig]:
    """257 to 640 rows on Hopper where the warp-specialized kernel's tiles fit no wave rule (``_wgmma_tma_waves``):
    the warp-specialized register-fed kernel on 128-row tiles, two programs an SM, unsplit over all its waves where
    they are at most six and 80% full; else None (the dequantized weight + cuBLAS, whose dequantization of the whole
    weight these rows do not amortize). H100, the op, medians of 3 rounds in turns, us, the dequantized weight ->
    this, and fp16 cuBLAS (bench/NOTES-kernels.md, eighty-eighth session): fp16 4096x14336 at 260 / 384 / 448 / 640
    rows 105.59 / 127.43 / 168.62 / 171.05 -> 97.94 / 95.50 / 126.44 / 159.93 (55.56 / 78.57 / 112.99 / 126.25);
    4096x11008 at 300 / 384 rows 90.95 / 94.24 -> 64.71 / 66.19 (48.66 / 57.59); 4096x28672 at 260 / 384 rows 214.07
    / 230.76 -> 206.73 / 198.54 (114.97 / 151.55); 8192x28672 at 384 rows 475.03 -> 394.26 (295.01); 4096x6144 at 640
    rows 69.57 -> 60.64 (51.52); bf16 alike (4096x14336 at 384 rows 126.39 -> 96.14): faster in all 28 cases from 260
    to 640 rows, 1.04x to 1.42x. From 896 rows the dequantized weight is amortized and it loses where K is longer:
    8192x10240 at 896 / 1000 rows 308.77 / 322.51 -> 318.39 / 353.09, 4096x6144 at 1000 rows 96.88 -> 100.78."""
    programs = cdiv(M, 128) * cdiv(N, 64)
    slots = 2 * sms
    waves = cdiv(programs, slots)
    if waves <= 6 and 10 * programs >= 8 * waves * slots:
        return WgmmaTmaConfig(128, 64, 3, 1, num_warps=4, registers=True, loader_warp=True,
                              maxnreg=rs_ws_registers(2))
    return None


class RowSplitConfig(NamedTuple):
    """x's first ``head_rows`` rows and the rest each by their own pick, the two outputs joined (``_rows_apart``). An
    eager call replays both parts' launches on rows of x and of one output (``replay.rows_of``, ``replay.join_rows``),
    so that its host time stays one replay's and nothing is copied; traced, the parts are joined by ``torch.cat``.
    H200, fp16, eager calls, us a call, each part's launches run anew and joined by ``torch.cat`` -> replayed into one
    output (bench/NOTES-kernels.md, ninetieth session): 4096x28672 at 260 / 300 / 500 rows 282.5 / 327.2 / 337.7 ->
    130.1 / 160.4 / 224.4, 4096x14336 at 260 rows 317.7 -> 85.9, 14336x4096 at 320 rows 393.1 -> 86.0."""

    head_rows: int


ROW_SPLIT_HEAD_ROWS = 256  # a whole tile of rows of the 256-row kernels


def _rows_apart(M: int, N: int, K: int, sms: int, whole) -> bool:
    """257 to 511 rows on Hopper: whether x's first 256 rows and the rest run faster apart, each by its own pick (one
    launch after the other, then joined), than all M by ``whole``, the pick for them all. Apart, the first 256 rows fill
    whole tiles of the 256-row kernels and only the rest pay for tiles of rows left part empty, but the rest reads the
    weight once more and (but in a replay) the join copies the output. Faster where ``whole`` is the dequantized weight
    + cuBLAS (whose dequantization 257-511 rows do not amortize); the register-fed kernel on 128-row tiles
    (``_register_fed_all_waves``) over three waves of two an SM or more, or four past 384 rows, where the rest takes a
    256-row tile of its own; or its 256-row tiles unsplit (``_register_fed_one_wave``) with at most 64 rows in the
    second and K from 8192, where the first 256 rows alone split K in two. H100, fp16, the op, medians of 3 rounds in
    turns, us, ``whole`` -> apart (cuBLAS) (bench/NOTES-kernels.md, eighty-ninth session): 4096x28672 at 260 / 300 / 384
    / 500 rows 208.03 / 204.89 / 200.17 / 268.61 -> 137.42 / 171.57 / 192.75 / 239.49 (115.64 / 126.87 / 155.97 /
    186.15); 4096x14336 at 448 rows 127.42 -> 110.20 (113.85); 4096x6144 at 260 / 320 rows 50.26 / 57.73 -> 35.31 /
    42.60 (27.60 / 36.86); 14336x4096 at 260 / 320 rows 98.01 / 103.29 -> 70.32 / 82.70 (70.46 / 66.67). It loses where
    ``whole``'s programs fill fewer waves (4096x11008 at 300 rows, two 98% full: 68.17 -> 74.00; at 500 rows, three:
    94.11 -> 103.81; 4096² at 300 rows, one: 28.28 -> 35.05), and on 256-row tiles with more rows in the second
    (14336x4096 at 448 rows 103.36 -> 114.68)."""
    if not ROW_SPLIT_HEAD_ROWS < M < 2 * ROW_SPLIT_HEAD_ROWS:
        return False
    if isinstance(whole, DequantMmConfig):
        return True
    if not (isinstance(whole, WgmmaTmaConfig) and whole.registers and whole.loader_warp):
        return False
    rest = M % ROW_SPLIT_HEAD_ROWS
    if whole.block_m == 128:
        return cdiv(cdiv(M, 128) * cdiv(N, 64), 2 * sms) >= (4 if rest > 128 else 3)
    return rest <= 64 and K >= 8192 and whole.split_k == 1


def _wgmma_tma_waves(M: int, N: int, K: int, sms: int) -> Optional[WgmmaTmaConfig]:
    """257 to 1024 rows on Hopper: the warp-specialized kernel's 256 x 128 tiles where M fills 60% of their rows
    and their programs 90% of their waves, one an SM: unsplit in one or two waves, or K split in two in one wave
    where a program keeps 64 steps of K; else None (the dequantized weight + cuBLAS, whose dequantization, 2.5
    bytes a weight, this kernel does not expose). H200, K x N, us, dequantized + cuBLAS -> this, fp16
    (bench/NOTES-kernels.md, fifty-third session): 14336x4096 at 448 rows 126.6 -> 105.1 (split 2), 1024 rows 215.5
    -> 198.4; 28672x8192 at 896 rows 846.0 -> 789.2; 13824x5120 at 700 rows 197.3 -> 181.8; 4096² at 1024 rows
    60.3 -> 59.7 (bf16 at 896 rows 57.5 -> 54.9). It loses where the programs leave part of a wave empty
    (14336x4096 at 1152 rows, 160 tiles: 250.7 -> 292.3), in three waves of a split (8192² at 640 rows: 172.4 ->
    194.2), on tiles half empty (14336x4096 at 257 rows: 92.6 -> 93.8) and in splits of 32 steps (4096² at 512
    rows, split 2: 37.2 -> 40.2). Where none of these fits, a tail (``_wgmma_tma_tail``); where no tail fits either
    (M not whole tiles, or whole waves only), unsplit over all its waves where they and M's tiles of rows are 90%
    full. H100, us, the dequantized weight + cuBLAS -> this (seventy-fourth session): 4096x28672 at 1000 rows fp16
    444.5 -> 410.1, bf16 432.9 -> 389.9; gate_up 4096 -> 2 x 28672 at 1000 rows 1314.4 -> 1235.6; 4096x12288 at
    1000 rows 201.1 -> 173.8; 4096x12672 at 1024 rows (three whole waves) 191.9 -> 179.4. On tiles 78% full it
    loses: 4096x12288 at 800 rows 175.9 -> 182.5. Over all waves where a tail fits, it is not faster: 4096x28672 at
    1024 rows 417.3 -> 417.4, 5120x27648 492.3 -> 516.8, silu_mul 4096x57344 at 768 rows 938.0 -> 961.2."""
    tiles = cdiv(M, 256) * cdiv(N, 128)
    if 5 * M < 3 * 256 * cdiv(M, 256):
        return None
    for split, max_waves in ((1, 2), (2, 1)):
        programs = tiles * split
        waves = cdiv(programs, sms)
        if waves <= max_waves and 10 * programs >= 9 * waves * sms and K // 64 >= 64 * split:
            return WgmmaTmaConfig(256, 128, 4, split, dequant_warps=4)
    tail = _wgmma_tma_tail(M, N, K, sms)
    whole = 10 * tiles >= 9 * cdiv(tiles, sms) * sms and 10 * M >= 9 * 256 * cdiv(M, 256)
    if tail is None and whole and K // 64 >= 64:
        return WgmmaTmaConfig(256, 128, 4, 1, dequant_warps=4)
    return tail


def _wgmma_tma_tail(M: int, N: int, K: int, sms: int) -> Optional[WgmmaTmaConfig]:
    """Whole waves of the warp-specialized kernel's 256 x 128 tiles and part of one more: the whole waves as whole
    columns of whole tiles, the columns after them either split in K to fill a second wave (``split_from_column``: one
    wave before them, long weights, K >= 8192, where they are at most half a wave; up to 8 splits of 8 steps or more)
    or left to the dequantized weight + cuBLAS (``dequantized_from_column``: M in whole tiles of rows); else None. H100,
    fp16, us, the dequantized weight (in chunks of columns at 1024 rows) -> this (bench/NOTES-kernels.md, seventieth
    and seventy-first sessions):

    - split: 8192² at 640 / 768 rows 179.6 / 209.7 -> 173.9 / 171.2; 8192x10240 at 384 / 512 rows 170.4 / 194.9 ->
      141.8 / 139.4; 28672x8192 at 640 / 768 rows 636.0 / 729.9 -> 592.6 / 584.8; 13824x5120 at 896 / 1024 rows 261.1 /
      255.0 -> 234.4 / 231.3 (the columns dequantized: 222.7 at 1024); shorter weights lose, 4096x6144 at 640 / 896 /
      1024 rows 67.7 / 89.5 / 90.2 -> 72.3 / 98.3 / 93.5;
    - dequantized, after one wave: 4096x6144 at 1024 rows 91.0 -> 83.2 (cuBLAS 81.4), bf16 87.6 -> 80.7, at 768 rows
      69.1 (split) -> 64.9; 5120² at 1024 rows 94.1 -> 85.7, 3584x4608 66.2 -> 56.4; 8192² at 768 rows 164.6 (split)
      -> 163.6. Not on tiles part empty: 4096x6144 at 640 rows 68.2 -> 71.6, 14336x4096 at 1152 rows 232.8 -> 241.3;
    - dequantized, after two waves or more (ab-w4a16-tail-after-waves-h100.json): 4096x14336 at 768 / 1024 rows 193.4
      / 206.8 -> 144.2 / 187.4 (cuBLAS 134.8 / 174.5); 4096x28672 at 512 / 768 rows 259.3 / 346.4 -> 192.8 / 301.3;
      8192x28672 at 768 rows 714.7 -> 571.5; 5120x27648 at 1024 rows 472.7 -> 445.0; faster in 14 of 15 cases, bf16
      and silu_mul too, but 4096x28672 at 1024 rows (six waves, then 79% of one): 406.3 -> 412.3.

    Every whole wave goes to the kernel: fewer, with more columns dequantized beside them, lose. H100, us, 7 rounds
    in turns, the kernel's waves (the pick's first) -> the op (ninety-eighth session,
    ``ab-w4a16-fewer-whole-waves-h100.json``): 4096x28672 at 1024 rows fp16 6 / 5 / 4 / 3 / 1 waves 400.4 / 409.2 /
    430.7 / 438.2 / 447.4, bf16 394.2 / 397.2 / 415.4 / 419.8 / 428.0; at 768 rows 5 / 4 / 3 / 1 292.7 / 305.7 /
    323.0 / 354.1; 4096x14336 at 1024 rows 3 / 2 / 1 189.0 / 203.8 / 210.1. (The pick timed again as a candidate of
    the same rounds: 410.6, 388.8, 305.4, 198.7.)"""
    row_tiles = cdiv(M, 256)
    wave = sms // row_tiles  # columns of tiles in a wave
    waves = cdiv(N, 128) // wave
    tail = row_tiles * (cdiv(N, 128) - waves * wave)
    if waves == 0 or tail == 0:
        return None
    if waves == 1 and K >= 8192 and tail <= sms // 2:
        split = min(sms // tail, 8)
        while split > 1 and K // 64 < 8 * split:
            split -= 1
        if split > 1:
            return WgmmaTmaConfig(256, 128, 4, split, dequant_warps=4, split_from_column=128 * wave)
    if M % 256 == 0:
        return WgmmaTmaConfig(256, 128, 4, 1, dequant_warps=4, dequantized_from_column=128 * waves * wave)
    return None


def _wgmma_config(M: int, N: int, K: int, sms: int) -> WgmmaConfig:
    """H200 sweeps (bench/NOTES-kernels.md, nineteenth to twenty-first sessions; fp16 and bf16 on the four
    Llama shapes). 17 to 32 rows: 32 rows a program with the weights exact in the MMA, two warpgroups with
    K split while the programs fit two an SM; one warpgroup where two leave the programs under 200
    (4096x6144: 12.4 us against 13.8 with two; 4096x28672 takes two, 43.3 against 44.0 with one, bf16 43.1
    against 47.3). 33 to 64 rows: 64 rows a program with the weights scaled before the MMA (the exact
    kernel's second accumulator takes 197-208 registers there), two warpgroups, K split so too: the best of
    8 timed configurations in 26 of 34 cases (40-64 rows, weights from L2 and from DRAM), within 4-11% of it
    in the rest (4096x6144)."""
    if M > WGMMA_EXACT_MAX_M:
        return WgmmaConfig(64, 2, _wgmma_split(cdiv(N, 128), K, 2 * sms), scaled=True)
    for warpgroups in (2, 1):
        tiles = cdiv(N, 64 * warpgroups)  # (one 32-row tile)
        split = _wgmma_split(tiles, K, (2 if warpgroups == 2 else 3) * sms)
        if warpgroups == 1 or tiles * split > 200:
            return WgmmaConfig(32, warpgroups, split)


class DequantMmConfig(NamedTuple):
    """Dequantize the weight, then cuBLAS: for M large enough to amortize the write. ``chunk_n``
    > 0: that many columns at a time, each chunk dequantized on a side stream while cuBLAS
    multiplies the one before (``dequantize_matmul``); 0: the whole weight, then one GEMM."""

    block_r: int = 16
    block_n: int = 128
    chunk_n: int = 0


def warp_mma_unrolled_iterations(cfg: WarpMmaConfig, groups: int) -> int:
    """The warp-level MMA kernel's UNROLLED_ITERS for ``groups`` groups of K: each warp's iterations
    over its groups where ``cfg`` asks to unroll them, every split has the same number of groups and
    there are at most ``MAX_UNROLLED_STEPS`` (0: a loop)."""
    k_warps = cfg.num_warps // cfg.column_warps
    iterations = cdiv(groups // cfg.split_k, k_warps)
    return iterations if cfg.unrolled and groups % cfg.split_k == 0 and iterations <= MAX_UNROLLED_STEPS else 0


def warp_mma_prefetch(cfg: WarpMmaConfig, tile: int, activation: str, up_run: int, device: torch.device) -> int:
    """The warp-level MMA kernel's PREFETCH_GROUPS: ``cfg.prefetch_groups`` where each warp's words of a group
    are one run, to pull with one bulk prefetch (sm_90 on): words in column tiles of ``WORD_TILE``, and under
    "silu_mul" gate and up in runs that divide 32 (a warp's 32 gate and 32 up columns then one tile); else 0."""
    one_run = tile == WORD_TILE and (activation != "silu_mul" or up_run > 0 and 32 % up_run == 0)
    return cfg.prefetch_groups if one_run and capability(device) >= (9, 0) else 0


def _split_within_one_wave(tiles: int, k_steps: int, slots: int) -> int:
    """Most K splits (a power of two) whose programs still fit ``slots`` at once."""
    split = 1
    while tiles * split * 2 <= slots and split * 2 <= k_steps and split < 16:
        split *= 2
    return split


def _warp_mma_config(M: int, tiles: int, groups: int, sms: int, gate_up: bool = False) -> WarpMmaConfig:
    """Warps and K splits of the warp-level MMA kernel for ``tiles`` blocks of a warp's
    columns (``warp_mma_columns``) and ``groups`` groups of K. H200 sweeps
    (bench/NOTES-kernels.md), 2 <= M <= 16: 4 warps unsplit where the tiles alone fill the SMs
    twice (4096x28672), as two column blocks of two warps past 8 rows (x shared through L1:
    29-30 against 33 us at M = 16), 8 warps unsplit from half the SMs (4096x6144: 96 tiles),
    else 4 warps and K split to about two programs an SM (4096x4096, 14336x4096: 64 tiles,
    split 4); each split costs a memset and atomics. Past 8 rows, where the tiles fill under
    half the SMs and K is at most 32 groups, a program an 8-row tile instead, 8 warps unsplit
    (4096x4096 at M = 16 from DRAM, bf16: 10.0 against 12.3 us; 14336x4096 stays split, 19.5
    against 21.9); there, but for gate and up (``gate_up``: "silu_mul"), 32 columns a warp instead (two 16-column
    blocks, ``column_blocks``), so that the same 2 x tiles programs each take both 8-row tiles and dequantize each
    weight once (H100, the op, fp16 unless said, medians of 5 rounds in turns, us, one tile a program -> 32 columns,
    bench/NOTES-kernels.md, hundredth session: 4096x4096 at 9 / 12 / 16 rows 5.55 / 5.74 / 5.71 -> 4.96 / 5.11 / 5.20,
    bf16 at 16 rows 5.88 -> 4.97; at ptxas's own registers 6.81-7.12; it loses where the tiles or the groups are
    more: 4096x6144 at 16 rows 6.73 against 7.36 at best, 14336x4096 12.66 against 14.20). The 8-warp kernels
    unroll their loop over groups up to K = 32 groups (4
    iterations a warp; bf16 from DRAM, us: 4096x6144 at M = 4, 8, 16 10.3 / 10.4 / 12.8 -> 9.5 /
    9.6 / 12.3, 4096x4096 at M = 16 10.4 -> 9.5); so do the split 4-warp ones (2 iterations a warp; 4096x4096
    at M = 8, fp16 / bf16, one weight replayed: 6.56 / 5.97 -> 5.31 / 5.46; the decode step's chain at batch 8
    829.6 -> 814.8). With 7 or 8 iterations a warp the 4-warp ones lose unrolled: 4096x28672 at M = 8 18.6 -> 27.9
    (fp16, replayed); at M = 16, alone faster (14336x4096 12.9 -> 11.3), the decode step's chain at batch 16
    slower (928.0 -> 980.3, with PDL; bench/NOTES-kernels.md, fiftieth session). There, past 32 groups, their
    loop's body twice an iteration (``loop_unroll``) is faster alone and no slower in the chain: 14336x4096 at
    M = 16, us, replayed / from DRAM, fp16 13.04 / 14.30 -> 12.21 / 14.14, bf16 12.84 / 14.61 -> 12.27 / 13.78 (3
    and 4 times: 14.40 / 18.21 in fp16); at 2 to 8 rows it is not (M = 8 bf16 14.12 -> 14.28; fifty-first)."""
    row_tiles = cdiv(M, 8)
    if M > 8 and 2 * tiles < sms and groups <= 32:
        if gate_up:
            return WarpMmaConfig(num_warps=8, split_k=1, row_tiles=1, unrolled=True)
        return WarpMmaConfig(num_warps=8, split_k=1, row_tiles=2, unrolled=True, column_blocks=2)
    if tiles >= 2 * sms:
        return WarpMmaConfig(num_warps=4, split_k=1, row_tiles=row_tiles, column_warps=2 if M > 8 else 1)
    if 2 * tiles >= sms:
        return WarpMmaConfig(num_warps=8, split_k=1, row_tiles=row_tiles, unrolled=groups <= 32)
    split = 1
    while tiles * split * 2 <= 2 * sms and split * 2 * 4 <= groups:
        split *= 2
    return WarpMmaConfig(num_warps=4, split_k=split, row_tiles=row_tiles, unrolled=groups <= 32,
                         loop_unroll=2 if M > 8 and groups > 32 else 1)


GEMV_MAX_M = 2
WARP_MMA_MAX_M = 16
WGMMA_MAX_M = 64
WGMMA_EXACT_MAX_M = 32  # up to here the Hopper kernel keeps the weights exact in the MMA (``WgmmaConfig.scaled``)
WGMMA_REGISTERS_MAX_M = 128  # from 33 rows to here the TMA kernel with the weights in registers (``registers``)
REGISTERS_ONE_WAVE_MAX_M = 512  # and on 256-row tiles to here where they fill one wave (``_register_fed_one_wave``)
WGMMA_TMA_MAX_M = 256  # past it the dequantized weight and cuBLAS (``DequantMmConfig``) are faster on Hopper,
WGMMA_TMA_WAVES_MAX_M = 1024  # but up to here where the TMA kernel's tiles fill whole waves (``_wgmma_tma_waves``)
REGISTERS_ALL_WAVES_MAX_M = 640  # and to here, where they do not, the register-fed kernel (``_register_fed_all_waves``)
# Off Hopper (there ``WGMMA_TMA_MAX_M``), past one 128-row tile the fused kernel reads and dequantizes the
# weight once a tile: dequantizing it once and cuBLAS is faster (H200, geometric mean over fp16 cuBLAS of
# the four Llama shapes: M = 192 0.53 against 0.37 fused, M = 256 0.60 against 0.41; M = 128 0.46 against
# 0.52, and 0.63 fused with the two-programs-an-SM picks, bench/results/kernels-h200.json).
DEQUANT_MM_MIN_M = 129


def dequantize_chunk_columns(M: int, N: int) -> int:
    """``DequantMmConfig.chunk_n`` for M rows and N GEMM columns (gate and up both under silu_mul):
    from 1024 rows, the widest of 4096, 2048 and 1024 columns whose GEMM writes at most 2^22 outputs
    (two waves of 128 x 128 tiles), so the side stream's dequantization of the next chunk overlaps a
    GEMM long enough to hide it; 0 where that chunk is all of N. From 384 rows, 8192 columns where N
    takes at least three such chunks; narrower weights lost there. H200, fp16, us, the whole weight ->
    chunks (bench/NOTES-kernels.md, fifteenth session): 4096x28672 M = 512 277.2 -> 244.1, M = 1024
    442.6 -> 407.6, M = 4096 1560.3 -> 1477.6; 14336x4096 M = 2048 409.2 -> 379.7; 4096x6144 M = 1024
    101.4 -> 94.1."""
    if M < 384:
        return 0
    if M < 1024:
        return 8192 if N >= 3 * 8192 else 0
    columns = 4096
    while columns > 1024 and M * columns > 1 << 22:  # (comparisons only: M may be a SymInt)
        columns //= 2
    return columns if columns < N else 0


def _one_wave_of_long_columns(M: int, N: int, K: int, sms: int) -> bool:
    """Whether the one-row GEMV takes 32 weight columns a program (16 warps, 2048 rows a step) instead of 16: where
    those programs fill 95-100% of one wave, one an SM, and K is at least 14336. H100, Triton 3.6, us, 16 -> 32
    columns, one weight replayed fp16 / from DRAM bf16 (bench/NOTES-kernels.md, hundred-and-first session):
    14336x4096 8.31 -> 7.69 / 12.16 -> 11.80, 16384x4096 10.52 -> 9.00 / 13.60 -> 13.21, 28672x4096 24.46 -> 21.60 /
    24.20 -> 21.69. Below that K, or with other grids, the 16-column tile stays ahead from DRAM: 12288x4096 10.60 ->
    10.69, 11008x4096 11.20 -> 11.75; 112 programs (18944x3584) 15.48 -> 16.62, 160 (13824x5120) 20.68 -> 21.03,
    256 (14336x8192) 23.85 -> 24.08. (Timed without the RMSNorm or silu_mul, which keep the 16-column tile.)"""
    programs = cdiv(N, 32)
    return M == 1 and K >= 14336 and 20 * programs >= 19 * sms and programs <= sms


def gemv_registers(cfg: GemvConfig, M: int, N: int, sms: int) -> int:
    """``GemvConfig.maxnreg`` for the GEMV's block shape ``cfg`` on M rows and N output columns: the most
    registers a thread (ptxas allots them 8 at a time) with which every program of the grid stays resident at
    once, at most 72 for 4-warp tiles and 80 for larger ones; 0 (ptxas's own choice, 40 to 62 registers) where
    that is under 64, and past ``GEMV_MAX_M`` rows. With its own choice ptxas issues each of a step's loads just
    before the arithmetic that reads it (``common.register_budget``). H200, us, ptxas's choice -> 64 or 72
    (bench/NOTES-kernels.md, twenty-seventh session), one weight replayed, M = 1, fp16 / bf16: 4096^2 4.18 / 4.17
    -> 4.01 / 4.09, 4096x6144 5.44 / 5.35 -> 5.01 / 5.13, 4096x28672 19.80 / 19.42 -> 18.02 / 18.35, 14336x4096
    9.54 / 9.03 -> 9.52 / 8.98. Fewer registers, to keep a larger grid in one wave, lost: 14336x8192 22.8 ->
    28.5 us at 32. The decode step's 64 ops chained with PDL (thirty-third session; us a step, bf16 / fp16):
    qkv's 8-warp tile (3 programs an SM) at 64 668.5 / 701.4, 72 660.5 / 692.2, 80 658.0 / 692.9, ptxas's
    choice 672.3 / 717.7. silu_mul's unrolled 4-warp tile (two runs of 16 columns, gate and up) takes the budget
    in bf16 too since the dots add their scaled sums in their asm (seventy-sixth session): H100, Triton 3.6, the
    decode step's ops at one row (bf16, ``bench/decode_ops.py``), ptxas's choice -> 72, gate_up with the RMSNorm
    30.40 -> 24.06 us, the step 851.0 -> 751.2 (80: 24.28, 751.1; seventy-seventh session). (With the dots before
    that change ptxas's choice had been the faster in bf16: the step 668.6 against 682.6 at 72, H200.) (Inductor
    drops a user kernel's maxnreg; ``qpass.inductor_launch`` gives it back.)
    The same budgets under Triton 3.9, H100, one row, us, ptxas's choice -> the budget (bench/NOTES-kernels.md,
    seventy-sixth session): 4096x28672 fp16 28.40 -> 25.28, bf16 24.37 -> 26.10, fp16 silu_mul in runs of 16
    24.77 -> 24.19, 14336x4096 fp16 10.07 -> 10.57, bf16 10.17 -> 10.35."""
    if M > GEMV_MAX_M:
        return 0
    programs = (1 if M == 1 else 2) * cdiv(N, cfg.block_n)  # (comparisons only: M may be a SymInt)
    budget = resident_registers(cfg.num_warps, programs, sms)
    return min(budget, 72 if cfg.num_warps == 4 else 80) if budget >= 64 else 0


def resident_registers(num_warps: int, programs: int, sms: int) -> int:
    """The most registers a thread (ptxas allots them 8 at a time) with which all ``programs`` of
    ``num_warps`` warps are resident on ``sms`` SMs at once (64K registers an SM)."""
    return 65536 // (32 * num_warps * cdiv(programs, sms)) // 8 * 8


def warp_mma_registers(cfg: WarpMmaConfig, M: int, tiles: int, sms: int) -> int:
    """``WarpMmaConfig.maxnreg`` for ``cfg`` on M rows and ``tiles`` blocks of a warp's columns: 168
    registers a thread for programs of one 8-row tile, 200 for two, or fewer where the grid then still
    stays resident at once; 0 (ptxas's own choice, 102 to 190) where that would be under 168. As in the
    GEMV (``gemv_registers``), ptxas left to itself issues loads late to save registers. H200, bf16,
    weights from DRAM (bench/NOTES-kernels.md, thirty-sixth session), us, ptxas's choice -> the budget:
    M = 16 4096x6144 12.34 -> 11.79, 4096^2 9.28 -> 8.20, 14336x4096 19.61 -> 18.96; M = 8 4096x6144 9.52
    -> 8.04, 4096^2 9.30 -> 9.08, 14336x4096 16.51 -> 15.24; M = 2 4096x6144 9.43 -> 7.97. 4096x28672
    silu_mul at M = 8 (448 programs of 4 warps) stays with ptxas: 22.46, 22.35 at 128, 26.06 at 168.
    Programs of two tiles and 4 warps, the fewest warps to hide the loads' latency, get 232 even where
    the grid then takes more than one wave (gate_up at 16 rows: 448 programs, 2 an SM): in the decode
    step's chain of 64 ops at batch 16, launched with PDL (thirty-eighth session), 1107 -> 1075 us for
    gate_up's (0 before) and down's (200, split 4) together; 216 and 248 within 8 us of 232, 200 slower. 32 columns a
    warp (``column_blocks`` 2) at 8 warps and two tiles, one program an SM: 200, with no words pulled into L2 ahead
    (``_pick_for_all_rows``). H100, 4096x4096 at 16 rows, the op, medians of 7 rounds in turns, us (hundredth and
    hundred-and-second sessions): ptxas's 128-142 registers 7.12, 168 5.20; then, fp16 / bf16 from L2 and fp16 / bf16
    from DRAM, 168 pulling 5.03 / 4.75 / 6.02 / 5.99, 168 not 4.42 / 4.31 / 5.88 / 5.75, 200 not 4.07 / 4.18 / 5.44 /
    5.38 (200 pulling 5.05 / 5.20 from L2)."""
    if cfg.num_warps == 4 and cfg.row_tiles == 2:
        return 232
    if cfg.column_blocks == 2:
        return 200
    row_programs = 1 if M <= 8 * cfg.row_tiles else 2  # (comparisons only: M may be a SymInt)
    programs = row_programs * cdiv(tiles, cfg.column_warps) * cfg.split_k
    budget = min(resident_registers(cfg.num_warps, programs, sms), 168 if cfg.row_tiles == 1 else 200)
    return budget if budget >= 168 else 0


def pick_config(M: int, N: int, K: int, group_size: int, device: torch.device, activation: str = "none",
                warp_mma: bool = True, dtype: torch.dtype = torch.float16, wgmma: bool = True, norm: bool = False,
                tma_words: bool = True):
    """The kernel and its block shapes for a problem of N output columns and activations of
    ``dtype``; from the sweeps in bench/NOTES-kernels.md. ``warp_mma``, ``wgmma``: whether the inputs
    suit the warp-level MMA kernel (``warp_mma_ok``) and the Hopper kernels (``wgmma_ok``); ``tma_words``:
    whether the TMA reads the words, scales and zeros too (``wgmma_tma_words_ok``); ``norm``: whether
    the RMSNorm of x comes with it (the GEMV computes it as it reads x). Where x's rows run faster in two
    parts (``_rows_apart``), a ``RowSplitConfig``, whose parts pick their own."""
    cfg = _pick_for_all_rows(M, N, K, group_size, device, activation, warp_mma, dtype, wgmma, norm, tma_words)
    gemm_n = 2 * N if activation == "silu_mul" else N
    # (the rule first: outside 257-511 rows it returns at once, leaving a one-token call's host time as it was)
    if tma_words and _rows_apart(M, gemm_n, K, sm_count(device), cfg) and \
            _hopper_kernels(K, group_size, dtype, device, wgmma):
        return RowSplitConfig(ROW_SPLIT_HEAD_ROWS)
    return cfg


def _hopper_kernels(K: int, group_size: int, dtype: torch.dtype, device: torch.device, wgmma: bool) -> bool:
    """Whether the Hopper kernels may run: the inputs suit them (``wgmma``), K is in their chunks, x is fp16 or bf16
    and the device is Hopper."""
    return wgmma and wgmma_chunks(K, group_size) and dtype != torch.float32 and _hopper(device)


def _pick_for_all_rows(M: int, N: int, K: int, group_size: int, device: torch.device, activation: str,
                       warp_mma: bool, dtype: torch.dtype, wgmma: bool, norm: bool, tma_words: bool):
    """``pick_config``'s kernel for all of x's M rows in one launch (or the dequantized weight + cuBLAS)."""
    sms = sm_count(device)
    # M = 1 (and 2 on weights up to 4096 x 4096) read the weight fastest with the GEMV; the
    # warp-level MMA reads it at about the same rate for any M up to 8 (H200, 4096x28672:
    # 20.3 us at M = 1, 20.9 at 8, 29.4 at 16; the tensor-core kernel before it 54 us from M = 4).
    if warp_mma and 2 <= M <= WARP_MMA_MAX_M and not (M == 2 and N * K <= 4096 * 4096):
        tiles = cdiv(N, warp_mma_columns(activation))
        cfg = _warp_mma_config(M, tiles, K // group_size, sms, activation == "silu_mul")
        # Past 8 rows each warp pulls its words into L2 a group ahead (with the words in column tiles); H200, the
        # decode step's 64 ops at 16 rows, bf16, us: 1060.8 -> 1017.7; at 8 rows it loses (870.8 -> 979.1)
        # (bench/NOTES-kernels.md, forty-third session), and so it does with 32 columns a warp, from L2 and from DRAM
        # (``warp_mma_registers``). With 64 columns it still gains at 16 rows (H100, us, from L2 / DRAM, without ->
        # with: 14336x4096 fp16 13.49 -> 12.49, 4096x28672 24.71 -> 21.38; bf16 from DRAM 15.68 -> 15.63, 27.60 ->
        # 27.07; hundred-and-second session).
        prefetch = M > 8 and cfg.column_blocks == 4
        return cfg._replace(maxnreg=warp_mma_registers(cfg, M, tiles, sms), prefetch_groups=int(prefetch))
    mma_block_k = [b for b in (128, 64, 32, 16) if group_size % b == 0]
    if M <= GEMV_MAX_M or not mma_block_k:
        # No split: a program's warps cover K in steps of 64 to 512 word rows, so even N = 4096
        # gives 256 programs, and split K would add atomics and a read-back. H200 sweeps of 20 block
        # shapes, rolled and unrolled, weights from DRAM as in a decode step (bench/NOTES-kernels.md,
        # ninth session; us, pick against the best rolled shape): 32 weight columns a program by
        # 512 rows with 4 warps, unrolled, where they alone fill the SMs four times over (4096x28672
        # fp16 19.97 unrolled against 20.92; gate_up with silu_mul, 16 output columns = 32 weight
        # columns, unrolled since the GEMV waits for the kernel before it (PDL): the 64-op chain
        # bf16 675 us against 699 rolled, fp16 709 against 773, thirty-second session); 16 columns
        # with 8 warps where K <= 4096 and 16-column programs are over two an SM (4096x6144: bf16
        # with its norm 7.46 against 8.06, fp16 7.41 against 7.19-7.76), by 1024 rows but where a norm
        # comes with one weight column an output (forty-seventh session, us, 2048 -> 1024 rows, replayed /
        # from DRAM: 4096x6144 fp16 4.53 -> 4.03 / 5.30 -> 5.01, bf16 4.51 -> 4.17 / 5.30 -> 5.09; with the
        # norm, bf16 as in the decode step's qkv, 5.28 -> 5.21 / 5.69 -> 6.10; gate and up, K = 2048 by 8192,
        # under silu_mul, bf16 7.36 -> 5.49 / 9.22 -> 6.01, with the norm 8.18 -> 6.32 / 10.09 -> 7.16,
        # and 1024 rows faster in all 16 silu_mul cases timed); 32 x 2048 with 16 warps where K >= 14336 and those
        # programs fill one wave (``_one_wave_of_long_columns``); else 16 x 2048 with 16 warps
        # (4096x4096: bf16 5.53 against 5.71, fp16 5.99 against 5.86-6.25; 14336x4096 bf16 11.71
        # against 13.06; fp16 from DRAM 9.65 against 11.12 rolled, forty-fifth session), all unrolled.
        reads = 2 if activation == "silu_mul" else 1  # weight columns a program reads per output column
        if cdiv(N * reads, 32) >= 4 * sms:
            cfg = GemvConfig(32 // reads, 512, 1, num_warps=4, unrolled=True)
        elif K <= 4096 and cdiv(N * reads, 16) > 2 * sms:
            cfg = GemvConfig(16, 2048 if norm and reads == 1 else 1024, 1, num_warps=8, unrolled=True)
        elif _one_wave_of_long_columns(M, N, K, sms) and reads == 1 and not norm:
            cfg = GemvConfig(32, 2048, 1, num_warps=16, unrolled=True)
        else:
            cfg = GemvConfig(16, 2048, 1, num_warps=16, unrolled=True)
        return cfg._replace(maxnreg=gemv_registers(cfg, M, N, sms))
    gemm_n = 2 * N if activation == "silu_mul" else N  # (gate and up both, the activation after the GEMM)
    hopper = _hopper_kernels(K, group_size, dtype, device, wgmma)
    # 33 to 128 rows on Hopper: every operand by TMA, the weights the MMA's register operand
    # (``_wgmma_registers_config``)
    if hopper and tma_words and WGMMA_EXACT_MAX_M < M <= WGMMA_REGISTERS_MAX_M:
        return _wgmma_registers_config(M, gemm_n, K, sms)
    # 65 to 256 rows on Hopper: x by TMA, the weights through shared memory, faster than the tensor-core
    # kernel and than the dequantized weight + cuBLAS (H200, fp16, us, bench/NOTES-kernels.md, twenty-second
    # session): 128 rows 18.9 / 26.0 / 77.7 / 39.1 against 20.8 / 40.5 / 104.1 / 54.8 on 4096², 4096x6144,
    # 4096x28672 and 14336x4096; 192 rows 25.9 / 37.2 / 126.5 / 56.6 against 30.7 / 38.7 / 157.9 / 88.8;
    # 256 rows 28.4 / 39.9 / 133.3 / 62.1 against 29.0 / 40.1 / 178.6 / 98.8
    one_wave = hopper and tma_words and WGMMA_REGISTERS_MAX_M < M <= REGISTERS_ONE_WAVE_MAX_M and \
        _register_fed_one_wave(M, gemm_n, K, sms)
    if one_wave:
        return one_wave
    if hopper and WGMMA_MAX_M < M <= WGMMA_TMA_MAX_M:
        cfg = _wgmma_tma_config(M, gemm_n, K, sms)
        return cfg if tma_words else cfg._replace(dequant_warps=0)
    whole_waves = hopper and tma_words and M <= WGMMA_TMA_WAVES_MAX_M and _wgmma_tma_waves(M, gemm_n, K, sms)
    if whole_waves:
        return whole_waves
    all_waves = hopper and tma_words and WGMMA_TMA_MAX_M < M <= REGISTERS_ALL_WAVES_MAX_M and \
        _register_fed_all_waves(M, gemm_n, K, sms)
    if all_waves:
        return all_waves
    if M >= DEQUANT_MM_MIN_M:
        return DequantMmConfig(chunk_n=dequantize_chunk_columns(M, gemm_n))
    # 17 to 64 rows on Hopper: the wgmma kernel, faster than the tensor-core kernel below on the four
    # Llama shapes (H200, bench/NOTES-kernels.md): 1.4 to 1.7x at 24 and 32 rows (nineteenth session),
    # 1.1 to 1.6x at 40 to 64 rows with the weights scaled before the MMA (twenty-first session)
    if hopper and WARP_MMA_MAX_M < M <= WGMMA_MAX_M:
        return _wgmma_config(M, gemm_n, K, sms)
    block_k = mma_block_k[0]  # the largest power of two up to 128 that divides group_size
    # Weight tile as the left operand (swap-AB): it stays in registers from the dequantization
    # to the MMA. Up to 64 rows, a tile of 32 or 64 rows by 64 columns with 4 warps (H200
    # sweeps over block shapes, bench/NOTES-kernels.md). Each step's wgmmas are waited for, so
    # one program an SM leaves them idle during its dequantization: past 64 rows, 64 weight
    # columns with 4 warps, two programs an SM (``mma_split_k``); where 128-column tiles alone
    # fill the GPU (4096x28672), 128 with 8 warps (M = 128, us against the 128 x 128 pick
    # before: 4096x4096 21.4 against 24.5, 4096x6144 33.6 against 39.0, 14336x4096 52.0 against
    # 63.7, 4096x28672 97.1 against 106.1 through shared memory).
    # K 128 a step where the group allows it: half the steps, so half the waits, of K 64; in 2
    # stages, which leave two programs an SM (3 stages take 123 KB of shared memory at 128 rows).
    # H200, fp16 and bf16 alike, us against the K-64 picks before (bench/NOTES-kernels.md,
    # fourteenth session): M = 32 4096x4096 14.4 -> 13.5, 4096x28672 74.6 -> 71.2; M = 64
    # 14336x4096 40.6 -> 39.6, 4096x28672 82.1 -> 79.6. Past 64 rows only where the 128 x 64
    # tiles leave SMs free for a K split (M = 128 4096x6144 33.1 -> 32.3); with them alone
    # filling a wave K 64 stays faster (gate_up with silu_mul 97.3 against 104.3).
    if M <= 16:
        cfg = MmaConfig(16, 128, block_k, 1, True, num_warps=4, num_stages=3)
    elif 32 < M <= 64 and block_k == 128 and activation == "silu_mul" and cdiv(N, 64) >= sms:
        # gate and up tiles a program, enough of them to fill the SMs: unsplit with 3 stages
        # (4096 -> 2 x 14336, M = 64: 80.1 us against 101.5 split in 2 stages and 107.6 for the
        # K-64 pick; M = 48 79.9 against 105.5; the best of 17 block shapes in sweeps at M = 48 fp16
        # and 64 bf16. 3 stages for narrower gate_up lose as often as they win: not taken there)
        return MmaConfig(64, 64, 128, 1, True, num_warps=4, num_stages=3)
    elif M <= 64:
        # K 64 or less (group sizes that 128 does not divide) in 5 stages at 32 rows, 4 at 64
        stages = 2 if block_k == 128 else 5 if M <= 32 else 4
        cfg = MmaConfig(32 if M <= 32 else 64, 64, block_k, 1, True, num_warps=4, num_stages=stages)
    elif cdiv(M, 128) * cdiv(N, 128) >= sms:
        cfg = MmaConfig(128, 128, min(block_k, 64), 1, True, num_warps=8, num_stages=4)
    else:
        cfg = MmaConfig(128, 64, min(block_k, 64), 1, True, num_warps=4, num_stages=4)
        if block_k == 128 and mma_split_k(cfg, M, N, K, sms) > 1:
            cfg = cfg._replace(block_k=128, num_stages=2)
    return cfg._replace(split_k=mma_split_k(cfg, M, N, K, sms))


def mma_split_k(cfg: MmaConfig, M: int, N: int, K: int, sms: int) -> int:
    """K splits of the tensor-core kernel's block shape ``cfg`` for M x N outputs over K (what
    ``pick_config`` gives it, but for gate_up's unsplit tile at 33-64 rows, and the sweeps)."""
    tiles = cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n)
    if M <= 64:
        return split_for(tiles, K // cfg.block_k, sms)
    # Each split adds M x N float32 atomics: past M = 64 split only within one wave (H100,
    # 2026-11-24, M = 128: 4096x28672 0.51x with two waves of split 128x128 tiles, 0.81x
    # with one unsplit; at M = 64 two waves were the faster, 0.97x against 0.58x on 4096x6144),
    # a wave being two programs an SM for 4 warps (H200, M = 128, 128 x 64 tiles: 4096x4096 split
    # 4 21.4 us against split 2 26.5, 14336x4096 52.0 against 74.8)
    return _split_within_one_wave(tiles, K // cfg.block_k, sms * max(1, 8 // cfg.num_warps))


def w4a16_linear(
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
    config=None,
    chunked_dequantize_matmul=None,
    wgmma_matmul_op=None,
    wgmma_tma_matmul_op=None,
    split_k_linear_op=None,
) -> torch.Tensor:
    """``x [M, K] @ dequantize(qweight, scales, zeros) (+ bias)`` -> ``[M, N]`` in x.dtype.

    ``bias``: ``[N]``, or ``[M, N]`` (a residual, added in the epilogue).
    ``activation`` (``common.ACTIVATIONS``), computed in float32 before the cast: "silu_mul"
    reads the N columns as ``[gate | up]`` and gives ``silu(gate) * up`` ``[M, N // 2]``;
    "gelu" / "gelu_tanh" apply GELU.
    ``up_run``: under "silu_mul", the columns are gate and up in alternating runs of ``up_run`` columns
    (``reference.gate_up_runs``; 0: ``[gate | up]``). Run as the GEMV's tile (16), a GEMV program reads its gate
    and up columns as one 128-byte run a word row instead of two 64-byte ones: the decode step's gate_up op
    22.3 -> 19.2 us on an H200 (bench/NOTES-kernels.md, thirty-fifth session).
    ``norm_weight`` ``[K]``: x goes through the RMSNorm ``rms_norm(x, norm_weight, norm_eps)`` (in x's dtype)
    first (``reference.rms_norm``); the GEMV computes it as it reads x, the other paths in a pass of their own.
    ``config`` (a ``GemvConfig``, ``WarpMmaConfig``, ``WgmmaConfig``, ``WgmmaTmaConfig``, ``MmaConfig``,
    ``DequantMmConfig`` or ``RowSplitConfig``, whose parts pick their own) overrides the tuned choice; for sweeps.
    ``chunked_dequantize_matmul``, ``wgmma_matmul_op``, ``wgmma_tma_matmul_op``: what runs
    ``dequantize_matmul`` where the weight goes in chunks, ``wgmma_matmul`` and ``wgmma_tma_matmul`` (the
    same arguments; by default those functions). torch.compile can trace none of them (streams; Gluon
    kernels), so ``qpass.ops`` passes each wrapped in an op that torch.compile keeps opaque.
    ``split_k_linear_op``: what runs this call, on ``(x, qweight, scales, zeros, group_size, bias, activation,
    norm_weight, norm_eps, up_run)``, where it is traced (fake tensors) and the kernel picked splits K
    (``common.traced_split``): the kernel's programs meet in a workspace kept between calls
    (``common.split_k_workspace``), which a traced graph cannot keep; ``qpass.ops`` passes an opaque op that runs
    this function for real. Without it a traced split zeroes a fresh workspace, one launch more.
    """
    M, K = x.shape
    N = word_columns(qweight)
    stride_qn, stride_qt, tile = word_strides(qweight)
    n_out = output_columns(activation, N)
    check_up_run(up_run, activation, N)
    assert qweight.shape[0] * 8 == K and K % group_size == 0 and group_size % 8 == 0
    assert scales.shape == zeros.shape == (K // group_size, N) and scales.stride() == zeros.stride()
    assert norm_weight is None or norm_weight.shape == (K,)
    if M == 0:
        return x.new_empty((0, n_out))
    # each kernel's input check only where pick_config could choose it (an eager call's host time: one token)
    cfg = config or pick_config(M, n_out, K, group_size, x.device, activation, dtype=x.dtype,
                                warp_mma=2 <= M <= WARP_MMA_MAX_M and warp_mma_ok(x, qweight, scales, zeros,
                                                                                  group_size, n_out),
                                wgmma=M > GEMV_MAX_M and wgmma_ok(x, qweight, scales, zeros, group_size),
                                norm=norm_weight is not None)
    # (the picks check their inputs above; a config given must be checked here)
    given = config is not None
    if (isinstance(cfg, (WgmmaConfig, WgmmaTmaConfig)) and given
            and not wgmma_ok(x, qweight, scales, zeros, group_size)):
        raise ValueError(f"{cfg} needs fp16/bf16 x on an sm_90 GPU (with Gluon in Triton), rows of x 16-byte "
                         f"aligned, rows of x, qweight and scales contiguous, K a multiple of 128 and group_size 64 "
                         f"or a multiple of 128; got x {tuple(x.shape)} {x.dtype} strides {x.stride()} offset "
                         f"{x.storage_offset()} on {x.device}, group_size {group_size}")
    if ((isinstance(cfg, WgmmaTmaConfig) and (cfg.dequant_warps or cfg.registers)
         or isinstance(cfg, RowSplitConfig) and not given) and not wgmma_tma_words_ok(qweight, scales, zeros)):
        if given:
            raise ValueError(f"{cfg} reads qweight, scales and zeros by TMA: needs words in column tiles of "
                             f"{WORD_TILE} laid out as [N / {WORD_TILE}, K / 8, {WORD_TILE}] or in contiguous rows of "
                             f"whole 16 bytes, scales and zeros in contiguous rows of whole 16 bytes, all 16-byte "
                             f"aligned; got qweight {tuple(qweight.shape)} strides {qweight.stride()} offset "
                             f"{qweight.storage_offset()}, scales strides {scales.stride()} offset "
                             f"{scales.storage_offset()}, zeros strides {zeros.stride()} offset "
                             f"{zeros.storage_offset()}")
        # the Hopper kernels that load the words themselves, or past 256 rows the dequantized weight + cuBLAS
        cfg = pick_config(M, n_out, K, group_size, x.device, activation, dtype=x.dtype, tma_words=False)
    if (split_k_linear_op is not None and not given and isinstance(cfg, (GemvConfig, WarpMmaConfig, MmaConfig))
            and traced_split(cfg, x, N)):
        return split_k_linear_op(x, qweight, scales, zeros, group_size, bias, activation, norm_weight, norm_eps, up_run)
    if isinstance(cfg, RowSplitConfig):
        if not 0 < cfg.head_rows < M:
            raise ValueError(f"{cfg}: head_rows must leave rows of x's {M} on both sides")
        parts = []
        for start, stop in ((0, cfg.head_rows), (cfg.head_rows, M)):
            part_bias = bias if bias is None or bias.dim() == 1 else rows_of(bias, start, stop)
            parts.append(w4a16_linear(rows_of(x, start, stop), qweight, scales, zeros, group_size, part_bias,
                                      activation, norm_weight, norm_eps, up_run, None, chunked_dequantize_matmul,
                                      wgmma_matmul_op, wgmma_tma_matmul_op, split_k_linear_op))
        return join_rows(parts)
    if norm_weight is not None and not isinstance(cfg, GemvConfig):
        x = _rms_norm(x, norm_weight, norm_eps)
        norm_weight = None
    if isinstance(cfg, (DequantMmConfig, WgmmaConfig, WgmmaTmaConfig)):
        vector_bias = bias if bias is None or bias.dim() == 1 else None
        if isinstance(cfg, WgmmaConfig):
            run = wgmma_matmul_op or wgmma_matmul
            out = run(x, qweight, scales, zeros, group_size, vector_bias, cfg.block_m, cfg.warpgroups, cfg.split_k,
                      cfg.scaled)
        elif isinstance(cfg, WgmmaTmaConfig):
            check_wgmma_tma_config(cfg)
            run = wgmma_tma_matmul_op or wgmma_tma_matmul
            out = run(x, qweight, scales, zeros, group_size, vector_bias, *cfg)
        else:
            run = dequantize_matmul
            if chunked_dequantize_matmul is not None and 0 < cfg.chunk_n < N:
                run = chunked_dequantize_matmul
            out = run(x, qweight, scales, zeros, group_size, vector_bias, cfg.block_r, cfg.block_n, cfg.chunk_n)
        return after_gemm(out, None if vector_bias is bias else bias, activation, up_run)
    if up_run and (isinstance(cfg, MmaConfig) or isinstance(cfg, GemvConfig) and up_run != cfg.block_n):
        # (the tensor-core kernel's epilogue reads [gate | up]; the GEMV reads runs of its BLOCK_N)
        out = w4a16_linear(x, qweight, scales, zeros, group_size, bias, norm_weight=norm_weight, norm_eps=norm_eps,
                           split_k_linear_op=split_k_linear_op)
        return after_gemm(out, None, activation, up_run)
    if up_run and bias is not None:  # the epilogue reads the bias of gate column c at c, of up column c at N / 2 + c
        bias = gate_up_halves(bias, up_run)
    out = new_empty((M, n_out), x.dtype, x.device)
    bias, stride_bm = bias_rows(bias, M, N)
    has_bias = bias is not None
    bias_arg = bias if has_bias else scales  # any pointer; never read
    if isinstance(cfg, WarpMmaConfig):
        if cfg.column_blocks not in (2, 4):
            raise ValueError(f"{cfg}: column_blocks must be 4 or 2 (a warp's 64 or 32 weight columns), got "
                             f"{cfg.column_blocks}")
        most = warp_mma_most_warps(cfg)
        if cfg.column_warps < 1 or cfg.num_warps % cfg.column_warps or cfg.num_warps > most * cfg.column_warps:
            raise ValueError(f"{cfg}: column_warps ({cfg.column_warps}) must divide num_warps ({cfg.num_warps}), "
                             f"leaving at most {most} warps a column block")
        if cfg.row_tiles not in (1, 2) or given and not warp_mma_ok(x, qweight, scales, zeros, group_size, n_out):
            raise ValueError(f"{cfg} needs row_tiles 1 or 2, fp16/bf16 x on a GPU with at most {WARP_MMA_MAX_M} "
                             f"rows, 16-byte aligned, group_size a multiple of 64 and N a multiple of 4; got x "
                             f"{tuple(x.shape)} {x.dtype} strides {x.stride()} on {x.device}, group_size "
                             f"{group_size}, N {N}")
        grid = (cdiv(M, 8 * cfg.row_tiles),
                cdiv(n_out, warp_mma_columns(activation, cfg.column_blocks) * cfg.column_warps), cfg.split_k)
        ws = split_k_workspace(M, N, grid[0] * grid[1], cfg.split_k, out)
        launch(
            w4a16_warp_mma_kernel, grid,
            x, qweight, scales, zeros, bias_arg, out, ws, M, n_out, N - n_out, K,
            x.stride(0), qweight.stride(0), stride_qt, scales.stride(0), stride_bm, out.stride(0), out.stride(1), N,
            TILE=tile, PREFETCH_GROUPS=warp_mma_prefetch(cfg, tile, activation, up_run, x.device),
            GROUP_SIZE=group_size, M_TILES=cfg.row_tiles, WARPS=cfg.num_warps, COLUMN_WARPS=cfg.column_warps,
            SPLIT_K=cfg.split_k, HAS_BIAS=has_bias, ACTIVATION=activation, BF16=x.dtype == torch.bfloat16,
            UNROLLED_ITERS=warp_mma_unrolled_iterations(cfg, K // group_size), LOOP_UNROLL=cfg.loop_unroll,
            UP_RUN=up_run, BLOCKS=cfg.column_blocks, num_warps=cfg.num_warps,
            **register_budget(cfg.maxnreg), **dependent_launch(x),
        )
        return out
    common = dict(GROUP_SIZE=group_size, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k, EVEN_N=n_out % cfg.block_n == 0,
                  HAS_BIAS=has_bias, ACTIVATION=activation, num_warps=cfg.num_warps)
    strides = (x.stride(0), x.stride(1), qweight.stride(0), stride_qn, stride_qt, scales.stride(0), scales.stride(1),
               stride_bm, out.stride(0), out.stride(1), N, tile)
    if isinstance(cfg, GemvConfig):
        grid = (M, cdiv(n_out, cfg.block_n), cfg.split_k)
        ws = split_k_workspace(M, N, grid[0] * grid[1], cfg.split_k, out)
        meta = gemv_meta(cfg, x, K, group_size, two_runs=activation == "silu_mul" and not up_run)
        g = x if norm_weight is None else norm_weight_as_x(norm_weight, x)  # x: any pointer; never read
        launch(
            w4a16_gemv_kernel, grid,
            x, g, qweight, scales, zeros, bias_arg, out, ws, M, n_out, N - n_out, K, float(norm_eps), *strides,
            HAS_NORM=norm_weight is not None, NORM_BLOCK=min(next_power_of_2(K), 4096), UP_RUN=up_run, **common,
            **meta, **dependent_launch(x),
        )
        return out
    assert group_size % cfg.block_k == 0
    grid = (cdiv(M, cfg.block_m) * cdiv(n_out, cfg.block_n), cfg.split_k)
    ws = split_k_workspace(M, N, grid[0], cfg.split_k, out)
    launch(
        _w4a16_mma_kernel, grid,
        x, qweight, scales, zeros, bias_arg, out, ws, M, n_out, N - n_out, K, *strides,
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SWAP_AB=cfg.swap_ab,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        PACKED=_mma_packed(cfg, x), num_stages=cfg.num_stages, **common,
    )
    return out


def _rms_norm(x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``reference.rms_norm(x, norm_weight in x's dtype, eps)`` by ``rms_norm_kernel``: the pass of the paths that do
    not compute the norm as they read x. (A launch of its own under torch.compile as well, where Inductor would
    otherwise generate one; in eager use one launch that ``replay`` can record, against torch's eight.)"""
    M, K = x.shape
    out = new_empty((M, K), x.dtype, x.device)
    block_k = min(next_power_of_2(K), 8192)
    launch(rms_norm_kernel, (M,), x, norm_weight_as_x(norm_weight, x), out, K, x.stride(0), x.stride(1),
           out.stride(0), float(eps), BLOCK_K=block_k, ONE_PASS=block_k >= K, num_warps=8 if block_k > 2048 else 4,
           **dependent_launch(x))
    return out


def _dequantize_into(w: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int, block_r: int, block_n: int, first_column: int = 0):
    """The weight's columns ``first_column`` on (``qweight`` in either layout, any strides) written into
    ``w`` ``[K, n]``."""
    K, N = w.shape
    stride_qn, stride_qt, tile = word_strides(qweight)
    grid = (cdiv(K // 8, block_r), cdiv(N, block_n))
    launch(
        _w4a16_dequantize_kernel, grid,
        qweight, scales, zeros, w, K, N, first_column, qweight.stride(0), stride_qn, stride_qt, scales.stride(0),
        scales.stride(1), w.stride(0), w.stride(1), GROUP_SIZE=group_size, BLOCK_R=block_r, BLOCK_N=block_n,
        TILE=tile,
    )


def dequantize_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int, bias: Optional[torch.Tensor], block_r: int, block_n: int,
                      chunk_n: int) -> torch.Tensor:
    """``DequantMmConfig``'s GEMM, ``x @ w (+ bias [N])``: the weight dequantized by
    ``_w4a16_dequantize_kernel``, then cuBLAS. With ``0 < chunk_n < N``, ``chunk_n`` columns at a
    time through two reused scratch buffers: on a GPU chunk i + 1 is dequantized on a side stream
    while cuBLAS multiplies chunk i into its column slice of the output, and the GEMMs' reads of
    the scratch come from L2. Where ``chunk_n`` does not divide N the narrower chunk goes first, as
    its dequantization is the one no GEMM hides (H100, fp16, 4096x6144 at 1024 rows: 2048 columns,
    then 4096, 91.94 -> 90.52 us; bench/NOTES-kernels.md, sixty-ninth session)."""
    M, K = x.shape
    N = word_columns(qweight)
    if not 0 < chunk_n < N:
        w = torch.empty((K, N), device=x.device, dtype=x.dtype)
        _dequantize_into(w, qweight, scales, zeros, group_size, block_r, block_n)
        return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    scratch = [torch.empty((K, chunk_n), device=x.device, dtype=x.dtype) for _ in range(2)]
    main = torch.cuda.current_stream(x.device) if x.is_cuda else None
    side = _side_stream(x.device) if x.is_cuda else None
    if side is not None:
        side.wait_stream(main)  # the inputs are written on the main stream
    multiplied = []  # per chunk: the main stream has read its scratch
    bounds = [0, *range(N % chunk_n or chunk_n, N + 1, chunk_n)]
    for i, (n0, n1) in enumerate(zip(bounds, bounds[1:])):
        w = scratch[i % 2][:, : n1 - n0]
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            if side is not None and i >= 2:
                side.wait_event(multiplied[i - 2])  # the GEMM two chunks back has read this buffer
            _dequantize_into(w, qweight, scales, zeros, group_size, block_r, block_n, n0)
        if side is not None:
            main.wait_stream(side)
        if bias is None:
            torch.mm(x, w, out=out[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1], x, w, out=out[:, n0:n1])
        if side is not None:
            multiplied.append(main.record_event())
    return out


_SIDE_STREAMS = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(index)
    return _SIDE_STREAMS[index]


def _mma_packed(cfg: MmaConfig, x: torch.Tensor) -> bool:
    """Whether the tensor-core kernel dequantizes its weight tile by inline PTX (``_mma_weight_tile``):
    for fp16 and bf16 on a GPU, with the tile as the register operand. Through shared memory, Triton
    3.6 failed to compile it for N not a multiple of the block (TritonGPUOptimizeDotOperands)."""
    return cfg.swap_ab and x.dtype in (torch.float16, torch.bfloat16) and not triton_interpreted()


