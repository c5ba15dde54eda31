"""W4A16 for 33 to 256 rows on Hopper: x by TMA, the weights dequantized into shared memory, ``wgmma``
from shared memory on both sides, in Gluon; to 128 rows the weights in registers instead (below).

The layout is ``w4a16.py``'s (``qweight`` int32 ``[K // 8, N]``, row k in nibble k % 8, or in column tiles;
``scales``/``zeros`` ``[K // group_size, N]``), read as it is. A program computes a
``[BLOCK_M, BLOCK_N]`` tile of the output, the product in its natural orientation: x's rows are the
MMA's M side, the left operand, the weight columns its N side.

Past 64 rows the register-fed kernel (``w4a16_wgmma``) runs out of registers: its x goes through
registers on its way to shared memory, and the accumulator grows with the rows. Here

- x's tile of a K step (64 rows of K) is copied by the TMA unit into a ring of ``STAGES`` shared buffers,
  K in its natural order, each stage signalled by an mbarrier: no registers, no thread's time;
- a step's words, 8 word rows by ``BLOCK_N`` columns, are loaded two steps ahead, dequantized and scaled
  in x's dtype (``_weight_tile``: the GEMV's ``lop3`` pairs, as a dequantized weight would be rounded),
  and stored K-major, one 16-byte store a word, into a ring of three shared buffers;
- the step's ``wgmma`` reads both tiles from shared memory and stays in flight while the next step is
  dequantized (``warpgroup_mma_wait`` for one pending).

Order between the threads, the TMA unit and the MMAs. A step's weight tile is written by every thread
and read by every warpgroup's MMAs, so a fence (generic to async proxy) and a CTA barrier separate the
stores from the MMAs. Past that barrier every warpgroup has waited for the MMAs of the step two back,
so that step's x stage takes the step ``STAGES - 2`` ahead, and its weight buffer, the third, is free
for the next step's stores.

The fence waits for every load the thread has in flight (``MEMBAR.ALL.CTA`` in the SASS), so the next
step's word loads are issued after it, not before (H200, fp16, 4096x28672 at 2048 rows: 968 us against
1042 with the loads before the fence).

**Warp-specialized** (``w4a16_wgmma_tma_ws_kernel``, 129 to 256 rows): the same product with each job in
warps of its own, ``STAGES`` steps deep. A loader warp copies each step's x, words, scales and zeros into
the step's stage by TMA once the stage's MMAs are done (``_loader``); ``DEQUANT_WARPS`` warps turn the
stage's words into its weight tile (``_dequantizer``); the kernel's ``num_warps`` run the MMAs, one in
flight, and release a stage when its MMAs are done (``_mma_consumer``). Every global read is a TMA copy:
the fence after the weight tile's stores waits for the thread's loads in flight, so words loaded into
registers ahead of their step would be waited for at every step (H200, fp16, 4096x28672 at 128 rows: 90.1
us with three steps' words in registers, 77.5 by TMA). One CTA an SM (its partitions share the registers):
past 128 rows it beats the kernel above (27.6 / 37.6 / 115.3 / 58.5 us against 28.4 / 40.5 / 129.3 / 67.1
at 256 rows on 4096², 4096x6144, 4096x28672, 14336x4096); at 128 rows, with two of those an SM, it does
not (bench/NOTES-kernels.md, forty-fourth session).

**A tail split** (``TAIL``, ``_tail_program_tile``): where the tiles make a whole wave and part of a second, the
warp-specialized kernel runs the first as whole columns of whole tiles (a grid of one dimension, rows first) and splits
K in the tiles of the columns after them, so that the part wave becomes a whole one of shorter programs; their sums are
added into float32 sums of those columns only, which one launch after finishes (``w4a16.wgmma_tma_matmul``). H100,
fp16, us, unsplit in two waves -> tail split: 4096x6144 at 1024 rows 98.7 -> 94.4, 14336x4096 at 1152 rows 336.9 ->
244.0, 8192² at 768 rows 203.6 -> 171.4 (bench/NOTES-kernels.md, seventieth session; ``w4a16._wgmma_tma_tail``).

**The weights in registers** (``w4a16_wgmma_tma_rs_kernel``, 33 to 128 rows): the product transposed, as the
register-fed kernel (``w4a16_wgmma``) computes it, the weights wgmma's left operand in registers, one warpgroup on
64 weight columns and x's rows the MMA's N side, but with every operand copied by TMA, ``STAGES`` steps ahead, and
no shared store, fence or barrier between the dequantization and the MMA. That kernel permutes K so that a thread
dequantizes whole words, and so must move x through registers into shared memory in that order; here x stays in
K's natural order, as the TMA copies it, and each lane of a quad takes one byte (two nibbles) of each of its 16
words a step, its A fragment's K positions exactly. H200, fp16, us at 128 rows, the single-partition kernel -> this:
19.24 / 25.96 / 73.25 / 41.63 -> 16.93 / 20.51 / 70.14 / 35.78 on 4096², 4096x6144, 4096x28672, 14336x4096
(bench/NOTES-kernels.md, fifty-fourth session).

**Warp-specialized, the weights in registers** (``w4a16_wgmma_tma_rs_ws_kernel``): the same, with a loader warp of
its own issuing the copies as the warpgroup frees each stage (an mbarrier arrival), so the warpgroup's step has no
fence + CTA barrier + copies before the next. Its partitions take 8 warps (the loader's padded to a warpgroup), two
programs an SM at ``w4a16.RS_WS_REGISTERS``; ``w4a16._wgmma_registers_config`` picks it where a split keeps its
programs within one such wave. H200, fp16, us, the op, the kernel above -> this: 4096² at 64 / 128 rows 12.48 / 16.65
-> 11.32 / 15.88, 14336x4096 24.57 / 36.00 -> 23.18 / 33.16 (bench/NOTES-kernels.md, sixty-second session). On
256-row tiles its accumulator takes one program an SM (``w4a16.RS_WS_256_REGISTERS``), which
``w4a16._register_fed_one_wave`` picks from 129 to 512 rows where its programs fill most of one wave.

**x past its last row.** Where a tile of the two kernels below reaches far past x's last row (``w4a16.x_in_halves``:
24 rows or more with the weights in registers, all its second half but a sixteenth warp-specialized), the TMA,
which zero-fills a box's rows past its tensor, copies it slowly enough to stall the steps (H200, fp16, 4096x28672
at 65 rows: 91.3 us against 49.5 at 64). There x is copied in two boxes of half the tile's rows instead
(``X_HALVES``: the launch gives ``x_half_desc`` such boxes, else it is ``x_desc``), each moved back to end within x
(``_x_halves``): 64.1 us. Their rows before the tile's, or the first half's again, are not stored.

**Launched with programmatic dependent launch** (the warp-specialized register-fed kernel, ``_first_copies``), as
the GEMV and the warp-level MMA kernel are: a program may start while the grid before it on the stream finishes,
issues its first stages' copies of the words, scales and zeros (which no kernel writes), and only then waits for that
grid (``griddepcontrol.wait``, after which its writes are visible to the whole grid) and copies x. The loader warp
alone waits: the warpgroup reads nothing a kernel writes before x's copies have landed, and writes nothing before then
either. H100, fp16, the op, us: 4096² at 64 / 128 rows 10.68 / 15.20 -> 10.11 / 14.07, 14336x4096 23.78 / 33.47 ->
23.32 / 32.27. The single-partition kernel lost with it where it runs (4096x6144 at 64 rows 14.62 -> 19.84 us,
4096x28672 48.79 -> 65.69; bench/NOTES-kernels.md, sixty-sixth session), and keeps its plain launch.

**The tile written by the TMA unit** (``_finish_tile``, all but the first kernel): the program's tile goes through
shared memory (the stages' space, free by then) and leaves in bulk copies, whole 128-byte rows, where the threads'
stores in the MMA's layout each wrote 4 bytes of a row (64 such stores a thread at 256 x 128), with nothing after
them to hide under where the programs fill one wave. H100, fp16, the op, us (bench/NOTES-kernels.md, sixty-ninth
session): 4096² at 1024 rows 58.22 -> 51.95 (cuBLAS 51.94), 4096x28672 at 256 rows 110.83 -> 104.61, at 128 rows
62.89 -> 62.02. K may be split over programs (``SPLIT_K``), whose float32 sums are added into a float32 output that is
zero before (the caller's to finish), so by the TMA unit too, one bulk reduction a block of the tile, where the
threads' 64 atomic instructions each held the warpgroup's epilogue at about 40% of its warps' stall samples (ncu,
4096² at 128 rows, split 4). H100, fp16, the op, us: the register-fed kernels at 128 rows split 4, 4096² 16.28 ->
15.20, 4096x6144 22.73 -> 20.07, 14336x4096 34.88 -> 33.47 (within 4% either way at 48-96 rows; sixty-sixth
session); the warp-specialized one at 256 rows, split 4, 4096² 27.05 -> 25.01, 14336x4096 57.96 -> 55.79 (sixty-ninth).
Where x is copied in halves and K is not split, the threads store the tile (``_store_tile``): a half's rows before
the tile's are another program's. Needs Hopper
(sm_90: TMA, ``wgmma``) and fp16/bf16 x; the CPU tests compile it for sm_90 (``tests/test_kernels.py``).
``w4a16.wgmma_tma_launch`` launches it and imports this module on its first call.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton._C.libtriton import ir
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .common import asm_constant
from .w4a16_wgmma import _cta_barrier, _dequantize, _scaled, _word_columns

_STEP = gl.constexpr(64)  # rows of K a loop step
_WEIGHT_BUFFERS = gl.constexpr(3)  # see the module's docstring
# a dequantizing thread's registers in the warp-specialized kernel: its words, zeros, scales and 8 values a word
# without spilling; the MMAs' warps take what the CTA has left
_DEQUANT_REGISTERS = gl.constexpr(128)
# Triton 3.9 calls the TMA copies ``async_load`` and ``async_store``, 3.6 ``async_copy_global_to_shared`` and
# ``async_copy_shared_to_global``
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global


@gluon.jit
def _split_steps(K, parts, part):
    """The steps of 64 rows of K of split ``part`` of ``parts``, ``[start, end)``: ``end <= start`` where none is
    left."""
    steps = K // _STEP
    per_split = gl.cdiv(steps, parts)
    start = part * per_split
    return start, gl.minimum(start + per_split, steps)


@gluon.jit
def _step_loads(w_ptrs, z_ptr, s_ptr, step, last, stride_qk, stride_sg, columns, spread, GROUP_SIZE: gl.constexpr):
    """What step ``min(step, last)`` reads: its 8 word rows and its group's zeros and scales, spread over
    the word tile."""
    step = gl.minimum(step, last)
    group = step * _STEP // GROUP_SIZE
    words = gl.load(w_ptrs + step * 8 * stride_qk)
    zero = gl.load(z_ptr + group * stride_sg + columns)[:, None] + spread
    scale = gl.load(s_ptr + group * stride_sg + columns)[:, None] + spread
    return words, zero, scale


@gluon.jit
def _weight_tile(words, zero, scale, BF16: gl.constexpr):
    """Words ``[BLOCK_N, 8 word rows]`` -> the weights ``[BLOCK_N, 64]``, scaled, K in its natural order
    (each thread's 8 nibbles of a word become 8 contiguous values)."""
    v = _scaled(_dequantize(words, zero, BF16), scale)
    low = gl.join(gl.join(v[0], v[1]), gl.join(v[2], v[3]))  # [BLOCK_N, j, t0, t1] for t2 = 0
    high = gl.join(gl.join(v[4], v[5]), gl.join(v[6], v[7]))
    r = gl.permute(gl.join(low, high), (0, 1, 4, 3, 2))  # [BLOCK_N, j, t2, t1, t0]: k = 8 j + t
    return gl.reshape(r, (r.shape[0], _STEP))


@gluon.jit
def _x_halves(m0, M, BLOCK_M: gl.constexpr):
    """The first rows of x in the two halves of the tile at row ``m0`` where x is copied in half tiles
    (``X_HALVES``): ``m0`` and ``m0 + BLOCK_M / 2``, each moved back to end within x (its rows before ``m0``, or the
    first half's again, are not stored: ``_store_tile``)."""
    inside = gl.maximum(M - BLOCK_M // 2, 0)  # the last row a half's box may start at
    return gl.minimum(m0, inside), gl.minimum(m0 + BLOCK_M // 2, inside)


@gluon.jit
def _program_tile(M, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr):
    """The TMA kernels' program: its tile's first column and row, the rows its x halves start at (``_x_halves``)
    and its steps of K."""
    n0 = gl.program_id(0) * BLOCK_N
    m0 = gl.program_id(1) * BLOCK_M
    lo, hi = _x_halves(m0, M, BLOCK_M)
    start, end = _split_steps(K, SPLIT_K, gl.program_id(2))
    return n0, m0, lo, hi, start, end


@gluon.jit
def _tail_program_tile(M, K, tail_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SPLIT_K: gl.constexpr):
    """``_program_tile`` where K is split only in the tail, the tiles from column ``tail_n`` on (a grid of one
    dimension): first the tiles before it, whole, by rows within each column of tiles, so that the first wave is
    whole columns of whole tiles; then each tail tile as SPLIT_K programs, a split of its steps each. Also whether
    the program's tile is the tail's."""
    row_tiles = gl.cdiv(M, BLOCK_M)
    whole = row_tiles * (tail_n // BLOCK_N)
    program = gl.program_id(0)
    tail = program >= whole
    if tail:
        tile = whole + (program - whole) // SPLIT_K
        start, end = _split_steps(K, SPLIT_K, (program - whole) % SPLIT_K)
    else:
        tile = program
        start, end = _split_steps(K, 1, 0)
    m0 = tile % row_tiles * BLOCK_M
    lo, hi = _x_halves(m0, M, BLOCK_M)
    return tile // row_tiles * BLOCK_N, m0, lo, hi, start, end, tail


@gluon.jit
def _copy_x(x_desc, x_half_desc, bar, dst, m0, lo, hi, k, pred):
    """x's rows of the tile at ``m0`` from column ``k`` into ``dst`` by TMA, where ``pred``: one box, or where x is
    copied in halves (``X_HALVES``) two, from ``lo`` and ``hi`` (``_x_halves``). (Told by the descriptors' types,
    as constants: Gluon builds a partition from an argument tuple's constexprs as values, so a flag built both forms,
    and Triton 3.9 refuses the half boxes of ``x_desc`` that the form not taken would copy.)"""
    HALF: gl.constexpr = x_half_desc.block_type.shape[0]
    if HALF < dst.type.shape[0]:
        _tma_load(x_half_desc, [lo, k], bar, dst.slice(0, HALF), pred=pred)
        _tma_load(x_half_desc, [hi, k], bar, dst.slice(HALF, HALF), pred=pred)
    else:
        _tma_load(x_desc, [m0, k], bar, dst, pred=pred)


@gluon.jit
def _tile_rows(r, m0, M, BLOCK_M: gl.constexpr, X_HALVES: gl.constexpr, lo, hi):
    """Rows ``r`` of the tile at ``m0`` (with ``X_HALVES``, its halves' rows from ``lo`` and ``hi``, ``_x_halves``):
    their rows of x, and whether each is the tile's and stored (once)."""
    if X_HALVES:
        HALF: gl.constexpr = BLOCK_M // 2
        om = gl.where(r < HALF, lo + r, hi + r - HALF)
        return om, (om >= m0) & (om < M) & ((r < HALF) | (om >= lo + HALF))
    om = m0 + r
    return om, om < M


@gluon.jit
def _with_bias(acc, b_ptr, n0, N):
    """The sums ``acc`` of the tile at columns ``n0`` plus the bias ``[N]``."""
    on = n0 + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, acc.type.layout))
    return acc + gl.load(b_ptr + on, mask=on < N, other=0.0).to(gl.float32)[None, :]


@gluon.jit
def _store_tile(acc, out_ptr, b_ptr, m0, n0, M, N, stride_om, SPLIT_K: gl.constexpr, HAS_BIAS: gl.constexpr,
                DTYPE: gl.constexpr, X_HALVES: gl.constexpr = False, lo=0, hi=0):
    """The program's sums ``acc`` for the tile of x's rows at ``m0`` (``_tile_rows``), columns ``n0``, by the threads:
    added into the float32 output where K is split, else with the bias and in x's dtype."""
    r = gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, acc.type.layout))
    on = n0 + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, acc.type.layout))
    om, rows = _tile_rows(r, m0, M, acc.shape[0], X_HALVES, lo, hi)
    mask = rows[:, None] & (on[None, :] < N)
    if SPLIT_K > 1:
        gl.atomic_add(out_ptr + om[:, None] * stride_om + on[None, :], acc, mask=mask, sem="relaxed")
    else:
        if HAS_BIAS:
            acc = _with_bias(acc, b_ptr, n0, N)
        gl.store(out_ptr + om[:, None] * stride_om + on[None, :], acc.to(DTYPE), mask=mask)


