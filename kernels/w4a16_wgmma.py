"""W4A16 for 17 to 64 rows on Hopper: warpgroup MMA (``wgmma``) fed from registers, in Gluon.

The layout is ``w4a16.py``'s (``qweight`` int32 ``[K // 8, N]``, row k in nibble k % 8, or in column tiles;
``scales``/``zeros`` ``[K // group_size, N]``), read as it is. The product is computed
transposed, ``out^T = W^T x^T``: each warpgroup's 64 weight columns are the MMA's M side, the
left operand, which ``wgmma`` reads from registers; x's rows are its N side, from shared memory.

Gluon states which thread holds which element, so the dequantization writes the MMA's operand
registers directly, with no trip through shared memory (Triton's ``tl.dot`` kernel in ``w4a16.py``
routes the tile through shared memory and waits for each step's MMAs):

- a K step is 64 rows, 8 word rows. Thread ``(g, c) = (lane // 4, lane % 4)`` of warp w loads
  word rows ``2 c`` and ``2 c + 1`` of columns ``16 w + g`` and ``16 w + g + 8`` (the layout
  ``WORDS`` in the kernel), the rows and K positions of its A fragment;
- one ``lop3`` turns a word into two exact halves ``(q_t, q_t+4)`` (the GEMV's trick) and the
  zero is subtracted, still exact, in fp16/bf16 pairs (``_dequantize``); the products of a
  group's steps in a chunk gather in an accumulator of their own, scaled once in float32, so the
  weights are never rounded. With ``SCALED`` the weights are multiplied by their scales in x's dtype
  before the MMA instead, as a dequantized weight would be: one accumulator, so 64 rows a program fit
  in 128 registers (the exact kernel's two took 197-208 there), and no wait for a group's MMAs;
- a sum over K does not care about the order of K, only that x follows the same order. So
  inside a step the A tile takes K in the order the fragment's registers hold it: logical k =
  t2 + 2 j1 + 4 j2 + 8 j0 + 16 t0 + 32 t1 holds nibble ``t = t0 + 2 t1 + 4 t2`` of word row
  ``j = j0 + 2 j1 + 4 j2``. x's step is permuted the same way on its way into shared memory
  (``_x_step``), read by contiguous 16-byte loads.

The loop goes over K in chunks of two steps (128 rows), each in one group or two of 64. A chunk's
loads, its words, zeros, scales and x, are issued together one chunk ahead (``_chunk_loads``), so
they are in flight under the chunk before's work. Its x goes into shared memory at the chunk's start,
in two stages of a double buffer, so one barrier serves two steps (H200, 14336x4096 at 32 rows: 18.5
us against 21.2 with x stored and waited for each step). One step's MMAs stay in flight while the next
step is dequantized (``warpgroup_mma_wait`` holds the previous operand's registers until its MMAs are
done). K may be split over programs by chunks (``SPLIT_K``): their float32 sums are added atomically into a
workspace that stays zero between launches, and the tile's last program reads the total back, stores the
result and zeroes its part again (``_add_split_sums``, ``_take_split_total``): one launch, no memset before
it and no cast after it.

x's shared memory holds two chunks, three with ``SCALED``. A chunk's x overwrites that of the chunk two
back (three), whose MMAs every warpgroup has waited for before it reached the barrier of the chunk before.
Without ``SCALED`` a chunk ends by waiting for all its MMAs; with it, a chunk's last MMA is waited for only
after the next chunk's first, past that chunk's barrier.

Needs Hopper (sm_90: ``wgmma``) and fp16/bf16 x; Triton's interpreter does not run Gluon, so the CPU
tests compile it for sm_90 instead (``tests/test_kernels.py``). ``w4a16.wgmma_matmul`` launches it and
imports this module on its first call: Gluon's import costs ``import qpass`` about 0.2 s.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from .common import asm_constant
from .int4_pairs import NIBBLE_PAIRS_OUT, bf16_nibble_pairs, f16_nibble_pairs

_STEP = gl.constexpr(64)  # rows of K a loop step
# Triton 3.6 calls the CTA barrier ``thread_barrier``, 3.9 ``barrier``
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.jit
def _add_split_sums(acc, offsets, mask, sums_ptr, count_ptr):
    """Add this program's float32 sums over its split of K into the workspace (``sums_ptr + offsets``, zero
    before the tile's first split) and count its arrival at the tile's count (``count_ptr``); returns how
    many of the tile's programs had arrived before it."""
    gl.atomic_add(sums_ptr + offsets, acc, mask=mask, sem="relaxed")
    _cta_barrier()  # every thread's additions are issued before the arrival is counted
    return gl.atomic_add(count_ptr, 1.0, sem="acq_rel")


