"""What the kernels share: the activations their epilogues compute, the split-K workspace
and the epilogue that finishes an output tile, tensor-core block shapes and which operand the
weight tile is, and how K is split."""

import functools
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from torch._subclasses.fake_tensor import is_fake

from .replay import kept_zeros, launch, new_empty

# Epilogues on the float32 result: "silu_mul" reads the N columns as [gate | up] and gives
# silu(gate) * up (N / 2 columns); "gelu" is erf's GELU, "gelu_tanh" its tanh approximation.
ACTIVATIONS = ("none", "silu_mul", "gelu", "gelu_tanh")


@functools.cache  # (Triton too reads it once, as its kernels are defined)
def triton_interpreted() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1) runs no inline PTX."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. ``triton.cdiv`` is a constexpr function, whose every host call unwraps its
    arguments: 4-5 us each, two thirds of ``w4a16.pick_config``'s 15.7 us at one row (an eager call's host time)."""
    return (a + b - 1) // b  # (M may be a SymInt under torch.compile: no divmod)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n, on the host (``triton.next_power_of_2``, a constexpr function, is slow there)."""
    power = 1
    while power < n:  # (comparisons only: n may be a SymInt)
        power *= 2
    return power


def asm_constant(ptx: str) -> tl.constexpr:
    """PTX composed in Python as a module-level constant of the kernels, on one line. Inductor
    copies a user kernel's source and these constants (as their repr) into a triple-quoted string
    of its generated module; torch 2.11 does not escape that string, so a repr's escaped newline
    turns back into a line break inside a one-line literal and the module no longer parses."""
    return tl.constexpr(" ".join(ptx.split()))


# Whether kernels run compiled: the interpreter runs no inline PTX (fixed at import, as Triton
# fixes at decoration whether a kernel is interpreted).
_COMPILED = tl.constexpr(not triton_interpreted())


