"""W8A16: int8 weights ``[N, K]`` (nn.Linear's orientation) with one scale per output
channel, fp16/bf16 (or fp32) activations. ``out = (x @ q.T) * scales``.

- ``w8_gemv_kernel`` (M of a few rows): each program owns ``BLOCK_N`` weight rows of one
  activation row and streams them along K with 16-byte loads; the per-channel scale is
  applied once at the end. Bound by the bytes of ``qweight``. FP8 W8A8 (``fp8.py``) runs the same
  kernel on float8_e4m3fn weights (``_chunk_dot_e4m3``) and x quantized per token, given in fp16
  with its scales (``X_SCALED``). For fp16 and bf16 x on a GPU (constexprs PACKED_F16 /
  PACKED_BF16, chosen by ``gemv_meta``) weights and x are loaded 16 a thread by inline PTX and
  each int8 weight costs one ``prmt`` (into the float32 32768 + q + 128) and one FFMA
  (``_chunk_dot_f32``): the loop compiled for sm_90 is 3.2 SASS instructions a weight at 4 rows x
  2048 (4.1 at 8 x 512), against 5.8 for the float32 path (which also moves x through shared
  memory) that Triton's interpreter and fp32 x take. Where a config asks and every split is whole
  steps, the loop over K is unrolled (``UNROLLED_STEPS``) so that each step's next loads stay
  ahead of its arithmetic.
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

from .common import (MmaConfig, asm_constant, bias_rows, grouped_tile, mma_accumulate, mma_zeros, output_columns,
                     sm_count, split_for, split_k_workspace, split_range, store_output, triton_interpreted,
                     unrolled_steps)
from .reference import activation_after_gemm


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
def _chunk_offset(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15):
    """``-32896 * sum(x)`` over a chunk's 16 x: the offset that ``_chunk_dot_f32`` takes away."""
    s0 = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    s1 = ((x8 + x9) + (x10 + x11)) + ((x12 + x13) + (x14 + x15))
    return (s0 + s1) * -32896.0


def _chunk_dot_asm() -> str:
    """The PTX of ``_chunk_dot_f32``: per word (operands $1..$4) one xor, then per byte i one
    prmt into 0x4700uu00 and one FFMA with its x ($5..$20), chained from cx ($21) to $0."""
    lines = ["{", ".reg .b32 u, f, c47;", ".reg .f32 t;", "mov.b32 c47, 0x47000000;"]
    for j in range(4):
        lines.append(f"xor.b32 u, ${j + 1}, 0x80808080;")
        for i in range(4):
            k = 4 * j + i
            lines += [f"prmt.b32 f, u, c47, 0x74{i}4;",
                      f"fma.rn.f32 {'$0' if k == 15 else 't'}, f, ${k + 5}, {'$21' if k == 0 else 't'};"]
    return "\n".join(lines + ["}"])


_CHUNK_DOT_ASM = asm_constant(_chunk_dot_asm())


@triton.jit
def _chunk_dot_f32(w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, cx):
    """float32 sum_k x[k] * q[k] over the 16 int8 weights of one chunk (words w0..w3, weight 4j + i
    in byte i of wj); x0..x15 from ``_load_x16`` and cx from ``_chunk_offset``.

    After an xor with 0x80808080 each byte is u = q + 128, and one ``prmt`` (selector 0x74i4)
    puts byte i of a word between 0x47 and zero bytes: 0x4700uu00 is the float32 32768 + u, so
    one FFMA a weight accumulates (32768 + u) * x onto cx, which takes the 32896 * x back: the
    chunk's sum_k q x. Per weight 1 prmt, 1 FFMA and a quarter of an xor (the float32 path:
    about 4). The products are exact (16 by 11 significant bits, inside the FMA); the sums are
    rounded at the magnitude of 32768 * (a partial sum of 16 x), which leaves about 5e-5 of
    relative error, far under the output's own rounding. Half2 products summed in fp16 (the
    W4A16 GEMV's way) cost fewer instructions but leave 4e-4 and, where a bias or silu * up
    cancels the sum, past the tests' 1e-3 bound (emulated: 1 to 9% of small cases)."""
    return tl.inline_asm_elementwise(
        _CHUNK_DOT_ASM,
        "=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
        [w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, cx],
        dtype=tl.float32, is_pure=True, pack=1,
    )