if hasattr(tma, "async_atomic_add"):
    _tma_add = tma.async_atomic_add
else:  # Triton 3.6's Gluon has the op in its builder only
    @builtin
    def _tma_add(tensor_desc, coord, src, _semantic=None):
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                  src.handle)


@gluon.jit
def _tile_by_tma(tile, desc, m0, n0, M, ADD: gl.constexpr, X_HALVES: gl.constexpr, lo, hi):
    """The program's ``tile`` (at ``m0``, columns ``n0``) through shared memory, written by the TMA unit in blocks of
    ``desc`` (the tile's rows, or half of them with ``X_HALVES``, by 128 bytes of columns); rows and columns past the
    tensor are not written. ``ADD``: float32 sums added into the split sums, rows not the tile's zeroed, one bulk
    reduction a block instead of an atomic instruction an element; else stored, in whole rows of 128 bytes where the
    threads' stores would write 4 bytes a row each (not with ``X_HALVES``: its rows not the tile's would be
    overwritten)."""
    BLOCK_M: gl.constexpr = tile.shape[0]
    BOX_M: gl.constexpr = desc.block_type.shape[0]
    BOX_N: gl.constexpr = desc.block_type.shape[1]
    if ADD:
        _, rows = _tile_rows(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, tile.type.layout)), m0, M, BLOCK_M,
                             X_HALVES, lo, hi)
        tile = gl.where(rows[:, None], tile, 0.0)
    staged = gl.allocate_shared_memory(desc.dtype, tile.shape, desc.layout)
    staged.store(tile)
    fence_async_shared()
    for i in gl.static_range(BLOCK_M // BOX_M):
        row = m0
        if X_HALVES:
            row = lo if i == 0 else hi
        for j in gl.static_range(tile.shape[1] // BOX_N):
            block = staged.slice(i * BOX_M, BOX_M, dim=0).slice(j * BOX_N, BOX_N, dim=1)
            if ADD:
                _tma_add(desc, [row, n0 + j * BOX_N], block)
            else:
                _tma_store(desc, [row, n0 + j * BOX_N], block)
    tma.store_wait(0)


@gluon.jit
def _finish_tile(acc, out_ptr, tile_desc, b_ptr, m0, n0, M, N, stride_om, SPLIT_K: gl.constexpr,
                 HAS_BIAS: gl.constexpr, DTYPE: gl.constexpr, X_HALVES: gl.constexpr, lo, hi):
    """The TMA kernels' sums ``acc`` ``[BLOCK_M, BLOCK_N]`` into the output by the TMA unit (``_tile_by_tma``,
    ``tile_desc``: ``w4a16.wgmma_tma_launch``): added into the float32 sums where K is split, else with the bias
    and in x's dtype; stored by the threads (``_store_tile``) where x is copied in halves and K is not split."""
    if SPLIT_K > 1:
        _tile_by_tma(acc, tile_desc, m0, n0, M, True, X_HALVES, lo, hi)
    elif X_HALVES:
        _store_tile(acc, out_ptr, b_ptr, m0, n0, M, N, stride_om, SPLIT_K, HAS_BIAS, DTYPE, X_HALVES, lo, hi)
    else:
        if HAS_BIAS:
            acc = _with_bias(acc, b_ptr, n0, N)
        _tile_by_tma(acc.to(DTYPE), tile_desc, m0, n0, M, False, X_HALVES, lo, hi)


@gluon.jit
def _stage_buffers(x_desc, w_desc, s_desc, z_desc, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Shared memory for ``STAGES`` steps of what the TMA copies: x ``[BLOCK_M, 64]``, the words (a ``w_desc``
    block), the scales and the zeros ``[1, BLOCK_N]``."""
    DTYPE: gl.constexpr = x_desc.dtype
    xs = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_M, _STEP], x_desc.layout)
    wq = gl.allocate_shared_memory(gl.int32, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    ss = gl.allocate_shared_memory(DTYPE, [STAGES, 1, BLOCK_N], s_desc.layout)
    zs = gl.allocate_shared_memory(DTYPE, [STAGES, 1, BLOCK_N], z_desc.layout)
    return xs, wq, ss, zs


@gluon.jit
def w4a16_wgmma_tma_kernel(x_desc, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, stride_qk, stride_qt, stride_sg,
                           stride_om, TILE: gl.constexpr, GROUP_SIZE: gl.constexpr, BLOCK_M: gl.constexpr,
                           BLOCK_N: gl.constexpr,
                           STAGES: gl.constexpr, SPLIT_K: gl.constexpr, HAS_BIAS: gl.constexpr,
                           BF16: gl.constexpr, num_warps: gl.constexpr):
    """out = x @ W (+ bias [N]) for BLOCK_N weight columns (program_id 0) by BLOCK_M rows of x (program_id
    1, read through ``x_desc``, a TMA descriptor of blocks ``[BLOCK_M, 64]``) over a SPLIT_K-th of K's
    steps (program_id 2; split, the float32 sums are added into ``out``, zero before, and the bias left to
    the caller)."""
    DTYPE: gl.constexpr = gl.bfloat16 if BF16 else gl.float16
    # a thread holds whole words: lanes along the columns (coalesced), warps over columns and word rows
    WORDS: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32, 1],
                                           warps_per_cta=[BLOCK_N // 32, num_warps // (BLOCK_N // 32)],
                                           order=[0, 1])
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    W_SHARED: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    X_BYTES: gl.constexpr = BLOCK_M * _STEP * 2

    n0 = gl.program_id(0) * BLOCK_N
    m0 = gl.program_id(1) * BLOCK_M
    start, end = _split_steps(K, SPLIT_K, gl.program_id(2))
    last = gl.maximum(end - 1, gl.minimum(start, K // _STEP - 1))  # the last step loads may touch

    columns = gl.minimum(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WORDS)), N - 1)  # past N: never stored
    word_rows = gl.arange(0, 8, layout=gl.SliceLayout(0, WORDS))
    w_ptrs = qw_ptr + word_rows[None, :] * stride_qk + _word_columns(columns, stride_qt, TILE)[:, None]
    spread = gl.zeros([BLOCK_N, 8], DTYPE, WORDS)

    xs = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_M, _STEP], x_desc.layout)  # (as the TMA writes it)
    ws = gl.allocate_shared_memory(DTYPE, [_WEIGHT_BUFFERS, BLOCK_N, _STEP], W_SHARED)
    x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(x_ready.index(s), count=1)
    fence_async_shared()
    for s in gl.static_range(STAGES - 2):
        mbarrier.expect(x_ready.index(s), X_BYTES, pred=start + s < end)
        _tma_load(x_desc, [m0, (start + s) * _STEP], x_ready.index(s), xs.index(s), pred=start + s < end)

    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, MMA)
    now = _step_loads(w_ptrs, z_ptr, s_ptr, start, last, stride_qk, stride_sg, columns, spread, GROUP_SIZE)
    ahead = _step_loads(w_ptrs, z_ptr, s_ptr, start + 1, last, stride_qk, stride_sg, columns, spread, GROUP_SIZE)
    for step in range(start, end):
        i = step - start
        words, zero, scale = now
        now = ahead
        w = ws.index(i % _WEIGHT_BUFFERS)
        w.store(_weight_tile(words, zero, scale, BF16))
        fence_async_shared()
        _cta_barrier()
        ahead = _step_loads(w_ptrs, z_ptr, s_ptr, step + 2, last, stride_qk, stride_sg, columns, spread,
                            GROUP_SIZE)
        # every warpgroup has waited for step i - 2's MMAs: its x stage takes step i + STAGES - 2
        refill = (i + STAGES - 2) % STAGES
        mbarrier.expect(x_ready.index(refill), X_BYTES, pred=step + STAGES - 2 < end)
        _tma_load(x_desc, [m0, (step + STAGES - 2) * _STEP], x_ready.index(refill), xs.index(refill),
                  pred=step + STAGES - 2 < end)
        mbarrier.wait(x_ready.index(i % STAGES), (i // STAGES) & 1)
        acc = warpgroup_mma(xs.index(i % STAGES), w.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
    acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(x_ready.index(s))

    _store_tile(acc, out_ptr, b_ptr, m0, n0, M, N, stride_om, SPLIT_K, HAS_BIAS, DTYPE)


# The two worker partitions below take the same arguments (Gluon would take different ones); each reads its own.
@gluon.jit
def _loader(x_desc, x_half_desc, w_desc, s_desc, z_desc, xs, wq, ss, zs, ws, loaded, w_ready, empty, n0, m0, lo, hi,
            start, end, word_run, GROUP_SIZE: gl.constexpr):
    """One warp: a step's x, words, scales and zeros into its stage by TMA once the stage's MMAs are done."""
    stages: gl.constexpr = xs.type.shape[0]
    BLOCK_N: gl.constexpr = ws.type.shape[1]
    BYTES: gl.constexpr = xs.type.shape[1] * _STEP * 2 + BLOCK_N * 8 * 4 + 2 * BLOCK_N * 2
    run, first_column = n0 // word_run, n0 % word_run
    for step in range(start, end):
        i = step - start
        s = i % stages
        bar = loaded.index(s)
        mbarrier.wait(empty.index(s), ((i // stages) & 1) ^ 1)
        mbarrier.expect(bar, BYTES)
        _copy_x(x_desc, x_half_desc, bar, xs.index(s), m0, lo, hi, step * _STEP, True)
        _tma_load(w_desc, [run, step * 8, first_column], bar, wq.index(s))
        group = step * _STEP // GROUP_SIZE
        _tma_load(s_desc, [group, n0], bar, ss.index(s))
        _tma_load(z_desc, [group, n0], bar, zs.index(s))


@gluon.jit
def _dequantizer(x_desc, x_half_desc, w_desc, s_desc, z_desc, xs, wq, ss, zs, ws, loaded, w_ready, empty, n0, m0,
                 lo, hi, start, end, word_run, GROUP_SIZE: gl.constexpr):
    """The weights' partition: each step's words, scales and zeros from their stage into the step's weight
    tile, dequantized and scaled. A tile is signalled to the MMAs (fence, arrival) only after the next tile's
    arithmetic, so that the fence finds its stores done: waiting them out right after storing held the MMAs back
    (H100, 14336x4096 at 1024 rows under ncu: 282.8 K -> 272.9 K cycles; bench/NOTES-kernels.md, ninety-seventh
    session). The partition runs about a step ahead of the MMAs, so the later signal holds them back only at the
    first step (1024 rows, the kernel in turns: 4096² 54.38 -> 54.75 us, 14336x4096 190.21 -> 184.77)."""
    DTYPE: gl.constexpr = ws.dtype
    WARPS: gl.constexpr = gl.num_warps()
    BLOCK_N: gl.constexpr = ws.type.shape[1]
    RUNS: gl.constexpr = wq.type.shape[1]
    COLUMN_WARPS: gl.constexpr = WARPS if WARPS < BLOCK_N // 32 else BLOCK_N // 32
    WORDS: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32, 1],
                                           warps_per_cta=[COLUMN_WARPS, WARPS // COLUMN_WARPS], order=[0, 1])
    # the words' stage [runs, 8 word rows, columns a run]: lanes along the columns, as WORDS has them
    RUN_WORDS: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1, 1], threads_per_warp=[1, 1, 32],
                                               warps_per_cta=[RUNS, WARPS // COLUMN_WARPS, COLUMN_WARPS // RUNS],
                                               order=[2, 0, 1])
    ROW: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[1, 32], warps_per_cta=[1, WARPS],
                                         order=[1, 0])
    stages: gl.constexpr = ws.type.shape[0]
    spread = gl.zeros([BLOCK_N, 8], DTYPE, WORDS)
    for step in range(start, end):
        i = step - start
        s = i % stages
        mbarrier.wait(loaded.index(s), (i // stages) & 1)
        words = gl.reshape(gl.permute(wq.index(s).load(RUN_WORDS), (0, 2, 1)), (BLOCK_N, 8))
        words = gl.convert_layout(words, WORDS)
        zero = gl.convert_layout(gl.reshape(zs.index(s).load(ROW), (BLOCK_N,)), gl.SliceLayout(1, WORDS))
        scale = gl.convert_layout(gl.reshape(ss.index(s).load(ROW), (BLOCK_N,)), gl.SliceLayout(1, WORDS))
        tile = _weight_tile(words, zero[:, None] + spread, scale[:, None] + spread, DTYPE == gl.bfloat16)
        fence_async_shared()
        mbarrier.arrive(w_ready.index((i + stages - 1) % stages), count=1, pred=i > 0)
        ws.index(s).store(tile)
    fence_async_shared()
    mbarrier.arrive(w_ready.index((end - start + stages - 1) % stages), count=1, pred=end > start)


@gluon.jit
def _mma_consumer(xs, ws, loaded, w_ready, empty, start, end):
    """The MMA warpgroups: a step's wgmma once its x and weights are in, one in flight; the stage of the step
    before is released when its MMAs are done."""
    BLOCK_M: gl.constexpr = xs.type.shape[1]
    BLOCK_N: gl.constexpr = ws.type.shape[1]
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    stages: gl.constexpr = xs.type.shape[0]
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, MMA)
    for step in range(start, end):
        i = step - start
        s = i % stages
        phase = (i // stages) & 1
        mbarrier.wait(loaded.index(s), phase)
        mbarrier.wait(w_ready.index(s), phase)
        acc = warpgroup_mma(xs.index(s), ws.index(s).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=[acc])
        # (the arrival waits for the partition's warps: every warpgroup's MMAs of the step before are done)
        mbarrier.arrive(empty.index((i + stages - 1) % stages), count=1, pred=i > 0)
    # (a tuple: Triton 3.6 flattens the default partition's results as one)
    return (warpgroup_mma_wait(num_outstanding=0, deps=[acc]),)


@gluon.jit
def w4a16_wgmma_tma_ws_kernel(x_desc, x_half_desc, w_desc, s_desc, z_desc, b_ptr, out_ptr, tile_desc, tail_desc, M,
                              N, K, word_run, stride_om, tail_n,
                              GROUP_SIZE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                              STAGES: gl.constexpr, SPLIT_K: gl.constexpr, TAIL: gl.constexpr, HAS_BIAS: gl.constexpr,
                              DEQUANT_WARPS: gl.constexpr, num_warps: gl.constexpr):
    """The same product, warp-specialized: a TMA warp fills the stages with x, the words (``w_desc``: in
    column tiles, blocks ``[BLOCK_N / 64, 8, 64]`` of ``[N / 64, K / 8, 64]`` and ``word_run`` 64; in rows,
    ``[1, 8, BLOCK_N]`` of ``[1, K / 8, N]`` and ``word_run`` N), the scales and the zeros (blocks
    ``[1, BLOCK_N]``); DEQUANT_WARPS warps dequantize each stage's weight tile, and the kernel's num_warps
    run the MMAs, STAGES steps deep. With ``TAIL`` K is split only in the tiles from column ``tail_n`` on
    (``_tail_program_tile``), whose sums are added through ``tail_desc`` into float32 sums of those columns, zero
    before (the caller's to finish); the tiles before are whole and stored into ``out_ptr``."""
    DTYPE: gl.constexpr = x_desc.dtype
    X_HALVES: gl.constexpr = x_half_desc.block_type.shape[0] < BLOCK_M  # (``w4a16.wgmma_tma_launch``)
    W_SHARED: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    if TAIL:
        n0, m0, lo, hi, start, end, tail = _tail_program_tile(M, K, tail_n, BLOCK_M, BLOCK_N, SPLIT_K)
    else:
        n0, m0, lo, hi, start, end = _program_tile(M, K, BLOCK_M, BLOCK_N, SPLIT_K)

    xs, wq, ss, zs = _stage_buffers(x_desc, w_desc, s_desc, z_desc, STAGES, BLOCK_M, BLOCK_N)
    ws = gl.allocate_shared_memory(DTYPE, [STAGES, BLOCK_N, _STEP], W_SHARED)
    loaded = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(loaded.index(s), count=1)
        mbarrier.init(w_ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()

    acc = gl.warp_specialize(
        [(_mma_consumer, (xs, ws, loaded, w_ready, empty, start, end)),
         (_dequantizer, (x_desc, x_half_desc, w_desc, s_desc, z_desc, xs, wq, ss, zs, ws, loaded, w_ready, empty,
                         n0, m0, lo, hi, start, end, word_run, GROUP_SIZE)),
         (_loader, (x_desc, x_half_desc, w_desc, s_desc, z_desc, xs, wq, ss, zs, ws, loaded, w_ready, empty, n0, m0,
                    lo, hi, start, end, word_run, GROUP_SIZE))],
        [DEQUANT_WARPS, 1], [_DEQUANT_REGISTERS, 24])[0]
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(loaded.index(s))
        mbarrier.invalidate(w_ready.index(s))
        mbarrier.invalidate(empty.index(s))

    if not TAIL:
        _finish_tile(acc, out_ptr, tile_desc, b_ptr, m0, n0, M, N, stride_om, SPLIT_K, HAS_BIAS, DTYPE, X_HALVES, lo,
                     hi)
    elif tail:
        _tile_by_tma(acc, tail_desc, m0, n0 - tail_n, M, True, X_HALVES, lo, hi)
    else:
        _finish_tile(acc, out_ptr, tile_desc, b_ptr, m0, n0, M, N, stride_om, 1, HAS_BIAS, DTYPE, X_HALVES, lo, hi)


def _byte_pair_ptx(bf16: bool) -> str:
    """PTX for byte c ($3) of a word ($2), nibbles 2c and 2c + 1, minus the zero ($4) and times the scale ($5) -> two
    values of x's dtype ($0, $1), exact before the scale. fp16: prmt puts the byte in bytes 0 and 2, one lop3 makes
    the half2 (1024 + lo, 1024 + 16 hi) (``int4_pairs.f16_nibble_pairs``' magic), one fma by (1, 1/16) with
    (-(1024 + z), -(64 + z)) leaves (lo - z, hi - z). bf16 keeps 7 mantissa bits, so the high nibble comes from the
    word shifted by 4: (128 + lo, 128 + hi), then one fma by 1 with -128 - z."""
    if bf16:
        pair = """
        mad.lo.u32 sel, $3, 0x101, 0x0400;
        shr.u32 w4, $2, 4;
        prmt.b32 v, $2, w4, sel;
        lop3.b32 v, v, 0x000F000F, 0x43004300, 0xEA;
        mov.b16 m, 0xBF80;
        mov.b16 lo, 0xC300;
        fma.rn.bf16 lo, $4, m, lo;
        mov.b32 zz, {lo, lo};
        mov.b32 unit, 0x3F803F80;
        fma.rn.bf16x2 v, v, unit, zz;"""
    else:
        pair = """
        mad.lo.u32 sel, $3, 0x101, 0x4040;
        prmt.b32 v, $2, 0, sel;
        lop3.b32 v, v, 0x00F0000F, 0x64006400, 0xEA;
        mov.b16 lo, 0x6400;
        add.rn.f16 lo, $4, lo;
        neg.f16 lo, lo;
        mov.b16 hi, 0x5400;
        add.rn.f16 hi, $4, hi;
        neg.f16 hi, hi;
        mov.b32 zz, {lo, hi};
        mov.b32 unit, 0x2C003C00;
        fma.rn.f16x2 v, v, unit, zz;"""
    return ("{ .reg .b32 v, w4, sel, unit, zz, ss; .reg .b16 lo, hi, m;" + pair +
            f" mov.b32 ss, {{$5, $5}}; mul.rn.{'bf16' if bf16 else 'f16'}x2 v, v, ss; mov.b32 {{$0, $1}}, v; }}")


_BYTE_PAIR_F16 = asm_constant(_byte_pair_ptx(False))
_BYTE_PAIR_BF16 = asm_constant(_byte_pair_ptx(True))


@gluon.jit
def _weight_copies(w_desc, s_desc, z_desc, xs, wq, ss, zs, ready, stage, step, n0, run, first_column, pred,
                   GROUP_SIZE: gl.constexpr):
    """Step ``step``'s words, scales and zeros into ``stage`` by TMA where ``pred``, on the stage's barrier, told to
    expect x's tile too (``_copy_x``, issued after: under PDL only once the grid before has written x)."""
    WORD_BYTES: gl.constexpr = wq.type.shape[1] * wq.type.shape[2] * wq.type.shape[3] * 4  # (every run of the block)
    BYTES: gl.constexpr = xs.type.shape[1] * _STEP * 2 + WORD_BYTES + 4 * ss.type.shape[2]
    bar = ready.index(stage)
    mbarrier.expect(bar, BYTES, pred=pred)
    _tma_load(w_desc, [run, step * 8, first_column], bar, wq.index(stage), pred=pred)
    group = step * _STEP // GROUP_SIZE
    _tma_load(s_desc, [group, n0], bar, ss.index(stage), pred=pred)
    _tma_load(z_desc, [group, n0], bar, zs.index(stage), pred=pred)


@gluon.jit
def _stage_copies(x_desc, x_half_desc, w_desc, s_desc, z_desc, xs, wq, ss, zs, ready, stage, step, m0, lo, hi, n0,
                  run, first_column, pred, GROUP_SIZE: gl.constexpr):
    """Step ``step``'s x, words, scales and zeros into ``stage`` by TMA, all on the stage's barrier, where ``pred``."""
    _weight_copies(w_desc, s_desc, z_desc, xs, wq, ss, zs, ready, stage, step, n0, run, first_column, pred,
                   GROUP_SIZE)
    _copy_x(x_desc, x_half_desc, ready.index(stage), xs.index(stage), m0, lo, hi, step * _STEP, pred)


@gluon.jit
def _first_copies(x_desc, x_half_desc, w_desc, s_desc, z_desc, xs, wq, ss, zs, ready, m0, lo, hi, n0, start, end,
                  run, first_column, GROUP_SIZE: gl.constexpr):
    """The warp-specialized register-fed kernel's first stages, launched with programmatic dependent launch
    (``w4a16.wgmma_tma_launch``): the weights' copies, which no kernel writes, issued while the grid before finishes;
    x's once it has (its writes are then visible to the whole grid)."""
    stages: gl.constexpr = xs.type.shape[0]
    for s in gl.static_range(stages):
        _weight_copies(w_desc, s_desc, z_desc, xs, wq, ss, zs, ready, s, start + s, n0, run, first_column,
                       start + s < end, GROUP_SIZE)
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; griddepcontrol.wait; // $0", "=r", [],
                              dtype=gl.int32, is_pure=False, pack=1)
    for s in gl.static_range(stages):
        _copy_x(x_desc, x_half_desc, ready.index(s), xs.index(s), m0, lo, hi, (start + s) * _STEP, start + s < end)


# The register-fed kernels' thread (warp w, lane 4 g + c): columns 16 w + g and 16 w + g + 8, all 8 word rows, byte c
_OPERAND_WORDS = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [8, 0, 0]],
    lane_bases=[[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
    warp_bases=[[16, 0, 0], [32, 0, 0]], block_bases=[], shape=[64, 8, 4]))
# the same threads' words and columns as a stage holds them ([1, 8, 64] and [1, 64])
_STAGE_WORDS = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 1, 0], [0, 2, 0], [0, 4, 0], [0, 0, 8]],
    lane_bases=[[0, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]],
    warp_bases=[[0, 0, 16], [0, 0, 32]], block_bases=[], shape=[1, 8, 64]))
