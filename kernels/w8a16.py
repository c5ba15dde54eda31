"""W8A16: int8 weights ``[N, K]`` (nn.Linear's orientation) with one scale per output
channel, fp16/bf16 (or fp32) activations. ``out = (x @ q.T) * scales``.

- ``w8_gemv_kernel`` (M of a few rows): each program owns ``BLOCK_N`` weight rows of one
  activation row and streams them along K with 16-byte loads; the per-channel scale is
  applied once at the end. Bound by the bytes of ``qweight``. FP8 W8A8 (``fp8.py``) runs the same
  kernel on float8_e4m3fn weights and x quantized per token, given in fp16 with its scales
  (``X_SCALED``). For fp16 and bf16 x on a GPU (constexprs PACKED_F16 / PACKED_BF16, chosen by
  ``gemv_meta``) weights and x are loaded 16 a thread by inline PTX and each int8 weight costs one
  ``prmt`` (into the float32 32768 + q + 128) and one FFMA (``_chunk_dot``): the loop compiled for
  sm_90 is 3.2 SASS instructions a weight at 4 rows x 2048 (4.1 at 8 x 512), against 5.8 for the
  float32 path (which also moves x through shared memory) that Triton's interpreter and fp32 x
  take. With ``GemvConfig.block_m`` 2 a program takes two rows of x and converts each weight once
  for both (``_chunk_dot2``). Where a config asks and every split is whole steps, the loop over K
  is unrolled (``UNROLLED_STEPS``) so that each step's next loads stay ahead of its arithmetic.
- ``_w8a16_mma_kernel`` (larger M): int8 tiles converted to the activation dtype (exact:
  |q| <= 128; by inline PTX for fp16, ``_int8_to_f16``) and fed to ``tl.dot``, as its left
  operand (the transposed product, which the Hopper MMA reads from registers) where the config
  asks (``swap_ab``), else as its right one; the scale multiplies the accumulator.
- ``DequantMmConfig`` (M >= 4096): the weight converted once (one torch pass), then cuBLAS.

Both split K when the tiles alone would leave the GPU idle; the programs of a tile add
their partial sums into a float32 workspace and the last to arrive finishes the tile
(``common.store_output``).
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import (MmaConfig, asm_constant, bias_rows, capability, cdiv, grouped_tile, mma_accumulate, mma_zeros,
                     output_columns, sm_count, split_for, split_k_workspace, split_range, store_output, traced_split,
                     triton_interpreted, unrolled_steps)
from .reference import activation_after_gemm
from .replay import launch, new_empty


@triton.jit
def _gemv_partial(x_row, qw_ptr, offs_n, mask_n, k_start, k_end, stride_xk, stride_qn, stride_qk,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr):
    """float32 sum over k in [k_start, k_end) of x[k] * q[n, k] for the rows offs_n of qweight (int8 or
    float8_e4m3fn): [BLOCK_N]."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        mask_k = ks < k_end
        if EVEN_N:
            mask_w = mask_k[None, :]
        else:
            mask_w = mask_n[:, None] & mask_k[None, :]
        q_ptrs = qw_ptr + offs_n[:, None] * stride_qn + ks[None, :] * stride_qk
        x = tl.load(x_row + ks * stride_xk, mask=mask_k, other=0).to(tl.float32)
        if qw_ptr.dtype.element_ty == tl.int8:
            # 0x4B000080 + q is the float32 2**23 + 128 + q for -128 <= q < 128.
            q = tl.load(q_ptrs, mask=mask_w, other=0)
            w = (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        else:  # float8_e4m3fn, exact in float32 (no `other`: Triton's interpreter cannot cast 0 to fp8)
            w = tl.where(mask_w, tl.load(q_ptrs, mask=mask_w).to(tl.float32), 0.0)
        acc += x[None, :] * w
    return tl.sum(acc, axis=1)


@triton.jit
def _load_w16(w_ptrs, valid):
    """The 16 int8 weights at each (16-byte aligned) w_ptrs as 4 words, where valid (int32) is
    not 0 (elsewhere the words are left unset), by inline PTX, read once: no L1 allocation.
    Loaded by PTX rather than ``tl.load`` so that the words keep the thread layout of the tile
    of 16-byte chunks (one asm call a chunk) and need no reshape."""
    return tl.inline_asm_elementwise(
        """
        {
        .reg .pred p;
        setp.ne.b32 p, $5, 0;
        @p ld.global.nc.L1::no_allocate.v4.b32 {$0, $1, $2, $3}, [$4];
        }
        """,
        "=r,=r,=r,=r,l,r", [w_ptrs, valid], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
        pack=1,
    )


def _load_x16_asm(bf16: bool) -> str:
    """The PTX of ``_load_x16``: two 16-byte loads, then each word's two halves widened to
    float32 ($0..$15): fp16 by ``cvt``, bf16 by a shift or a mask."""
    lines = ["{", ".reg .b32 a0, a1, a2, a3, a4, a5, a6, a7;", ".reg .b16 l, h;",
             "ld.global.nc.v4.b32 {a0, a1, a2, a3}, [$16];", "ld.global.nc.v4.b32 {a4, a5, a6, a7}, [$16+16];"]
    for j in range(8):
        if bf16:
            lines += [f"shl.b32 ${2 * j}, a{j}, 16;", f"and.b32 ${2 * j + 1}, a{j}, 0xFFFF0000;"]
        else:
            lines += [f"mov.b32 {{l, h}}, a{j};", f"cvt.f32.f16 ${2 * j}, l;", f"cvt.f32.f16 ${2 * j + 1}, h;"]
    return "\n".join(lines + ["}"])


_LOAD_X16_F16_ASM = asm_constant(_load_x16_asm(bf16=False))
_LOAD_X16_BF16_ASM = asm_constant(_load_x16_asm(bf16=True))
_LOAD_X16_CONSTRAINTS = tl.constexpr("=r," * 16 + "l")


@triton.jit
def _load_x16(x_ptrs, BF16: tl.constexpr):
    """The 16 fp16 (or, with BF16, bf16) values at each (16-byte aligned) x_ptrs, loaded by
    inline PTX and widened to float32 (exact). A ``tl.load`` here would get a thread layout of
    its own and the compiler would move the weight tile through shared memory to match
    (bench/NOTES-kernels.md); this takes the layout of the chunk tile it is broadcast against,
    and the copies that land in one thread (one per weight row it holds) merge into one."""
    if BF16:
        return tl.inline_asm_elementwise(_LOAD_X16_BF16_ASM, _LOAD_X16_CONSTRAINTS, [x_ptrs], dtype=(tl.float32,) * 16,
                                         is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_LOAD_X16_F16_ASM, _LOAD_X16_CONSTRAINTS, [x_ptrs], dtype=(tl.float32,) * 16,
                                     is_pure=True, pack=1)


@triton.jit
def _chunk_offset(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, E4M3: tl.constexpr):
    """Where ``_chunk_dot`` starts a row's sum: int8 weights enter it as 32768 + q + 128, so at
    ``-32896 * sum(x)`` over the chunk's 16 x; float8 weights are their values, so at 0."""
    if E4M3:
        return x0 * 0.0  # (tl.zeros_like here compiles to other SASS, not timed on the GPU)
    s0 = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    s1 = ((x8 + x9) + (x10 + x11)) + ((x12 + x13) + (x14 + x15))
    return (s0 + s1) * -32896.0


def _chunk_dot_asm(rows: int, e4m3: bool) -> str:
    """The PTX of ``_chunk_dot`` (rows 1) and ``_chunk_dot2`` (rows 2). Operands: the rows' sums
    $0.., then the 4 words, then each row's 16 x, then each row's start. Each weight is converted
    once, then one FFMA a row adds it into that row's chain."""
    words, xs = rows, rows + 4
    starts = xs + 16 * rows
    lines = ["{", ".reg .f32 w, " + ", ".join(f"t{r}" for r in range(rows)) + ";"]
    if e4m3:
        lines += [".reg .b32 pair;", ".reg .b16 lo, hi, p0, p1;"]
    else:
        lines += [".reg .b32 u, c47;", "mov.b32 c47, 0x47000000;"]
    for k in range(16):
        j, i = divmod(k, 4)
        if e4m3:
            if i == 0:
                lines.append(f"mov.b32 {{lo, hi}}, ${words + j};")
            if i % 2 == 0:
                lines += [f"cvt.rn.f16x2.e4m3x2 pair, {'lo' if i == 0 else 'hi'};", "mov.b32 {p0, p1}, pair;"]
            lines.append(f"cvt.f32.f16 w, p{i % 2};")
        else:
            if i == 0:
                lines.append(f"xor.b32 u, ${words + j}, 0x80808080;")
            lines.append(f"prmt.b32 w, u, c47, 0x74{i}4;")
        for r in range(rows):
            out = f"${r}" if k == 15 else f"t{r}"
            lines.append(f"fma.rn.f32 {out}, w, ${xs + 16 * r + k}, {f'${starts + r}' if k == 0 else f't{r}'};")
    return "\n".join(lines + ["}"])


_CHUNK_DOT_INT8_ASM = asm_constant(_chunk_dot_asm(1, e4m3=False))
_CHUNK_DOT_E4M3_ASM = asm_constant(_chunk_dot_asm(1, e4m3=True))
_CHUNK_DOT2_INT8_ASM = asm_constant(_chunk_dot_asm(2, e4m3=False))
_CHUNK_DOT2_E4M3_ASM = asm_constant(_chunk_dot_asm(2, e4m3=True))
_CHUNK_DOT_CONSTRAINTS = tl.constexpr("=r," + "r," * 20 + "r")
_CHUNK_DOT2_CONSTRAINTS = tl.constexpr("=r,=r," + "r," * 37 + "r")


@triton.jit
def _chunk_dot(w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, start,
               E4M3: tl.constexpr):
    """float32 sum_k x[k] * q[k] over the 16 weights of one chunk (words w0..w3, weight 4j + i in
    byte i of wj; x0..x15 from ``_load_x16``), from ``start`` (``_chunk_offset``).

    int8: after an xor with 0x80808080 each byte is u = q + 128, and one ``prmt`` (selector 0x74i4)
    puts it between 0x47 and zero bytes: 0x4700uu00 is the float32 32768 + u, so one FFMA a weight
    accumulates (32768 + u) * x onto the start, which takes the 32896 * x back. Per weight 1 prmt,
    1 FFMA and a quarter of an xor (the float32 path: about 4). The products are exact (16 by 11
    significant bits, inside the FMA); the sums are rounded at the magnitude of 32768 * (a partial
    sum of 16 x), which leaves about 5e-5 of relative error, far under the output's own rounding.
    Half2 products summed in fp16 (the W4A16 GEMV's way) cost fewer instructions but leave 4e-4
    and, where a bias or silu * up cancels the sum, past the tests' 1e-3 bound (emulated: 1 to 9%
    of small cases).
    float8_e4m3fn: one ``cvt`` a pair of weights to fp16 and one a weight to float32, both exact
    (``cvt ... e4m3x2`` needs sm_89 or later, ``_packed_ok``); the sums are the only rounding."""
    args = [w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, start]
    if E4M3:
        return tl.inline_asm_elementwise(_CHUNK_DOT_E4M3_ASM, _CHUNK_DOT_CONSTRAINTS, args, dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_CHUNK_DOT_INT8_ASM, _CHUNK_DOT_CONSTRAINTS, args, dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _chunk_dot2(w0, w1, w2, w3, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
                b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15, start_a, start_b,
                E4M3: tl.constexpr):
    """``_chunk_dot`` for two rows of x (a and b) at once: each weight converted once, one FFMA a
    weight and row."""
    args = [w0, w1, w2, w3, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
            b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15, start_a, start_b]
    if E4M3:
        return tl.inline_asm_elementwise(_CHUNK_DOT2_E4M3_ASM, _CHUNK_DOT2_CONSTRAINTS, args,
                                         dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    return tl.inline_asm_elementwise(_CHUNK_DOT2_INT8_ASM, _CHUNK_DOT2_CONSTRAINTS, args,
                                     dtype=(tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _add_chunk(acc, d, ks, k_end, EVEN_K: tl.constexpr):
    """acc plus a step's chunk sums d, those of chunks past k_end left out unless every chunk is inside."""
    if EVEN_K:
        return acc + d
    return acc + tl.where(ks < k_end, d, 0.0)  # (unset words past k_end: whatever d is there)


@triton.jit
def _row_pair_step(acc_a, acc_b, w0, w1, w2, w3, x_row_a, x_row_b, x_offs, ks, k_end, EVEN_K: tl.constexpr,
                   BF16: tl.constexpr, E4M3: tl.constexpr):
    """Two rows' sums plus their products with one step's chunks (``_chunk_dot2``)."""
    a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15 = _load_x16(x_row_a + x_offs, BF16)
    b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15 = _load_x16(x_row_b + x_offs, BF16)
    start_a = _chunk_offset(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, E4M3)
    start_b = _chunk_offset(b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15, E4M3)
    da, db = _chunk_dot2(w0, w1, w2, w3, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
                         b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15, start_a, start_b, E4M3)
    return _add_chunk(acc_a, da, ks, k_end, EVEN_K), _add_chunk(acc_b, db, ks, k_end, EVEN_K)


@triton.jit
def _gemv_step_x2(acc0, acc1, w0, w1, w2, w3, w_rows, x_row0, x_row1, k0, k_end, offs_c, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr, BF16: tl.constexpr, ROWS: tl.constexpr):
    """One step of ``_gemv_partial_x2`` at k0, on the chunks w0..w3 loaded before it: issues the
    next step's loads, then adds this step's products to each row's sums (two rows: each weight
    converted once for both). Returns the sums and the next chunks."""
    ks_next = k0 + BLOCK_K + offs_c
    n0, n1, n2, n3 = _load_w16(w_rows + ks_next, (ks_next < k_end).to(tl.int32))
    ks = k0 + offs_c
    if EVEN_K:
        x_offs = ks
    else:
        x_offs = tl.minimum(ks, k_end - 16)  # (16 divides k_end)
    E4M3: tl.constexpr = w_rows.dtype.element_ty != tl.int8
    if ROWS == 1:
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load_x16(x_row0 + x_offs, BF16)
        start = _chunk_offset(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, E4M3)
        d = _chunk_dot(w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, start,
                       E4M3)
        acc0 = _add_chunk(acc0, d, ks, k_end, EVEN_K)
    else:
        acc0, acc1 = _row_pair_step(acc0, acc1, w0, w1, w2, w3, x_row0, x_row1, x_offs, ks, k_end, EVEN_K, BF16,
                                    E4M3)
    return acc0, acc1, n0, n1, n2, n3


@triton.jit
def _gemv_partial_x2(x_row0, x_row1, qw_ptr, offs_n, mask_n, k_start, k_end, stride_qn, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, BF16: tl.constexpr,
                     UNROLLED_STEPS: tl.constexpr, ROWS: tl.constexpr):
    """``_gemv_partial`` by inline PTX for ROWS (1 or 2) activation rows at once, 16 weights of a
    weight row a call (x fp16, or bf16 with BF16; x and the weight rows contiguous and 16-byte
    aligned, K a multiple of 16): [BLOCK_N] sums for x_row0 and x_row1 (0 where ROWS is 1).

    Each chunk's weights are loaded and converted once for both rows (``_chunk_dot2``), so two rows
    cost about the bytes of one. The tile is ``[BLOCK_N, BLOCK_K // 16]`` chunks of 16
    weights; a thread widens the x of its chunk once for all the weight rows it holds (BLOCK_N over
    the warps along N), so shapes whose warps lie along K (BLOCK_K = 512 * num_warps) share it most.
    Each step issues the next step's loads before its arithmetic (Triton does not pipeline a loop
    without ``tl.dot``); in a loop ptxas moves them after it all the same (into the registers
    consumed at the back-edge), so UNROLLED_STEPS > 0 (the number of steps, all of [k_start,
    k_end), each whole) unrolls the loop, where they stay ahead (as in the W4A16 GEMV). The loads
    of chunks at or past k_end are predicated off. Weight rows right of N read row 0 again (never
    stored). EVEN_K: every step lies inside [k_start, k_end); else a step's chunks past k_end read
    the last x again and add 0."""
    CHUNKS: tl.constexpr = BLOCK_K // 16
    offs_c = (tl.arange(0, CHUNKS) * 16)[None, :]  # [1, CHUNKS]: a chunk's first k within the step
    if EVEN_N:
        rows = offs_n
    else:
        rows = tl.where(mask_n, offs_n, 0)
    w_rows = qw_ptr + rows[:, None] * stride_qn  # [BLOCK_N, 1]
    ks = k_start + offs_c
    w0, w1, w2, w3 = _load_w16(w_rows + ks, (ks < k_end).to(tl.int32))
    acc0 = tl.zeros((BLOCK_N, CHUNKS), dtype=tl.float32)
    acc1 = acc0
    if UNROLLED_STEPS > 0:
        for i in tl.static_range(UNROLLED_STEPS):
            acc0, acc1, w0, w1, w2, w3 = _gemv_step_x2(acc0, acc1, w0, w1, w2, w3, w_rows, x_row0, x_row1,
                                                       k_start + i * BLOCK_K, k_end, offs_c, BLOCK_K, EVEN_K, BF16,
                                                       ROWS)
    else:
        for k0 in range(k_start, k_end, BLOCK_K):
            acc0, acc1, w0, w1, w2, w3 = _gemv_step_x2(acc0, acc1, w0, w1, w2, w3, w_rows, x_row0, x_row1, k0, k_end,
                                                       offs_c, BLOCK_K, EVEN_K, BF16, ROWS)
    return tl.sum(acc0, axis=1), tl.sum(acc1, axis=1)


@triton.jit
def _gemv_columns(x_row0, x_row1, qw_ptr, offs_n, mask_n, k_start, k_end, stride_xk, stride_qn, stride_qk,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                  PACKED_F16: tl.constexpr, PACKED_BF16: tl.constexpr, UNROLLED_STEPS: tl.constexpr,
                  ROWS: tl.constexpr):
    """float32 x . q for the weight rows offs_n over k in [k_start, k_end), for the activation rows
    x_row0 (and x_row1 where ROWS is 2): ``[ROWS, BLOCK_N]``. The float32 path reads the weights once
    a row."""
    if PACKED_F16 or PACKED_BF16:
        a0, a1 = _gemv_partial_x2(x_row0, x_row1, qw_ptr, offs_n, mask_n, k_start, k_end, stride_qn, BLOCK_N,
                                  BLOCK_K, EVEN_N, EVEN_K, PACKED_BF16, UNROLLED_STEPS, ROWS)
    else:
        a0 = _gemv_partial(x_row0, qw_ptr, offs_n, mask_n, k_start, k_end, stride_xk, stride_qn, stride_qk,
                           BLOCK_N, BLOCK_K, EVEN_N)
        a1 = a0
        if ROWS == 2:
            a1 = _gemv_partial(x_row1, qw_ptr, offs_n, mask_n, k_start, k_end, stride_xk, stride_qn, stride_qk,
                               BLOCK_N, BLOCK_K, EVEN_N)
    if ROWS == 1:
        tile = a0[None, :]
    else:
        tile = tl.where(tl.arange(0, 2)[:, None] == 0, a0[None, :], a1[None, :])
    return tile


@triton.jit
def _column_scales(s_ptr, xs_ptr, x_rows, offs_n, mask_n, X_SCALED: tl.constexpr):
    """What the sums of columns offs_n are multiplied by: the weights' scales ``[1, BLOCK_N]``, times
    the x scales of the (valid) rows x_rows ``[ROWS, 1]`` under X_SCALED (the FP8 tensor-core
    kernel's order: the scales' product first)."""
    scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    if X_SCALED:
        scale = tl.load(xs_ptr + x_rows) * scale
    return scale


@triton.jit
def w8_gemv_kernel(
    x_ptr, xs_ptr, qw_ptr, s_ptr, b_ptr, out_ptr, ws_ptr,
    M, N_OUT, N_UP, K,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_bm, stride_om, stride_on, stride_wm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    PACKED_F16: tl.constexpr, PACKED_BF16: tl.constexpr, UNROLLED_STEPS: tl.constexpr, X_SCALED: tl.constexpr,
):
    """``(x @ q.T) * s``, q int8 (W8A16) or float8_e4m3fn (FP8 W8A8, ``fp8.py``) [N, K], BLOCK_M (1 or
    2) rows of x a program. X_SCALED: x holds each row's quantized values (e4m3 values, exact in
    fp16) and xs_ptr [M] their scales; else x is the activation itself (xs_ptr unread)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_start, k_end = split_range(pid_k, K, SPLIT_K, BLOCK_K)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    x_rows = tl.minimum(rows, M - 1)[:, None]  # a row past M reads the last row again (never stored)
    x_row0 = x_ptr + pid_m * BLOCK_M * stride_xm
    x_row1 = x_ptr + tl.minimum(pid_m * BLOCK_M + 1, M - 1) * stride_xm
    acc = _gemv_columns(x_row0, x_row1, qw_ptr, offs_n, mask_n, k_start, k_end, stride_xk, stride_qn, stride_qk,
                        BLOCK_N, BLOCK_K, EVEN_N, EVEN_K, PACKED_F16, PACKED_BF16, UNROLLED_STEPS, BLOCK_M)
    acc *= _column_scales(s_ptr, xs_ptr, x_rows, offs_n, mask_n, X_SCALED)
    acc_up = acc
    if ACTIVATION == "silu_mul":
        acc_up = _gemv_columns(x_row0, x_row1, qw_ptr + N_UP * stride_qn, offs_n, mask_n, k_start, k_end, stride_xk,
                               stride_qn, stride_qk, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K, PACKED_F16, PACKED_BF16,
                               UNROLLED_STEPS, BLOCK_M)
        acc_up *= _column_scales(s_ptr + N_UP, xs_ptr, x_rows, offs_n, mask_n, X_SCALED)
    store_output(acc, acc_up, rows[:, None], offs_n[None, :], (rows < M)[:, None] & mask_n[None, :],
                 pid_m * tl.num_programs(1) + pid_n, M, N_UP, b_ptr, out_ptr, ws_ptr, stride_bm, stride_om, stride_on,
                 stride_wm, SPLIT_K, HAS_BIAS, ACTIVATION)


@triton.jit
def _int8_to_f16(q):
    """int8 -> fp16, exact, four at a time by inline PTX: after an xor with 0x80 each byte is
    q + 128, and under the byte 0x64 it is the fp16 1024 + q + 128 (one prmt for two weights,
    one HSUB2 takes the 1152 off). Triton's own conversion is one I2F a weight, a quarter-rate
    instruction that outlasts the MMA at these tile shapes."""
    return tl.inline_asm_elementwise(
        """
        {
        .reg .b32 u, magic;
        xor.b32 u, $2, 0x80808080;
        prmt.b32 $0, u, 0x64646464, 0x4140;
        prmt.b32 $1, u, 0x64646464, 0x4342;
        mov.b32 magic, 0x64806480;
        sub.f16x2 $0, $0, magic;
        sub.f16x2 $1, $1, magic;
        }
        """,
        "=r,=r,r", [q], dtype=tl.float16, is_pure=True, pack=4,
    )


@triton.jit
def _weight_tile(q, DTYPE: tl.constexpr, CVT_ASM: tl.constexpr):
    """The int8 tile in DTYPE: by ``_int8_to_f16`` where CVT_ASM (fp16 on a GPU)."""
    if CVT_ASM:
        w = _int8_to_f16(q)
    else:
        w = q.to(DTYPE)
    return w


@triton.jit
def _w8a16_mma_kernel(
    x_ptr, qw_ptr, s_ptr, b_ptr, out_ptr, ws_ptr,
    M, N_OUT, N_UP, K,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_bm, stride_om, stride_on, stride_wm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr, CVT_ASM: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m, offs_n = grouped_tile(pid, M, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows and columns read row 0 again (always valid) and are never stored.
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    qw_ptrs = qw_ptr + (offs_n % N_OUT)[:, None] * stride_qn + offs_k[None, :] * stride_qk
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty

    k_tiles = tl.cdiv(K, BLOCK_K)
    tile_start, tile_end = split_range(tl.program_id(1), k_tiles, SPLIT_K, 1)
    # SWAP_AB: the product transposed, out^T = q x^T, the weight tile the MMA's left operand, which
    # Hopper's wgmma reads from registers: the int8 -> fp16/bf16 conversion feeds it with no trip
    # through shared memory (bench/NOTES-kernels.md).
    acc = mma_zeros(BLOCK_M, BLOCK_N, SWAP_AB)
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
        acc = mma_accumulate(acc, x, _weight_tile(q, DTYPE, CVT_ASM), SWAP_AB, DOT_PRECISION)
        if ACTIVATION == "silu_mul":
            if EVEN_K:
                q_up = tl.load(qw_ptrs + N_UP * stride_qn + k0 * stride_qk)
            else:
                q_up = tl.load(qw_ptrs + N_UP * stride_qn + k0 * stride_qk, mask=mask_k[None, :], other=0)
            acc_up = mma_accumulate(acc_up, x, _weight_tile(q_up, DTYPE, CVT_ASM), SWAP_AB, DOT_PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)
    mask_n = offs_n < N_OUT
    acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    if ACTIVATION == "silu_mul":
        acc_up = acc_up * tl.load(s_ptr + N_UP + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
    store_output(acc, acc_up, offs_m[:, None], offs_n[None, :], (offs_m < M)[:, None] & mask_n[None, :], pid, M,
                 N_UP, b_ptr, out_ptr, ws_ptr, stride_bm, stride_om, stride_on, stride_wm, SPLIT_K, HAS_BIAS,
                 ACTIVATION)


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int  # K per loop step: a power of two, at least 16
    split_k: int
    num_warps: int
    num_stages: int
    packed_f16: bool = True  # the packed path (inline PTX, ``_chunk_dot``) where x is fp16 on a GPU
    packed_bf16: bool = True  # the same where x is bf16 on a GPU
    unrolled: bool = False  # the packed paths' loop over K unrolled where every split is whole steps
    # (``common.unrolled_steps``)
    block_m: int = 1  # activation rows a program, 1 or 2 (the packed path reads the weights once for both)


def _packed_ok(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """The packed paths read 16 weights and 16 x values at a time: fp16 or bf16 x on a GPU, x
    rows and weight rows contiguous and 16-byte aligned (K a multiple of 16); float8 weights from
    sm_89 (``_chunk_dot``)."""
    # (storage_offset, not data_ptr: under torch.compile the tensors are fake; allocations are aligned)
    K = x.shape[1]
    return (x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda and not triton_interpreted()
            and K > 0 and K % 16 == 0 and x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.storage_offset() % 8 == 0
            and qweight.stride(1) == 1 and qweight.stride(0) % 16 == 0 and qweight.storage_offset() % 16 == 0
            and (qweight.dtype == torch.int8 or capability(x.device) >= (8, 9)))


def _cvt_asm_ok(x: torch.Tensor) -> bool:
    """The MMA kernel converts int8 by inline PTX (``_int8_to_f16``) for fp16 x on a GPU."""
    return x.dtype == torch.float16 and x.is_cuda and not triton_interpreted()


def gemv_meta(cfg: GemvConfig, x: torch.Tensor, qweight: torch.Tensor) -> dict:
    """The GEMV kernel's constexprs for x ``[M, K]``: EVEN_K, which loop it runs: PACKED_F16 /
    PACKED_BF16 (inline PTX, ``_gemv_partial_x2``) or neither (``_gemv_partial``, float32), and
    UNROLLED_STEPS (``common.unrolled_steps``; the packed paths only)."""
    K = x.shape[1]
    packed = cfg.block_k >= 16 and _packed_ok(x, qweight)
    packed_f16 = packed and cfg.packed_f16 and x.dtype == torch.float16
    packed_bf16 = packed and cfg.packed_bf16 and x.dtype == torch.bfloat16
    return dict(EVEN_K=K % (cfg.split_k * cfg.block_k) == 0, PACKED_F16=packed_f16, PACKED_BF16=packed_bf16,
                UNROLLED_STEPS=unrolled_steps(cfg.unrolled and (packed_f16 or packed_bf16), K, cfg.split_k,
                                              cfg.block_k))


class DequantMmConfig(NamedTuple):
    """Convert the whole weight to the activation dtype, then cuBLAS: for M where the GEMM is
    compute-bound and one pass over the weight costs less than converting it in the main loop."""


GEMV_MAX_M = 2
DEQUANT_MM_MIN_M = 4096


def pick_config(M: int, N: int, K: int, device: torch.device, packed: bool = True):
    """The kernel and its block shapes for a problem; the MMA shapes tuned on the H100
    (bench/NOTES-kernels.md), the GEMV's on the H200 (``packed``: the GEMV takes the packed
    path, ``_packed_ok``)."""
    sms = sm_count(device)
    if M <= GEMV_MAX_M and not packed:  # float32 path; H100 sweep, 2026-11-24: the best of 18 block shapes
        if K >= 8192:
            return GemvConfig(4, 1024, 1, num_warps=4, num_stages=2, block_m=M)
        if N >= 16384:
            return GemvConfig(16, 256, 1, num_warps=4, num_stages=2, block_m=M)
        return GemvConfig(8, 512, 1, num_warps=4, num_stages=2, block_m=M)
    if M == 2:
        # Both rows in one program, which reads each weight once. H200 sweep of 40 block shapes,
        # int8 and fp8, fp16 x, the weight replayed (bench/results/sweep-w8-gemv-two-rows-h200.json),
        # us, int8 / fp8 (with its quantization of x): 14336x4096 4 x 1024 with 2 warps 19.8 / 21.1,
        # within 1% of the best of each; else 4 x 2048 with 2 warps unrolled: 4096^2 5.4 / 9.4,
        # 4096x6144 7.6 / 12.8, 4096x28672 33.2 / 35.2 (the best int8 on all three, fp8 2-15% behind).
        if K >= 8192:
            return GemvConfig(4, 1024, 1, num_warps=2, num_stages=2, block_m=2)
        return GemvConfig(4, 2048, 1, num_warps=2, num_stages=2, unrolled=True, block_m=2)
    if M == 1:
        # H200 sweeps of the packed path (bench/kernels.py, 17 block shapes, each rolled and unrolled
        # since 2026-11-30's eleventh session; fp16 x, the weight replayed as in the kernel table, us):
        # 14336x4096 8 x 1024 with 8 warps unrolled 16.0 (4 x 2048, 2 warps, rolled: 16.8);
        # 4096x28672 4 x 2048 with 2 warps 29.7 (the best, unrolled 4 x 4096, 29.4, within the spread);
        # 4096^2 and 4096x6144 4 x 1024 with 2 warps 5.0 and 6.2 (8 x 512, 4 warps: 5.2 and 6.6).
        if K >= 8192:
            return GemvConfig(8, 1024, 1, num_warps=8, num_stages=2, unrolled=True)
        if N >= 16384:
            return GemvConfig(4, 2048, 1, num_warps=2, num_stages=2)
        return GemvConfig(4, 1024, 1, num_warps=2, num_stages=2)
    # From M = 4096 the whole weight converted once and cuBLAS (H200, fp16, geometric mean over fp16
    # cuBLAS of the four Llama shapes: 0.72 against 0.60 for the best fused block shape).
    if M >= DEQUANT_MM_MIN_M:
        return DequantMmConfig()
    # Past 16 rows the weight tile is the MMA's left operand, each step's wgmmas waited for: at M = 64
    # 64 x 128 x 128 (0.71 against 0.70 through shared memory), at M = 128 and 1024 128 x 64 x 128, the
    # best of 14 (0.71 and 0.66 against 0.57 and 0.49 for the best through shared memory; H200,
    # bench/results/sweep-register-operand-waited-h200.json). At 16 rows shared memory is faster
    # (4096^2: 8.5 against 10.2 us).
    if M <= 16:
        cfg = MmaConfig(16, 64, 128, 1, num_warps=4, num_stages=4)
    elif M <= 64:
        cfg = MmaConfig(64, 128, 128, 1, num_warps=4, num_stages=3, swap_ab=True)
    else:
        cfg = MmaConfig(128, 64, 128, 1, num_warps=4, num_stages=3, swap_ab=True)
    tiles = cdiv(M, cfg.block_m) * cdiv(N, cfg.block_n)
    return cfg._replace(split_k=split_for(tiles, cdiv(K, cfg.block_k), sms))


def w8a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    config=None,
    split_k_linear_op=None,
) -> torch.Tensor:
    """``(x [M, K] @ qweight.T) * scales (+ bias)`` -> ``[M, N]`` in x.dtype.

    ``activation`` (``common.ACTIVATIONS``), computed in float32 before the cast: "silu_mul"
    reads the N columns as ``[gate | up]`` and gives ``silu(gate) * up`` ``[M, N // 2]``;
    "gelu" / "gelu_tanh" apply GELU.
    ``config`` (a ``GemvConfig``, ``MmaConfig`` or ``DequantMmConfig``) overrides the tuned choice; for sweeps.
    ``split_k_linear_op``: what runs a traced call whose kernel splits K, on ``(x, qweight, scales, bias,
    activation)`` (``common.traced_split``; ``w4a16.w4a16_linear`` says why).
    """
    M, K = x.shape
    N = qweight.shape[0]
    n_out = output_columns(activation, N)
    assert qweight.shape[1] == K and scales.shape == (N,)
    if M == 0:
        return x.new_empty((0, n_out))
    cfg = config if config is not None else pick_config(M, n_out, K, x.device, packed=_packed_ok(x, qweight))
    if split_k_linear_op is not None and config is None and traced_split(cfg, x, N):
        return split_k_linear_op(x, qweight, scales, bias, activation)
    if isinstance(cfg, DequantMmConfig):
        return activation_after_gemm(F.linear(x, (qweight * scales[:, None]).to(x.dtype), bias), activation)
    if isinstance(cfg, GemvConfig):
        return w8_gemv(x, qweight, scales, bias, activation, cfg)
    out = new_empty((M, n_out), x.dtype, x.device)
    bias, stride_bm = bias_rows(bias, M, N)
    has_bias = bias is not None
    grid = (cdiv(M, cfg.block_m) * cdiv(n_out, cfg.block_n), cfg.split_k)
    ws = split_k_workspace(M, N, grid[0], cfg.split_k, out)
    launch(
        _w8a16_mma_kernel, grid,
        x, qweight, scales, bias if has_bias else scales, out, ws, M, n_out, N - n_out, K,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), stride_bm, out.stride(0), out.stride(1), N,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=cfg.split_k,
        EVEN_K=K % cfg.block_k == 0, HAS_BIAS=has_bias, ACTIVATION=activation,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", CVT_ASM=_cvt_asm_ok(x), SWAP_AB=cfg.swap_ab,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def w8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
            activation: str, cfg: GemvConfig, x_scale: Optional[torch.Tensor] = None,
            out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``w8_gemv_kernel`` on x ``[M, K]`` and qweight ``[N, K]`` (int8 or float8_e4m3fn) ->
    ``[M, N]`` (``[M, N // 2]`` under "silu_mul") in ``out_dtype`` (x's by default). With
    ``x_scale`` [M] (FP8 W8A8), x holds each row's quantized values and the sums are scaled by it too."""
    M, K = x.shape
    N = qweight.shape[0]
    n_out = output_columns(activation, N)
    out = new_empty((M, n_out), out_dtype or x.dtype, x.device)
    bias, stride_bm = bias_rows(bias, M, N)
    has_bias = bias is not None
    if cfg.block_m not in (1, 2):
        raise ValueError(f"GemvConfig.block_m is {cfg.block_m}; the GEMV takes 1 or 2 rows a program")
    grid = (cdiv(M, cfg.block_m), cdiv(n_out, cfg.block_n), cfg.split_k)
    ws = split_k_workspace(M, N, grid[0] * grid[1], cfg.split_k, out)
    launch(
        w8_gemv_kernel, grid,
        x, scales if x_scale is None else x_scale, qweight, scales, bias if has_bias else scales, out, ws,
        M, n_out, N - n_out, K, x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), stride_bm,
        out.stride(0), out.stride(1), N, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        EVEN_N=n_out % cfg.block_n == 0, HAS_BIAS=has_bias, ACTIVATION=activation, X_SCALED=x_scale is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **gemv_meta(cfg, x, qweight),
    )
    return out