def _chunk_dot_e4m3_asm() -> str:
    """The PTX of ``_chunk_dot_e4m3``: per pair of weights one ``cvt`` of both to fp16 (exact), then
    per weight one ``cvt`` to float32 and one FFMA with its x ($5..$20), chained into $0."""
    lines = ["{", ".reg .b16 lo, hi, p0, p1;", ".reg .b32 pair;", ".reg .f32 w, t;"]
    for k in range(16):
        if k % 4 == 0:
            lines.append(f"mov.b32 {{lo, hi}}, ${k // 4 + 1};")
        if k % 2 == 0:
            lines += [f"cvt.rn.f16x2.e4m3x2 pair, {'lo' if k % 4 == 0 else 'hi'};", "mov.b32 {p0, p1}, pair;"]
        lines.append(f"cvt.f32.f16 w, p{k % 2};")
        if k == 0:
            lines.append("mul.rn.f32 t, w, $5;")
        else:
            lines.append(f"fma.rn.f32 {'$0' if k == 15 else 't'}, w, ${k + 5}, t;")
    return "\n".join(lines + ["}"])


_CHUNK_DOT_E4M3_ASM = asm_constant(_chunk_dot_e4m3_asm())


@triton.jit
def _chunk_dot_e4m3(w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15):
    """float32 sum_k x[k] * q[k] over the 16 float8_e4m3fn weights of one chunk (words w0..w3,
    weight 4j + i in byte i of wj; x0..x15 from ``_load_x16``). Each weight is exact in fp16 and
    float32 and each product exact inside its FMA: the float32 sums are the only rounding.
    ``cvt ... e4m3x2`` needs sm_89 or later (``_packed_ok``)."""
    return tl.inline_asm_elementwise(
        _CHUNK_DOT_E4M3_ASM,
        "=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
        [w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15],
        dtype=tl.float32, is_pure=True, pack=1,
    )


