"""W4A16 GEMV (M = 1, and 2 on small weights; ``w4a16.pick_config``): no tensor cores. Each program
owns ``BLOCK_N`` columns of one activation row and reads each packed word once; nibble ``j`` of word row
``r`` meets ``x[8 r + j]``. For fp16 x on a GPU the words are dequantized two at a time
in half2 registers by inline PTX (``_word_pair_dot_f16x2``: about 13 instructions per 8
weights, against about 30 for the float32 path that the interpreter uses); bf16 x the same
way in bf16x2 registers (``_word_pair_dot_bf16x2``: 15), through the same loop
(``_gemv_partial_x2``, constexprs PACKED_F16 / PACKED_BF16, ``w4a16.gemv_meta``).

In fp16, where a program's tile has as many groups of K as columns (the 16-warp picks), the warps' column sums
meet in shared memory behind one barrier (``_sums_through_shared``), not through Triton's two reductions.

The GEMV also computes the RMSNorm of x when given its weight (HAS_NORM): each program
reduces the row itself, from L2, and scales the x values it reads (``_gemv_columns``); the
other paths run the norm as a pass of its own. A bias may be shaped as the output (a residual,
``common.bias_rows``).

With PDL (programmatic dependent launch, ``common.dependent_launch``; Hopper and later) the kernel lets the next
one start at once and, launched the same way, starts while the kernel before it finishes: the packed paths load
their first step's words, then wait (``common.wait_for_prior_grids``) before they read x or write anything, and
read x coherently. A decode step of 16 Llama-3-8B layers (64 GEMVs, bf16, H200) as an eager CUDA-graph chain:
743.8 -> 705.4 us (bench/NOTES-kernels.md, thirty-first session). Traced by torch.compile the same, where
``qpass.inductor_launch`` has Inductor launch it so.
"""

import triton
import triton.language as tl

from .common import (SHARED_ADDRESS_MAX_BYTES, asm_constant, barrier_after, launch_dependent_grids, load_shared,
                     row_inv_rms, shared_address, split_range, store_output, store_shared, wait_for_prior_grids,
                     word_offsets)
from .int4_pairs import F16_DOT_UNIT, bf16_nibble_pairs, f16_nibble_pairs, zero_bf16x2, zero_f16x2

_F32_MAGIC = tl.constexpr(8388608.0)  # 2**23: 0x4B000000 | q is 2**23 + q as float32
_F16_DOT_SCALE = tl.constexpr(1 / F16_DOT_UNIT)  # the sum back from the dot's unit (a power of two)


def _x_pairs_asm(load: str) -> tl.constexpr:
    return asm_constant("""
        {
        .reg .b32 a, b, c, d;
        """ + load + """.v4.b32 {a, b, c, d}, [$4];
        prmt.b32 $0, a, c, 0x5410;
        prmt.b32 $1, a, c, 0x7632;
        prmt.b32 $2, b, d, 0x5410;
        prmt.b32 $3, b, d, 0x7632;
        }
        """)


def _normed_x_pairs_asm(load: str, bf16: bool) -> tl.constexpr:
    if bf16:  # (bf16x2 multiply is sm_90+; an fma adding -0 is the same product from sm_80)
        return asm_constant("""
            {
            .reg .b32 a, b, c, d, e, f, g, h, nz;
            mov.b32 nz, 0x80008000;
            """ + load + """.v4.b32 {a, b, c, d}, [$4];
            ld.global.nc.v4.b32 {e, f, g, h}, [$5];
            fma.rn.bf16x2 a, a, e, nz;
            fma.rn.bf16x2 b, b, f, nz;
            fma.rn.bf16x2 c, c, g, nz;
            fma.rn.bf16x2 d, d, h, nz;
            prmt.b32 $0, a, c, 0x5410;
            prmt.b32 $1, a, c, 0x7632;
            prmt.b32 $2, b, d, 0x5410;
            prmt.b32 $3, b, d, 0x7632;
            }
            """)
    return asm_constant("""
        {
        .reg .b32 a, b, c, d, e, f, g, h;
        """ + load + """.v4.b32 {a, b, c, d}, [$4];
        ld.global.nc.v4.b32 {e, f, g, h}, [$5];
        mul.rn.f16x2 a, a, $6;
        mul.rn.f16x2 b, b, $6;
        mul.rn.f16x2 c, c, $6;
        mul.rn.f16x2 d, d, $6;
        mul.rn.f16x2 a, a, e;
        mul.rn.f16x2 b, b, f;
        mul.rn.f16x2 c, c, g;
        mul.rn.f16x2 d, d, h;
        prmt.b32 $0, a, c, 0x5410;
        prmt.b32 $1, a, c, 0x7632;
        prmt.b32 $2, b, d, 0x5410;
        prmt.b32 $3, b, d, 0x7632;
        }
        """)