_STAGE_COLUMNS = gl.constexpr(gl.DistributedLinearLayout(
    reg_bases=[[0, 8]], lane_bases=[[0, 0], [0, 0], [0, 1], [0, 2], [0, 4]],
    warp_bases=[[0, 16], [0, 32]], block_bases=[], shape=[1, 64]))


@gluon.jit
def _operand_bytes():
    """Each thread's byte c of its words, spread over ``_OPERAND_WORDS``."""
    return gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, _OPERAND_WORDS)))[None, None, :] + \
        gl.zeros([64, 8, 4], gl.int32, _OPERAND_WORDS)


@gluon.jit
def _register_operand(wq, zs, ss, stage, byte, A_LAYOUT: gl.constexpr, BF16: gl.constexpr):
    """A stage's words, scales and zeros -> the wgmma's left operand ``[64 columns, 64]``, K in its natural order:
    thread (g, c) reads all 8 word rows of its two columns (``_OPERAND_WORDS``, the same words for every c) and keeps
    byte c of each, rows 8 j + 2 c and 8 j + 2 c + 1: exactly its fragment's K positions, so the layout changes below
    are renamings."""
    BN: gl.constexpr = 64
    COLUMNS: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, _OPERAND_WORDS))
    words = wq.index(stage).load(_STAGE_WORDS)  # [1 run, 8 word rows, BN]
    words = gl.convert_layout(gl.permute(gl.reshape(words, (8, BN)), (1, 0)), gl.SliceLayout(2, _OPERAND_WORDS))
    zero = gl.convert_layout(gl.reshape(zs.index(stage).load(_STAGE_COLUMNS), (BN,)), COLUMNS)
    scale = gl.convert_layout(gl.reshape(ss.index(stage).load(_STAGE_COLUMNS), (BN,)), COLUMNS)
    spread = gl.zeros([BN, 8, 4], zero.dtype, _OPERAND_WORDS)
    args = [words[:, :, None] + gl.zeros([BN, 8, 4], gl.int32, _OPERAND_WORDS), byte, zero[:, None, None] + spread,
            scale[:, None, None] + spread]
    if BF16:
        low, high = gl.inline_asm_elementwise(_BYTE_PAIR_BF16, "=h,=h,r,r,h,h", args, dtype=(gl.bfloat16, gl.bfloat16),
                                              is_pure=True, pack=1)
    else:
        low, high = gl.inline_asm_elementwise(_BYTE_PAIR_F16, "=h,=h,r,r,h,h", args, dtype=(gl.float16, gl.float16),
                                              is_pure=True, pack=1)
    pairs = gl.join(low, high)  # [BN, 8 (j), 4 (c), 2]: k = 8 j + 2 c + t
    return gl.convert_layout(gl.reshape(pairs, (BN, _STEP)), A_LAYOUT)


