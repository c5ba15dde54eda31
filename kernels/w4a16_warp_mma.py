"""W4A16 for 2 to 16 rows of activations on tensor cores: warp-level ``mma.sync`` in inline PTX.

The layout is ``w4a16.py``'s (``qweight`` int32 ``[K // 8, N]``, row k in nibble k % 8, or in column tiles;
``scales``/``zeros`` ``[K // group_size, N]``), read as it is. The product is computed
transposed, ``out^T = W^T x^T``, so the weight fills the 16-row side of
``mma.m16n8k16`` and the few rows of x its 8-column side (one or two 8-row tiles).

Every tensor of the kernel holds one value a thread (``[32 * WARPS]``), so each lane's
registers are exactly what it loaded, in the order the MMA wants them: the loads are inline
PTX (a ``tl.load`` may be given another thread layout by Triton) and so is the MMA. Lane
``(g, c) = (lane // 4, lane % 4)`` of a warp:

- holds the columns ``base_a + b`` and ``base_b + b`` for the BLOCKS (4 or 2) 16-column blocks b
  (``base_a = n0 + BLOCKS g``, ``base_b = base_a + 8 BLOCKS``, or the up columns under "silu_mul"),
  and loads BLOCKS words of each with one 16- or 8-byte load, for the two word rows ``r + 2 c`` and
  ``r + 2 c + 1`` of each 64-row step r: as the MMA's A fragment, the columns are its rows g
  and g + 8, and the rows are its K positions 2c, 2c+1 and 2c+8, 2c+9;
- dequantizes each word into four half2 (bf16x2) registers, register t holding nibbles t and
  t + 4 minus the zero point, exactly (the GEMV's lop3 trick); MMA t of a step takes register
  t of its four words: a sum over K does not care about the order of K, only that x follows
  the same order, so MMA t covers rows ``8 (r + 2c) + t (+4)`` and ``8 (r + 2c + 1) + t (+4)``;
- loads x row g of each tile (16 values at rows ``8 (r + 2c)``) and pairs them the same way
  (``_x_pairs``): the B fragment.

A program covers one or two 8-row tiles (M_TILES); more rows take more programs (program_id 0),
adjacent in launch order, so they read the same weight tiles together: from DRAM once. Two blocks
a warp (32 columns) give twice the programs of four on the same columns, each dequantizing its
words once for both tiles, where the GPU has SMs to spare (``w4a16.pick_config``).

The C fragment leaves lane (g, c) with columns a and b at rows 2c and 2c + 1 of each tile.
A group's products accumulate unscaled in float32 (the MMA's C), and are scaled per column
once a group (``group_size`` a multiple of 64). A program's warps cover ``COLUMN_WARPS``
blocks of 16 BLOCKS columns (sharing x through L1), the warps of a block taking turns over its
groups of K, each issuing the next group's loads before this one's arithmetic; at the end
their sums are added across warps through shared memory (``_shared_sums``, inline PTX: one
barrier) and go through ``common.store_outputs`` (split K, bias, activation) like every other
kernel's. In a loop, ptxas moves those loads to the
end of the body (they take the registers of the group being consumed at the back-edge), so
each group waits a memory latency; with UNROLLED_ITERS (the loop unrolled) they stay among the
MMAs, for more registers: a win only where few iterations keep the count down (``w4a16.pick_config``).

With PDL (programmatic dependent launch, ``common.dependent_launch``; Hopper and later) the kernel lets the
next one start at once, issues its first group's weight loads, and only then waits for the kernel before it
to finish and loads x (coherently: see the loads below). H200, the decode step's 64 ops at 16 rows, bf16:
1168.7 -> 1104.0 us a step with the RMSNorm kernel and the split-K workspace's zeroing launched so too
(bench/NOTES-kernels.md, thirty-seventh session).

Needs a GPU (inline PTX: Triton's interpreter does not run it) with ``mma.sync`` for bf16
(sm_80+); ``w4a16.warp_mma_ok`` states the alignment it reads with.
"""

import triton
import triton.language as tl

from .common import (asm_constant, barrier_after, launch_dependent_grids, load_shared, prefetch_to_l2, shared_address,
                     store_outputs, store_shared, wait_for_prior_grids, word_offsets)