@triton.jit
def _gemv_step_x2(acc, w0, w1, w2, w3, w_rows, x_row, k0, k_end, offs_c, BLOCK_K: tl.constexpr,
                  EVEN_K: tl.constexpr, BF16: tl.constexpr):
    """One step of ``_gemv_partial_x2`` at k0, on the chunks w0..w3 loaded before it: issues the
    next step's loads, then adds this step's products. Returns the sums and the next chunks."""
    ks_next = k0 + BLOCK_K + offs_c
    n0, n1, n2, n3 = _load_w16(w_rows + ks_next, (ks_next < k_end).to(tl.int32))
    ks = k0 + offs_c
    if EVEN_K:
        x_ptrs = x_row + ks
    else:
        x_ptrs = x_row + tl.minimum(ks, k_end - 16)  # (16 divides k_end)
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load_x16(x_ptrs, BF16)
    if w_rows.dtype.element_ty == tl.int8:
        cx = _chunk_offset(x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
        d = _chunk_dot_f32(w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, cx)
    else:
        d = _chunk_dot_e4m3(w0, w1, w2, w3, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    if EVEN_K:
        acc += d
    else:
        acc += tl.where(ks < k_end, d, 0.0)  # (unset words past k_end: whatever d is there)
    return acc, n0, n1, n2, n3


@triton.jit
def _gemv_partial_x2(x_row, qw_ptr, offs_n, mask_n, k_start, k_end, stride_qn,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                     BF16: tl.constexpr, UNROLLED_STEPS: tl.constexpr):
    """``_gemv_partial`` by inline PTX, 16 weights of a row a call (``_chunk_dot_f32``; x fp16, or
    bf16 with BF16; x and the weight rows contiguous and 16-byte aligned, K a multiple of 16).

    The tile is ``[BLOCK_N, BLOCK_K // 16]`` chunks of 16 weights; a thread widens the x of its
    chunk once for all the rows it holds (BLOCK_N over the warps along N), so shapes whose warps
    lie along K (BLOCK_K = 512 * num_warps) share it most. Each step issues the next step's
    loads before its arithmetic (Triton does not pipeline a loop without ``tl.dot``); in a loop
    ptxas moves them after it all the same (into the registers consumed at the back-edge), so
    UNROLLED_STEPS > 0 (the number of steps, all of [k_start, k_end), each whole) unrolls the
    loop, where they stay ahead (as in the W4A16 GEMV). The loads of chunks at or past k_end are
    predicated off. Rows right of N read row 0 again (never stored). EVEN_K: every step lies
    inside [k_start, k_end); else a step's chunks past k_end read the last x again and add 0."""
    CHUNKS: tl.constexpr = BLOCK_K // 16
    offs_c = (tl.arange(0, CHUNKS) * 16)[None, :]  # [1, CHUNKS]: a chunk's first k within the step
    if EVEN_N:
        rows = offs_n
    else:
        rows = tl.where(mask_n, offs_n, 0)
    w_rows = qw_ptr + rows[:, None] * stride_qn  # [BLOCK_N, 1]
    ks = k_start + offs_c
    w0, w1, w2, w3 = _load_w16(w_rows + ks, (ks < k_end).to(tl.int32))
    acc = tl.zeros((BLOCK_N, CHUNKS), dtype=tl.float32)
    if UNROLLED_STEPS > 0:
        for i in tl.static_range(UNROLLED_STEPS):
            acc, w0, w1, w2, w3 = _gemv_step_x2(acc, w0, w1, w2, w3, w_rows, x_row, k_start + i * BLOCK_K, k_end,
                                                offs_c, BLOCK_K, EVEN_K, BF16)
    else:
        for k0 in range(k_start, k_end, BLOCK_K):
            acc, w0, w1, w2, w3 = _gemv_step_x2(acc, w0, w1, w2, w3, w_rows, x_row, k0, k_end, offs_c, BLOCK_K,
                                                EVEN_K, BF16)
    return tl.sum(acc, axis=1)


@triton.jit
def _column_scales(s_ptr, xs_ptr, pid_m, offs_n, mask_n, X_SCALED: tl.constexpr):
    """What the sums of columns offs_n are multiplied by: the weights' scales [BLOCK_N], times the
    row's x scale under X_SCALED (the FP8 tensor-core kernel's order: the scales' product first)."""
    scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)
    if X_SCALED:
        scale = tl.load(xs_ptr + pid_m) * scale
    return scale


@triton.jit
def _gemv_columns(x_row, qw_ptr, offs_n, mask_n, k_start, k_end, stride_xk, stride_qn, stride_qk,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                  PACKED_F16: tl.constexpr, PACKED_BF16: tl.constexpr, UNROLLED_STEPS: tl.constexpr):
    """float32 x . q for the rows offs_n over k in [k_start, k_end): [BLOCK_N]."""
    if PACKED_F16 or PACKED_BF16:
        return _gemv_partial_x2(x_row, qw_ptr, offs_n, mask_n, k_start, k_end, stride_qn, BLOCK_N, BLOCK_K,
                                EVEN_N, EVEN_K, PACKED_BF16, UNROLLED_STEPS)
    return _gemv_partial(x_row, qw_ptr, offs_n, mask_n, k_start, k_end, stride_xk, stride_qn, stride_qk,
                         BLOCK_N, BLOCK_K, EVEN_N)


@triton.jit
def w8_gemv_kernel(
    x_ptr, xs_ptr, qw_ptr, s_ptr, b_ptr, out_ptr, ws_ptr,
    M, N_OUT, N_UP, K,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_bm, stride_om, stride_on, stride_wm,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    PACKED_F16: tl.constexpr, PACKED_BF16: tl.constexpr, UNROLLED_STEPS: tl.constexpr, X_SCALED: tl.constexpr,
):
    """``(x @ q.T) * s``, q int8 (W8A16) or float8_e4m3fn (FP8 W8A8, ``fp8.py``) [N, K]. X_SCALED: x
    holds each row's quantized values (e4m3 values, exact in fp16) and xs_ptr [M] their scales;
    else x is the activation itself (xs_ptr unread)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    k_start, k_end = split_range(pid_k, K, SPLIT_K, BLOCK_K)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    x_row = x_ptr + pid_m * stride_xm
    acc = _gemv_columns(x_row, qw_ptr, offs_n, mask_n, k_start, k_end, stride_xk, stride_qn, stride_qk,
                        BLOCK_N, BLOCK_K, EVEN_N, EVEN_K, PACKED_F16, PACKED_BF16, UNROLLED_STEPS)
    acc *= _column_scales(s_ptr, xs_ptr, pid_m, offs_n, mask_n, X_SCALED)
    acc_up = acc
    if ACTIVATION == "silu_mul":
        acc_up = _gemv_columns(x_row, qw_ptr + N_UP * stride_qn, offs_n, mask_n, k_start, k_end, stride_xk,
                               stride_qn, stride_qk, BLOCK_N, BLOCK_K, EVEN_N, EVEN_K, PACKED_F16, PACKED_BF16,
                               UNROLLED_STEPS)
        acc_up *= _column_scales(s_ptr + N_UP, xs_ptr, pid_m, offs_n, mask_n, X_SCALED)
    rows = pid_m + tl.arange(0, 1)
    store_output(acc[None, :], acc_up[None, :], rows[:, None], offs_n[None, :], (rows < M)[:, None] & mask_n[None, :],
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
    packed_f16: bool = True  # the packed path (inline PTX, ``_chunk_dot_f32``) where x is fp16 on a GPU
    packed_bf16: bool = True  # the same where x is bf16 on a GPU
    unrolled: bool = False  # the packed paths' loop over K unrolled where every split is whole steps
    # (``common.unrolled_steps``)


def _packed_ok(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """The packed paths read 16 weights and 16 x values at a time: fp16 or bf16 x on a GPU, x
    rows and weight rows contiguous and 16-byte aligned (K a multiple of 16); float8 weights from
    sm_89 (``_chunk_dot_e4m3``)."""
    # (storage_offset, not data_ptr: under torch.compile the tensors are fake; allocations are aligned)
    K = x.shape[1]
    return (x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda and not triton_interpreted()
            and K > 0 and K % 16 == 0 and x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.storage_offset() % 8 == 0
            and qweight.stride(1) == 1 and qweight.stride(0) % 16 == 0 and qweight.storage_offset() % 16 == 0
            and (qweight.dtype == torch.int8 or torch.cuda.get_device_capability(x.device) >= (8, 9)))


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
            return GemvConfig(4, 1024, 1, num_warps=4, num_stages=2)
        if N >= 16384:
            return GemvConfig(16, 256, 1, num_warps=4, num_stages=2)
        return GemvConfig(8, 512, 1, num_warps=4, num_stages=2)
    if M <= GEMV_MAX_M:
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

    ``activation`` (``common.ACTIVATIONS``), computed in float32 before the cast: "silu_mul"
    reads the N columns as ``[gate | up]`` and gives ``silu(gate) * up`` ``[M, N // 2]``;
    "gelu" / "gelu_tanh" apply GELU.
    ``config`` (a ``GemvConfig``, ``MmaConfig`` or ``DequantMmConfig``) overrides the tuned choice; for sweeps.
    """
    M, K = x.shape
    N = qweight.shape[0]
    n_out = output_columns(activation, N)
    assert qweight.shape[1] == K and scales.shape == (N,)
    if M == 0:
        return x.new_empty((0, n_out))
    cfg = config if config is not None else pick_config(M, n_out, K, x.device, packed=_packed_ok(x, qweight))
    if isinstance(cfg, DequantMmConfig):
        return activation_after_gemm(F.linear(x, (qweight * scales[:, None]).to(x.dtype), bias), activation)
    if isinstance(cfg, GemvConfig):
        return w8_gemv(x, qweight, scales, bias, activation, cfg)
    out = torch.empty((M, n_out), device=x.device, dtype=x.dtype)
    bias, stride_bm = bias_rows(bias, M, N)
    has_bias = bias is not None
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(n_out, cfg.block_n), cfg.split_k)
    ws = split_k_workspace(M, N, grid[0], cfg.split_k, out)
    torch.library.wrap_triton(_w8a16_mma_kernel)[grid](
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
    out = torch.empty((M, n_out), device=x.device, dtype=out_dtype or x.dtype)
    bias, stride_bm = bias_rows(bias, M, N)
    has_bias = bias is not None
    grid = (M, triton.cdiv(n_out, cfg.block_n), cfg.split_k)
    ws = split_k_workspace(M, N, grid[0] * grid[1], cfg.split_k, out)
    torch.library.wrap_triton(w8_gemv_kernel)[grid](
        x, scales if x_scale is None else x_scale, qweight, scales, bias if has_bias else scales, out, ws,
        M, n_out, N - n_out, K, x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), stride_bm,
        out.stride(0), out.stride(1), N, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        EVEN_N=n_out % cfg.block_n == 0, HAS_BIAS=has_bias, ACTIVATION=activation, X_SCALED=x_scale is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **gemv_meta(cfg, x, qweight),
    )
    return out