# x through the read-only path (.nc); coherent loads where x may still be being written when the kernel starts
# (programmatic dependent launch): ptxas moves .nc loads above griddepcontrol.wait
_X_PAIRS_NC, _X_PAIRS = _x_pairs_asm("ld.global.nc"), _x_pairs_asm("ld.global")
_NORMED_BF16_NC, _NORMED_BF16 = _normed_x_pairs_asm("ld.global.nc", True), _normed_x_pairs_asm("ld.global", True)
_NORMED_F16_NC, _NORMED_F16 = _normed_x_pairs_asm("ld.global.nc", False), _normed_x_pairs_asm("ld.global", False)


@triton.jit
def _load_x_pairs_x2(x_ptrs, COHERENT: tl.constexpr):
    """The 8 16-bit values (fp16 or bf16) at each (16-byte aligned) x_ptrs, loaded by inline
    PTX, as the four pairs (x_j, x_j+4), j < 4, packed in 32 bits, that meet nibbles j and
    j + 4 of a word (``_word_pair_dot_f16x2``, ``_word_pair_dot_bf16x2``).

    A ``tl.load`` here would get a thread layout of its own from Triton's coalescing pass, and
    the compiler would then move the whole word tile into that layout through shared memory;
    an elementwise op takes the layout of the word tile it is broadcast against. The copies
    that land in one thread (one per column it holds) are merged into one load."""
    if COHERENT:
        return _x_pairs(x_ptrs, _X_PAIRS)
    return _x_pairs(x_ptrs, _X_PAIRS_NC)