# The loads, by inline PTX (a ``tl.load`` could get another thread layout, and the MMA needs each lane's own
# registers). Under programmatic dependent launch the kernel starts while the grid before it may still be writing
# x: its loads of x must be coherent (no ``.nc``), which ptxas keeps after ``griddepcontrol.wait``, and so must
# the first group's loads of the weights, which are issued before the wait and which ptxas would otherwise sink
# below it (nothing orders a read-only load against the wait). The weights, read once, are not kept in L1
# (H200: 4-8% faster on 4096x28672).
_V4, _V2, _V1 = "{$0, $1, $2, $3}, [$4];", "{$0, $1}, [$2];", "$0, [$1];"
_X_NC, _X = asm_constant("ld.global.nc.v4.b32 " + _V4), asm_constant("ld.global.v4.b32 " + _V4)
_WORDS_NC = asm_constant("ld.global.nc.L1::no_allocate.v4.b32 " + _V4)
_WORDS = asm_constant("ld.global.L1::no_allocate.v4.b32 " + _V4)
_WORD_PAIR_NC = asm_constant("ld.global.nc.L1::no_allocate.v2.b32 " + _V2)
_WORD_PAIR = asm_constant("ld.global.L1::no_allocate.v2.b32 " + _V2)
_PARAMS_NC, _PARAMS = asm_constant("ld.global.nc.v2.b32 " + _V2), asm_constant("ld.global.v2.b32 " + _V2)
_PARAM_PAIR_NC, _PARAM_PAIR = asm_constant("ld.global.nc.b32 " + _V1), asm_constant("ld.global.b32 " + _V1)


@triton.jit
def _load_v4(ptrs, ASM: tl.constexpr):
    """Four 32-bit words at each (16-byte aligned) pointer, by the load ``ASM``."""
    return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,l", [ptrs], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                                     is_pure=True, pack=1)