@gluon.jit
def _register_accumulator(BLOCK_M: gl.constexpr):
    """The register-fed kernels' float32 sums ``[64 weight columns, BLOCK_M rows of x]``, zero, in the wgmma's layout
    (one warpgroup)."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
    return gl.zeros([64, BLOCK_M], gl.float32, MMA)


@gluon.jit
def _register_step(xs, wq, ss, zs, stage, byte, acc):
    """One step of the register-fed kernels: the stage's weights dequantized into the wgmma's left operand, times
    x's stage (``[BLOCK_M, 64]``, the right operand K-major), added into ``acc`` ``[64, BLOCK_M]``."""
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
    a = _register_operand(wq, zs, ss, stage, byte, A_LAYOUT, xs.dtype == gl.bfloat16)
    acc = warpgroup_mma(a, xs.index(stage).permute((1, 0)), acc, is_async=True)
    # waited for at once: an operand still in flight at the loop's back edge may have its registers reused by
    # ptxas (Triton 3.6), and a wait for one pending gained nothing where it was safe (two steps an iteration); the
    # warp-specialized kernel's 128-row consumer keeps one step in flight its own way (``_steps_under_mmas``)
    return warpgroup_mma_wait(num_outstanding=0, deps=[acc])


@gluon.jit
def _ready_step(xs, wq, ss, zs, ready, i, byte, acc):
    """The register-fed kernels' ``i``-th step of a program: once its stage's copies are in (``ready``),
    ``_register_step`` on it. Returns the stage and the sums."""
    stages: gl.constexpr = xs.type.shape[0]
    stage = i % stages
    mbarrier.wait(ready.index(stage), (i // stages) & 1)
    return stage, _register_step(xs, wq, ss, zs, stage, byte, acc)


@gluon.jit
def w4a16_wgmma_tma_rs_kernel(x_desc, x_half_desc, w_desc, s_desc, z_desc, b_ptr, out_ptr, tile_desc, M, N, K,
                              word_run, stride_om, GROUP_SIZE: gl.constexpr, BLOCK_M: gl.constexpr,
                              STAGES: gl.constexpr, SPLIT_K: gl.constexpr, HAS_BIAS: gl.constexpr):
    """The same product transposed, ``out^T = W^T x^T``, with the weights as wgmma's left operand in registers
    (one warpgroup, 64 weight columns a program, BLOCK_M rows of x its N side): each step's x, words (``w_desc`` as
    the warp-specialized kernel's, blocks of one run), scales and zeros are copied by TMA into one of ``STAGES``
    stages, STAGES steps ahead, and the threads dequantize the stage's words straight into the MMA's operand."""
    BN: gl.constexpr = 64
    DTYPE: gl.constexpr = x_desc.dtype
    X_HALVES: gl.constexpr = x_half_desc.block_type.shape[0] < BLOCK_M  # (``w4a16.wgmma_tma_launch``)

    n0, m0, lo, hi, start, end = _program_tile(M, K, BLOCK_M, BN, SPLIT_K)
    run, first_column = n0 // word_run, n0 % word_run
    byte = _operand_bytes()

    xs, wq, ss, zs = _stage_buffers(x_desc, w_desc, s_desc, z_desc, STAGES, BLOCK_M, BN)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    fence_async_shared()
    for s in gl.static_range(STAGES):
        _stage_copies(x_desc, x_half_desc, w_desc, s_desc, z_desc, xs, wq, ss, zs, ready, s, start + s, m0, lo, hi,
                      n0, run, first_column, start + s < end, GROUP_SIZE)

    acc = _register_accumulator(BLOCK_M)
    for step in range(start, end):
        stage, acc = _ready_step(xs, wq, ss, zs, ready, step - start, byte, acc)
        # every thread's reads of the stage are done (the fence orders them before the TMA's writes): refill it
        fence_async_shared()
        _cta_barrier()
        _stage_copies(x_desc, x_half_desc, w_desc, s_desc, z_desc, xs, wq, ss, zs, ready, stage, step + STAGES, m0,
                      lo, hi, n0, run, first_column, step + STAGES < end, GROUP_SIZE)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))

    _finish_tile(gl.permute(acc, (1, 0)), out_ptr, tile_desc, b_ptr, m0, n0, M, N, stride_om, SPLIT_K, HAS_BIAS,
                 DTYPE, X_HALVES, lo, hi)