@triton.jit
def _waited_for(acc):
    """acc, read by a register move that ptxas drops. A dot whose result something other than the
    next step's dot reads is synchronous to Triton's pipeliner: it waits for all of the step's
    wgmmas (``pendings = 0``) before the loop goes on. Left asynchronous, a dot whose left operand
    is in registers races up to Triton 3.7: its wait covers only a step's first wgmma, and the
    next step's dequantization rewrites the registers the others still read (triton-lang/triton#9433;
    the fix needs Triton's later copies and ptxas 13.3, which Triton uses for sm_90 from 3.9 on).
    On the H200 with 3.6 that gave wrong results, bench/NOTES-kernels.md. Pure: Inductor's mutation
    analysis of a kernel gives up at inline asm with side effects and takes every argument as written."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [acc], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def mma_accumulate(acc, x, w_t, SWAP_AB: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + x @ w for the transposed weight tile w_t ``[BLOCK_N, BLOCK_K]``: acc is ``[BLOCK_M,
    BLOCK_N]``, or its transpose under SWAP_AB (the weight tile as the left operand, which the
    MMA takes from registers, each step's wgmmas waited for before the next: ``_waited_for``)."""
    if SWAP_AB:  # (one return: Triton compiles the code after a return in a constexpr branch too)
        acc = tl.dot(w_t, tl.trans(x), acc, input_precision=DOT_PRECISION)
        if _COMPILED:
            acc = _waited_for(acc)
    else:
        acc = tl.dot(x, tl.trans(w_t), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def mma_zeros(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr):
    """A zero float32 accumulator for ``mma_accumulate``: ``[BLOCK_M, BLOCK_N]``, transposed under SWAP_AB."""
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return acc


@triton.jit
def grouped_tile_index(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The row tile and the column tile (indices) of output tile ``pid`` of ``[M, N]``."""
    # Grouped tile order: GROUP_M row tiles share each weight column tile while it is in L2.
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_rows, (pid % width) // group_rows


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The rows ``[BLOCK_M]`` and columns ``[BLOCK_N]`` of output tile ``pid`` of ``[M, N]``."""
    pid_m, pid_n = grouped_tile_index(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def split_range(pid_k, total, SPLIT_K: tl.constexpr, STEP: tl.constexpr):
    """The part ``[start, end)`` of ``[0, total)`` that split ``pid_k`` of SPLIT_K takes: whole STEPs, but
    for the last part."""
    per_split = tl.cdiv(total, SPLIT_K * STEP) * STEP
    start = pid_k * per_split
    return start, tl.minimum(start + per_split, total)


def output_columns(activation: str, N: int) -> int:
    """Columns of the result: N, or N // 2 under "silu_mul" (whose N GEMM columns are [gate | up])."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation != "silu_mul":
        return N
    if N % 2:
        raise ValueError(f"activation 'silu_mul' needs an even number of columns ([gate | up]), got N={N}")
    return N // 2


# W4A16's words: int32 [K / 8, N] row by row, or in column tiles of WORD_TILE: [K / 8, N / WORD_TILE, WORD_TILE]
# whose memory is ordered [N / WORD_TILE, K / 8, WORD_TILE] (reference.tile_word_columns), so that a tile's words,
# all K of its columns, are one run. A warp of the warp-level MMA kernel reads one tile: a group's words are then
# one 4 KB run, which one bulk prefetch pulls into L2 a group ahead (per word row, 16 of 256 bytes, it loses).
WORD_TILE = 64


def word_columns(qweight: torch.Tensor) -> int:
    """N of a W4A16 ``qweight``, ``[K / 8, N]`` or in column tiles ``[K / 8, N / T, T]``."""
    return qweight.shape[1] if qweight.dim() == 2 else qweight.shape[1] * qweight.shape[2]


def word_strides(qweight: torch.Tensor) -> Tuple[int, int, int]:
    """``(stride_qn, stride_qt, TILE)`` of ``word_offsets`` for a W4A16 ``qweight``: its column stride for rows of
    words (TILE 0), or the tile stride and width of column tiles."""
    if qweight.dim() == 2:
        return qweight.stride(1), 0, 0
    tile = qweight.shape[2]
    if qweight.dim() != 3 or qweight.stride(2) != 1 or tile < 4 or tile & (tile - 1):
        raise ValueError(f"a W4A16 qweight in column tiles is [K / 8, N / T, T] with T a power of two >= 4 and "
                         f"its last dim contiguous; got shape {tuple(qweight.shape)}, strides {qweight.stride()}")
    return 1, qweight.stride(1), tile


@triton.jit
def word_offsets(cols, stride_qn, stride_qt, TILE: tl.constexpr):
    """Where columns ``cols`` of a W4A16 word row lie in it (``word_strides``' layout)."""
    if TILE == 0:
        return cols * stride_qn
    return (cols // TILE) * stride_qt + cols % TILE


# Partial sums past this many floats (16 MB) are not kept between calls: the memory would stay held for the process
# (the kept ones, one a power-of-two size, hold 64 MB a device at most), and where M x N is that large the
# GEMM's own time dwarfs the launch that zeroes a fresh workspace
KEPT_WORKSPACE_MAX = 1 << 22


def keeps_workspace(M: int, N: int) -> bool:
    """Whether a split of K of an ``[M, N]`` GEMM that runs for real meets in the workspace kept between calls."""
    return M * N <= KEPT_WORKSPACE_MAX


def split_k_workspace(M: int, N: int, tiles: int, split_k: int, like: torch.Tensor) -> torch.Tensor:
    """Zeroed float32 partial sums ``[M, N]`` followed by one arrival count per output tile
    (float32 too: one allocation, no dtype view for Inductor to trip on); ``like`` (never read)
    when K is not split. Where the kernels run for real, the workspace kept between calls
    (``replay.kept_zeros``; ``keeps_workspace``), which ``store_output`` leaves at zero: no launch
    before the kernel's (H200, bf16, 16 rows: down_proj's op 18.1 -> 17.3 us, the decode step's 64
    ops 1061-1075 -> 1048-1057 us). Traced (fake tensors: torch.compile), a graph cannot keep a
    buffer between its runs (``traced_split``: the entry points hand such a call to an opaque op),
    and past ``KEPT_WORKSPACE_MAX``: a fresh one, zeroed by ``zero_kernel``, launched as ``like``'s
    kernels are (``dependent_launch``): torch's fill would wait for the kernel before it to finish,
    and the split kernel after it could not start early."""
    if split_k == 1:
        return like
    size = M * N + tiles
    if keeps_workspace(M, N) and not is_fake(like):
        return kept_zeros(size, like.device)
    ws = new_empty((size,), torch.float32, like.device)
    launch(zero_kernel, (cdiv(size, ZERO_BLOCK),), ws, size, BLOCK=ZERO_BLOCK, **dependent_launch(like))
    return ws


def traced_split(cfg, x: torch.Tensor, N: int) -> bool:
    """Whether a call on x ``[M, K]`` is traced (a fake tensor: torch.compile) and its kernel's config ``cfg`` splits
    K into the workspace kept between calls (``keeps_workspace`` for ``[M, N]``): a call that an entry point hands to
    its ``split_k_linear_op`` where it has one, as a traced graph cannot keep that workspace."""
    return getattr(cfg, "split_k", 1) > 1 and keeps_workspace(x.shape[0], N) and is_fake(x)


ZERO_BLOCK = 1024


@triton.jit
def zero_kernel(ptr, size, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Zeros into ``ptr[:size]``, BLOCK values a program. Under PDL (``dependent_launch``) the
    next kernel may start at once, and this one writes only once the kernel before it has
    finished (which may still be using the memory when the allocator hands it out)."""
    if PDL:
        launch_dependent_grids()
    block = tl.program_id(0)
    if PDL:  # (on the block, not the pointer, whose alignment Triton would then no longer know)
        block += wait_for_prior_grids()
    offs = block * BLOCK + tl.arange(0, BLOCK)
    tl.store(ptr + offs, tl.zeros((BLOCK,), tl.float32), mask=offs < size)


@triton.jit
def split_total_kernel(ws_ptr, b_ptr, out_ptr, size, N, stride_om, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
                       PDL: tl.constexpr):
    """The result of a GEMM whose K splits added their float32 sums into ``ws_ptr[:size]`` (``[M, N]``, rows
    contiguous): plus the bias ``[N]``, cast into ``out_ptr`` (the same shape, rows ``stride_om`` apart: the
    columns of a wider output), BLOCK values a program; the sums are left at zero for the next split
    (``split_k_workspace``). Under PDL (``dependent_launch``) the next kernel may start at once, and this one reads
    the sums once the GEMM before it has finished."""
    if PDL:
        launch_dependent_grids()
    block = tl.program_id(0)
    if PDL:
        block += wait_for_prior_grids()
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    total = tl.load(ws_ptr + offs, mask=mask, other=0)
    # every thread has read its sums before any zeroes them: the zeros' layout need not be the sums' (H200: without
    # it, some totals came out short)
    tl.debug_barrier()
    tl.store(ws_ptr + offs, tl.zeros((BLOCK,), tl.float32), mask=mask)
    if HAS_BIAS:
        total += tl.load(b_ptr + offs % N, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + offs // N * stride_om + offs % N, total.to(out_ptr.dtype.element_ty), mask=mask)


# The RMSNorm before a linear, as ``reference.rms_norm`` computes it, for the kernels that take it in (the W4A16 GEMV,
# FP8's quantization of x) and W4A16's pass of its own.
@triton.jit
def row_inv_rms(x_row, K, stride_xk, eps, BLOCK: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of the row of K values at x_row, in float32."""
    squares = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        v = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0).to(tl.float32)
        squares += v * v
    return inv_rms_of_squares(squares, K, eps)


@triton.jit
def inv_rms_of_squares(squares, K, eps):
    """1 / sqrt(mean(x^2) + eps) from a row's squares in float32 (summed here), K values."""
    # (eps may arrive as a float64 constant: Inductor passes Python floats so)
    return tl.rsqrt((tl.sum(squares, axis=0) / K + eps).to(tl.float32))


@triton.jit
def normed(x, inv_rms, g, DTYPE: tl.constexpr):
    """float32 x times ``inv_rms``, rounded to DTYPE, times the norm weight g (float32), rounded once."""
    return ((x * inv_rms).to(DTYPE).to(tl.float32) * g).to(DTYPE)


def norm_weight_as_x(norm_weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The norm weight in x's dtype, contiguous and 16-byte aligned as the packed GEMV reads x."""
    g = norm_weight.to(x.dtype).contiguous()
    return g if g.storage_offset() % 8 == 0 else g.clone()


def bias_rows(bias: Optional[torch.Tensor], M: int, N: int) -> Tuple[Optional[torch.Tensor], int]:
    """The bias as the epilogue reads it, and its row stride: ``[N]`` is every row's (stride 0);
    ``[M, N]``, shaped as the GEMM's output (a residual added in the epilogue), row by row."""
    if bias is None or bias.dim() == 1:
        return bias, 0
    if tuple(bias.shape) != (M, N):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({N},) or the output's ({M}, {N})")
    if bias.stride(1) != 1:
        bias = bias.contiguous()
    return bias, bias.stride(0)


@triton.jit
def store_output(acc, acc_up, rows, cols, mask, tile, M, N_UP,
                 b_ptr, out_ptr, ws_ptr, stride_bm, stride_om, stride_on, stride_wm,
                 SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """Finish one output tile from float32 sums: ``acc [R, C]`` of the rows ``rows`` and GEMM
    columns ``cols`` (index tensors that broadcast to ``[R, C]``: ``[R, 1]`` and ``[1, C]`` for a
    rectangle; ``mask`` the same) and, under "silu_mul", ``acc_up`` of the up columns
    ``cols + N_UP``; bias (row ``r`` at ``b_ptr + r * stride_bm``: ``bias_rows``), ACTIVATION
    (one of ``ACTIVATIONS``), cast, store. ``store_outputs`` for a tile held as several tensors."""
    store_outputs((acc,), (acc_up,), (rows,), (cols,), (mask,), tile, M, N_UP, b_ptr, out_ptr, ws_ptr, stride_bm,
                  stride_om, stride_on, stride_wm, SPLIT_K, HAS_BIAS, ACTIVATION)


@triton.jit
def store_outputs(accs, acc_ups, rows, cols, masks, tile, M, N_UP,
                  b_ptr, out_ptr, ws_ptr, stride_bm, stride_om, stride_on, stride_wm,
                  SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """``store_output`` for one output tile held as a tuple of parts: ``accs[i]`` the sums at
    ``rows[i]``, ``cols[i]`` (``masks[i]``; ``acc_ups[i]`` under "silu_mul"), each part laid out as
    the code that computed it left it (no change of layout through shared memory).

    With SPLIT_K > 1 the sums are partial: each program adds them into the workspace, zero before
    (``split_k_workspace``: ``[M, stride_wm]`` sums, then a count per tile), and the last of the
    tile's SPLIT_K programs to arrive reads the totals back, leaves its sums and count at zero
    again for the next launch, and runs the epilogue: the reduction costs no second launch."""
    if SPLIT_K > 1:
        for i in tl.static_range(len(accs)):
            ws = ws_ptr + rows[i] * stride_wm + cols[i]
            tl.atomic_add(ws, accs[i], mask=masks[i], sem="relaxed")
            if ACTIVATION == "silu_mul":
                tl.atomic_add(ws + N_UP, acc_ups[i], mask=masks[i], sem="relaxed")
        tl.debug_barrier()  # all threads' additions are issued before the arrival is counted
        count = ws_ptr + M * stride_wm + tile
        arrived = tl.atomic_add(count, 1.0, sem="acq_rel")
        totals = ()
        up_totals = ()
        last_masks = ()
        for i in tl.static_range(len(accs)):
            ws = ws_ptr + rows[i] * stride_wm + cols[i]
            # (broadcast before comparing: Triton's interpreter rejects a mask made from a 0-d one)
            mask = masks[i] & ((rows[i] * 0 + arrived) == SPLIT_K - 1)
            last_masks = last_masks + (mask,)
            totals = totals + (tl.load(ws, mask=mask, other=0, cache_modifier=".cg"),)
            if ACTIVATION == "silu_mul":
                up_totals = up_totals + (tl.load(ws + N_UP, mask=mask, other=0, cache_modifier=".cg"),)
        # every thread has read its totals before any zeroes them: the threads that store a value need not be the
        # ones that loaded it (H200: without it, tl.dot's kernels lost partial sums)
        tl.debug_barrier()
        for i in tl.static_range(len(accs)):
            ws = ws_ptr + rows[i] * stride_wm + cols[i]
            tl.store(ws, tl.zeros_like(totals[i]), mask=last_masks[i])
            if ACTIVATION == "silu_mul":
                tl.store(ws + N_UP, tl.zeros_like(up_totals[i]), mask=last_masks[i])
        tl.store(count, 0.0, mask=arrived == SPLIT_K - 1)
        accs = totals
        acc_ups = totals  # (read under silu_mul only)
        if ACTIVATION == "silu_mul":
            acc_ups = up_totals
        masks = last_masks
    for i in tl.static_range(len(accs)):
        acc = accs[i]
        acc_up = acc_ups[i]
        if HAS_BIAS:
            b_ptrs = b_ptr + rows[i] * stride_bm + cols[i]
            acc += tl.load(b_ptrs, mask=masks[i], other=0).to(tl.float32)
            if ACTIVATION == "silu_mul":
                acc_up += tl.load(b_ptrs + N_UP, mask=masks[i], other=0).to(tl.float32)
        out_ptrs = out_ptr + rows[i] * stride_om + cols[i] * stride_on
        tl.store(out_ptrs, activated(acc, acc_up, ACTIVATION).to(out_ptr.dtype.element_ty), mask=masks[i])


@triton.jit
def activated(acc, acc_up, ACTIVATION: tl.constexpr):
    """ACTIVATION (one of ``ACTIVATIONS``) on float32 sums ``acc``, the gate's under "silu_mul" (``acc_up`` the up
    columns', read under "silu_mul" only)."""
    if ACTIVATION == "silu_mul":
        acc = acc * tl.sigmoid(acc) * acc_up
    elif ACTIVATION == "gelu":
        acc = 0.5 * acc * (1 + tl.erf(acc * 0.7071067811865476))  # x * Phi(x)
    elif ACTIVATION == "gelu_tanh":  # 0.5 * (1 + tanh(u)) is sigmoid(2 u)
        acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
    return acc


class MmaConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    swap_ab: bool = False  # W8A16: the weight tile as the MMA's left operand (``mma_accumulate``)
    tma: bool = False  # FP8: x's and the weight's tiles copied in by TMA (tensor descriptors; sm_90 and later)


# An unrolled loop's code grows with its steps: past this many a kernel keeps its loop.
MAX_UNROLLED_STEPS = 16


def unrolled_steps(asked: bool, length: int, split: int, step: int) -> int:
    """A GEMV's UNROLLED_STEPS for a loop over ``length`` (rows of K) cut into ``split`` programs
    that advance ``step`` at a time: the steps of a split where unrolling is asked for, every split
    is whole steps and there are at most MAX_UNROLLED_STEPS; else 0 (a loop). A loop runs no step
    past a split's end, where an unrolled split shorter than the others would spend whole steps
    on masked loads."""
    steps = length // (split * step)  # (no divmod: under torch.compile length may be a SymInt)
    return steps if asked and length % (split * step) == 0 and 0 < steps <= MAX_UNROLLED_STEPS else 0


@triton.jit
def wait_for_prior_grids():
    """0, once the grid before this one on the stream has finished and its writes are visible (programmatic
    dependent launch, ``dependent_launch``). Add it to the pointers of what that grid may have written: Triton
    may move a load by inline asm marked pure above the wait otherwise. Such loads must also be coherent (no
    ``.nc``), which ptxas would move above it."""
    return tl.inline_asm_elementwise("griddepcontrol.wait; mov.b32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                     pack=1)


@triton.jit
def launch_dependent_grids():
    """Let the next grid on the stream, where it is launched with programmatic dependent launch, start its
    programs as this one's free the SMs (they run up to their ``wait_for_prior_grids``)."""
    tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False,
                              pack=1)


# A program's threads meet in shared memory, which Triton's block language does not address: inline PTX declares a
# buffer (of one of these sizes, in bytes), writes and reads it. Each asm is pure, ordered by what it is given: the
# barrier takes every store's token, each read the barrier's, so torch's analysis of a kernel sees no side effects.
def _shared_buffer(nbytes: int) -> tl.constexpr:
    return asm_constant("{ .shared .align 16 .b8 sums[%d]; mov.u32 $0, sums; }" % nbytes)


_SHARED_4K, _SHARED_8K, _SHARED_16K, _SHARED_32K = (_shared_buffer(n) for n in (4096, 8192, 16384, 32768))
SHARED_ADDRESS_MAX_BYTES = tl.constexpr(32768)


@triton.jit
def shared_address(NBYTES: tl.constexpr):
    """The shared address of a buffer of at least NBYTES (at most 32 KB), one for each call in a kernel."""
    tl.static_assert(NBYTES <= SHARED_ADDRESS_MAX_BYTES, "a buffer of shared_address takes at most 32 KB")
    if NBYTES <= 4096:
        return tl.inline_asm_elementwise(_SHARED_4K, "=r", [], dtype=tl.int32, is_pure=True, pack=1)
    elif NBYTES <= 8192:
        return tl.inline_asm_elementwise(_SHARED_8K, "=r", [], dtype=tl.int32, is_pure=True, pack=1)
    elif NBYTES <= 16384:
        return tl.inline_asm_elementwise(_SHARED_16K, "=r", [], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(_SHARED_32K, "=r", [], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def store_shared(address, value):
    """Stores ``value`` (float32) at the shared ``address``; returns a token (0) for the barrier."""
    return tl.inline_asm_elementwise("st.shared.f32 [$1], $2; mov.b32 $0, 0;", "=r,r,f", [address, value],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def barrier_after(tokens):
    """Waits for every thread of the program (``bar.sync``) once ``tokens`` are in; returns a token (0). One barrier
    for each value a thread holds of ``tokens``: give it one a thread."""
    return tl.inline_asm_elementwise("bar.sync 0; mov.b32 $0, 0; // $1", "=r,r", [tokens], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def load_shared(address):
    """The float32 at the shared ``address``."""
    return tl.inline_asm_elementwise("ld.shared.f32 $0, [$1];", "=f,r", [address], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def prefetch_to_l2(ptrs, nbytes, issue):
    """Pull ``nbytes`` (a multiple of 16) at ``ptrs`` into L2 by one bulk prefetch (sm_90) from each thread whose
    ``issue`` is nonzero; nothing waits for it."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $1, 0; @p cp.async.bulk.prefetch.L2.global [$2], $3; } // $0",
        "=r,r,l,r", [issue, ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)


def register_budget(maxnreg: int) -> dict:
    """Launch arguments that give ptxas ``maxnreg`` registers a thread, 0 its own choice, for a kernel with a
    ``MAXNREG`` constexpr. Left to itself ptxas keeps the GEMVs in few registers by issuing each of a step's
    loads just before the arithmetic that reads it, so a step waits for memory two or more times in turn;
    with the registers that the programs resident on an SM leave free anyway, it issues them all first.
    The kernel does not read MAXNREG: as a constexpr it keys Inductor's compiled code (which knows a user
    kernel's constexprs, not its launch options) and tells ``qpass.inductor_launch`` the budget."""
    return {"MAXNREG": maxnreg, "maxnreg": maxnreg} if maxnreg else {"MAXNREG": 0}


@functools.cache
def _cuda_properties(index: int):
    return torch.cuda.get_device_properties(index)


def _properties(device: torch.device):
    """The CUDA device's properties, read once a device."""
    return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())


def capability(device: torch.device) -> Tuple[int, int]:
    """The CUDA device's compute capability (major, minor)."""
    properties = _properties(device)
    return properties.major, properties.minor


def dependent_launch(x: torch.Tensor) -> dict:
    """The launch arguments of a kernel with a ``PDL`` constexpr that reads ``x``: PDL, and Triton's launch_pdl,
    on Hopper and later GPUs. Launched so, the kernel starts while the one before it on the stream finishes, and
    may read before its ``wait_for_prior_grids`` only what no kernel writes (weights).
    Traced (torch.compile) the same: Inductor drops a user kernel's launch_pdl, which ``qpass.inductor_launch``
    gives back to kernels traced with ``PDL``. (A PDL kernel launched without it is right, only slower: its
    wait and coherent loads cost and nothing overlaps; H200, the decode step's 64 GEMVs compiled, 0.751 ms
    without PDL, 0.799 so, 0.730 with the launch; bench/NOTES-kernels.md, thirty-first and thirty-second
    sessions.)"""
    if x.device.type != "cuda" or triton_interpreted() or torch.version.hip or capability(x.device) < (9, 0):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


def sm_count(device: torch.device) -> int:
    return _properties(device).multi_processor_count if device.type == "cuda" else 132


def shared_memory(device: torch.device) -> int:
    """The most shared memory a CUDA program may take on ``device`` (opted in); elsewhere an H100's, so that the
    picks made on the CPU are the H100's."""
    return _properties(device).shared_memory_per_block_optin if device.type == "cuda" else 232448


def split_for(tiles: int, k_steps: int, sms: int) -> int:
    """Fewest K splits (a power of two) that give every SM about two programs."""
    split = 1
    while tiles * split < 2 * sms and split * 2 <= k_steps and split < 16:
        split *= 2
    return split