@triton.jit
def _load_v2(ptrs, ASM: tl.constexpr):
    """Two 32-bit words (four 16-bit values) at each (8-byte aligned) pointer, by the load ``ASM``."""
    return tl.inline_asm_elementwise(ASM, "=r,=r,l", [ptrs], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _load_v1(ptrs, ASM: tl.constexpr):
    """One 32-bit word (two 16-bit values) at each (4-byte aligned) pointer, by the load ``ASM``."""
    return (tl.inline_asm_elementwise(ASM, "=r,l", [ptrs], dtype=tl.int32, is_pure=True, pack=1),)


@triton.jit
def _load_x(ptrs, COHERENT: tl.constexpr):
    if COHERENT:
        return _load_v4(ptrs, _X)
    return _load_v4(ptrs, _X_NC)


@triton.jit
def _load_columns(ptrs, COHERENT: tl.constexpr, BLOCKS: tl.constexpr, WORDS: tl.constexpr):
    """What a lane reads of its BLOCKS columns (4 or 2) at ``ptrs``: with WORDS their 32-bit words (one a column),
    else their 16-bit zeros or scales (two a register)."""
    # (one return: Triton 3.6 compares the types of every return, taken or not)
    if WORDS and BLOCKS == 2:
        loaded = _load_v2(ptrs, _WORD_PAIR if COHERENT else _WORD_PAIR_NC)
    elif WORDS:
        loaded = _load_v4(ptrs, _WORDS if COHERENT else _WORDS_NC)
    elif BLOCKS == 2:
        loaded = _load_v1(ptrs, _PARAM_PAIR if COHERENT else _PARAM_PAIR_NC)
    else:
        loaded = _load_v2(ptrs, _PARAMS if COHERENT else _PARAMS_NC)
    return loaded


@triton.jit
def _x_pairs(x01, x23, x45, x67):
    """Eight 16-bit x values (as loaded, two a register) -> the pairs (x_t, x_t+4), t < 4, that
    meet nibbles t and t + 4 of a word. Done where they are used, not after the load: there it
    would make the compiler wait for the load early and so issue it late."""
    return tl.inline_asm_elementwise(
        """
        {
        prmt.b32 $0, $4, $6, 0x5410;
        prmt.b32 $1, $4, $6, 0x7632;
        prmt.b32 $2, $5, $7, 0x5410;
        prmt.b32 $3, $5, $7, 0x7632;
        }
        """,
        "=r,=r,=r,=r,r,r,r,r", [x01, x23, x45, x67], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
        pack=1)


@triton.jit
def _zero_consts(pair, BF16: tl.constexpr):
    """The two 16-bit zero points in ``pair`` -> each one's dequantization constants:
    fp16 (1024 + z, 1024 + z) and (-64 - z, -64 - z); bf16 (-128 - z, -128 - z)."""
    if BF16:
        consts = tl.inline_asm_elementwise(
            """
            {
            .reg .b16 lo, hi, m, c, t;
            mov.b32 {lo, hi}, $2;
            mov.b16 m, 0xBF80;
            mov.b16 c, 0xC300;
            fma.rn.bf16 t, lo, m, c;
            mov.b32 $0, {t, t};
            fma.rn.bf16 t, hi, m, c;
            mov.b32 $1, {t, t};
            }
            """,
            "=r,=r,r", [pair], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        consts = tl.inline_asm_elementwise(
            """
            {
            .reg .b16 lo, hi, c, t;
            mov.b32 {lo, hi}, $4;
            mov.b16 c, 0x6400;
            add.rn.f16 t, lo, c;
            mov.b32 $0, {t, t};
            add.rn.f16 t, hi, c;
            mov.b32 $2, {t, t};
            mov.b16 c, 0xD400;
            sub.rn.f16 t, c, lo;
            mov.b32 $1, {t, t};
            sub.rn.f16 t, c, hi;
            mov.b32 $3, {t, t};
            }
            """,
            "=r,=r,=r,=r,r", [pair], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    return consts


@triton.jit
def _scales_f32(pair, BF16: tl.constexpr):
    """The two 16-bit scales in ``pair`` as float32."""
    if BF16:
        return tl.inline_asm_elementwise(
            "{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xFFFF0000; }",
            "=f,=f,r", [pair], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }",
        "=f,=f,r", [pair], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _dequantize_word(word, zero, BF16: tl.constexpr):
    """The 8 nibbles of ``word`` minus the zero point, exactly, as four half2 (bf16x2) registers,
    register t holding nibbles (t, t + 4) (the GEMV's lop3 trick, ``int4_pairs.f16_nibble_pairs``);
    ``zero`` from ``_zero_consts``."""
    if BF16:
        halves = tl.inline_asm_elementwise(
            """
            {
            .reg .b32 t1, t2, t3, one;
            mov.b32 one, 0x3F803F80;
            shr.u32 t1, $4, 4;
            shr.u32 t2, $4, 8;
            shr.u32 t3, $4, 12;
            lop3.b32 $0, $4, 0x000F000F, 0x43004300, 0xEA;
            lop3.b32 $1, t1, 0x000F000F, 0x43004300, 0xEA;
            lop3.b32 $2, t2, 0x000F000F, 0x43004300, 0xEA;
            lop3.b32 $3, t3, 0x000F000F, 0x43004300, 0xEA;
            fma.rn.bf16x2 $0, $0, one, $5;
            fma.rn.bf16x2 $1, $1, one, $5;
            fma.rn.bf16x2 $2, $2, one, $5;
            fma.rn.bf16x2 $3, $3, one, $5;
            }
            """,
            "=r,=r,=r,=r,r,r", (word,) + zero, dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        halves = tl.inline_asm_elementwise(
            """
            {
            .reg .b32 t, sixteenth;
            mov.b32 sixteenth, 0x2C002C00;
            shr.u32 t, $4, 8;
            lop3.b32 $0, $4, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 $1, $4, 0x00F000F0, 0x64006400, 0xEA;
            lop3.b32 $2, t, 0x000F000F, 0x64006400, 0xEA;
            lop3.b32 $3, t, 0x00F000F0, 0x64006400, 0xEA;
            sub.rn.f16x2 $0, $0, $5;
            fma.rn.f16x2 $1, $1, sixteenth, $6;
            sub.rn.f16x2 $2, $2, $5;
            fma.rn.f16x2 $3, $3, sixteenth, $6;
            }
            """,
            "=r,=r,=r,=r,r,r,r", (word,) + zero, dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
            pack=1)
    return halves


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c, BF16: tl.constexpr):
    """One warp-level ``mma.m16n8k16`` (float32 accumulation): A fragment a0..a3, B fragment
    b0, b1, accumulators c (four floats) -> four floats."""
    if BF16:
        d = tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
            "{$10, $11, $12, $13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", (a0, a1, a2, a3, b0, b1) + c,
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        d = tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
            "{$10, $11, $12, $13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", (a0, a1, a2, a3, b0, b1) + c,
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    return d


@triton.jit
def _block_step(w0, w1, w2, w3, zero_a, zero_b, xs, acc, BF16: tl.constexpr, M_TILES: tl.constexpr):
    """acc + one 64-row step of one block of 16 weight columns: words w0..w3 (rows r + 2c and
    r + 2c + 1 of columns a and b: the A fragment's four registers), their zero constants, the
    x pairs of each 8-row tile (8 a tile: the B fragments of MMAs 0..3), the accumulators
    (4 a tile)."""
    a0 = _dequantize_word(w0, zero_a, BF16)
    a1 = _dequantize_word(w1, zero_b, BF16)
    a2 = _dequantize_word(w2, zero_a, BF16)
    a3 = _dequantize_word(w3, zero_b, BF16)
    tile = acc[0:4]
    for t in tl.static_range(4):
        tile = _mma(a0[t], a1[t], a2[t], a3[t], xs[t], xs[4 + t], tile, BF16)
    if M_TILES == 2:
        tile1 = acc[4:8]
        for t in tl.static_range(4):
            tile1 = _mma(a0[t], a1[t], a2[t], a3[t], xs[8 + t], xs[12 + t], tile1, BF16)
        tile = tile + tile1
    return tile


@triton.jit
def _zeros_like_acc(z, M_TILES: tl.constexpr):
    acc = (z, z, z, z)
    if M_TILES == 2:
        acc = acc + acc
    return acc


@triton.jit
def _scaled_add(acc, part, scale_a, scale_b, M_TILES: tl.constexpr):
    """acc + part with its rows of column a (values 0, 1 of each tile) scaled by scale_a and
    those of column b (2, 3) by scale_b."""
    first = (acc[0] + part[0] * scale_a, acc[1] + part[1] * scale_a,
             acc[2] + part[2] * scale_b, acc[3] + part[3] * scale_b)
    if M_TILES == 2:
        first = first + (acc[4] + part[4] * scale_a, acc[5] + part[5] * scale_a,
                         acc[6] + part[6] * scale_b, acc[7] + part[7] * scale_b)
    return first


@triton.jit
def _value_index(i, M_TILES: tl.constexpr, BLOCKS: tl.constexpr):
    """A lane's value ``i`` of ``_shared_sums``' order -> (its 8-row tile, its 16-column block, its row in the lane's
    pair (0, 1), and whether it is of column b (the up column under "silu_mul") rather than a)."""
    half = 2 * BLOCKS * M_TILES
    rest = i % half
    return rest // (2 * BLOCKS), (rest // 2) % BLOCKS, rest % 2, i // half


@triton.jit
def _shared_sums(accs, tid, M_TILES: tl.constexpr, K_WARPS: tl.constexpr, COLUMN_WARPS: tl.constexpr,
                 ACTIVATION: tl.constexpr):
    """The program's sums (``accs``: the BLOCKS blocks' partial sums, a warp's) added across the K_WARPS warps of each
    column block, for ``common.store_outputs``: every lane stores its 4 BLOCKS M_TILES values (column a's first, then
    column b's: ``_value_index``) in shared memory, value-major, and after one barrier each thread adds up
    4 BLOCKS M_TILES / K_WARPS of the sums, those of its warp's lane position in value rows ``warp_k + r K_WARPS``.
    A column a and its column b lie 2 BLOCKS M_TILES / K_WARPS parts apart: under "silu_mul" the gate and up parts."""
    T: tl.constexpr = tid.shape[0]
    BLOCKS: tl.constexpr = len(accs)
    V: tl.constexpr = 4 * BLOCKS * M_TILES
    PARTS: tl.constexpr = V // K_WARPS
    tl.static_assert(V % (2 * K_WARPS) == 0, "at most 2 BLOCKS M_TILES warps a column block")
    base = shared_address(4 * V * T)
    tokens = tid * 0
    for column_b in tl.static_range(2):  # (the order that ``_value_index`` undoes)
        for tile in tl.static_range(M_TILES):
            for block in tl.static_range(BLOCKS):
                for row in tl.static_range(2):
                    i = 2 * BLOCKS * M_TILES * column_b + 2 * BLOCKS * tile + 2 * block + row
                    tokens += store_shared(base + 4 * (i * T + tid), accs[block][4 * tile + 2 * column_b + row])
    ready = barrier_after(tokens)
    position = tid % (32 * COLUMN_WARPS)  # the lane's and its column block's
    warp_k = tid // (32 * COLUMN_WARPS)
    sums = ()
    for r in tl.static_range(PARTS):
        row_start = base + ready + 4 * ((warp_k + r * K_WARPS) * T + position)
        total = load_shared(row_start)
        for k in tl.static_range(1, K_WARPS):
            total += load_shared(row_start + 4 * 32 * COLUMN_WARPS * k)
        sums = sums + (total,)
    values = sums
    up_values = sums
    if ACTIVATION == "silu_mul":
        values = sums[:PARTS // 2]
        up_values = sums[PARTS // 2:]
    return values, up_values


@triton.jit
def _shared_sums_places(tid, first_row, first_block_column, M_TILES: tl.constexpr, K_WARPS: tl.constexpr,
                        COLUMN_WARPS: tl.constexpr, WARP_COLUMNS: tl.constexpr, ACTIVATION: tl.constexpr,
                        BLOCKS: tl.constexpr):
    """The rows and columns of ``_shared_sums``' parts (from the thread's index alone: torch's analysis of the
    kernel follows what a store's pointers are computed from, and must not reach the loads)."""
    position = tid % (32 * COLUMN_WARPS)
    lane = position % 32
    first_columns = first_block_column + (position // 32) * WARP_COLUMNS + BLOCKS * (lane // 4)
    PARTS: tl.constexpr = 4 * BLOCKS * M_TILES // K_WARPS
    COUNT: tl.constexpr = PARTS // 2 if ACTIVATION == "silu_mul" else PARTS
    rows = ()
    cols = ()
    for r in tl.static_range(COUNT):
        tile, block, row, column_b = _value_index(tid // (32 * COLUMN_WARPS) + r * K_WARPS, M_TILES, BLOCKS)
        rows = rows + (first_row + 8 * tile + 2 * (lane % 4) + row,)
        cols = cols + (first_columns + block + 8 * BLOCKS * column_b,)
    return rows, cols


@triton.jit
def _load_group_weights(qw_ptr, s_ptr, z_ptr, group, lane_c, base_a, base_b, word_a, word_b, stride_qk, stride_sg,
                        GROUP_SIZE: tl.constexpr, COHERENT: tl.constexpr, BLOCKS: tl.constexpr):
    """This lane's weights of one group: the words of each 64-row step (word rows ``r + 2 c`` and
    ``r + 2 c + 1``, columns a0.. then b0.. of each, BLOCKS of either, at word_a and word_b of a word row), and the
    packed zeros and scales of its columns."""
    sz = group * stride_sg
    params = (_load_columns(z_ptr + sz + base_a, COHERENT, BLOCKS, False)
              + _load_columns(z_ptr + sz + base_b, COHERENT, BLOCKS, False)
              + _load_columns(s_ptr + sz + base_a, COHERENT, BLOCKS, False)
              + _load_columns(s_ptr + sz + base_b, COHERENT, BLOCKS, False))
    first_row = group * (GROUP_SIZE // 8) + 2 * lane_c
    words = ()
    for step in tl.static_range(GROUP_SIZE // 64):
        row = first_row + 8 * step
        words = words + (_load_columns(qw_ptr + row * stride_qk + word_a, COHERENT, BLOCKS, True)
                         + _load_columns(qw_ptr + row * stride_qk + word_b, COHERENT, BLOCKS, True)
                         + _load_columns(qw_ptr + (row + 1) * stride_qk + word_a, COHERENT, BLOCKS, True)
                         + _load_columns(qw_ptr + (row + 1) * stride_qk + word_b, COHERENT, BLOCKS, True))
    return words, params


@triton.jit
def _load_group_x(x_row0, x_row1, group, lane_c, GROUP_SIZE: tl.constexpr, M_TILES: tl.constexpr,
                  COHERENT: tl.constexpr):
    """This lane's x of one group: 16 values of its row of each 8-row tile a 64-row step, at rows
    ``8 (r + 2 c)`` on, as loaded (``_x_pairs`` pairs them)."""
    first_row = group * (GROUP_SIZE // 8) + 2 * lane_c
    xs = ()
    for step in tl.static_range(GROUP_SIZE // 64):
        row = first_row + 8 * step
        xs = xs + _load_x(x_row0 + 8 * row, COHERENT) + _load_x(x_row0 + 8 * row + 8, COHERENT)
        if M_TILES == 2:
            xs = xs + _load_x(x_row1 + 8 * row, COHERENT) + _load_x(x_row1 + 8 * row + 8, COHERENT)
    return xs


@triton.jit
def _load_group(qw_ptr, s_ptr, z_ptr, x_row0, x_row1, group, lane_c, base_a, base_b, word_a, word_b, stride_qk,
                stride_sg, GROUP_SIZE: tl.constexpr, M_TILES: tl.constexpr, COHERENT: tl.constexpr,
                BLOCKS: tl.constexpr):
    """This lane's loads for one group: its words, x and packed zeros and scales."""
    words, params = _load_group_weights(qw_ptr, s_ptr, z_ptr, group, lane_c, base_a, base_b, word_a, word_b,
                                        stride_qk, stride_sg, GROUP_SIZE, False, BLOCKS)
    return words, _load_group_x(x_row0, x_row1, group, lane_c, GROUP_SIZE, M_TILES, COHERENT), params


@triton.jit
def _zero_constants(params, BLOCKS: tl.constexpr, BF16: tl.constexpr):
    """``_load_group_weights``' packed zeros -> for each of the BLOCKS blocks, the zero constants (``_zero_consts``)
    of its column a and of its column b (block b's column is value b % 2 of its register)."""
    PAIRS: tl.constexpr = BLOCKS // 2  # registers of two 16-bit values a column side
    consts = ()
    for p in tl.static_range(2 * PAIRS):  # column a's registers, then column b's
        consts = consts + (_zero_consts(params[p], BF16),)
    zero_a = ()
    zero_b = ()
    for b in tl.static_range(BLOCKS):
        ca = consts[b // 2]
        cb = consts[PAIRS + b // 2]
        if BF16:
            zero_a = zero_a + ((ca[b % 2],),)
            zero_b = zero_b + ((cb[b % 2],),)
        else:
            zero_a = zero_a + ((ca[2 * (b % 2)], ca[2 * (b % 2) + 1]),)
            zero_b = zero_b + ((cb[2 * (b % 2)], cb[2 * (b % 2) + 1]),)
    return zero_a, zero_b


@triton.jit
def _group_product(loads, live, accs, z, GROUP_SIZE: tl.constexpr, M_TILES: tl.constexpr, BF16: tl.constexpr):
    """The blocks' accumulators ``accs`` plus one group's product (``_load_group``'s loads), scaled per
    column and by ``live`` (0 for a group past the end)."""
    words, xs, params = loads
    BLOCKS: tl.constexpr = len(accs)
    PAIRS: tl.constexpr = BLOCKS // 2
    zero_a, zero_b = _zero_constants(params, BLOCKS, BF16)
    parts = ()
    for b in tl.static_range(BLOCKS):
        parts = parts + (_zeros_like_acc(z, M_TILES),)
    # words of a step: row r + 2 c columns a0.., b0.., then row r + 2 c + 1 the same
    for step in tl.static_range(GROUP_SIZE // 64):
        step_words = words[4 * BLOCKS * step:4 * BLOCKS * (step + 1)]
        raw = xs[8 * M_TILES * step:8 * M_TILES * step + 8 * M_TILES]
        step_xs = _x_pairs(raw[0], raw[1], raw[2], raw[3]) + _x_pairs(raw[4], raw[5], raw[6], raw[7])
        if M_TILES == 2:
            step_xs = step_xs + _x_pairs(raw[8], raw[9], raw[10], raw[11]) + _x_pairs(raw[12], raw[13], raw[14],
                                                                                       raw[15])
        stepped = ()
        for b in tl.static_range(BLOCKS):
            stepped = stepped + (_block_step(step_words[b], step_words[BLOCKS + b], step_words[2 * BLOCKS + b],
                                             step_words[3 * BLOCKS + b], zero_a[b], zero_b[b], step_xs, parts[b],
                                             BF16, M_TILES),)
        parts = stepped
    scales = ()
    for p in tl.static_range(2 * PAIRS):  # column a's registers, then column b's
        scales = scales + (_scales_f32(params[2 * PAIRS + p], BF16),)
    summed = ()
    for b in tl.static_range(BLOCKS):
        summed = summed + (_scaled_add(accs[b], parts[b], scales[b // 2][b % 2] * live,
                                       scales[PAIRS + b // 2][b % 2] * live, M_TILES),)
    return summed


@triton.jit
def _prefetch_group(tile_words, group, group_end, lane, GROUP_SIZE: tl.constexpr, TILE: tl.constexpr):
    """Lane 0 of the warp pulls its column tile's words of ``group`` (one run of GROUP_SIZE / 8 word rows) into L2
    with one bulk prefetch; nothing waits for it."""
    issue = ((lane == 0) & (group < group_end)).to(tl.int32)
    prefetch_to_l2(tile_words + group * (GROUP_SIZE // 8) * TILE, (GROUP_SIZE // 8) * TILE * 4 + lane * 0, issue)


@triton.jit
def _iteration(accs, loads, it, group_start, group_end, warp_k, qw_ptr, s_ptr, z_ptr, x_row0, x_row1, lane_c, base_a,
               base_b, word_a, word_b, stride_qk, stride_sg, z, tile_words, lane, GROUP_SIZE: tl.constexpr,
               M_TILES: tl.constexpr, K_WARPS: tl.constexpr, BF16: tl.constexpr, COHERENT: tl.constexpr,
               TILE: tl.constexpr, PREFETCH_GROUPS: tl.constexpr, BLOCKS: tl.constexpr):
    """Iteration ``it`` of a warp's walk over its groups: pulls the words of its group ``it + PREFETCH_GROUPS``
    into L2 (where PREFETCH_GROUPS > 0), issues the next group's loads, then adds this group's product
    (``loads``) to the accumulators. Returns the sums and the next loads."""
    live = (group_start + it * K_WARPS + warp_k < group_end).to(tl.float32)
    group = tl.minimum(group_start + (it + 1) * K_WARPS + warp_k, group_end - 1)
    if PREFETCH_GROUPS > 0:
        _prefetch_group(tile_words, group_start + (it + PREFETCH_GROUPS) * K_WARPS + warp_k, group_end, lane,
                        GROUP_SIZE, TILE)
    next_loads = _load_group(qw_ptr, s_ptr, z_ptr, x_row0, x_row1, group, lane_c, base_a, base_b, word_a, word_b,
                             stride_qk, stride_sg, GROUP_SIZE, M_TILES, COHERENT, BLOCKS)
    return _group_product(loads, live, accs, z, GROUP_SIZE, M_TILES, BF16), next_loads


@triton.jit
def w4a16_warp_mma_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr,
    M, N_OUT, N_UP, K,
    stride_xm, stride_qk, stride_qt, stride_sg, stride_bm, stride_om, stride_on, stride_wm,
    TILE: tl.constexpr, GROUP_SIZE: tl.constexpr, M_TILES: tl.constexpr, WARPS: tl.constexpr,
    COLUMN_WARPS: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    BF16: tl.constexpr, UNROLLED_ITERS: tl.constexpr = 0, UP_RUN: tl.constexpr = 0, MAXNREG: tl.constexpr = 0,
    PDL: tl.constexpr = False, PREFETCH_GROUPS: tl.constexpr = 0, LOOP_UNROLL: tl.constexpr = 1,
    BLOCKS: tl.constexpr = 4,
):
    """out = x @ W for 8 * M_TILES rows a program (program_id 0 picks them) and BLOCKS blocks of 16 weight columns
    a warp (64 with 4, 32 with 2; half of them gate and half up under "silu_mul"): a program's WARPS warps cover
    COLUMN_WARPS such blocks of columns, the K_WARPS = WARPS / COLUMN_WARPS warps of each block
    taking turns over its groups of K. MAXNREG: the launch's register budget (``common.register_budget``);
    the code does not read it. PDL: launched with programmatic dependent launch (``common.dependent_launch``).
    LOOP_UNROLL: where the loop is not unrolled (UNROLLED_ITERS 0), its body this many times an iteration.
    The words are in rows (TILE 0) or column tiles (``common.word_offsets``); PREFETCH_GROUPS > 0 (words in tiles
    of 64, each warp's columns one tile): each warp pulls its tile's words of a group into L2 that many iterations
    before its loads of it would start, by one bulk prefetch (1: as the loads of the group before start)."""
    if PDL:  # the next kernel's programs may start as SMs free up, and read their first weights
        launch_dependent_grids()
    T: tl.constexpr = 32 * WARPS
    K_WARPS: tl.constexpr = WARPS // COLUMN_WARPS
    WARP_COLUMNS: tl.constexpr = 8 * BLOCKS if ACTIVATION == "silu_mul" else 16 * BLOCKS
    tid = tl.arange(0, T)
    warp = tid // 32
    warp_n = warp % COLUMN_WARPS  # which of the program's column blocks
    warp_k = warp // COLUMN_WARPS  # which of every K_WARPS groups
    lane_g = (tid % 32) // 4  # the MMA's row group: weight columns, and x's row in a tile
    lane_c = tid % 4  # the MMA's column pair: word rows r + 2 c, r + 2 c + 1
    # Programs of the same columns and K range but different rows are adjacent in launch order,
    # so they read the same weight tiles at about the same time: from DRAM once, then from L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    first_row = pid_m * 8 * M_TILES
    # Lane g's columns: a = base_a + b and b = base_b + b for the BLOCKS blocks b (16- or 8-byte loads);
    # columns past N are read at N - BLOCKS (never stored).
    first_column = (pid_n * COLUMN_WARPS + warp_n) * WARP_COLUMNS + BLOCKS * lane_g
    if ACTIVATION == "silu_mul" and UP_RUN > 0:  # gate and up in alternating runs of UP_RUN columns
        gate_column = tl.minimum(first_column, N_UP - BLOCKS)
        base_a = (gate_column // UP_RUN) * (2 * UP_RUN) + gate_column % UP_RUN
        base_b = base_a + UP_RUN
    elif ACTIVATION == "silu_mul":
        base_a = tl.minimum(first_column, N_UP - BLOCKS)
        base_b = base_a + N_UP
    else:
        base_a = tl.minimum(first_column, N_OUT - BLOCKS)
        base_b = tl.minimum(first_column + 8 * BLOCKS, N_OUT - BLOCKS)
    word_a = word_offsets(base_a, 1, stride_qt, TILE)  # (a lane's BLOCKS columns lie in one tile)
    word_b = word_offsets(base_b, 1, stride_qt, TILE)
    x_row0 = x_ptr + tl.minimum(first_row + lane_g, M - 1) * stride_xm
    x_row1 = x_ptr + tl.minimum(first_row + 8 + lane_g, M - 1) * stride_xm

    groups = K // GROUP_SIZE
    per_split = tl.cdiv(groups, SPLIT_K)
    group_start = pid_k * per_split
    group_end = tl.minimum(group_start + per_split, groups)
    lane = tid % 32
    tile_words = qw_ptr + base_a * 0  # the warp's column tile, whose words it pulls into L2 ahead
    if PREFETCH_GROUPS > 0:
        tile_words += (base_a // TILE) * stride_qt
    for ahead in tl.static_range(PREFETCH_GROUPS):  # the groups before the loop's first pull
        _prefetch_group(tile_words, group_start + ahead * K_WARPS + warp_k, group_end, lane, GROUP_SIZE, TILE)
    z = tl.zeros((T,), tl.float32)
    accs = ()
    for b in tl.static_range(BLOCKS):
        accs = accs + (_zeros_like_acc(z, M_TILES),)
    # Each warp takes every K_WARPS-th group; the next group's loads are issued before this one's
    # arithmetic. Past the end a warp re-reads the range's last group (already fetched by the
    # program) and scales it by 0.
    group = tl.minimum(group_start + warp_k, group_end - 1)
    words, params = _load_group_weights(qw_ptr, s_ptr, z_ptr, group, lane_c, base_a, base_b, word_a, word_b,
                                        stride_qk, stride_sg, GROUP_SIZE, PDL, BLOCKS)
    if PDL:  # the first weights are on their way as the grid before finishes writing x
        ready = wait_for_prior_grids()
        x_row0 += ready
        x_row1 += ready
    loads = (words, _load_group_x(x_row0, x_row1, group, lane_c, GROUP_SIZE, M_TILES, PDL), params)
    if UNROLLED_ITERS > 0:
        for it in tl.static_range(UNROLLED_ITERS):
            accs, loads = _iteration(accs, loads, it, group_start, group_end, warp_k, qw_ptr, s_ptr, z_ptr, x_row0,
                                     x_row1, lane_c, base_a, base_b, word_a, word_b, stride_qk, stride_sg, z,
                                     tile_words, lane, GROUP_SIZE, M_TILES, K_WARPS, BF16, PDL, TILE,
                                     PREFETCH_GROUPS, BLOCKS)
    else:
        for it in tl.range(0, tl.cdiv(group_end - group_start, K_WARPS), loop_unroll_factor=LOOP_UNROLL):
            accs, loads = _iteration(accs, loads, it, group_start, group_end, warp_k, qw_ptr, s_ptr, z_ptr, x_row0,
                                     x_row1, lane_c, base_a, base_b, word_a, word_b, stride_qk, stride_sg, z,
                                     tile_words, lane, GROUP_SIZE, M_TILES, K_WARPS, BF16, PDL, TILE,
                                     PREFETCH_GROUPS, BLOCKS)
    # The warps' sums meet in shared memory by inline PTX, behind one barrier. Through Triton's layouts they took 53
    # CTA barriers at M = 16 on 4096^2 (a change of layout at each tl.join of a tile), or 2 in one tl.reduce whose
    # every warp took part in all of it; H200, fp16, one weight replayed, us (bench/NOTES-kernels.md, forty-ninth
    # session): 4096^2 at M = 16 6.31 -> 5.63, 4096x6144 8.49 -> 6.74, 14336x4096 14.44 -> 13.08.
    rows, cols = _shared_sums_places(tid, first_row, pid_n * COLUMN_WARPS * WARP_COLUMNS, M_TILES, K_WARPS,
                                     COLUMN_WARPS, WARP_COLUMNS, ACTIVATION, BLOCKS)
    values, up_values = _shared_sums(accs, tid, M_TILES, K_WARPS, COLUMN_WARPS, ACTIVATION)
    masks = ()
    for i in tl.static_range(len(values)):
        masks = masks + ((rows[i] < M) & (cols[i] < N_OUT),)
    store_outputs(values, up_values, rows, cols, masks, pid_m * tl.num_programs(1) + pid_n, M, N_UP, b_ptr, out_ptr,
                  ws_ptr, stride_bm, stride_om, stride_on, stride_wm, SPLIT_K, HAS_BIAS, ACTIVATION)


def warp_mma_columns(activation: str, blocks: int = 4) -> int:
    """Output columns of a warp's ``blocks`` blocks of 16 weight columns: 16 ``blocks``, or 8 ``blocks`` (and as many
    up columns) under "silu_mul"."""
    return 8 * blocks if activation == "silu_mul" else 16 * blocks