# The loader's registers in the warp-specialized register-fed kernel (it holds a few indices); its consumer raises
# its own to what the launch's budget leaves (``w4a16.RS_WS_REGISTERS``)
_RS_LOADER_REGISTERS = gl.constexpr(24)


# The two partitions below take the same arguments, so that one tuple serves both (Gluon would take a tuple each);
# each reads its own.
@gluon.jit
def _rs_loader(x_desc, x_half_desc, w_desc, s_desc, z_desc, xs, wq, ss, zs, ready, empty, m0, lo, hi, n0, start, end,
               word_run, GROUP_SIZE: gl.constexpr):
    """One warp: the first stages' copies (``_first_copies``), then each step's x, words, scales and zeros into its
    stage by TMA once the consumer has freed it."""
    stages: gl.constexpr = xs.type.shape[0]
    run, first_column = n0 // word_run, n0 % word_run
    _first_copies(x_desc, x_half_desc, w_desc, s_desc, z_desc, xs, wq, ss, zs, ready, m0, lo, hi, n0, start, end, run,
                  first_column, GROUP_SIZE)
    for step in range(start + stages, end):
        i = step - start
        stage = i % stages
        mbarrier.wait(empty.index(stage), ((i // stages) & 1) ^ 1)
        _stage_copies(x_desc, x_half_desc, w_desc, s_desc, z_desc, xs, wq, ss, zs, ready, stage, step, m0, lo, hi,
                      n0, run, first_column, True, GROUP_SIZE)


@gluon.jit
def _rs_consumer(x_desc, x_half_desc, w_desc, s_desc, z_desc, xs, wq, ss, zs, ready, empty, m0, lo, hi, n0, start,
                 end, word_run, GROUP_SIZE: gl.constexpr):
    """The warpgroup: each step once its stage is in, as the kernel above, then the stage freed by an mbarrier
    arrival (no CTA barrier, no copies to issue). With 128- and 256-row tiles each step is dequantized under the MMAs
    of the step before (``_steps_under_mmas``): H100, the op, medians of 7 rounds, us, fp16 4096x28672 at 65 / 96 /
    128 rows 65.39 / 65.58 / 63.09 -> 62.93 / 63.15 / 62.41, 4096x12288 at 128 rows 30.14 -> 28.23, 4096² 13.18 ->
    12.54, 14336x4096 31.68 -> 30.81, bf16 with a bias 4096² 14.50 -> 13.92; with 64-row tiles it lost (14336x4096 at
    64 rows 22.39 -> 23.69, 4096x28672 at 33 rows 40.41 -> 42.25; bench/NOTES-kernels.md, eighty-second session)."""
    BLOCK_M: gl.constexpr = xs.type.shape[1]
    byte = _operand_bytes()
    acc = _register_accumulator(BLOCK_M)
    if BLOCK_M >= 128:
        acc = _steps_under_mmas(xs, wq, ss, zs, ready, empty, end - start, byte, acc)
    else:
        for step in range(start, end):
            stage, acc = _ready_step(xs, wq, ss, zs, ready, step - start, byte, acc)
            _free_stage(empty, stage)
    return (acc,)  # (a tuple: Triton 3.6 flattens the default partition's results as one)


@gluon.jit
def _free_stage(empty, stage):
    """The warpgroup's reads of ``stage`` done (the fence orders them before the TMA's next writes): the loader may
    refill it."""
    fence_async_shared()
    mbarrier.arrive(empty.index(stage), count=1)


@gluon.jit
def _step_under_mmas(xs, wq, ss, zs, ready, empty, i, byte, acc, in_flight):
    """Step ``i``'s operand dequantized while step ``i - 1``'s MMAs, which read ``in_flight``, run; then those waited
    for (``in_flight`` kept alive to there, so that ptxas gives the new operand other registers), their stage freed
    and step ``i``'s MMAs issued. Returns the sums in flight and the new operand."""
    stages: gl.constexpr = xs.type.shape[0]
    stage = i % stages
    mbarrier.wait(ready.index(stage), (i // stages) & 1)
    A_LAYOUT: gl.constexpr = in_flight.type.layout
    a = _register_operand(wq, zs, ss, stage, byte, A_LAYOUT, xs.dtype == gl.bfloat16)
    acc, in_flight = warpgroup_mma_wait(num_outstanding=0, deps=[acc, in_flight])
    _free_stage(empty, (i - 1) % stages)
    return warpgroup_mma(a, xs.index(stage).permute((1, 0)), acc, is_async=True), a


@gluon.jit
def _steps_under_mmas(xs, wq, ss, zs, ready, empty, steps, byte, acc):
    """The warp-specialized consumer's ``steps`` steps with each step's dequantization under the MMAs of the step
    before (``_step_under_mmas``), two steps an iteration with an operand each, so that the one in flight at the
    loop's back edge is always the same value and no copy of it is rewritten in flight. Returns the sums."""
    stages: gl.constexpr = xs.type.shape[0]
    mbarrier.wait(ready.index(0), 0)
    A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
    a0 = _register_operand(wq, zs, ss, 0, byte, A_LAYOUT, xs.dtype == gl.bfloat16)
    acc = warpgroup_mma(a0, xs.index(0).permute((1, 0)), acc, is_async=True)
    for j in range((steps - 1) // 2):
        acc, a1 = _step_under_mmas(xs, wq, ss, zs, ready, empty, 1 + 2 * j, byte, acc, a0)
        acc, a0 = _step_under_mmas(xs, wq, ss, zs, ready, empty, 2 + 2 * j, byte, acc, a1)
    last = a0
    if steps % 2 == 0:
        acc, last = _step_under_mmas(xs, wq, ss, zs, ready, empty, steps - 1, byte, acc, a0)
    acc, last = warpgroup_mma_wait(num_outstanding=0, deps=[acc, last])
    _free_stage(empty, (steps - 1) % stages)
    return acc


@gluon.jit
def w4a16_wgmma_tma_rs_ws_kernel(x_desc, x_half_desc, w_desc, s_desc, z_desc, b_ptr, out_ptr, tile_desc, M, N,
                                 K, word_run, stride_om, GROUP_SIZE: gl.constexpr, BLOCK_M: gl.constexpr,
                                 STAGES: gl.constexpr, SPLIT_K: gl.constexpr, HAS_BIAS: gl.constexpr):
    """The register-fed kernel above, warp-specialized: a loader warp issues each stage's TMA copies once the
    warpgroup has freed it (``empty``), and the warpgroup only waits, dequantizes, multiplies and frees. Same
    arguments, layouts and result."""
    BN: gl.constexpr = 64
    DTYPE: gl.constexpr = x_desc.dtype
    X_HALVES: gl.constexpr = x_half_desc.block_type.shape[0] < BLOCK_M  # (``w4a16.wgmma_tma_launch``)
    n0, m0, lo, hi, start, end = _program_tile(M, K, BLOCK_M, BN, SPLIT_K)

    xs, wq, ss, zs = _stage_buffers(x_desc, w_desc, s_desc, z_desc, STAGES, BLOCK_M, BN)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()

    args = (x_desc, x_half_desc, w_desc, s_desc, z_desc, xs, wq, ss, zs, ready, empty, m0, lo, hi, n0, start, end,
            word_run, GROUP_SIZE)
    acc = gl.warp_specialize([(_rs_consumer, args), (_rs_loader, args)], [1], [_RS_LOADER_REGISTERS])[0]
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
        mbarrier.invalidate(empty.index(s))

    _finish_tile(gl.permute(acc, (1, 0)), out_ptr, tile_desc, b_ptr, m0, n0, M, N, stride_om, SPLIT_K, HAS_BIAS,
                 DTYPE, X_HALVES, lo, hi)