@triton.jit
def _x_pairs(x_ptrs, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,l", [x_ptrs], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                                     is_pure=True, pack=1)


@triton.jit
def _load_normed_x_pairs_x2(x_ptrs, g_ptrs, r_pair, BF16: tl.constexpr, COHERENT: tl.constexpr):
    """``_load_x_pairs_x2`` of an RMSNorm's output: the 8 values at each x_ptrs times those at
    g_ptrs (the norm weight), each product rounded to the dtype as the unfused norm rounds. fp16:
    x first times the packed pair ``r_pair`` (1 / rms rounded to fp16, ``_f16_pair``), as
    unscaled products could overflow fp16; bf16 has float32's range, and 1 / rms goes on the sum
    (``_gemv_columns``)."""
    if BF16:
        if COHERENT:
            return _normed_x_pairs(x_ptrs, g_ptrs, 0, _NORMED_BF16, True)
        return _normed_x_pairs(x_ptrs, g_ptrs, 0, _NORMED_BF16_NC, True)
    if COHERENT:
        return _normed_x_pairs(x_ptrs, g_ptrs, r_pair, _NORMED_F16, False)
    return _normed_x_pairs(x_ptrs, g_ptrs, r_pair, _NORMED_F16_NC, False)


@triton.jit
def _normed_x_pairs(x_ptrs, g_ptrs, r_pair, ASM: tl.constexpr, BF16: tl.constexpr):
    if BF16:
        return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,l,l", [x_ptrs, g_ptrs],
                                         dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,l,l,r", [x_ptrs, g_ptrs, r_pair],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _f16_pair(value):
    """float32 ``value`` rounded to fp16, twice, in one 32-bit register."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $1;", "=r,f", [value], dtype=tl.int32, is_pure=True,
                                     pack=1)


# The asm of the packed dot of a word pair (composed once here: Triton takes an asm string as a constant).
_WORD_PAIR_DOT_F16X2 = asm_constant("""
        {
        .reg .b32 t, q0, q1, q2, q3, s, sixteenth;
        .reg .b16 lo, hi;
        .reg .f32 flo, fhi;
        mov.b32 sixteenth, 0x2C002C00;""" + f16_nibble_pairs("$1", F16_DOT_UNIT, "$3", "$4") + """
        mul.rn.f16x2 s, q0, $5;
        fma.rn.f16x2 s, q1, $6, s;
        fma.rn.f16x2 s, q2, $7, s;
        fma.rn.f16x2 s, q3, $8, s;""" + f16_nibble_pairs("$2", F16_DOT_UNIT, "$3", "$4") + """
        fma.rn.f16x2 s, q0, $9, s;
        fma.rn.f16x2 s, q1, $10, s;
        fma.rn.f16x2 s, q2, $11, s;
        fma.rn.f16x2 s, q3, $12, s;
        mov.b32 {lo, hi}, s;
        cvt.f32.f16 flo, lo;
        cvt.f32.f16 fhi, hi;
        add.rn.f32 flo, flo, fhi;
        fma.rn.f32 $0, flo, $13, $14;
        }
        """)
_WORD_PAIR_DOT_BF16X2 = asm_constant("""
        {
        .reg .b32 t1, t2, t3, q0, q1, q2, q3, s, one, nz;
        .reg .f32 flo, fhi;
        mov.b32 one, 0x3F803F80;
        mov.b32 nz, 0x80008000;""" + bf16_nibble_pairs("$1", "$3") + """
        fma.rn.bf16x2 s, q0, $4, nz;
        fma.rn.bf16x2 s, q1, $5, s;
        fma.rn.bf16x2 s, q2, $6, s;
        fma.rn.bf16x2 s, q3, $7, s;""" + bf16_nibble_pairs("$2", "$3") + """
        fma.rn.bf16x2 s, q0, $8, s;
        fma.rn.bf16x2 s, q1, $9, s;
        fma.rn.bf16x2 s, q2, $10, s;
        fma.rn.bf16x2 s, q3, $11, s;
        shl.b32 t1, s, 16;
        and.b32 t2, s, 0xFFFF0000;
        mov.b32 flo, t1;
        mov.b32 fhi, t2;
        add.rn.f32 flo, flo, fhi;
        fma.rn.f32 $0, flo, $12, $13;
        }
        """)


@triton.jit
def _word_pair_dot_f16x2(w0, w1, z_low, z_high, a0, a1, a2, a3, b0, b1, b2, b3, scale, acc):
    """acc + scale * sum_k x[k] * (q[k] - zero) / 16 over the 16 nibbles of two words (8 rows each),
    as float32; a0..a3 and b0..b3 are their x pairs from ``_load_x_pairs_x2``; (q - z) / 16 by
    ``f16_nibble_pairs``. The 8 products of each lane sum in fp16 (HFMA2, two weights an
    instruction) before the float32 widening: that adds rounding of about the fp16 output's own.
    The sixteenth (one HMUL a zero point, in ``zero_f16x2``) keeps every single product finite
    (15/16 of fp16's largest x at most); whole, one x past 4367 against a weight code 15 from its
    zero gave inf. A lane still overflows past a sum of |x| of 69871 over its 8 rows.
    The scaled sum is added to acc in the asm: Triton 3.9's LLVM vectorized those float32 adds of a
    loop unrolled whole and moved them all to its end, keeping every step's sums and scales live
    (bench/NOTES-kernels.md, seventy-sixth session)."""
    return tl.inline_asm_elementwise(
        _WORD_PAIR_DOT_F16X2,
        "=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r", [w0, w1, z_low, z_high, a0, a1, a2, a3, b0, b1, b2, b3, scale, acc],
        dtype=tl.float32, is_pure=True, pack=1,
    )


@triton.jit
def _word_pair_dot_bf16x2(w0, w1, z_128, a0, a1, a2, a3, b0, b1, b2, b3, scale, acc):
    """``_word_pair_dot_f16x2`` for bf16 x (``z_128`` from ``zero_bf16x2``; q - z by
    ``bf16_nibble_pairs``). Per word: 3 shifts, 4 lop3, 4 fma (q - z), 4 fma (x products): 15
    instructions for 8 weights.
    Each lane's 8 products sum in bf16 (fma.rn.bf16x2) before the float32 widening (a 16-bit
    shift / mask): measured and emulated error in bench/NOTES-kernels.md (about 2x the bf16
    output's own rounding, within the 1e-2 bound). No overflow: bf16 has float32's range."""
    return tl.inline_asm_elementwise(
        _WORD_PAIR_DOT_BF16X2,
        "=r,r,r,r,r,r,r,r,r,r,r,r,r,r", [w0, w1, z_128, a0, a1, a2, a3, b0, b1, b2, b3, scale, acc],
        dtype=tl.float32, is_pure=True, pack=1,
    )


@triton.jit
def _word_pair_dot_x2(w0, w1, zero, scale, acc, x_ptrs, g_ptrs, r_pair, BF16: tl.constexpr,
                      HAS_NORM: tl.constexpr, COHERENT: tl.constexpr):
    """float32 acc + scale * sum_k x[k] * (q[k] - zero) over the 16 rows of the word pair (w0, w1)
    whose x starts at x_ptrs: x pairs loaded by ``_load_x_pairs_x2`` (under HAS_NORM the RMSNorm's
    output, ``_load_normed_x_pairs_x2``), the packed dot of the dtype."""
    if HAS_NORM:
        a0, a1, a2, a3 = _load_normed_x_pairs_x2(x_ptrs, g_ptrs, r_pair, BF16, COHERENT)
        b0, b1, b2, b3 = _load_normed_x_pairs_x2(x_ptrs + 8, g_ptrs + 8, r_pair, BF16, COHERENT)
    else:
        a0, a1, a2, a3 = _load_x_pairs_x2(x_ptrs, COHERENT)
        b0, b1, b2, b3 = _load_x_pairs_x2(x_ptrs + 8, COHERENT)
    if BF16:
        return _word_pair_dot_bf16x2(w0, w1, zero_bf16x2(zero), a0, a1, a2, a3, b0, b1, b2, b3, scale, acc)
    z_low, z_high = zero_f16x2(zero, True)
    return _word_pair_dot_f16x2(w0, w1, z_low, z_high, a0, a1, a2, a3, b0, b1, b2, b3, scale, acc)


@triton.jit
def _gemv_step_x2(acc, squares, w0, w1, w_ptrs, r0, x_row, g_ptr, r_pair, s_ptr, z_ptr, first_rows, rows, cols, mask_w,
                  row_end, stride_qk, stride_sg, stride_sn, GROUP_SIZE: tl.constexpr, STEP: tl.constexpr,
                  EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, BF16: tl.constexpr, HAS_NORM: tl.constexpr,
                  SQUARES: tl.constexpr, COHERENT: tl.constexpr):
    """One step of ``_gemv_partial_x2`` at word row r0, on the words w0, w1 loaded before it:
    issues the next step's word loads, then adds this step's products (and squares of x).
    Returns the sums, the next step's words and their pointers."""
    if SQUARES:
        k_step = 8 * r0 + tl.arange(0, 8 * STEP)
        if EVEN_K:
            v = tl.load(x_row + k_step).to(tl.float32)
        else:
            v = tl.load(x_row + k_step, mask=k_step < 8 * row_end, other=0).to(tl.float32)
        squares += v * v
    w_ptrs += STEP * stride_qk
    mask_next = (r0 + STEP + first_rows < row_end) & mask_w
    w0_next = tl.load(w_ptrs, mask=mask_next)
    w1_next = tl.load(w_ptrs + stride_qk, mask=mask_next)

    # [GROUP_ROWS // 2, GROUPS, BLOCK_N] like the words, so no layout change; copies merge
    sz_offs = ((r0 + rows) * 8 // GROUP_SIZE) * stride_sg + cols * stride_sn
    if EVEN_K and EVEN_N:
        scale = tl.load(s_ptr + sz_offs).to(tl.float32)
        zero = tl.load(z_ptr + sz_offs)
        k_offs = (r0 + rows) * 8
    else:
        mask = (r0 + first_rows < row_end) & mask_w
        scale = tl.load(s_ptr + sz_offs, mask=mask, other=0).to(tl.float32)  # 0 past the end
        zero = tl.load(z_ptr + sz_offs, mask=mask)
        k_offs = tl.minimum(r0 + rows, row_end - 2) * 8  # past the end: the last rows again
    acc = _word_pair_dot_x2(w0, w1, zero, scale, acc, x_row + k_offs, g_ptr + k_offs, r_pair, BF16, HAS_NORM,
                            COHERENT)
    return acc, squares, w0_next, w1_next, w_ptrs


@triton.jit
def _gemv_partial_x2(x_row, g_ptr, r_pair, qw_ptr, s_ptr, z_ptr, offs_n, mask_n, row_start, row_end, stride_qk,
                     word_cols, stride_sg, stride_sn, GROUP_SIZE: tl.constexpr, GROUP_ROWS: tl.constexpr,
                     GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                     BF16: tl.constexpr, HAS_NORM: tl.constexpr, SQUARES: tl.constexpr,
                     UNROLLED_STEPS: tl.constexpr, COHERENT: tl.constexpr, WAIT: tl.constexpr,
                     GROUPS_FIRST: tl.constexpr, SHARED_SUMS: tl.constexpr):
    """``_gemv_partial`` with dequantization two weights a register (inline PTX; x fp16, or bf16
    with BF16, contiguous, 16-byte aligned), and under SQUARES the sum of x^2 over the rows (else
    0), from a load of each step's x slice that L1 mostly serves (the pairs read the same bytes).

    Each step reads a ``[GROUP_ROWS // 2, GROUPS, BLOCK_N]`` tile of even word rows and the one
    of the odd rows below them (word row ``r0 + g * GROUP_ROWS + 2 i (+1)`` at
    ``[i, g, :]``; ``[GROUPS, GROUP_ROWS // 2, BLOCK_N]``, at ``[g, i, :]``, with GROUPS_FIRST:
    ``w4a16.gemv_meta``), and issues the loads of the next step before its arithmetic: Triton does not
    software-pipeline a loop without ``tl.dot``, and the GEMV needs bytes in flight. In a loop,
    ptxas puts those loads after the arithmetic all the same (they take the registers of the
    words being consumed at the back-edge); UNROLLED_STEPS > 0 (the number of steps, all of
    [row_start, row_end), each whole) unrolls the loop, and then they stay ahead. EVEN_K: every
    step lies inside [row_start, row_end). Words, zeros and scales past the end or right of N load
    as 0 (Triton zero-fills masked loads): those rows add nothing, and those columns are not stored.
    COHERENT: x loaded without ``.nc`` (programmatic dependent launch); WAIT: the wait for the kernel before comes
    after the first step's word loads (``common.wait_for_prior_grids``). The column sums come back ``[1, 1, BLOCK_N]``
    or, with SHARED_SUMS, along the groups' axis (``_sums_through_shared``)."""
    STEP: tl.constexpr = GROUPS * GROUP_ROWS
    ROWS_AXIS: tl.constexpr = 1 if GROUPS_FIRST else 0  # the tile's axis of a group's rows, the other its groups
    # word rows from the step's start: each group's first, then the even rows of each group
    first_rows = tl.expand_dims(tl.expand_dims(tl.arange(0, GROUPS), ROWS_AXIS), 2) * GROUP_ROWS
    rows = first_rows + tl.expand_dims(tl.expand_dims(2 * tl.arange(0, GROUP_ROWS // 2), 1 - ROWS_AXIS), 2)
    cols = offs_n[None, None, :]
    mask_w = mask_n[None, None, :]  # broadcast against row masks; ignored when EVEN_N
    w_ptrs = qw_ptr + (row_start + rows) * stride_qk + word_cols[None, None, :]
    if EVEN_K and EVEN_N:
        w0 = tl.load(w_ptrs)
        w1 = tl.load(w_ptrs + stride_qk)
    else:
        mask = (row_start + first_rows < row_end) & mask_w
        w0 = tl.load(w_ptrs, mask=mask)
        w1 = tl.load(w_ptrs + stride_qk, mask=mask)
    if WAIT:  # the first step's words are in flight while the kernel before finishes
        x_row += wait_for_prior_grids()
    acc = tl.zeros((rows.shape[0], rows.shape[1], BLOCK_N), dtype=tl.float32)
    squares = tl.zeros((8 * STEP,), dtype=tl.float32)
    if UNROLLED_STEPS > 0:
        for i in tl.static_range(UNROLLED_STEPS):
            acc, squares, w0, w1, w_ptrs = _gemv_step_x2(
                acc, squares, w0, w1, w_ptrs, row_start + i * STEP, x_row, g_ptr, r_pair, s_ptr, z_ptr, first_rows,
                rows, cols, mask_w, row_end, stride_qk, stride_sg, stride_sn, GROUP_SIZE, STEP, EVEN_N, EVEN_K, BF16,
                HAS_NORM, SQUARES, COHERENT)
    else:
        for r0 in range(row_start, row_end, STEP):
            acc, squares, w0, w1, w_ptrs = _gemv_step_x2(
                acc, squares, w0, w1, w_ptrs, r0, x_row, g_ptr, r_pair, s_ptr, z_ptr, first_rows, rows, cols, mask_w,
                row_end, stride_qk, stride_sg, stride_sn, GROUP_SIZE, STEP, EVEN_N, EVEN_K, BF16, HAS_NORM, SQUARES,
                COHERENT)
    if SHARED_SUMS:
        total = _sums_through_shared(acc, ROWS_AXIS)
    else:
        total = tl.sum(tl.sum(acc, axis=ROWS_AXIS, keep_dims=True), axis=1 - ROWS_AXIS, keep_dims=True)
    if not BF16:
        total *= _F16_DOT_SCALE  # back from the fp16 dot's unit (a power of two: exact in float32)
    return total, tl.sum(squares, axis=0)


@triton.jit
def _gemv_partial(x_row, g_ptr, inv_rms, qw_ptr, s_ptr, z_ptr, offs_n, mask_n, row_start, row_end, stride_xk,
                  stride_qk, word_cols, stride_sg, stride_sn, GROUP_SIZE: tl.constexpr, GROUP_ROWS: tl.constexpr,
                  GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, HAS_NORM: tl.constexpr):
    """float32 sum over the word rows [row_start, row_end) of x . w for the columns offs_n: [1, 1, BLOCK_N]
    (under HAS_NORM x is ``x * inv_rms * g``, in float32).

    Each step reads a ``[GROUP_ROWS, GROUPS, BLOCK_N]`` tile of words, word row
    ``r0 + g * GROUP_ROWS + i`` at ``[i, g, :]``: the GROUP_ROWS rows of one ``g`` share a
    row of scales and zeros. Dequantization in float32 through the exponent trick."""
    offs_i = tl.arange(0, GROUP_ROWS)[:, None, None]
    offs_g = tl.arange(0, GROUPS)[None, :, None]
    cols = offs_n[None, None, :]
    acc = tl.zeros((GROUP_ROWS, GROUPS, BLOCK_N), dtype=tl.float32)
    for r0 in range(row_start, row_end, GROUPS * GROUP_ROWS):
        first_rows = r0 + offs_g * GROUP_ROWS  # [1, GROUPS, 1]
        rows = first_rows + offs_i  # [GROUP_ROWS, GROUPS, 1]
        mask_g = first_rows < row_end  # row_end is a multiple of GROUP_ROWS
        if EVEN_N:
            mask_w = mask_g
        else:
            mask_w = mask_g & mask_n[None, None, :]
        words = tl.load(qw_ptr + rows * stride_qk + word_cols[None, None, :], mask=mask_w, other=0)
        sz_offs = (first_rows * 8 // GROUP_SIZE) * stride_sg + cols * stride_sn  # [1, GROUPS, BLOCK_N]
        scale = tl.load(s_ptr + sz_offs, mask=mask_w, other=0).to(tl.float32)
        magic_zero = tl.load(z_ptr + sz_offs, mask=mask_w, other=0).to(tl.float32) + _F32_MAGIC
        dot = tl.zeros((GROUP_ROWS, GROUPS, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_row + (rows * 8 + j) * stride_xk, mask=mask_g, other=0).to(tl.float32)
            if HAS_NORM:
                xj *= tl.load(g_ptr + rows * 8 + j, mask=mask_g, other=0).to(tl.float32) * inv_rms
            qj = ((words >> (4 * j)) & 0xF) | 0x4B000000
            dot += xj * (qj.to(tl.float32, bitcast=True) - magic_zero)
        acc += dot * scale
    return tl.sum(tl.sum(acc, axis=0, keep_dims=True), axis=1, keep_dims=True)


@triton.jit
def _gemv_columns(x_row, g_ptr, norm_eps, K, qw_ptr, s_ptr, z_ptr, offs_n, mask_n, row_start, row_end, stride_xk,
                  stride_qk, word_cols, stride_sg, stride_sn, GROUP_SIZE: tl.constexpr, GROUP_ROWS: tl.constexpr,
                  GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                  PACKED_F16: tl.constexpr, PACKED_BF16: tl.constexpr, HAS_NORM: tl.constexpr,
                  NORM_BLOCK: tl.constexpr, WHOLE_ROW: tl.constexpr, UNROLLED_STEPS: tl.constexpr,
                  PDL: tl.constexpr, GROUPS_FIRST: tl.constexpr, SHARED_SUMS: tl.constexpr):
    """float32 x . w for the columns offs_n over the word rows [row_start, row_end): [1, 1, BLOCK_N] (with
    SHARED_SUMS along the groups' axis: ``_sums_through_shared``);
    under HAS_NORM, x is the RMSNorm ``x * inv_rms * g`` of the row of K values at x_row (each
    program reduces the row itself; g at g_ptr). WHOLE_ROW: [row_start, row_end) is all of K.
    word_cols: where the columns lie in a word row (``common.word_offsets``: rows of words or column tiles)."""
    # Under PDL the packed paths wait after their first word loads; the others before they read x
    wait_in_loop: tl.constexpr = PDL and (PACKED_F16 or PACKED_BF16) and not (PACKED_F16 and HAS_NORM)
    if PDL and not wait_in_loop:
        x_row += wait_for_prior_grids()
    if PACKED_F16 and HAS_NORM:
        # fp16 could overflow unscaled: x scaled in the loop by 1 / rms rounded to fp16, the
        # rounding's factor put on the sum
        inv_rms = row_inv_rms(x_row, K, stride_xk, norm_eps, NORM_BLOCK)
        correction = inv_rms / inv_rms.to(tl.float16).to(tl.float32)
        acc, _ = _gemv_partial_x2(
            x_row, g_ptr, _f16_pair(inv_rms), qw_ptr, s_ptr, z_ptr, offs_n, mask_n, row_start, row_end,
            stride_qk, word_cols, stride_sg, stride_sn, GROUP_SIZE, GROUP_ROWS, GROUPS, BLOCK_N, EVEN_N, EVEN_K,
            PACKED_BF16, HAS_NORM, False, UNROLLED_STEPS, PDL, False, GROUPS_FIRST, SHARED_SUMS)
        return correction * acc
    if PACKED_F16 or PACKED_BF16:
        # bf16 has float32's range: x * g in the loop and 1 / rms on the sum; the loop sums the
        # squares of a row it reads whole, so no pass over the row before it (a decode step's
        # grids are one wave: every program would wait on it at once) or after it
        squares_in_loop: tl.constexpr = HAS_NORM and WHOLE_ROW
        acc, squares = _gemv_partial_x2(x_row, g_ptr, 0, qw_ptr, s_ptr, z_ptr, offs_n, mask_n, row_start, row_end,
                                        stride_qk, word_cols, stride_sg, stride_sn, GROUP_SIZE, GROUP_ROWS, GROUPS,
                                        BLOCK_N, EVEN_N, EVEN_K, PACKED_BF16, HAS_NORM, squares_in_loop,
                                        UNROLLED_STEPS, PDL, wait_in_loop, GROUPS_FIRST, SHARED_SUMS)
        if squares_in_loop:
            acc *= tl.rsqrt((squares / K + norm_eps).to(tl.float32))
        elif HAS_NORM:
            acc *= row_inv_rms(x_row, K, stride_xk, norm_eps, NORM_BLOCK)
        return acc
    else:  # (an else: Triton types every return of a function alike, and SHARED_SUMS shapes the packed ones)
        inv_rms = row_inv_rms(x_row, K, stride_xk, norm_eps, NORM_BLOCK) if HAS_NORM else 1.0
        return _gemv_partial(x_row, g_ptr, inv_rms, qw_ptr, s_ptr, z_ptr, offs_n, mask_n, row_start, row_end,
                             stride_xk, stride_qk, word_cols, stride_sg, stride_sn, GROUP_SIZE, GROUP_ROWS, GROUPS,
                             BLOCK_N, EVEN_N, HAS_NORM)


@triton.jit
def _as_tile(sums, D0: tl.constexpr, D1: tl.constexpr):
    """The column sums ``[1, 1, BLOCK_N]`` (``_gemv_columns``) broadcast back over the ``[D0, D1, BLOCK_N]``
    tile they were taken from, and the mask of its first row and group: stored so, the sums keep the tile's layout,
    where a store of the BLOCK_N sums alone takes a layout of its own (one value a thread), reached through shared
    memory with two CTA barriers more (the kernel had four; sm_90 SASS, bench/NOTES-kernels.md)."""
    first = (tl.arange(0, D0)[:, None, None] == 0) & (tl.arange(0, D1)[None, :, None] == 0)
    return tl.broadcast_to(sums, (D0, D1, sums.shape[2])), first


@triton.jit
def _sums_as_tile(sums, HALF_ROWS: tl.constexpr, GROUPS_FIRST: tl.constexpr):
    """``_as_tile`` for ``_sums_through_shared``'s sums (``[1, G, 1]``, or ``[G, 1, 1]`` with GROUPS_FIRST; column g's
    at group g): broadcast over the tile ``[HALF_ROWS, G, G]`` (``[G, HALF_ROWS, G]``), and the mask of its first row
    where the column (the last axis, as the store's columns are) is the group. (Stored at columns along the groups'
    axis, the sums would be taken for contiguous there, and Triton's coalescing would change their layout.)"""
    G: tl.constexpr = sums.shape[0] if GROUPS_FIRST else sums.shape[1]
    columns = tl.arange(0, G)[None, None, :]
    if GROUPS_FIRST:
        first = (tl.arange(0, HALF_ROWS)[None, :, None] == 0) & (columns == tl.arange(0, G)[:, None, None])
        tile = tl.broadcast_to(sums, (G, HALF_ROWS, G))
    else:
        first = (tl.arange(0, HALF_ROWS)[:, None, None] == 0) & (columns == tl.arange(0, G)[None, :, None])
        tile = tl.broadcast_to(sums, (HALF_ROWS, G, G))
    return tile, first


@triton.jit
def _sums_through_shared(acc, ROWS_AXIS: tl.constexpr):
    """The column sums of ``_gemv_partial_x2``'s tile ``acc`` (``[R, G, C]``, or ``[G, R, C]`` with ROWS_AXIS 1; G == C)
    added up through shared memory behind one barrier, where Triton's two reductions take two (the first in warps,
    then across them). Element (r, g, c) is column c's partial ``p = r G + g``, stored at row p of a ``[R G, C + 1]``
    buffer (one float of padding a row: fewer bank conflicts); after the barrier element (r, g, c) reads column g's
    partial ``r C + c``, and the sums over r and c leave column g's total along the groups' axis: ``[1, G, 1]``
    (``[G, 1, 1]``). In the layout the picks get (a warp a group, its rows and columns in its lanes) that sum is
    within warps."""
    GROUPS_AXIS: tl.constexpr = 1 - ROWS_AXIS
    R: tl.constexpr = acc.shape[ROWS_AXIS]
    G: tl.constexpr = acc.shape[GROUPS_AXIS]
    C: tl.constexpr = acc.shape[2]
    tl.static_assert(G == C, "one column a group")
    r = tl.expand_dims(tl.expand_dims(tl.arange(0, R), GROUPS_AXIS), 2)
    g = tl.expand_dims(tl.expand_dims(tl.arange(0, G), ROWS_AXIS), 2)
    c = tl.arange(0, C)[None, None, :]
    base = shared_address(4 * R * G * (C + 1))
    tokens = store_shared(base + 4 * ((r * G + g) * (C + 1) + c), acc)
    ready = barrier_after(tl.sum(tokens, axis=2, keep_dims=True))  # (a value a thread: one barrier)
    partials = load_shared(base + ready + 4 * ((r * C + c) * (C + 1) + g))
    return tl.sum(tl.sum(partials, axis=2, keep_dims=True), axis=ROWS_AXIS, keep_dims=True)


@triton.jit
def w4a16_gemv_kernel(
    x_ptr, g_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr,
    M, N_OUT, N_UP, K, norm_eps,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_qt, stride_sg, stride_sn, stride_bm, stride_om, stride_on,
    stride_wm, TILE: tl.constexpr, GROUP_SIZE: tl.constexpr, GROUP_ROWS: tl.constexpr, GROUPS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr, PACKED_F16: tl.constexpr, PACKED_BF16: tl.constexpr, HAS_NORM: tl.constexpr,
    NORM_BLOCK: tl.constexpr, UNROLLED_STEPS: tl.constexpr, PDL: tl.constexpr, MAXNREG: tl.constexpr,
    GROUPS_FIRST: tl.constexpr, UP_RUN: tl.constexpr = 0,
):
    # MAXNREG: the launch's register budget (``common.register_budget``); the code does not read it.
    # GROUPS_FIRST: the packed paths' tile with its groups on its first axis (``_gemv_partial_x2``)
    if PDL:  # the next kernel's programs may start as SMs free up, and read their first weights
        launch_dependent_grids()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    STEP: tl.constexpr = GROUPS * GROUP_ROWS
    k_rows = K // 8
    row_start, row_end = split_range(pid_k, k_rows, SPLIT_K, STEP)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    x_row = x_ptr + pid_m * stride_xm
    if ACTIVATION == "silu_mul":
        # The gate columns, then the up columns: one pass over K reads both, with twice the
        # bytes of a step in flight, and x is read once. (Runs of BLOCK_N contiguous columns:
        # interleaved single columns hid the contiguity from Triton's coalescing, 3-4x slower.
        # With UP_RUN = BLOCK_N the two runs are one in memory: 128 bytes a word row, not two
        # 64-byte halves of two lines.)
        both_n = tl.arange(0, 2 * BLOCK_N)
        offs_both = pid_n * BLOCK_N + both_n % BLOCK_N
        if UP_RUN > 0:  # gate and up in alternating runs of UP_RUN = BLOCK_N columns: one run of 2 BLOCK_N
            # (written so: Triton 3.6 lost the contiguity of a run's place computed from pid_n, 2.2x slower)
            columns = pid_n * 2 * BLOCK_N + both_n
        else:
            columns = offs_both + (both_n // BLOCK_N) * N_UP
        both = _gemv_columns(x_row, g_ptr, norm_eps, K, qw_ptr, s_ptr, z_ptr, columns,
                             offs_both < N_OUT, row_start, row_end, stride_xk, stride_qk,
                             word_offsets(columns, stride_qn, stride_qt, TILE), stride_sg,
                             stride_sn, GROUP_SIZE, GROUP_ROWS, GROUPS, 2 * BLOCK_N, EVEN_N, EVEN_K, PACKED_F16,
                             PACKED_BF16, HAS_NORM, NORM_BLOCK, SPLIT_K == 1, UNROLLED_STEPS, PDL, GROUPS_FIRST,
                             False)
        acc, acc_up = tl.split(tl.permute(tl.reshape(both, (2, BLOCK_N)), (1, 0)))
        acc, acc_up, cols = acc[None, None, :], acc_up[None, None, :], offs_n[None, None, :]
        first = tl.full((1, 1, 1), True, tl.int1)
    else:
        # fp16's packed tile's column sums through shared memory where its groups are as many as its columns (H100,
        # one row, 4096^2 3.26 -> 3.12 us; bf16 gains nothing: 3.36 -> 3.39; bench/NOTES-kernels.md, eighty-first
        # session) and their buffer fits ``shared_address`` (16 x 16 does, 32 x 32 not)
        SHARED_SUMS: tl.constexpr = (PACKED_F16 and GROUPS == BLOCK_N
                                     and 4 * (GROUP_ROWS // 2) * GROUPS * (BLOCK_N + 1) <= SHARED_ADDRESS_MAX_BYTES)
        acc = _gemv_columns(x_row, g_ptr, norm_eps, K, qw_ptr, s_ptr, z_ptr, offs_n, mask_n, row_start, row_end,
                            stride_xk, stride_qk, word_offsets(offs_n, stride_qn, stride_qt, TILE), stride_sg,
                            stride_sn, GROUP_SIZE, GROUP_ROWS, GROUPS,
                            BLOCK_N, EVEN_N, EVEN_K, PACKED_F16, PACKED_BF16, HAS_NORM, NORM_BLOCK, SPLIT_K == 1,
                            UNROLLED_STEPS, PDL, GROUPS_FIRST, SHARED_SUMS)
        if not (PACKED_F16 or PACKED_BF16):
            acc, first = _as_tile(acc, GROUP_ROWS, GROUPS)
        elif SHARED_SUMS:
            acc, first = _sums_as_tile(acc, GROUP_ROWS // 2, GROUPS_FIRST)
        elif GROUPS_FIRST:
            acc, first = _as_tile(acc, GROUPS, GROUP_ROWS // 2)
        else:
            acc, first = _as_tile(acc, GROUP_ROWS // 2, GROUPS)
        # (the store's columns from none of a call's results: torch's analysis of what a kernel writes takes each
        # result of a call for made from all its arguments, the sums' loads among them)
        cols = tl.broadcast_to(offs_n[None, None, :], acc.shape)
        acc_up = acc
    rows = pid_m + tl.arange(0, 1)[:, None, None]
    store_output(acc, acc_up, rows, cols, first & (rows < M) & (cols < N_OUT),
                 pid_m * tl.num_programs(1) + pid_n, M, N_UP, b_ptr, out_ptr, ws_ptr, stride_bm, stride_om, stride_on,
                 stride_wm, SPLIT_K, HAS_BIAS, ACTIVATION)