@gluon.jit
def _take_split_total(offsets, mask, sums_ptr, count_ptr):
    """The tile's totals, for its last program to arrive; its part of the workspace and its count are left at
    zero for the next launch, so the workspace needs no zeroing of its own (``common.split_k_workspace``)."""
    total = gl.load(sums_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    gl.store(sums_ptr + offsets, gl.zeros_like(total), mask=mask)
    gl.store(count_ptr, 0.0)
    return total


# A word's 8 nibbles minus an fp16/bf16 zero (``$9``), exactly: the GEMV's nibble pairs (``w4a16``),
# their zero constants made from the zero in the block
_Q_MINUS_Z_F16 = asm_constant("""
        {
        .reg .b32 t, zz, ww, q0, q1, q2, q3, sixteenth;
        .reg .b16 c;
        mov.b32 sixteenth, 0x2C002C00;
        mov.b16 c, 0x6400;
        add.rn.f16 c, $9, c;
        mov.b32 zz, {c, c};
        mov.b16 c, 0xD400;
        sub.rn.f16 c, c, $9;
        mov.b32 ww, {c, c};""" + f16_nibble_pairs("$8", 1.0, "zz", "ww") + NIBBLE_PAIRS_OUT)
_Q_MINUS_Z_BF16 = asm_constant("""
        {
        .reg .b32 t1, t2, t3, zz, q0, q1, q2, q3, one;
        .reg .b16 c, m;
        mov.b32 one, 0x3F803F80;
        mov.b16 m, 0xBF80;
        mov.b16 c, 0xC300;
        fma.rn.bf16 c, $9, m, c;
        mov.b32 zz, {c, c};""" + bf16_nibble_pairs("$8", "zz") + NIBBLE_PAIRS_OUT)


@gluon.jit
def _dequantize(word, zero, BF16: gl.constexpr):
    """The 8 nibbles of ``word`` minus ``zero``, t = 0..7, exactly, in x's dtype: register pairs
    ``(t, t + 4)`` from one ``lop3`` each."""
    if BF16:
        values = gl.inline_asm_elementwise(_Q_MINUS_Z_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [word, zero],
                                           dtype=(gl.bfloat16,) * 8, is_pure=True, pack=1)
    else:
        values = gl.inline_asm_elementwise(_Q_MINUS_Z_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h", [word, zero],
                                           dtype=(gl.float16,) * 8, is_pure=True, pack=1)
    return values


@gluon.jit
def _scaled(v, scale):
    """``_dequantize``'s 8 values times ``scale``, in x's dtype (as a dequantized weight is rounded)."""
    return (v[0] * scale, v[1] * scale, v[2] * scale, v[3] * scale, v[4] * scale, v[5] * scale, v[6] * scale,
            v[7] * scale)


@gluon.jit
def _a_operand(words, zero, scale, A_LAYOUT: gl.constexpr, BF16: gl.constexpr, SCALED: gl.constexpr):
    """One step's words ``[BN, 2 (j2), 2 (j1), 2 (j0)]`` -> the MMA's left operand ``[BN, 64]`` in
    the module's order of K, times ``scale`` where ``SCALED``; each thread's registers stay its own
    (the layout change is a renaming)."""
    v = _dequantize(words, zero, BF16)
    if SCALED:
        v = _scaled(v, scale)
    low = gl.join(gl.join(v[0], v[4]), gl.join(v[1], v[5]))  # [BN, j2, j1, j0, t2, t0] for t1 = 0
    high = gl.join(gl.join(v[2], v[6]), gl.join(v[3], v[7]))
    r = gl.join(low, high)
    r = gl.permute(r, (0, 6, 5, 3, 1, 2, 4))  # [BN, j2, j1, j0, t2, t0, t1] -> [BN, t1, t0, j0, j2, j1, t2]
    return gl.convert_layout(gl.reshape(r, (r.shape[0], _STEP)), A_LAYOUT)


@gluon.jit
def _x_step(x_ptr, rows, columns, m0, k0, M, stride_xm):
    """x's rows m0 + ``rows``, K k0 to k0 + 64, in the A operand's order of K."""
    x = gl.load(x_ptr + (m0 + rows)[:, None] * stride_xm + k0 + columns[None, :], mask=(m0 + rows < M)[:, None],
                other=0.0)
    x = gl.reshape(x, (x.shape[0], 2, 2, 2, 2, 2, 2))  # [BM, j2, j1, j0, t2, t1, t0]
    x = gl.permute(x, (0, 5, 6, 3, 1, 2, 4))  # [BM, t1, t0, j0, j2, j1, t2]
    return gl.reshape(x, (x.shape[0], _STEP))


@gluon.jit
def _group_scale(s_ptr, group, stride_sg, columns, spread, acc_columns, SCALED: gl.constexpr):
    """A group's scales: spread over the word tile where ``SCALED`` (they multiply the weights), else by
    the accumulator's columns (they multiply the group's products)."""
    if SCALED:
        scale = gl.load(s_ptr + group * stride_sg + columns)[:, None, None, None] + spread
    else:
        scale = gl.load(s_ptr + group * stride_sg + acc_columns)
    return scale


@gluon.jit
def _chunk_loads(w_ptrs, z_ptr, s_ptr, x_ptr, chunk, last, stride_qk, stride_sg, columns, spread, acc_columns, x_rows,
                 x_columns, m0, M, stride_xm, GROUP_SIZE: gl.constexpr, SCALED: gl.constexpr):
    """All that chunk ``min(chunk, last)`` reads: its two steps' words, their groups' zeros (spread over
    the word tile) and scales (``_group_scale``), and their x in the A operand's order of K."""
    step = 2 * gl.minimum(chunk, last)
    group = step * _STEP // GROUP_SIZE
    zero_a = gl.load(z_ptr + group * stride_sg + columns)[:, None, None, None] + spread
    scale_a = _group_scale(s_ptr, group, stride_sg, columns, spread, acc_columns, SCALED)
    if GROUP_SIZE == _STEP:  # the chunk's second step is a group of its own
        zero_b = gl.load(z_ptr + (group + 1) * stride_sg + columns)[:, None, None, None] + spread
        scale_b = _group_scale(s_ptr, group + 1, stride_sg, columns, spread, acc_columns, SCALED)
    else:
        zero_b = zero_a
        scale_b = scale_a
    words_a = gl.load(w_ptrs + step * 8 * stride_qk)
    words_b = gl.load(w_ptrs + (step + 1) * 8 * stride_qk)
    x_a = _x_step(x_ptr, x_rows, x_columns, m0, step * _STEP, M, stride_xm)
    x_b = _x_step(x_ptr, x_rows, x_columns, m0, (step + 1) * _STEP, M, stride_xm)
    return words_a, words_b, zero_a, zero_b, scale_a, scale_b, x_a, x_b


@gluon.jit
def _mma_step(words, zero, scale, x_stage, part, a_in_flight, A_LAYOUT: gl.constexpr, BF16: gl.constexpr,
              SCALED: gl.constexpr):
    """``part`` += the step's dequantized words times its x (asynchronously). Returns ``part`` and the
    operand now in flight, whose registers must outlive its MMAs."""
    a = _a_operand(words, zero, scale, A_LAYOUT, BF16, SCALED)
    part = warpgroup_mma(a, x_stage.permute((1, 0)), part, is_async=True)
    # the MMAs before are done: the operand before's registers are free
    part, a_in_flight = warpgroup_mma_wait(num_outstanding=1, deps=[part, a_in_flight])
    return part, a


@gluon.jit
def _store_tile(tile, rows, cols, mask, N, b_ptr, out_ptr, stride_om, HAS_BIAS: gl.constexpr):
    """A float32 ``tile`` plus the bias of its columns, cast and stored at ``out[rows, cols]`` (index tensors
    broadcasting to the tile's shape, ``mask`` its shape)."""
    if HAS_BIAS:
        tile = tile + gl.load(b_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)
    gl.store(out_ptr + rows * stride_om + cols, tile.to(out_ptr.dtype.element_ty), mask=mask)


@gluon.jit
def _word_columns(columns, stride_qt, TILE: gl.constexpr):
    """Where ``columns`` lie in a word row: ``common.word_offsets`` with unit column stride, for Gluon."""
    if TILE == 0:
        return columns
    return (columns // TILE) * stride_qt + columns % TILE


@gluon.jit
def w4a16_wgmma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, sums_ptr, M, N, K, stride_xm, stride_qk,
                       stride_qt, stride_sg, stride_om, TILE: gl.constexpr, GROUP_SIZE: gl.constexpr,
                       BLOCK_M: gl.constexpr,
                       WARPGROUPS: gl.constexpr, SPLIT_K: gl.constexpr, HAS_BIAS: gl.constexpr,
                       BF16: gl.constexpr, SCALED: gl.constexpr):
    """out = x @ W (+ bias [N]) for BLOCK_M rows (program_id 1) by 64 * WARPGROUPS weight columns
    (program_id 0) over a SPLIT_K-th of K's chunks (program_id 2). Split, the float32 sums meet in the
    workspace ``sums_ptr`` (``[M, N]`` sums, then a count per output tile; ``common.split_k_workspace``), and the
    tile's last program stores the result."""
    BN: gl.constexpr = 64 * WARPGROUPS
    WARPS: gl.constexpr = 4 * WARPGROUPS
    DTYPE: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
    # the word tile [BN, j2, j1, j0]: thread (warp w, lane 4 g + c) holds columns 16 w + g and
    # 16 w + g + 8, word rows 2 c and 2 c + 1 (j1 + 2 j2 = c)
    if WARPGROUPS == 1:
        warp_bases: gl.constexpr = [[16, 0, 0, 0], [32, 0, 0, 0]]
    else:
        warp_bases: gl.constexpr = [[16, 0, 0, 0], [32, 0, 0, 0], [64, 0, 0, 0]]
    WORDS: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 0, 1], [8, 0, 0, 0]],
        lane_bases=[[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
        warp_bases=warp_bases, block_bases=[], shape=[BN, 2, 2, 2])
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, BLOCK_M, 16])
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    X_LOAD: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                            warps_per_cta=[WARPS, 1], order=[1, 0])
    X_SHARED: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

    n0 = gl.program_id(0) * BN
    m0 = gl.program_id(1) * BLOCK_M
    chunks = K // (2 * _STEP)
    per_split = gl.cdiv(chunks, SPLIT_K)
    start = gl.program_id(2) * per_split
    end = gl.minimum(start + per_split, chunks)  # (no chunks left: end <= start)
    last = gl.maximum(end - 1, gl.minimum(start, chunks - 1))  # the last chunk loads may touch

    rows = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, WORDS))))
    j2 = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, WORDS))))
    j1 = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, WORDS))))
    j0 = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, WORDS))))
    columns = gl.minimum(n0 + rows, N - 1)  # past N: read column N - 1, never stored
    word_rows = 4 * j2[None, :, None, None] + 2 * j1[None, None, :, None] + j0[None, None, None, :]
    w_ptrs = qw_ptr + word_rows * stride_qk + _word_columns(columns, stride_qt, TILE)[:, None, None, None]
    spread = gl.zeros([BN, 2, 2, 2], DTYPE, WORDS)
    acc_columns = gl.minimum(n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA)), N - 1)
    x_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, X_LOAD))
    x_columns = gl.arange(0, _STEP, layout=gl.SliceLayout(0, X_LOAD))

    # x's chunks in two stages each, the MMAs reading some while the next is stored
    X_BUFFERS: gl.constexpr = 3 if SCALED else 2
    xs = gl.allocate_shared_memory(DTYPE, [2 * X_BUFFERS, BLOCK_M, _STEP], X_SHARED)
    acc = gl.zeros([BN, BLOCK_M], gl.float32, MMA)
    a_in_flight = gl.zeros([BN, _STEP], DTYPE, A_LAYOUT)
    loads = _chunk_loads(w_ptrs, z_ptr, s_ptr, x_ptr, start, last, stride_qk, stride_sg, columns, spread,
                         acc_columns, x_rows, x_columns, m0, M, stride_xm, GROUP_SIZE, SCALED)
    for chunk in range(start, end):
        words_a, words_b, zero_a, zero_b, scale_a, scale_b, x_a, x_b = loads
        stage = 2 * ((chunk - start) % X_BUFFERS)
        # the MMAs of the chunk that last read these stages are done (see the module's docstring)
        xs.index(stage).store(x_a)
        xs.index(stage + 1).store(x_b)
        fence_async_shared()
        _cta_barrier()
        # the next chunk's loads in flight under this one's dequantization and MMAs
        loads = _chunk_loads(w_ptrs, z_ptr, s_ptr, x_ptr, chunk + 1, last, stride_qk, stride_sg, columns, spread,
                             acc_columns, x_rows, x_columns, m0, M, stride_xm, GROUP_SIZE, SCALED)
        if SCALED:
            acc, a_in_flight = _mma_step(words_a, zero_a, scale_a, xs.index(stage), acc, a_in_flight, A_LAYOUT,
                                         BF16, SCALED)
            acc, a_in_flight = _mma_step(words_b, zero_b, scale_b, xs.index(stage + 1), acc, a_in_flight, A_LAYOUT,
                                         BF16, SCALED)
        else:
            # the products of the exact q - z, scaled once a group in float32
            part = gl.zeros([BN, BLOCK_M], gl.float32, MMA)
            part, a_in_flight = _mma_step(words_a, zero_a, scale_a, xs.index(stage), part, a_in_flight, A_LAYOUT,
                                          BF16, SCALED)
            if GROUP_SIZE == _STEP:
                part = warpgroup_mma_wait(num_outstanding=0, deps=[part])
                acc += part * scale_a.to(gl.float32)[:, None]
                part = gl.zeros([BN, BLOCK_M], gl.float32, MMA)
            part, a_in_flight = _mma_step(words_b, zero_b, scale_b, xs.index(stage + 1), part, a_in_flight, A_LAYOUT,
                                          BF16, SCALED)
            part = warpgroup_mma_wait(num_outstanding=0, deps=[part])
            acc += part * scale_b.to(gl.float32)[:, None]
    if SCALED:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])

    # the output tile along N, its contiguous dimension: stored so, and read back so where K is split
    OUT: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32, 1],
                                         warps_per_cta=[1, WARPS], order=[0, 1])
    cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, OUT))[:, None]
    rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, OUT))[None, :]
    in_bounds = (cols < N) & (rows < M)
    if SPLIT_K > 1:
        an = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))[:, None]
        am = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))[None, :]
        count_ptr = sums_ptr + M * N + gl.program_id(1) * gl.num_programs(0) + gl.program_id(0)
        if _add_split_sums(acc, am * N + an, (an < N) & (am < M), sums_ptr, count_ptr) == SPLIT_K - 1:
            total = _take_split_total(rows * N + cols, in_bounds, sums_ptr, count_ptr)
            _store_tile(total, rows, cols, in_bounds, N, b_ptr, out_ptr, stride_om, HAS_BIAS)
    else:
        _store_tile(gl.convert_layout(acc, OUT), rows, cols, in_bounds, N, b_ptr, out_ptr, stride_om, HAS_BIAS)
