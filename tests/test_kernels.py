"""The Triton kernels of ``kernels/`` against dequantize-then-matmul in float32.

Bound: relative error of the whole output, ``||out - ref|| / ||ref||``, where ``ref`` is
the float32 reference (``kernels/reference.py`` on float32 inputs). The kernel's output is
rounded to the activation dtype, so the bound follows that dtype: fp16 1e-3, bf16 1e-2,
fp32 1e-4. FP8 W8A8 gets 3e-3, 1e-2 and 1e-3: the H100's fp8 tensor cores accumulate with
fewer bits than float32 (seen: 1.3e-3 at K = 2048 against the float32 reference). Outputs have at
least 16 columns: with a handful of elements, one dot product whose terms cancel can stand for the
whole norm and its relative error is unbounded. Where a test draws fewer (the W4A16 kernels' hypothesis
tests through ``check_w4_config``, N from 8), the bound is ``w4_bound``: the larger of the dtype's and
twice the error of dequantize-then-matmul in x's dtype on the same problem.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported) on small shapes. The interpreter stores
bf16 as raw 16-bit integers and gets arithmetic and ``tl.dot`` on them wrong, so on the
CPU bf16 is tested only through the GEMV kernels (whose arithmetic is float32); the
tensor-core kernels in bf16 are tested on the GPU (``-m cuda``). The interpreter does run
fp8 ``tl.dot`` (it widens to fp16), so the fp8 kernels are tested on the CPU too. It runs no
inline PTX: the W4A16 GEMV's half2 and bf16x2 paths (fp16 / bf16 x on a GPU) are tested by
the same tests on the GPU, where every fp16 and bf16 GEMV case takes them (and by
``test_gpu_w4a16_gemv_packed_bf16``), and ``packed_f16=False, packed_bf16=False`` keeps the
float32 path covered there; the warp-level MMA kernel (inline PTX throughout) by
``test_gpu_w4a16_warp_mma`` and every GPU test whose tuned choice for 2 to 16 rows it is.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qpass.kernels import common, fp8, int4_pairs, reference, replay, w4a16, w8a16
from qpass.kernels.common import ACTIVATIONS, MAX_UNROLLED_STEPS, output_columns, unrolled_steps

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BOUND = {torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}
FP8_BOUND = {torch.float16: 3e-3, torch.bfloat16: 1e-2, torch.float32: 1e-3}
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# On the CPU (interpreter) every example costs a fraction of a second: keep them few.
examples = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_w4(M, N, K, group_size, dtype, symmetric, bias, seed, tile=0):
    """x, qweight, scales, zeros and a bias (or None); with ``tile``, the words in column tiles of that many
    (where it divides N)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=g)
    qweight = reference.pack_int4_rows(q)
    qweight = reference.tile_word_columns(qweight, tile) if tile else qweight
    scales = (torch.rand(K // group_size, N, generator=g) * 0.02 + 0.005).to(dtype)
    if symmetric:
        zeros = torch.full((K // group_size, N), 8.0).to(dtype)
    else:
        zeros = torch.randint(0, 16, (K // group_size, N), generator=g).to(dtype)
    x = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return [t.to(DEVICE) if t is not None else None for t in (x, qweight, scales, zeros, b)]


def norm_and_residual(M, N, K, dtype, seed):
    """An RMSNorm weight ``[K]`` and a residual ``[M, N]``, as the ops take them."""
    g = torch.Generator().manual_seed(seed + 1)
    norm_weight = (torch.rand(K, generator=g) + 0.5).to(dtype)
    residual = torch.randn(M, N, generator=g).to(dtype)
    return norm_weight.to(DEVICE), residual.to(DEVICE)


def w4_reference(x, qweight, scales, zeros, group_size, bias):
    return reference.w4a16_linear(x.float(), qweight, scales.float(), zeros.float(), group_size,
                                  None if bias is None else bias.float())


def make_w8(M, N, K, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    scales = (torch.rand(N, generator=g) * 0.01 + 0.001).to(dtype)
    x = torch.randn(M, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return [t.to(DEVICE) if t is not None else None for t in (x, qweight, scales, b)]


def make_fp8(M, N, K, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    qweight = (torch.randn(N, K, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
    weight_scale = torch.rand(N, generator=g) * 0.01 + 0.001
    # |x| shrinks past K = 1024 as 1 / sqrt(K), so that silu(gate) * up stays inside fp16 at K = 14336
    x = (torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4 * min(1.0, (1024 / K) ** 0.5)).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return [t.to(DEVICE) if t is not None else None for t in (x, qweight, weight_scale, b)]


def cpu_dtypes(gemv: bool):
    return [torch.float16, torch.bfloat16, torch.float32] if (CUDA or gemv) else [torch.float16, torch.float32]


# --- W4A16 ---------------------------------------------------------------------------------

@examples
@given(M=st.integers(1, 40), N=st.integers(16, 72), groups=st.integers(1, 3),
       group_size=st.sampled_from([32, 64, 128]), dtype=st.sampled_from(cpu_dtypes(gemv=False)),
       symmetric=st.booleans(), bias=st.booleans(), tile=st.sampled_from([0, 4, 8, 16]), seed=st.integers(0, 2**16))
def test_w4a16_tuned_choice_matches_reference(M, N, groups, group_size, dtype, symmetric, bias, tile, seed):
    K = groups * group_size
    args = make_w4(M, N, K, group_size, dtype, symmetric, bias, seed, tile)
    x, qweight, scales, zeros, b = args
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, group_size, b)
    assert out.dtype == dtype and out.shape == (M, N)
    assert relative_error(out, w4_reference(*args[:4], group_size, b)) < BOUND[dtype]


def test_words_in_column_tiles():
    """``tile_word_columns`` keeps each tile's words one run in memory and ``word_rows`` gives them back; the
    kernels' strides of both layouts; what is not a layout of theirs is refused."""
    qweight = torch.arange(4 * 256, dtype=torch.int32).reshape(4, 256)
    tiles = reference.tile_word_columns(qweight)
    assert tiles.shape == (4, 4, 64) and tiles.transpose(0, 1).is_contiguous()
    assert tiles.transpose(0, 1).reshape(-1)[:128].tolist() == qweight[:2, :64].reshape(-1).tolist()
    assert torch.equal(reference.word_rows(tiles), qweight)
    assert reference.word_rows(qweight).data_ptr() == qweight.data_ptr()  # rows as they are: a view
    assert reference.tile_word_columns(qweight[:, :96]).shape == (4, 96)  # 96 columns: no whole tiles, as they are
    assert common.word_columns(tiles) == common.word_columns(qweight) == 256
    assert common.word_strides(qweight) == (1, 0, 0) and common.word_strides(tiles) == (1, 4 * 64, 64)
    transposed_tiles = tiles.transpose(0, 2).contiguous().transpose(0, 2)  # its last dim not contiguous
    with pytest.raises(ValueError, match=r"\[K / 8, N / T, T\].*shape \(4, 4, 64\), strides \(1, 4, 16\)"):
        common.word_strides(transposed_tiles)
    with pytest.raises(ValueError, match=r"a power of two >= 4 .*; got shape \(4, 32, 6\)"):
        common.word_strides(torch.zeros(4, 32, 6, dtype=torch.int32))
    x = torch.randn(3, 32)
    scales, zeros = torch.rand(1, 256), torch.full((1, 256), 8.0)
    assert torch.equal(reference.w4a16_linear(x, tiles, scales, zeros, 32), reference.w4a16_linear(x, qweight, scales,
                                                                                                    zeros, 32))


W4_CONFIGS = [
    w4a16.GemvConfig(block_n=16, block_k=64, split_k=1, num_warps=4, maxnreg=64),  # ptxas given 64 registers
    w4a16.GemvConfig(block_n=16, block_k=256, split_k=3, num_warps=4),  # a step spans groups; split K
    w4a16.GemvConfig(block_n=16, block_k=32, split_k=2, num_warps=4, unrolled=True),  # unrolled where steps are whole
    w4a16.GemvConfig(block_n=32, block_k=128, split_k=2, num_warps=4, packed_f16=False,
                     packed_bf16=False),  # float32 path on GPU too
    w4a16.MmaConfig(16, 32, 32, split_k=1, swap_ab=True, num_warps=4, num_stages=2),
    w4a16.MmaConfig(32, 16, 32, split_k=2, swap_ab=False, num_warps=4, num_stages=2),
    w4a16.MmaConfig(32, 16, 16, split_k=1, swap_ab=True, num_warps=4, num_stages=3),  # two words a row a step
    w4a16.DequantMmConfig(block_r=4, block_n=16),
    w4a16.DequantMmConfig(block_r=4, block_n=16, chunk_n=16),  # N in chunks, the last one partial
]


@pytest.mark.parametrize("config", W4_CONFIGS, ids=lambda c: type(c).__name__ + str(tuple(c)))
@settings(max_examples=3 if not CUDA else 6, deadline=None)
@given(M=st.integers(1, 37), N=st.integers(16, 50), groups=st.integers(1, 3),
       group_size=st.sampled_from([32, 64]), symmetric=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2**16), data=st.data())
def test_w4a16_each_kernel_variant(config, M, N, groups, group_size, symmetric, bias, seed, data):
    dtype = data.draw(st.sampled_from(cpu_dtypes(gemv=not isinstance(config, w4a16.MmaConfig))))
    if isinstance(config, w4a16.GemvConfig) and not CUDA:
        M = M % 3 + 1  # the interpreter runs one program per row: keep the GEMV's rows few
    K = groups * group_size
    args = make_w4(M, N, K, group_size, dtype, symmetric, bias, seed, data.draw(st.sampled_from([0, 4, 8])))
    x, qweight, scales, zeros, b = args
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, group_size, b, config=config)
    assert relative_error(out, w4_reference(*args[:4], group_size, b)) < BOUND[dtype]
    # the RMSNorm before the linear and the residual after it, folded into the op
    norm_weight, residual = norm_and_residual(M, N, K, dtype, seed)
    out = w4a16.w4a16_linear(3 * x, qweight, scales, zeros, group_size, residual, norm_weight=norm_weight,
                             norm_eps=1e-5, config=config)
    normed = reference.rms_norm(3 * x, norm_weight, 1e-5)
    assert relative_error(out, w4_reference(normed, *args[1:4], group_size, residual)) < BOUND[dtype]


@pytest.mark.parametrize("dtype", cpu_dtypes(gemv=True))
def test_rms_norm_pass_rounds_as_the_reference(dtype):
    """The RMSNorm pass of the W4A16 paths that do not fuse it (``w4a16._rms_norm``) is torch's norm to within two
    units in the last place a value, and as close as torch's to the norm computed in float64, give or take a float32
    ulp of 1 / rms (four in float32 output: its sums of squares, added in another order, round apart, and so does
    1 / rms). Triton's interpreter casts float32 to bf16 by truncation (a GPU rounds): one more ulp there, and no
    float64 comparison. K = 5000 fits one block, 9000 takes two; the norm weight in float32 goes to x's dtype first,
    as the op does."""
    g = torch.Generator().manual_seed(0)
    truncated = dtype == torch.bfloat16 and not CUDA
    ulps = {torch.float16: 2 * 2**-10, torch.bfloat16: (3 if truncated else 2) * 2**-7, torch.float32: 4 * 2**-23}
    for K in (5000, 9000):
        x = (torch.randn(5, K, generator=g) * 30).to(dtype).to(DEVICE)
        weight = (torch.rand(K, generator=g) + 0.5).to(DEVICE)
        out = w4a16._rms_norm(x[1:], weight, 1e-6)
        ref = reference.rms_norm(x[1:], weight.to(dtype), 1e-6)
        torch.testing.assert_close(out, ref, rtol=ulps[dtype], atol=0)
        if not truncated:
            exact = reference.rms_norm(x[1:].double(), weight.to(dtype).double(), 1e-6)
            assert relative_error(out, exact) <= 1.5 * relative_error(ref, exact) + 2**-22


def test_w4a16_kernel_choice_by_rows():
    """M = 1 takes the GEMV; 2 to 16 rows the warp-level MMA (M = 2 on a small weight the GEMV),
    with one 8-row tile up to M = 8; inputs it cannot read, and larger M, the other kernels."""
    device = torch.device(DEVICE)
    pick = w4a16.pick_config
    assert isinstance(pick(1, 28672, 4096, 128, device), w4a16.GemvConfig)
    assert isinstance(pick(2, 4096, 4096, 128, device), w4a16.GemvConfig)
    # M = 1 block shapes for 132 SMs (what sm_count gives a CPU device): wide weights 32 weight columns
    # x 512 rows with 4 warps, unrolled (gate_up with silu_mul: 16 output columns, gate and up); narrow ones
    # (16-column programs at most two an SM) and K > 4096 16 x 2048 with 16 warps (32 x 2048 from K = 14336 where
    # those programs fill one wave); 4096x6144 16 x 1024 with
    # 8 (16 x 2048 with the RMSNorm folded in, but not under silu_mul); all unrolled. Each asks ptxas for the
    # most registers a thread with which its whole grid stays resident, 64 to 72 (4 warps) or 80 (more), in fp16
    # and bf16 alike.
    cpu = torch.device("cpu")
    assert pick(1, 28672, 4096, 128, cpu) == w4a16.GemvConfig(32, 512, 1, 4, unrolled=True, maxnreg=72)
    for dtype in (torch.float16, torch.bfloat16):
        assert pick(1, 14336, 4096, 128, cpu, activation="silu_mul", dtype=dtype) == w4a16.GemvConfig(
            16, 512, 1, 4, unrolled=True, maxnreg=72)
    assert pick(1, 4096, 4096, 128, cpu) == w4a16.GemvConfig(16, 2048, 1, 16, unrolled=True, maxnreg=64)
    for dtype in (torch.float16, torch.bfloat16):
        assert pick(1, 4096, 12288, 128, cpu, dtype=dtype) == w4a16.GemvConfig(16, 2048, 1, 16, unrolled=True,
                                                                               maxnreg=64)
    # from K = 14336, 32 columns a program where those fill 95-100% of the SMs (one an SM, 80 registers)
    for N, K in [(4096, 14336), (4072, 14336), (4096, 28672), (4224, 16384)]:
        for dtype in (torch.float16, torch.bfloat16):
            assert pick(1, N, K, 128, cpu, dtype=dtype) == w4a16.GemvConfig(32, 2048, 1, 16, unrolled=True,
                                                                            maxnreg=80), (N, K)
    # not with the RMSNorm, nor under silu_mul, nor on 112 or 133 such programs, nor at two rows
    assert pick(1, 4096, 14336, 128, cpu, norm=True).block_n == pick(1, 4096, 14336, 128, cpu, activation="silu_mul") \
        .block_n == pick(1, 3584, 18944, 128, cpu).block_n == pick(1, 4232, 14336, 128, cpu).block_n == 16
    assert pick(2, 4096, 14336, 128, cpu, warp_mma=False) == w4a16.GemvConfig(16, 2048, 1, 16, unrolled=True)
    assert pick(1, 6144, 4096, 128, cpu) == w4a16.GemvConfig(16, 1024, 1, 8, unrolled=True, maxnreg=80)
    assert pick(1, 6144, 4096, 128, cpu, norm=True) == w4a16.GemvConfig(16, 2048, 1, 8, unrolled=True, maxnreg=80)
    for norm in (False, True):
        assert pick(1, 3072, 4096, 128, cpu, activation="silu_mul", norm=norm) == w4a16.GemvConfig(
            16, 1024, 1, 8, unrolled=True, maxnreg=80)
    assert pick(1, 1536, 1024, 128, cpu) == w4a16.GemvConfig(16, 2048, 1, 16, unrolled=True, maxnreg=80)  # 1 an SM
    # 512 programs of 16 warps (two rows, or twice the columns) are not all resident with 64 registers
    assert pick(2, 4096, 4096, 128, cpu).maxnreg == pick(1, 8192, 14336, 128, cpu).maxnreg == 0
    assert w4a16.gemv_registers(w4a16.GemvConfig(16, 2048, 1, 16), 3, 4096, 132) == 0  # past GEMV_MAX_M rows
    assert isinstance(pick(2, 6144, 4096, 128, device), w4a16.WarpMmaConfig)
    assert [pick(M, 28672, 4096, 128, device).row_tiles for M in (3, 8, 9, 16)] == [1, 1, 2, 2]
    # past 8 rows on a wide weight, two warps side by side on columns share x through L1
    assert [pick(M, 28672, 4096, 128, device).column_warps for M in (8, 16)] == [1, 2]
    # past 8 rows on a narrow weight with short K, 32 columns a warp and both 8-row tiles a program (but for gate and
    # up: a program an 8-row tile); longer K stays split
    # (200 registers, and no words pulled into L2 ahead)
    assert [pick(M, 4096, 4096, 128, cpu, dtype=dtype) for M in (9, 16) for dtype in (torch.float16, torch.bfloat16)
            ] == 4 * [w4a16.WarpMmaConfig(8, 1, 2, unrolled=True, maxnreg=200, prefetch_groups=0, column_blocks=2)]
    assert pick(16, 2048, 4096, 128, cpu, activation="silu_mul") == w4a16.WarpMmaConfig(
        8, 1, 1, unrolled=True, maxnreg=168, prefetch_groups=1)
    # past 8 rows each warp of 64 columns pulls its words into L2 a group ahead; up to 8 it does not
    assert [pick(M, N, K, 128, cpu).prefetch_groups for M in (8, 9, 16) for N, K in ((6144, 4096), (4096, 14336))] == [
        0, 0, 1, 1, 1, 1]
    assert pick(16, 4096, 14336, 128, device).row_tiles == 2
    # the 8-warp kernels and the split 4-warp ones unroll their loop over groups up to K = 32 groups; the 4-warp
    # ones on wide weights do not, nor any past it
    assert [pick(M, 6144, 4096, 128, device).unrolled for M in (4, 16)] == [True, True]
    assert [pick(M, 6144, 8192, 128, device).unrolled for M in (4, 16)] == [False, False]
    assert all(cfg.split_k > 1 and cfg.unrolled for cfg in (pick(M, 4096, 4096, 128, device) for M in (4, 8)))
    assert not any(pick(M, N, K, 128, device).unrolled for M in (8, 16) for N, K in ((28672, 4096), (4096, 14336)))
    # past 8 rows the split 4-warp ones past it repeat the loop's body twice an iteration; no other kernel does
    assert [pick(M, 4096, 14336, 128, device).loop_unroll for M in (2, 8, 9, 16)] == [1, 1, 2, 2]
    assert [pick(M, N, K, 128, device).loop_unroll for M in (8, 16) for N, K in ((28672, 4096), (6144, 8192))] == [
        1, 1, 1, 1]
    assert isinstance(pick(8, 14336, 4096, 128, device, activation="silu_mul"), w4a16.WarpMmaConfig)
    # ptxas is given 168 registers a thread for one 8-row tile a program, 200 for two, where the grid still
    # stays resident, and 232 for two tiles on 4 warps whether or not it does: the decode step's ops at 8 and
    # 16 rows, on 132 SMs (qkv, o, gate_up, down)
    decode_ops = [(6144, 4096, "none"), (4096, 4096, "none"), (14336, 4096, "silu_mul"), (4096, 14336, "none")]
    assert [pick(M, N, K, 128, cpu, activation=a).maxnreg for M in (8, 16) for N, K, a in decode_ops] == [
        168, 168, 0, 168, 200, 200, 232, 232]  # (gate_up at 8 rows: 448 programs of 4 warps, ptxas's choice)
    assert w4a16.warp_mma_registers(w4a16.WarpMmaConfig(4, 1, 1), 8, 528, 132) == 0  # 4 an SM: 128 registers
    assert isinstance(pick(8, 28672, 4096, 128, device, warp_mma=False), w4a16.MmaConfig)
    # 17 to 64 rows: the wgmma kernel on Hopper (never on the CPU), else the tensor-core kernel; the
    # weights exact in its MMA up to 32 rows; past 32 the TMA kernel with the weights in registers, or, where the
    # TMA cannot read the words, the wgmma kernel with them scaled before the MMA
    hopper = CUDA and torch.cuda.get_device_capability() == (9, 0)
    for M in (17, 32, 33, 64):
        cfg = pick(M, 28672, 4096, 128, device)
        assert isinstance(cfg, (w4a16.WgmmaTmaConfig if M > 32 else w4a16.WgmmaConfig) if hopper else w4a16.MmaConfig)
        assert not hopper or M <= 32 or cfg.registers
        cfg = pick(M, 28672, 4096, 128, device, tma_words=False)
        assert isinstance(cfg, w4a16.WgmmaConfig if hopper else w4a16.MmaConfig)
        assert not hopper or cfg.scaled == (M > 32)
        assert isinstance(pick(M, 28672, 4096, 128, device, wgmma=False), w4a16.MmaConfig)
    # 65 to 256 rows: the TMA kernel on Hopper (the weights in registers to 128 rows where the TMA reads the
    # words), else the tensor-core kernel to 128 rows, then the weight dequantized once and cuBLAS
    for M in (65, 128, 256):
        assert isinstance(pick(M, 28672, 4096, 128, device), w4a16.WgmmaTmaConfig if hopper else
                          w4a16.MmaConfig if M <= 128 else w4a16.DequantMmConfig)
        assert not hopper or pick(M, 28672, 4096, 128, device).registers == (M <= 128)
        assert not hopper or not pick(M, 28672, 4096, 128, device, tma_words=False).registers
        assert not isinstance(pick(M, 28672, 4096, 128, device, wgmma=False), w4a16.WgmmaTmaConfig)
    # past 256 rows on Hopper x's first 256 rows apart from the rest where the pick for them all is the register-fed
    # kernel over three waves or more (1344 programs of 1584 slots at 257 rows: ``_register_fed_all_waves``), else the
    # dequantized weight
    assert pick(257, 28672, 4096, 128, device) == w4a16.RowSplitConfig(256) if hopper else \
        isinstance(pick(257, 28672, 4096, 128, device), w4a16.DequantMmConfig)
    assert isinstance(pick(641, 28672, 4096, 128, device), w4a16.DequantMmConfig)
    assert isinstance(pick(24, 4096, 4160, 64, device), w4a16.MmaConfig)  # K not in 128-row chunks
    assert isinstance(pick(16, 28672, 4096, 128, device, warp_mma=False), w4a16.MmaConfig)
    # up to 64 rows K 128 a step in 2 stages where the group allows it, K 64 where it does not
    assert pick(32, 4096, 4096, 128, cpu) == w4a16.MmaConfig(32, 64, 128, 8, True, 4, 2)
    assert pick(64, 28672, 4096, 128, cpu) == w4a16.MmaConfig(64, 64, 128, 1, True, 4, 2)
    assert pick(64, 28672, 4096, 64, cpu) == w4a16.MmaConfig(64, 64, 64, 1, True, 4, 4)
    assert pick(32, 4096, 4096, 64, cpu) == w4a16.MmaConfig(32, 64, 64, 8, True, 4, 5)
    # gate_up with silu_mul past 32 rows: unsplit, 3 stages, where its tiles fill the SMs
    assert pick(48, 14336, 4096, 128, cpu, activation="silu_mul") == w4a16.MmaConfig(64, 64, 128, 1, True, 4, 3)
    assert pick(48, 1024, 4096, 128, cpu, activation="silu_mul") == w4a16.MmaConfig(64, 64, 128, 16, True, 4, 2)
    assert pick(32, 14336, 4096, 128, cpu, activation="silu_mul") == w4a16.MmaConfig(32, 64, 128, 2, True, 4, 2)
    # past 64 rows the weight tile as the register operand: 64 columns with 4 warps, two programs an
    # SM, K 128 a step where the tiles leave room for a K split; but 128 columns with 8 warps where
    # 128-column tiles alone fill the GPU, and K 64 where the 64-column ones fill a wave
    assert pick(128, 4096, 4096, 128, cpu) == w4a16.MmaConfig(128, 64, 128, 4, True, 4, 2)
    assert pick(100, 6144, 4096, 128, cpu) == w4a16.MmaConfig(128, 64, 128, 2, True, 4, 2)
    assert pick(100, 6144, 4096, 64, cpu) == w4a16.MmaConfig(128, 64, 64, 2, True, 4, 4)
    assert pick(128, 28672, 4096, 128, cpu) == w4a16.MmaConfig(128, 128, 64, 1, True, 8, 4)
    assert pick(128, 14336, 4096, 128, cpu, activation="silu_mul") == w4a16.MmaConfig(128, 64, 64, 1, True, 4, 4)
    # past one 128-row tile of the tensor-core kernel: the weight dequantized once, then cuBLAS
    assert pick(129, 28672, 4096, 128, cpu) == w4a16.DequantMmConfig()
    # from 1024 rows in chunks of columns whose GEMM writes at most 2^22 outputs, where that is not all
    # of N; from 384 rows chunks of 8192 columns where N takes three (where the Hopper kernels do not take the rows:
    # test_w4a16_wgmma_tma_tails_after_whole_waves)
    chunks = [pick(M, 28672, 4096, 128, device, wgmma=False).chunk_n for M in (300, 384, 768, 1024, 1500, 2048, 4096,
                                                                             8192)]
    assert chunks == [0, 8192, 8192, 4096, 2048, 2048, 1024, 1024]
    assert [pick(M, 4096, 14336, 128, device, wgmma=False).chunk_n for M in (512, 1024, 2048)] == [0, 0, 2048]
    assert [pick(M, 6144, 4096, 128, device, wgmma=False).chunk_n for M in (768, 1024)] == [0, 4096]
    for M, N, K in [(16, 4096, 4096), (4, 6144, 4096), (16, 28672, 4096), (2, 4096, 14336), (5, 256, 512)]:
        cfg = pick(M, N, K, 128, device)
        assert cfg.split_k * cfg.num_warps // cfg.column_warps <= K // 128  # every warp has a group of K


def test_w4a16_linear_picks_its_block_shape_knowing_the_norm_it_folds(monkeypatch):
    """``w4a16_linear`` tells ``pick_config`` whether it folds an RMSNorm in (the GEMV's steps depend on it), and
    the result is the norm's output times the weight either way."""
    asked = []
    pick = w4a16.pick_config

    def recording_pick(*args, **kwargs):
        asked.append(kwargs.get("norm"))
        return pick(*args, **kwargs)

    monkeypatch.setattr(w4a16, "pick_config", recording_pick)
    x, qweight, scales, zeros, _ = make_w4(1, 64, 256, 128, torch.float32, False, False, 3)
    norm_weight, _ = norm_and_residual(1, 64, 256, torch.float32, 3)
    folded = w4a16.w4a16_linear(x, qweight, scales, zeros, 128, norm_weight=norm_weight, norm_eps=1e-5)
    plain = w4a16.w4a16_linear(reference.rms_norm(x, norm_weight, 1e-5), qweight, scales, zeros, 128)
    assert asked == [True, False]
    assert relative_error(plain, folded) < 1e-5


class _CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on a GPU (``is_cuda``), for the checks that read no memory."""

    @property
    def is_cuda(self):
        return True


def test_w4a16_gemv_register_budget_only_on_the_packed_paths(monkeypatch):
    """The GEMV launches with its pick's register budget where it runs a packed path (fp16 or bf16 x, rows aligned),
    which the budgets were measured on, and with ptxas's own choice on the float32 path (float32 x, or rows the
    packed loads cannot read) and where a program's columns lie in two runs (``[gate | up]``), which spill at
    those budgets (bench/NOTES-kernels.md, seventy-fifth and seventy-sixth sessions)."""
    monkeypatch.setattr(w4a16, "triton_interpreted", lambda: False)
    cfg = w4a16.GemvConfig(32, 512, 1, 4, unrolled=True, maxnreg=72)

    def budget(x, two_runs=False):
        meta = w4a16.gemv_meta(cfg, x.as_subclass(_CudaLooking), 4096, 128, two_runs)
        packed = meta["PACKED_F16"] or meta["PACKED_BF16"]
        return packed, meta["MAXNREG"], meta.get("maxnreg")

    for dtype in (torch.float16, torch.bfloat16):
        assert budget(torch.zeros(1, 4096, dtype=dtype)) == (True, 72, 72)
        assert budget(torch.zeros(1, 4096, dtype=dtype), two_runs=True) == (True, 0, None)
        assert budget(torch.zeros(1, 4100, dtype=dtype)[:, 1:4097]) == (False, 0, None)  # rows not 16-byte aligned
    assert budget(torch.zeros(1, 4096)) == (False, 0, None)


def test_w4a16_gemv_budget_off_where_gate_and_up_lie_apart(monkeypatch):
    """The op asks for the pick's budget under silu_mul where gate and up alternate in runs of the GEMV's tile, and
    for none where the weight is ``[gate | up]`` (the launches recorded, not run)."""
    monkeypatch.setattr(w4a16, "triton_interpreted", lambda: False)
    monkeypatch.setattr(w4a16, "_packed_ok", lambda x: True)
    launches = []
    monkeypatch.setattr(w4a16, "launch", lambda kernel, grid, *args, **kwargs: launches.append(kwargs))
    x, qweight, scales, zeros, _ = make_w4(1, 2 * 14336, 4096, 128, torch.float16, False, False, 0)
    cfg = w4a16.pick_config(1, 14336, 4096, 128, torch.device("cpu"), activation="silu_mul")
    assert cfg.maxnreg == 72, cfg
    for up_run, maxnreg in ((16, 72), (0, None)):
        w4a16.w4a16_linear(x, qweight, scales, zeros, 128, activation="silu_mul", up_run=up_run, config=cfg)
        assert launches[-1]["UP_RUN"] == up_run and launches[-1].get("maxnreg") == maxnreg, launches[-1]


def test_w4a16_wgmma_config_by_shape():
    """The Hopper kernel's block shapes (H200 sweeps, bench/NOTES-kernels.md): up to 32 rows, 32 rows a
    program, two warpgroups with K split while the programs fit two an SM, one warpgroup where two leave
    them few; past 32, 64 rows a program with the weights scaled before the MMA, two warpgroups, K split
    so too."""
    cfg = w4a16._wgmma_config
    assert cfg(32, 4096, 4096, 132) == w4a16.WgmmaConfig(32, 2, 8)
    assert cfg(17, 6144, 4096, 132) == w4a16.WgmmaConfig(32, 1, 4)
    assert cfg(32, 28672, 4096, 132) == w4a16.WgmmaConfig(32, 2, 1)
    assert cfg(32, 4096, 14336, 132) == w4a16.WgmmaConfig(32, 2, 8)
    assert cfg(32, 4096, 1024, 132) == w4a16.WgmmaConfig(32, 1, 2)  # at least 8 steps of K a split
    assert cfg(33, 4096, 4096, 132) == w4a16.WgmmaConfig(64, 2, 8, scaled=True)
    assert cfg(64, 6144, 4096, 132) == w4a16.WgmmaConfig(64, 2, 4, scaled=True)
    assert cfg(48, 28672, 4096, 132) == w4a16.WgmmaConfig(64, 2, 1, scaled=True)
    assert cfg(64, 4096, 14336, 132) == w4a16.WgmmaConfig(64, 2, 8, scaled=True)
    assert cfg(64, 4096, 1024, 132) == w4a16.WgmmaConfig(64, 2, 2, scaled=True)


def test_w4a16_wgmma_tma_config_by_shape():
    """The TMA kernel's block shapes (H200 sweeps, bench/NOTES-kernels.md, twenty-second session): 128 columns
    with 8 warps; 128 rows, K split while the programs fit two an SM, to 128 rows; one tile of 256 rows past
    it, K split while they fit one an SM, warp-specialized with 4 warps dequantizing (forty-fourth session);
    16 steps of 64 a split."""
    cfg = w4a16._wgmma_tma_config
    shapes = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]
    assert [cfg(128, N, K, 132) for N, K in shapes] == [w4a16.WgmmaTmaConfig(128, 128, 4, split) for split in (4, 4, 1, 8)]
    assert [cfg(M, N, K, 132) for M in (129, 256) for N, K in shapes] == 2 * [
        w4a16.WgmmaTmaConfig(256, 128, 4, split, dequant_warps=4) for split in (4, 2, 1, 4)]
    assert cfg(100, 1024, 2048, 132) == w4a16.WgmmaTmaConfig(128, 128, 4, 2)  # 16 steps a split
    assert cfg(100, 1024, 1024, 132) == w4a16.WgmmaTmaConfig(128, 128, 4, 1)


def test_w4a16_wgmma_registers_config_by_shape():
    """33 to 128 rows (fifty-fourth session): the TMA kernel with the weights in registers, 64 columns a program by
    64 rows to 64, by 128 past; 3 stages (4 warp-specialized on 128 rows, ninety-fifth session); K split by powers of
    two to 8 while the programs fit 4 an SM (64 rows) or 3 (128 rows) and a split keeps 8 steps of 64.
    Warp-specialized (sixty-second session) where a split keeps the programs within 90-100% of one wave at two an SM,
    and (seventy-fourth session) where unsplit they need more than one wave at two an SM but at most two. With 64-row
    tiles (seventy-ninth session) wherever two, three or four an SM (``rs_ws_registers``: 128, 80, 64 registers) hold
    a split's programs at once, at the split and residency that fill their wave the most, the fewer an SM on a tie;
    128-row tiles also unsplit where they fill 70% of a wave of two an SM. Shapes as N, K."""
    cfg = w4a16._wgmma_registers_config
    shapes = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]
    assert [w4a16.rs_ws_registers(programs) for programs in (2, 3, 4)] == [w4a16.RS_WS_REGISTERS, 80, 64]

    def registers(block_m, splits, programs):  # (programs an SM, 0: not warp-specialized)
        return [w4a16.WgmmaTmaConfig(block_m, 64, w4a16.RS_WS_128_STAGES if block_m == 128 and p else 3, split,
                                     num_warps=4, registers=True, loader_warp=p > 0,
                                     maxnreg=w4a16.rs_ws_registers(p) if p else 0)
                for split, p in zip(splits, programs)]

    # N = 4096: 64 programs a split, 256 of 264 slots at split 4; 6144: 192 at split 2 (73% of two an SM), 384 at
    # split 4 (97% of three an SM; 64 rows only); 28672: 448 unsplit, over one wave of 264 (64 rows: within 528)
    assert [cfg(M, N, K, 132) for M in (33, 64) for N, K in shapes] == 2 * registers(64, (4, 4, 1, 4), (2, 3, 4, 2))
    assert [cfg(M, N, K, 132) for M in (65, 128) for N, K in shapes] == 2 * registers(128, (4, 4, 1, 4), (2, 0, 2, 2))
    assert cfg(128, 8192, 4096, 132) == registers(128, [2], [2])[0]  # 128 programs: 256 slots at split 2
    assert cfg(128, 8192, 4096, 143) == registers(128, [2], [0])[0]  # 256 of 286 slots: 90% is 257.4
    assert cfg(64, 2048, 4096, 132) == registers(64, [8], [2])[0]
    assert cfg(100, 1024, 1024, 132) == registers(128, [2], [0])[0]  # 16 programs; a split keeps 8 steps
    assert cfg(100, 1024, 512, 132).split_k == 1
    assert cfg(128, 5120, 4096, 132) == registers(128, [4], [0])[0]  # 80 programs: 160 (61%), 320 over a wave
    assert cfg(64, 5120, 4096, 132) == registers(64, [4], [3])[0]  # 80 tiles: 160 (61%), 320 (81% of 396, 61% of 528)
    assert cfg(64, 14336, 4096, 132) == registers(64, [1], [2])[0]  # 224 tiles: 85% of 264 or, split 2, of 528
    assert cfg(64, 64 * 300, 4096, 132) == registers(64, [1], [3])[0]  # 300 programs: 76% of 396, 57% of 528
    assert cfg(64, 128 * 264, 4096, 132) == registers(64, [1], [4])[0]  # 528 programs: four an SM
    assert cfg(64, 128 * 264 + 64, 4096, 132) == registers(64, [1], [0])[0]  # 529
    assert cfg(128, 128 * 264, 4096, 132) == registers(128, [1], [2])[0]  # two waves of two an SM
    assert cfg(100, 64 * 185, 4096, 132) == registers(128, [1], [2])[0]  # 185 tiles: 70% of 264
    assert cfg(100, 64 * 184, 4096, 132) == registers(128, [2], [0])[0]
    assert cfg(128, 128256, 4096, 132) == registers(128, [1], [0])[0]  # 2004 programs
    for c in registers(64, (8, 4, 1, 1), (0, 2, 3, 4)):
        w4a16.check_wgmma_tma_config(c)


def test_w4a16_register_fed_one_wave_by_shape():
    """129 to 512 rows (eighty-eighth session): the warp-specialized register-fed kernel on 256-row tiles of 64
    columns, one program an SM, 4 stages, where its programs fill 70-100% of one wave, K split in two where twice
    them fit and a split keeps 32 steps of 64; else None, and the picks before. Shapes as N, K."""
    one_wave = w4a16._register_fed_one_wave

    def fed(split):
        return w4a16.WgmmaTmaConfig(256, 64, 4, split, num_warps=4, registers=True, loader_warp=True,
                                    maxnreg=w4a16.RS_WS_256_REGISTERS)

    # 4096 columns: 64 tiles, split in two (128 of 132) to 256 rows, 128 tiles unsplit to 512; 6144: 96 tiles (73%)
    # to 256 rows, 192 past; 28672: 448 tiles
    assert [one_wave(M, N, K, 132) for M in (129, 256) for N, K in [(4096, 4096), (6144, 4096), (4096, 14336)]] == \
        2 * [fed(2), fed(1), fed(2)]
    assert [one_wave(M, N, 4096, 132) for M in (257, 512) for N in (4096, 6144)] == 2 * [fed(1), None]
    assert one_wave(256, 28672, 4096, 132) is None and one_wave(256, 5120, 4096, 132) is None  # 448; 80 (61%)
    assert one_wave(256, 4096, 2048, 132) is None  # 64 tiles (48%): a split would keep 16 steps
    assert one_wave(256, 64 * 92, 4096, 132) is None and one_wave(256, 64 * 93, 4096, 132) == fed(1)  # 70%: 92.4
    assert one_wave(512, 8192, 4096, 132) is None  # 256 tiles
    w4a16.check_wgmma_tma_config(fed(2))


def test_w4a16_register_fed_one_wave_is_picked_from_129_to_512_rows(monkeypatch):
    """On Hopper the pick takes ``_register_fed_one_wave`` from 129 to 512 rows wherever it gives a config and the
    TMA reads the words; at 128 rows and past 512, and for words the TMA cannot read, the picks before."""
    monkeypatch.setattr(w4a16, "_hopper", lambda device: True)
    cpu = torch.device("cpu")
    for M in (129, 200, 256, 300, 512):
        assert w4a16.pick_config(M, 4096, 4096, 128, cpu) == w4a16._register_fed_one_wave(M, 4096, 4096, 132)
        assert w4a16.pick_config(M, 4096, 4096, 128, cpu, tma_words=False) != w4a16.pick_config(M, 4096, 4096, 128, cpu)
    assert w4a16.pick_config(256, 28672, 4096, 128, cpu) == w4a16._wgmma_tma_config(256, 28672, 4096, 132)
    assert w4a16.pick_config(128, 4096, 4096, 128, cpu).block_m == 128
    assert not getattr(w4a16.pick_config(513, 4096, 4096, 128, cpu), "loader_warp", False)
    # gate and up under silu_mul: the GEMM's 2 N columns (2 x 2048: 64 tiles)
    assert w4a16.pick_config(256, 2048, 4096, 128, cpu, activation="silu_mul") == \
        w4a16._register_fed_one_wave(256, 4096, 4096, 132)


def test_w4a16_register_fed_all_waves_by_shape(monkeypatch):
    """257 to 640 rows where the warp-specialized kernel's wave rules give nothing (eighty-eighth session): the
    warp-specialized register-fed kernel on 128-row tiles of 64 columns, two an SM, unsplit over at most six waves that
    its programs fill to 80%; else None, and the dequantized weight. Shapes as N, K."""
    all_waves = w4a16._register_fed_all_waves
    fed = w4a16.WgmmaTmaConfig(128, 64, 3, 1, num_warps=4, registers=True, loader_warp=True,
                               maxnreg=w4a16.RS_WS_REGISTERS)
    # 264 slots a wave: 4096x14336 at 384 rows, 672 programs (85% of three waves); 4096x28672 at 257 rows, 1344 (85%
    # of six), at 384 rows 1344 too, at 640 rows 2240 (nine waves); 4096x6144 at 384 rows, 288 (55% of two)
    assert [all_waves(M, N, K, 132) for M, N, K in [(384, 14336, 4096), (257, 28672, 4096), (384, 28672, 14336)]] == \
        3 * [fed]
    assert all_waves(640, 28672, 4096, 132) is None and all_waves(384, 6144, 4096, 132) is None
    assert all_waves(300, 64 * 70, 4096, 132) is None and all_waves(300, 64 * 70 + 1, 4096, 132) == fed  # 80%: 211.2
    w4a16.check_wgmma_tma_config(fed)
    monkeypatch.setattr(w4a16, "_hopper", lambda device: True)
    cpu = torch.device("cpu")
    for M in (257, 384, 640):  # the pick for all rows there, where the wave rules give nothing (4096x14336 to 640 rows)
        assert pick_for_all_rows(M, 14336, 4096) == fed
        assert isinstance(w4a16.pick_config(M, 14336, 4096, 128, cpu, tma_words=False), w4a16.DequantMmConfig)
    assert w4a16.pick_config(640, 14336, 4096, 128, cpu) == fed
    assert isinstance(w4a16.pick_config(641, 14336, 4096, 128, cpu), w4a16.DequantMmConfig)
    assert w4a16.pick_config(512, 28672, 4096, 128, cpu).dequant_warps  # whole waves and a tail first


def pick_for_all_rows(M, N, K, dtype=torch.float16):
    """``pick_config``'s kernel for all of M rows in one launch, on a CPU device of 132 SMs."""
    return w4a16._pick_for_all_rows(M, N, K, 128, torch.device("cpu"), "none", True, dtype, True, False, True)


def test_w4a16_rows_apart_by_shape(monkeypatch):
    """257 to 511 rows on Hopper (eighty-ninth session): x's first 256 rows apart from the rest, each by its own pick,
    where the pick for them all is the dequantized weight, the register-fed kernel's 128-row tiles over three waves
    or more (four past 384 rows), or its 256-row tiles unsplit with at most 64 rows in the second and K from 8192.
    Shapes as N, K."""
    monkeypatch.setattr(w4a16, "_hopper", lambda device: True)
    cpu = torch.device("cpu")

    def apart(M, N, K):
        return w4a16._rows_apart(M, N, K, 132, pick_for_all_rows(M, N, K))

    # 128-row tiles: 4096x14336 at 300 rows, 672 programs, over the 528 of two waves; 4096x11008, 516, within them;
    # past 384 rows four waves: 4096x14336 at 448 rows 896 programs, 4096x11008 688
    assert pick_for_all_rows(300, 11008, 4096).block_m == pick_for_all_rows(300, 14336, 4096).block_m == 128
    assert apart(300, 14336, 4096) and not apart(300, 11008, 4096)
    assert pick_for_all_rows(448, 11008, 4096).block_m == pick_for_all_rows(448, 14336, 4096).block_m == 128
    assert apart(448, 14336, 4096) and not apart(448, 11008, 4096)
    assert [apart(M, 28672, 4096) for M in (256, 257, 384, 511, 512)] == [False, True, True, True, False]
    # the dequantized weight: 4096x6144 from 257 rows
    assert isinstance(pick_for_all_rows(260, 6144, 4096), w4a16.DequantMmConfig) and apart(260, 6144, 4096)
    # 256-row tiles unsplit (14336x4096): to 64 rows in the second tile; not for K 4096 (4096²)
    assert [pick_for_all_rows(M, 4096, 14336).block_m for M in (320, 321)] == [256, 256]
    assert [apart(M, 4096, 14336) for M in (260, 320, 321, 448)] == [True, True, False, False]
    assert pick_for_all_rows(300, 4096, 4096).block_m == 256 and not apart(300, 4096, 4096)
    # the warp-specialized kernel through shared memory: never (8192x10240 at 320 rows)
    assert pick_for_all_rows(320, 10240, 8192).dequant_warps and not apart(320, 10240, 8192)
    # the pick: on Hopper, where the TMA reads the words, in fp16 and bf16; gate and up's 2 N columns
    for dtype in (torch.float16, torch.bfloat16):
        assert w4a16.pick_config(300, 14336, 4096, 128, cpu, dtype=dtype) == w4a16.RowSplitConfig(256)
    assert w4a16.pick_config(300, 11008, 4096, 128, cpu, activation="silu_mul") == w4a16.RowSplitConfig(256)
    assert not isinstance(w4a16.pick_config(300, 11008, 4096, 128, cpu), w4a16.RowSplitConfig)
    assert isinstance(w4a16.pick_config(300, 14336, 4096, 128, cpu, tma_words=False), w4a16.DequantMmConfig)
    monkeypatch.setattr(w4a16, "_hopper", lambda device: False)
    assert isinstance(w4a16.pick_config(300, 14336, 4096, 128, cpu), w4a16.DequantMmConfig)


@pytest.mark.parametrize("activation", ["none", "silu_mul"])
def test_w4a16_row_split_joins_its_parts(activation):
    """A ``RowSplitConfig``: x's first rows and the rest each by their own pick, one output; with a bias, or the
    RMSNorm before and a residual (its rows split as x's) and the activation after. A split that leaves either part
    empty is refused, naming it."""
    dtype = cpu_dtypes(gemv=True)[0]
    M, N, K = 7, 48, 128
    x, qweight, scales, zeros, b = make_w4(M, N, K, 64, dtype, False, True, 3)
    config = w4a16.RowSplitConfig(4)
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, 64, b, activation, config=config)
    assert out.shape == (M, w4a16.output_columns(activation, N))
    expected = reference.epilogue(w4_reference(x, qweight, scales, zeros, 64, None), b, activation, torch.float32)
    assert relative_error(out, expected) < BOUND[dtype]
    norm_weight, residual = norm_and_residual(M, N, K, dtype, 3)
    out = w4a16.w4a16_linear(3 * x, qweight, scales, zeros, 64, residual, activation, norm_weight, 1e-5, config=config)
    normed = reference.rms_norm(3 * x, norm_weight, 1e-5)
    expected = reference.epilogue(w4_reference(normed, qweight, scales, zeros, 64, None), residual, activation,
                                  torch.float32)
    assert relative_error(out, expected) < BOUND[dtype]
    for rows in (0, M):
        with pytest.raises(ValueError, match=rf"RowSplitConfig\(head_rows={rows}\): .* x's {M}"):
            w4a16.w4a16_linear(x, qweight, scales, zeros, 64, config=w4a16.RowSplitConfig(rows))


def test_w4a16_wgmma_tma_past_256_rows_only_in_whole_waves():
    """257 to 1024 rows (fifty-third session): the warp-specialized kernel's 256 x 128 tiles where M fills 60% of
    their rows and their programs 90% of their waves: unsplit in up to two waves, split in two in one where that
    keeps 64 steps of K; else None (the dequantized weight + cuBLAS). Shapes as K x N."""
    waves = w4a16._wgmma_tma_waves
    ws = [None] + [w4a16.WgmmaTmaConfig(256, 128, 4, split, dequant_warps=4) for split in (1, 2)]
    # 14336x4096: 64 tiles to 512 rows, split in two from 308 rows (60% of 512); 96 at 640 and 768 fill 73% of a
    # wave (and a split would take two); 128 from 769 rows, unsplit
    assert [waves(M, 4096, 14336, 132) for M in (257, 307, 308, 512, 640, 768, 896, 1024)] == [None] * 2 + [
        ws[2]] * 2 + [None] * 2 + [ws[1]] * 2
    assert waves(1024, 8192, 28672, 132) == ws[1]  # 256 tiles: two waves at 97%
    assert waves(768, 5120, 13824, 132) == ws[1]  # 120 tiles: 91% of one wave
    assert waves(512, 4096, 4096, 132) is None  # a split in two would keep 32 steps of K
    assert waves(1024, 4096, 4096, 132) == ws[1]
    assert waves(1024, 28672, 4096, 132) == w4a16.WgmmaTmaConfig(  # 896 tiles: six waves, the rest dequantized
        256, 128, 4, 1, dequant_warps=4, dequantized_from_column=128 * 6 * 33)
    # 128 tiles on 120 SMs: 53% of two waves (the first 30 columns of tiles, then the rest dequantized: below)
    assert waves(1024, 4096, 4096, 120) == w4a16.WgmmaTmaConfig(256, 128, 4, 1, dequant_warps=4,
                                                                dequantized_from_column=3840)


def test_w4a16_wgmma_tma_tails_after_whole_waves():
    """Where the tiles make whole waves and part of one more (``_wgmma_tma_tail``): the whole waves as whole columns of
    whole tiles, then after one wave, for long weights (K >= 8192), the other columns' tiles split in K to fill the
    second, at most half a wave of them, up to 8 splits of 8 steps or more; else, M in whole 256-row tiles, the other
    columns left to the dequantized weight + cuBLAS. Shapes as K x N."""
    waves = w4a16._wgmma_tma_waves

    def split(parts, whole_columns):
        return w4a16.WgmmaTmaConfig(256, 128, 4, parts, dequant_warps=4, split_from_column=128 * whole_columns)

    def dequantized(whole_columns):
        return w4a16.WgmmaTmaConfig(256, 128, 4, 1, dequant_warps=4, dequantized_from_column=128 * whole_columns)

    # 8192²: at 640 and 768 rows 3 tiles a column, 44 columns in the first wave, 20 x 3 tiles split in two; at 1024
    # rows two waves at 97%, unsplit
    assert [waves(M, 8192, 8192, 132) for M in (640, 768, 1024)] == [split(2, 44)] * 2 + [
        w4a16.WgmmaTmaConfig(256, 128, 4, 1, dequant_warps=4)]
    assert waves(1024, 5120, 13824, 132) == split(4, 33)  # 160 tiles: 28 split in 4 (112 programs)
    assert waves(512, 10240, 8192, 132) == split(4, 66)  # 2 x 80 tiles: 28 split in 4
    assert waves(768, 8192, 8192, 150) == split(3, 50)  # 150 SMs: 50 columns first, 14 x 3 tiles split in 3
    assert waves(768, 6144, 8192, 132) == split(8, 44)  # 12 x 3 tiles split in 8, 16 steps each
    assert waves(768, 6144, 28672, 132) == split(8, 44)
    # shorter weights, and tails of more than half a wave: the rest dequantized, where M fills its tiles of rows
    assert [waves(M, 6144, 4096, 132) for M in (640, 768, 896, 1024)] == [None, dequantized(44), None, dequantized(33)]
    assert waves(1024, 5120, 5120, 132) == dequantized(33)
    assert waves(768, 8192, 8192, 120) == dequantized(40)  # 120 SMs: 40 columns first, 24 x 3 tiles after
    assert waves(512, 10240, 7168, 132) == dequantized(66)  # K = 7168 < 8192
    assert waves(640, 128 * 74, 8192, 132) is None  # 3 x 74 tiles: 30 x 3 past the first, M not in whole tiles
    # after two waves or more, the rest dequantized, where M fills its tiles of rows (else None), whatever K
    assert [waves(M, 14336, 4096, 132) for M in (640, 768, 1024)] == [None, dequantized(2 * 44), dequantized(3 * 33)]
    assert waves(768, 12288, 8192, 132) == dequantized(2 * 44)  # 3 x 96 tiles: 8 x 3 after two waves
    assert waves(512, 28672, 8192, 132) == dequantized(3 * 66)  # 2 x 224 tiles: 26 x 2 after three waves
    # no tail fits (M not whole tiles, or whole waves only): unsplit over all the waves where they and M's tiles of
    # rows are 90% full and K keeps 64 steps
    unsplit = w4a16.WgmmaTmaConfig(256, 128, 4, 1, dequant_warps=4)
    assert waves(1000, 28672, 4096, 132) == unsplit  # 896 tiles: seven waves at 97%
    assert waves(1000, 12288, 4096, 132) == unsplit  # 384 tiles: three waves at 97%
    assert waves(1000, 28672, 2048, 132) is None  # 32 steps of K
    assert waves(1000, 28672, 4096, 120) == unsplit  # on 120 SMs: eight waves at 93%
    assert waves(1000, 17920, 4096, 132) is None  # 560 tiles: five waves at 85%
    assert waves(800, 12288, 4096, 132) is None  # 800 of 1024 rows: 78%
    assert waves(922, 12288, 4096, 132) == unsplit  # 922 of 1024 rows: 90%
    assert waves(1024, 128 * 99, 4096, 132) == unsplit  # 4 x 99 tiles: three whole waves, nothing after them


def test_w4a16_wgmma_tma_rejects_shapes_it_cannot_run():
    """Each shape the TMA kernel cannot lay out is named with what it needs, before any launch."""
    for cfg in (w4a16.WgmmaTmaConfig(128, 128, 4, 1), w4a16.WgmmaTmaConfig(64, 64, 3, 3, num_warps=4),
                w4a16.WgmmaTmaConfig(256, 128, 5, 1), w4a16.WgmmaTmaConfig(128, 256, 2, 2),
                w4a16.WgmmaTmaConfig(256, 128, 4, 1, 8, 4), w4a16.WgmmaTmaConfig(128, 64, 4, 1, 8, 8)):
        w4a16.check_wgmma_tma_config(cfg)
    for cfg, shared in ((w4a16.WgmmaTmaConfig(256, 128, 4, 1, 8, 8), 215040),  # 128 sums a thread, 8 dequantizing
                        (w4a16.WgmmaTmaConfig(128, 256, 2, 1, 8, 4), 116736),  # 256 columns
                        (w4a16.WgmmaTmaConfig(128, 128, 4, 1, 8, 2), 149504),  # 2 warps dequantizing
                        (w4a16.WgmmaTmaConfig(128, 128, 2, 1, 8, 4), 74752),  # 2 stages: a tile's signal waits
                        (w4a16.WgmmaTmaConfig(256, 128, 5, 1, 8, 4), 268800)):  # 5 stages of 256 rows
        with pytest.raises(ValueError, match=rf"{re.escape(repr(cfg))}: needs .*dequant_warps 4 or 8.*"
                                             rf"this one: {shared}"):
            w4a16.check_wgmma_tma_config(cfg)
    for cfg in (w4a16.WgmmaTmaConfig(128, 64, 3, 4, 4, registers=True),
                w4a16.WgmmaTmaConfig(256, 64, 4, 1, 4, 0, True), w4a16.WgmmaTmaConfig(64, 64, 3, 4, 4, 0, True, True)):
        w4a16.check_wgmma_tma_config(cfg)
    for cfg in (w4a16.WgmmaTmaConfig(128, 64, 3, 4, 4, loader_warp=True),
                w4a16.WgmmaTmaConfig(256, 128, 4, 1, 8, 4, loader_warp=True)):
        with pytest.raises(ValueError, match=rf"{re.escape(repr(cfg))}: loader_warp .* needs registers=True"):
            w4a16.check_wgmma_tma_config(cfg)
    register_fed = w4a16.WgmmaTmaConfig(64, 64, 3, 1, 4, registers=True, loader_warp=True)
    for cfg in (register_fed._replace(maxnreg=64), register_fed._replace(maxnreg=248),
                register_fed._replace(block_m=128, maxnreg=128), register_fed._replace(block_m=128),
                register_fed._replace(block_m=256, stages=4, maxnreg=w4a16.RS_WS_256_REGISTERS),
                register_fed._replace(block_m=256, maxnreg=248)):
        w4a16.check_wgmma_tma_config(cfg)
    # (256-row tiles: ptxas asks 158 registers, so no default of 128)
    for cfg, least in ((register_fed._replace(maxnreg=56), 64), (register_fed._replace(maxnreg=66), 64),
                       (register_fed._replace(maxnreg=256), 64), (register_fed._replace(block_m=128, maxnreg=80), 128),
                       (register_fed._replace(loader_warp=False, maxnreg=128), 64),
                       (register_fed._replace(block_m=256), 168),
                       (register_fed._replace(block_m=256, maxnreg=128), 168)):
        with pytest.raises(ValueError, match=rf"{re.escape(repr(cfg))}: maxnreg .* needs loader_warp and a multiple "
                                             rf"of 8 from {least} \(block_m {cfg.block_m}\) to 255"):
            w4a16.check_wgmma_tma_config(cfg)
    w4a16.check_wgmma_tma_config(w4a16.WgmmaTmaConfig(256, 128, 4, 2, 8, 4, split_from_column=4224))
    w4a16.check_wgmma_tma_config(w4a16.WgmmaTmaConfig(256, 128, 4, 1, 8, 4, dequantized_from_column=4224))
    for cfg in (w4a16.WgmmaTmaConfig(256, 128, 4, 2, 8, 4, dequantized_from_column=128),  # K split
                w4a16.WgmmaTmaConfig(256, 128, 4, 1, 8, dequantized_from_column=128),  # not warp-specialized
                w4a16.WgmmaTmaConfig(256, 128, 4, 1, 8, 4, dequantized_from_column=64)):  # within a tile
        with pytest.raises(ValueError, match=rf"{re.escape(repr(cfg))}: dequantized_from_column .* needs "
                                             rf"dequant_warps, split_k 1 and a positive multiple of block_n"):
            w4a16.check_wgmma_tma_config(cfg)
    for cfg in (w4a16.WgmmaTmaConfig(256, 128, 4, 1, 8, 4, split_from_column=128),  # K not split
                w4a16.WgmmaTmaConfig(256, 128, 4, 2, 8, split_from_column=128),  # not warp-specialized
                w4a16.WgmmaTmaConfig(256, 128, 4, 2, 8, 4, split_from_column=192),  # within a tile
                w4a16.WgmmaTmaConfig(256, 128, 4, 2, 8, 4, split_from_column=-128)):
        with pytest.raises(ValueError, match=rf"{re.escape(repr(cfg))}: split_from_column .* needs dequant_warps, "
                                             rf"split_k > 1 and a positive multiple of block_n"):
            w4a16.check_wgmma_tma_config(cfg)
    for cfg, shared in ((w4a16.WgmmaTmaConfig(128, 128, 3, 1, 4, registers=True), 56064),  # one warpgroup: 64 columns
                        (w4a16.WgmmaTmaConfig(128, 64, 3, 1, 8, registers=True), 56064),
                        (w4a16.WgmmaTmaConfig(128, 64, 3, 1, 4, 4, True), 56064),  # not warp-specialized too
                        (w4a16.WgmmaTmaConfig(256, 64, 8, 1, 4, registers=True), 280576)):
        with pytest.raises(ValueError, match=rf"{re.escape(repr(cfg))}: needs .*registers with block_n 64.*"
                                             rf"this one: {shared}"):
            w4a16.check_wgmma_tma_config(cfg)
    for cfg, shared in ((w4a16.WgmmaTmaConfig(64, 128, 4, 1), 81920), (w4a16.WgmmaTmaConfig(128, 256, 4, 1, 4), 163840),
                        (w4a16.WgmmaTmaConfig(256, 256, 5, 1), 262144), (w4a16.WgmmaTmaConfig(128, 96, 4, 1), 102400),
                        (w4a16.WgmmaTmaConfig(128, 128, 1, 1), 65536), (w4a16.WgmmaTmaConfig(128, 128, 4, 0), 114688),
                        (w4a16.WgmmaTmaConfig(192, 64, 2, 1, 4), 73728)):  # (TMA blocks are powers of two)
        with pytest.raises(ValueError, match=rf"{re.escape(repr(cfg))}: needs num_warps 4 or 8.*this one: {shared}"):
            w4a16.check_wgmma_tma_config(cfg)
    x, qweight, scales, zeros, _ = make_w4(80, 64, 128, 32, torch.float16, False, False, 0)
    with pytest.raises(ValueError, match=r"WgmmaTmaConfig.*sm_90 GPU.*; got x \(80, 128\).*group_size 32"):
        w4a16.w4a16_linear(x, qweight, scales, zeros, 32, config=w4a16.WgmmaTmaConfig(128, 128, 4, 1))

def test_w4a16_warp_specialized_kernel_reads_words_tma_can_copy():
    """The warp-specialized kernel's TMA copies read words in tiles of 64 whose runs are contiguous, or in rows of
    whole 16 bytes, and scales and zeros in rows of whole 16 bytes, all 16-byte aligned (by storage offset);
    anything else goes to the kernel without them."""
    _, rows, scales, zeros, _ = make_w4(1, 128, 256, 128, torch.float16, False, False, 0)
    _, rows_of_6, scales_of_6, zeros_of_6, _ = make_w4(1, 6, 256, 128, torch.float16, False, False, 0)
    offset_scales = torch.empty(scales.numel() + 4, dtype=scales.dtype)[4:].view_as(scales)
    for words, s, z, readable in ((rows, scales, zeros, True),
                                  (reference.tile_word_columns(rows), scales, zeros, True),
                                  # one tile (N = 64): laid out as any other, not with the stride its view had
                                  (reference.tile_word_columns(rows[:, :64].contiguous()), scales[:, :64],
                                   zeros[:, :64], True),
                                  (rows[:, :64], scales[:, :64], zeros[:, :64], True),  # columns of wider rows
                                  (reference.tile_word_columns(rows, 32), scales, zeros, False),  # tiles of 32
                                  (rows_of_6, scales_of_6, zeros_of_6, False),  # rows of 24 and 12 bytes
                                  (rows, offset_scales, zeros, False)):  # scales 8 bytes into their allocation
        assert w4a16.wgmma_tma_words_ok(words, s, z) == readable, (words.shape, words.stride(), s.stride())



def test_w4a16_warp_mma_unrolls_only_whole_splits_of_few_iterations():
    # 32 groups over 8 warps: 4 iterations a warp; with column warps, fewer warps share K
    assert w4a16.warp_mma_unrolled_iterations(w4a16.WarpMmaConfig(8, 1, 2, unrolled=True), 32) == 4
    assert w4a16.warp_mma_unrolled_iterations(w4a16.WarpMmaConfig(8, 1, 2, 2, unrolled=True), 32) == 8
    assert w4a16.warp_mma_unrolled_iterations(w4a16.WarpMmaConfig(4, 2, 2, unrolled=True), 30) == 4  # cdiv(15, 4)
    assert w4a16.warp_mma_unrolled_iterations(w4a16.WarpMmaConfig(8, 1, 2), 32) == 0  # not asked
    assert w4a16.warp_mma_unrolled_iterations(w4a16.WarpMmaConfig(4, 3, 2, unrolled=True), 32) == 0  # splits differ
    assert w4a16.warp_mma_unrolled_iterations(w4a16.WarpMmaConfig(4, 1, 2, unrolled=True), 112) == 0  # 28: too many


def test_gemv_unrolls_only_whole_splits_of_few_steps():
    assert unrolled_steps(True, 4096, 1, 512) == 8
    assert unrolled_steps(True, 4096, 2, 512) == 4
    assert unrolled_steps(False, 4096, 1, 512) == 0  # not asked
    assert unrolled_steps(True, 4096 + 16, 1, 512) == 0  # the last step is partial
    assert unrolled_steps(True, 4096, 3, 256) == 0  # splits differ
    assert unrolled_steps(True, 512 * MAX_UNROLLED_STEPS, 1, 512) == MAX_UNROLLED_STEPS
    assert unrolled_steps(True, 512 * (MAX_UNROLLED_STEPS + 1), 1, 512) == 0  # too many
    assert unrolled_steps(True, 0, 1, 512) == 0


def test_w4a16_warp_mma_rejects_what_it_cannot_read():
    x, qweight, scales, zeros, _ = make_w4(12, 64, 128, 32, torch.float16, False, False, 0)
    with pytest.raises(ValueError, match="group_size a multiple of 64.*group_size 32"):
        w4a16.w4a16_linear(x, qweight, scales, zeros, 32, config=w4a16.WarpMmaConfig(4, 1, 2))
    x, qweight, scales, zeros, _ = make_w4(12, 64, 128, 64, torch.float16, False, False, 0)
    with pytest.raises(ValueError, match=r"row_tiles 1 or 2.*x \(12, 128\)"):
        w4a16.w4a16_linear(x, qweight, scales, zeros, 64, config=w4a16.WarpMmaConfig(4, 1, 3))
    with pytest.raises(ValueError, match=r"column_warps \(3\) must divide num_warps \(4\)"):
        w4a16.w4a16_linear(x, qweight, scales, zeros, 64, config=w4a16.WarpMmaConfig(4, 1, 2, 3))
    with pytest.raises(ValueError, match=r"num_warps \(16\), leaving at most 8 warps a column block"):
        w4a16.w4a16_linear(x, qweight, scales, zeros, 64, config=w4a16.WarpMmaConfig(16, 1, 2, 1))
    # 32 columns a warp and one 8-row tile: 8 sums a lane, so at most 4 warps take turns on a block
    with pytest.raises(ValueError, match=r"num_warps \(8\), leaving at most 4 warps a column block"):
        w4a16.w4a16_linear(x, qweight, scales, zeros, 64, config=w4a16.WarpMmaConfig(8, 1, 1, column_blocks=2))
    with pytest.raises(ValueError, match=r"column_blocks must be 4 or 2 .* got 3"):
        w4a16.w4a16_linear(x, qweight, scales, zeros, 64, config=w4a16.WarpMmaConfig(4, 1, 2, column_blocks=3))
    x, qweight, scales, zeros, _ = make_w4(24, 64, 128, 32, torch.float16, False, False, 0)
    with pytest.raises(ValueError, match=r"sm_90 GPU.*K a multiple of 128.*; got x \(24, 128\).*group_size 32"):
        w4a16.w4a16_linear(x, qweight, scales, zeros, 32, config=w4a16.WgmmaConfig(32, 1, 1))
    # K in whole 128-row chunks, each in one group or two of 64
    assert [w4a16.wgmma_chunks(K, g) for K, g in [(256, 64), (256, 128), (512, 256), (192, 64), (384, 192)]] == [
        True, True, True, False, False]


def test_w4a16_strided_activations_and_empty_batch():
    x, qweight, scales, zeros, _ = make_w4(6, 24, 64, 32, torch.float16, False, False, 0)
    wide = torch.randn(6, 128, dtype=torch.float16, device=DEVICE)
    wide[:, ::2] = x
    out = w4a16.w4a16_linear(wide[:, ::2], qweight, scales, zeros, 32)
    assert relative_error(out, w4_reference(x, qweight, scales, zeros, 32, None)) < BOUND[torch.float16]
    assert w4a16.w4a16_linear(x[:0], qweight, scales, zeros, 32).shape == (0, 24)


# --- W8A16 ---------------------------------------------------------------------------------

@examples
@given(M=st.integers(1, 40), N=st.integers(16, 72), K=st.integers(1, 300),
       dtype=st.sampled_from(cpu_dtypes(gemv=False)), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_w8a16_tuned_choice_matches_reference(M, N, K, dtype, bias, seed):
    x, qweight, scales, b = make_w8(M, N, K, dtype, bias, seed)
    out = w8a16.w8a16_linear(x, qweight, scales, b)
    assert out.dtype == dtype and out.shape == (M, N)
    ref = reference.w8a16_linear(x.float(), qweight, scales.float(), None if b is None else b.float())
    assert relative_error(out, ref) < BOUND[dtype]


W8_CONFIGS = [
    w8a16.GemvConfig(block_n=8, block_k=64, split_k=3, num_warps=4, num_stages=2),
    w8a16.GemvConfig(block_n=8, block_k=64, split_k=2, num_warps=4, num_stages=2, block_m=2),  # 2 rows a program
    w8a16.GemvConfig(block_n=16, block_k=128, split_k=2, num_warps=4, num_stages=2, packed_f16=False,
                     packed_bf16=False, block_m=2),  # float32 path on GPU too
    w8a16.MmaConfig(16, 32, 32, split_k=2, num_warps=4, num_stages=2),
    w8a16.DequantMmConfig(),
]


@pytest.mark.parametrize("config", W8_CONFIGS, ids=lambda c: type(c).__name__ + str(tuple(c)))
@settings(max_examples=3 if not CUDA else 6, deadline=None)
@given(M=st.integers(1, 37), N=st.integers(16, 50), K=st.integers(1, 200), bias=st.booleans(),
       seed=st.integers(0, 2**16), data=st.data())
def test_w8a16_each_kernel_variant(config, M, N, K, bias, seed, data):
    dtype = data.draw(st.sampled_from(cpu_dtypes(gemv=isinstance(config, w8a16.GemvConfig))))
    if isinstance(config, w8a16.GemvConfig) and not CUDA:
        M = M % (2 * config.block_m + 1) + 1  # the interpreter runs one program per block of rows: keep them few
    x, qweight, scales, b = make_w8(M, N, K, dtype, bias, seed)
    out = w8a16.w8a16_linear(x, qweight, scales, b, config=config)
    ref = reference.w8a16_linear(x.float(), qweight, scales.float(), None if b is None else b.float())
    assert relative_error(out, ref) < BOUND[dtype]
    _, residual = norm_and_residual(M, N, K, dtype, seed)  # a bias shaped as the output: a residual
    out = w8a16.w8a16_linear(x, qweight, scales, residual, config=config)
    ref = reference.w8a16_linear(x.float(), qweight, scales.float(), residual.float())
    assert relative_error(out, ref) < BOUND[dtype]


@pytest.mark.parametrize("swap_ab", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_w8a16_mma_either_operand(swap_ab, activation):
    """The W8A16 tensor-core kernel with the weight tile as the MMA's left operand (registers) and
    as its right one (shared memory)."""
    config = w8a16.MmaConfig(16, 32, 32, split_k=2, num_warps=4, num_stages=2, swap_ab=swap_ab)
    assert w8_epilogue_error(activation, 19, 40, 72, torch.float32, True, 7, config=config) < BOUND[torch.float32]


def test_w4a16_mma_split_is_what_the_pick_runs():
    """The sweeps split K by ``mma_split_k``: for each tensor-core pick it is the pick's own split."""
    cpu = torch.device("cpu")
    for M in (3, 17, 48, 64, 65, 100, 128):
        for N, K in [(4096, 4096), (28672, 4096), (4096, 14336)]:
            cfg = w4a16.pick_config(M, N, K, 128, cpu, warp_mma=False)
            assert cfg.split_k == w4a16.mma_split_k(cfg, M, N, K, 132), (M, N, K, cfg)


# Kernels compiled for sm_90 in a process of its own (this one interprets them); no GPU needed. The
# scripts below start with this one's ``compiled``.
_COMPILE_FOR_SM90 = r"""
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compiled(kernel, pointers, constexprs, source_type=ASTSource, **options):
    # ``pointers`` the types of the pointers and TMA descriptors, the other arguments i32; Gluon kernels with
    # ``source_type`` GluonASTSource
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: pointers.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    # aligned pointers, sizes and strides, as at run time (loops are then pipelined, loads vectorized)
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names
               if signature[n] != "constexpr" and not signature[n].startswith("tensordesc")}
    given = {n: constexprs[n] for n in names if n in constexprs}
    source = source_type(fn=kernel, signature=signature, constexprs=given, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

def gluon_ttgir(kernel, pointers, constexprs, num_warps):
    # A Gluon kernel's TTGIR for sm_90
    from triton.experimental.gluon._runtime import GluonASTSource
    return compiled(kernel, pointers, constexprs, GluonASTSource, num_warps=num_warps).asm["ttgir"]

def w4a16_gemv_sm90(dtype, N, K, activation="none", norm=False, bias=False, pdl=False, budget=None, config=None):
    # The W4A16 GEMV at its M = 1 pick for K x N (group 128), or at ``config``, compiled for sm_90 with ``budget``
    # registers a thread (None: the config's).
    import torch
    from qpass.kernels import w4a16
    from qpass.kernels.common import WORD_TILE, register_budget, unrolled_steps

    torch_dtype = torch.float16 if dtype == "fp16" else torch.bfloat16
    cfg = config or w4a16.pick_config(1, N, K, 128, torch.device("cpu"), activation=activation, dtype=torch_dtype,
                                      norm=norm)
    word_rows = cfg.block_k // 8
    constexprs = dict(GROUP_SIZE=128, GROUP_ROWS=16, GROUPS=word_rows // 16, BLOCK_N=cfg.block_n, SPLIT_K=1,
                      EVEN_N=True, EVEN_K=True, HAS_BIAS=bias, ACTIVATION=activation, PACKED_F16=dtype == "fp16",
                      PACKED_BF16=dtype == "bf16", HAS_NORM=norm, NORM_BLOCK=4096,
                      UNROLLED_STEPS=unrolled_steps(cfg.unrolled, K // 8, 1, word_rows), stride_xk=1,
                      stride_qn=1, stride_sn=1, stride_on=1, PDL=pdl, TILE=WORD_TILE,
                      GROUPS_FIRST=w4a16.gemv_groups_first(cfg))
    launch = register_budget(cfg.maxnreg if budget is None else budget)  # MAXNREG, and maxnreg where given
    constexprs["MAXNREG"] = launch.pop("MAXNREG")
    pointers = {p: "*" + dtype for p in ("x_ptr", "g_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr")}
    pointers |= {"qw_ptr": "*i32", "ws_ptr": "*fp32", "norm_eps": "fp32"}
    return compiled(w4a16.w4a16_gemv_kernel, pointers, constexprs, num_warps=cfg.num_warps, **launch)

def w4a16_warp_mma_sm90(dtype, M, N, K, activation="none", bias=False, pdl=False):
    # The warp-level MMA kernel at its pick for M rows and K x N (group 128; N the GEMM's columns, gate and up
    # in runs of 16 under silu_mul), compiled for sm_90 with the pick's register budget.
    import torch
    from qpass.kernels import w4a16
    from qpass.kernels.common import WORD_TILE, output_columns, register_budget

    torch_dtype = torch.float16 if dtype == "fp16" else torch.bfloat16
    cfg = w4a16.pick_config(M, output_columns(activation, N), K, 128, torch.device("cpu"), activation=activation,
                            dtype=torch_dtype)
    assert isinstance(cfg, w4a16.WarpMmaConfig), cfg
    constexprs = dict(GROUP_SIZE=128, M_TILES=cfg.row_tiles, WARPS=cfg.num_warps, COLUMN_WARPS=cfg.column_warps,
                      SPLIT_K=cfg.split_k, HAS_BIAS=bias, ACTIVATION=activation, BF16=dtype == "bf16",
                      UNROLLED_ITERS=w4a16.warp_mma_unrolled_iterations(cfg, K // 128),
                      UP_RUN=16 if activation == "silu_mul" else 0, PDL=pdl, stride_on=1, TILE=WORD_TILE,
                      PREFETCH_GROUPS=cfg.prefetch_groups, LOOP_UNROLL=cfg.loop_unroll, BLOCKS=cfg.column_blocks)
    launch = register_budget(cfg.maxnreg)
    constexprs["MAXNREG"] = launch.pop("MAXNREG")
    pointers = {p: "*" + dtype for p in ("x_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr")}
    pointers |= {"qw_ptr": "*i32", "ws_ptr": "*fp32"}
    return compiled(w4a16.w4a16_warp_mma_kernel, pointers, constexprs, num_warps=cfg.num_warps, **launch)

def sass(kernel):
    # The kernel's SASS, its instruction lines.
    import os, subprocess, tempfile
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        lines = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", cubin.name], capture_output=True,
                               text=True, check=True).stdout.splitlines()
    return [line for line in lines if "/*" in line and ";" in line]
"""


def compiled_for_sm90(script: str) -> str:
    """The standard output of ``script`` run after ``_COMPILE_FOR_SM90`` in a Python of its own."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90 + script], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


_TTGIR_OF_SWAPPED_TILES = r"""
from qpass.kernels import w4a16, w8a16

def ttgir(kernel, pointers, constexprs, num_warps, num_stages=3):
    return compiled(kernel, pointers, constexprs, num_warps=num_warps, num_stages=num_stages).asm["ttgir"]

common = dict(GROUP_M=8, SPLIT_K=1, SWAP_AB=True, HAS_BIAS=False, ACTIVATION="none", DOT_PRECISION="tf32")
# unit strides as constants, as Triton's launcher specializes them: qweight [K / 8, N] (W4A16), [N, K] (W8A16)
w4 = dict(common, GROUP_SIZE=128, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, EVEN_N=True, PACKED=True, stride_xk=1,
          stride_qn=1, stride_sn=1, stride_on=1)
w8 = dict(common, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, EVEN_K=True, CVT_ASM=True, stride_xk=1, stride_qk=1,
          stride_on=1)
for dtype in ("*fp16", "*bf16"):  # (the inline PTX of each dtype's tile, which the interpreter never runs)
    pointers = {p: dtype for p in ("x_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr")} | {"qw_ptr": "*i32", "ws_ptr": "*fp32"}
    print(ttgir(w4a16._w4a16_mma_kernel, pointers, w4, 4))
    print(ttgir(w4a16._w4a16_mma_kernel, pointers, dict(w4, BLOCK_N=64, BLOCK_K=128), 4, num_stages=2))
print(ttgir(w8a16._w8a16_mma_kernel, {p: "*fp16" for p in ("x_ptr", "s_ptr", "b_ptr", "out_ptr")}
            | {"qw_ptr": "*i8", "ws_ptr": "*fp32"}, w8, 4))
"""


def test_register_operand_wgmmas_are_waited_for_each_step():
    """With the weight tile as the left operand, which Hopper's wgmma reads from registers, every
    wgmma of a loop step completes (a wait for none pending) before the next step's dequantization
    can rewrite those registers (``common.mma_accumulate``): checked in Triton's own TTGIR for sm_90."""
    out = compiled_for_sm90(_TTGIR_OF_SWAPPED_TILES)
    mma_ops = [line for line in out.splitlines() if "ttng.warp_group_dot" in line]
    register_dots = [i for i, line in enumerate(mma_ops)
                     if "warp_group_dot_wait" not in line and "dot_op<{opIdx = 0" in line]
    assert len(register_dots) >= 5, out[-3000:]  # a tile in each kernel
    for i in register_dots:
        assert "warp_group_dot_wait" in mma_ops[i + 1] and "pendings = 0" in mma_ops[i + 1], mma_ops[i:i + 2]


# The Hopper kernel compiled for sm_90 (``compiled_for_sm90``; Gluon: no interpreter).
_TTGIR_OF_WGMMA_KERNEL = r"""
from qpass.kernels import w4a16_wgmma

for dtype, split, bias, group_size, scaled in (("fp16", 1, True, 128, False), ("bf16", 4, False, 128, False),
                                              ("fp16", 3, False, 64, False), ("bf16", 1, True, 64, True)):
    constexprs = dict(GROUP_SIZE=group_size, BLOCK_M=128 if scaled else 32, WARPGROUPS=2, SPLIT_K=split,
                      HAS_BIAS=bias, BF16=dtype == "bf16", SCALED=scaled)
    pointers = {p: "*" + dtype for p in ("x_ptr", "s_ptr", "z_ptr", "b_ptr")}
    pointers |= {"qw_ptr": "*i32", "out_ptr": "*" + dtype, "sums_ptr": "*fp32"}
    print(gluon_ttgir(w4a16_wgmma.w4a16_wgmma_kernel, pointers, constexprs, 8))
"""


def assert_split_epilogue(ttgir: str, split: bool):
    """The wgmma kernel's epilogue in TTGIR: unsplit, no atomics; split, the sums added into the workspace
    (relaxed), then the tile's count (acquire-release), and only in the branch of the last program to arrive
    the totals read back, the workspace and the count zeroed for the next launch and the result stored."""
    epilogue = ttgir[ttgir.rindex("ttng.warp_group_dot_wait"):]
    if not split:
        assert "tt.atomic_rmw" not in ttgir
        return
    order = [epilogue.index(op) for op in ("tt.atomic_rmw fadd, relaxed", "tt.atomic_rmw fadd, acq_rel", "scf.if",
                                           "tt.load", "tt.store")]
    assert order == sorted(order), order
    last = epilogue[epilogue.index("scf.if"):]
    stores = [line for line in last.splitlines() if "tt.store" in line]
    assert len(stores) == 3 and "f32>" in stores[0] and "!tt.ptr<f32>" in stores[1] and "f32>" not in stores[2], stores


@pytest.mark.skipif(not w4a16._GLUON, reason="this Triton has no Gluon")
def test_w4a16_wgmma_kernel_feeds_the_mma_from_registers():
    """The Hopper kernel, compiled for sm_90 (fp16 and bf16, split or not, groups of 128 and of 64, the
    weights exact or scaled): its only shared memory is x's stages (two chunks of two steps, three chunks
    when scaled), so the dequantized weight reaches the wgmma in the registers that computed it; one
    step's wgmma stays in flight while the next is dequantized (a wait for one pending), and the MMAs are
    all done (none pending) before a group's products are scaled, or, scaled, before the epilogue. Split,
    the epilogue meets the other splits in the workspace (``assert_split_epilogue``)."""
    modules = compiled_for_sm90(_TTGIR_OF_WGMMA_KERNEL).split("module attributes")[1:]
    assert len(modules) == 4
    for ttgir, stages, split in zip(modules, ("4x32x64x", "4x32x64x", "4x32x64x", "6x128x64x"),
                                    (False, True, True, False)):
        assert ttgir.count("ttg.local_alloc") == 1 and stages in ttgir, ttgir[-3000:]
        assert_split_epilogue(ttgir, split)
        dots = [line for line in ttgir.splitlines() if "ttng.warp_group_dot " in line]
        assert len(dots) == 2 and all("dot_op<{opIdx = 0" in dot for dot in dots), dots
        assert "pendings = 1" in ttgir and "pendings = 0" in ttgir


# The TMA kernel compiled for sm_90 (``compiled_for_sm90``): fp16 and bf16, 8 and 4 warps, split or not, groups
# of 128, 64 and 256, 4 to 2 stages
_TTGIR_OF_WGMMA_TMA_KERNEL = r"""
from triton.experimental.gluon import language as gl
from qpass.kernels import w4a16_wgmma_tma

x_tiles = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
for dtype, block_m, block_n, stages, split, bias, group_size, warps in (
        ("fp16", 128, 128, 4, 1, True, 128, 8), ("bf16", 64, 64, 3, 3, False, 64, 4),
        ("fp16", 128, 256, 2, 2, False, 256, 8)):
    constexprs = dict(GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, SPLIT_K=split,
                      HAS_BIAS=bias, BF16=dtype == "bf16", num_warps=warps)
    pointers = {p: "*" + dtype for p in ("s_ptr", "z_ptr", "b_ptr")}
    pointers |= {"x_desc": f"tensordesc<{dtype}[{block_m},64],{x_tiles!r}>", "qw_ptr": "*i32",
                 "out_ptr": "*fp32" if split > 1 else "*" + dtype}
    print(gluon_ttgir(w4a16_wgmma_tma.w4a16_wgmma_tma_kernel, pointers, constexprs, warps))
"""


@pytest.mark.skipif(not w4a16._GLUON, reason="this Triton has no Gluon")
def test_w4a16_wgmma_tma_kernel_reads_both_operands_from_shared_memory():
    """The TMA kernel, compiled for sm_90: three shared allocations, x's stages, three weight tiles and x's
    mbarriers; x reaches its stages by TMA only; in the loop the step's weight tile is stored, then fenced
    for the MMAs, and only then are the next words loaded (the fence waits for the loads in flight); the
    wgmma reads both operands from shared memory and one stays in flight (a wait for one pending, then none
    after the loop)."""
    modules = compiled_for_sm90(_TTGIR_OF_WGMMA_TMA_KERNEL).split("module attributes")[1:]
    assert len(modules) == 3
    for ttgir, x_stages, weights, dtype in zip(modules, ("4x128x64", "3x64x64", "2x128x64"),
                                               ("3x128x64", "3x64x64", "3x256x64"), ("f16", "bf16", "f16")):
        allocs = [line for line in ttgir.splitlines() if "ttg.local_alloc" in line]
        assert len(allocs) == 3 and f"{x_stages}x{dtype}" in allocs[0] and f"{weights}x{dtype}" in allocs[1], allocs
        assert "ttng.async_tma_copy_global_to_local %x_desc" in ttgir
        loop = ttgir[ttgir.index("scf.for"):]
        order = [loop.index(op) for op in ("ttg.local_store", "ttng.fence_async_shared", "tt.load",
                                           "ttng.warp_group_dot ")]
        assert order == sorted(order), order
        dots = [line for line in ttgir.splitlines() if "ttng.warp_group_dot " in line]
        assert len(dots) == 1 and "dot_op" not in dots[0] and dots[0].count("!ttg.memdesc") == 2, dots
        assert "pendings = 1" in loop and "pendings = 0" in ttgir


def copied_block(line):
    """The block a TTGIR TMA copy reads ("128x64xf16"), as Triton 3.9 and 3.6 (``tensor<...>``) print it."""
    return line.split("!tt.tensordesc<")[1].split(",")[0].removeprefix("tensor<")


# The warp-specialized TMA kernel compiled for sm_90: fp16 256 x 128 (x in half tiles) with 4 warps dequantizing words
# in tiles, bf16 128 x 64 with 4 MMA warps and 8 dequantizing words in rows, with a bias
_TTGIR_OF_WARP_SPECIALIZED_KERNEL = r"""
from triton.experimental.gluon import language as gl
from qpass.kernels import w4a16_wgmma_tma

x_tiles = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
runs = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)
rows = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
sums = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
for dtype, block_m, block_n, words, split, tail, bias, warps, dequant_warps, halves in (
        ("fp16", 256, 128, "2,8,64", 2, False, False, 8, 4, True),
        ("bf16", 128, 64, "1,8,64", 1, False, True, 4, 8, False),
        ("fp16", 256, 128, "2,8,64", 2, True, True, 8, 4, False)):
    constexprs = dict(GROUP_SIZE=128, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=4, SPLIT_K=split, TAIL=tail,
                      HAS_BIAS=bias, DEQUANT_WARPS=dequant_warps, num_warps=warps)
    pointers = {"b_ptr": "*" + dtype, "out_ptr": "*fp32" if split > 1 and not tail else "*" + dtype,
                "x_desc": f"tensordesc<{dtype}[{block_m},64],{x_tiles!r}>",
                "x_half_desc": f"tensordesc<{dtype}[{block_m // 2 if halves else block_m},64],{x_tiles!r}>",
                "w_desc": f"tensordesc<i32[{words}],{runs!r}>"}
    pointers |= {p: f"tensordesc<{dtype}[1,{block_n}],{rows!r}>" for p in ("s_desc", "z_desc")}
    # the tile's blocks as the TMA unit writes them (w4a16.wgmma_tma_launch)
    sums_blocks = f"tensordesc<fp32[{block_m // 2 if halves else block_m},32],{sums!r}>"
    out_blocks = f"tensordesc<{dtype}[{block_m},64],{x_tiles!r}>"
    pointers["tile_desc"] = sums_blocks if split > 1 and not tail else out_blocks
    pointers["tail_desc"] = sums_blocks if tail else pointers["tile_desc"]
    print(gluon_ttgir(w4a16_wgmma_tma.w4a16_wgmma_tma_ws_kernel, pointers, constexprs, warps))
"""


@pytest.mark.skipif(not w4a16._GLUON, reason="this Triton has no Gluon")
def test_w4a16_warp_specialized_kernel_reads_every_operand_by_tma():
    """The warp-specialized kernel, compiled for sm_90: a region of a default partition (the MMAs) and two
    workers, the dequantizing warps and one loader warp; x, the words, scales and zeros reach shared memory by TMA
    only (the only global load left is the bias of the epilogue); the wgmma reads both operands from shared memory,
    one in flight; the tile leaves by the TMA unit, added into the split sums in blocks of 32 columns (four a half
    of x's rows) or stored in blocks of 64, and no thread stores or adds an element of it. With a tail split (and
    only there), a tile is stored or added, as it is whole or the tail's."""
    modules = compiled_for_sm90(_TTGIR_OF_WARP_SPECIALIZED_KERNEL).split("module attributes")[1:]
    assert len(modules) == 3
    stored, added = "ttng.async_tma_copy_local_to_global", "ttng.async_tma_reduce add"
    for ttgir, (x_blocks, words, scales, dequant_warps, bias, tile_writes, tail_writes) in zip(modules, (
            (["128x64xf16"] * 2, "2x8x64xsi32", "1x128xf16", 4, False, 8 * [added], []),  # x in halves
            (["128x64xbf16"], "1x8x64xsi32", "1x64xbf16", 8, True, [stored], []),
            (["256x64xf16"], "2x8x64xsi32", "1x128xf16", 4, True, 2 * [stored], 4 * [added]))):
        assert "ttg.warp_specialize" in ttgir and f"num_warps({dequant_warps})" in ttgir and "num_warps(1)" in ttgir
        copies = [line for line in ttgir.splitlines() if "ttng.async_tma_copy_global_to_local" in line]
        assert sorted(copied_block(line) for line in copies) == sorted([*x_blocks, words, scales, scales]), copies
        assert ttgir.count("tt.load ") == int(bias)
        dots = [line for line in ttgir.splitlines() if "ttng.warp_group_dot " in line]
        assert len(dots) == 1 and "dot_op" not in dots[0] and dots[0].count("!ttg.memdesc") == 2, dots
        assert "pendings = 1" in ttgir
        for desc, expected in (("%tile_desc", tile_writes), ("%tail_desc", tail_writes)):
            writes = [line.split(desc)[0].strip(" ,") for line in ttgir.splitlines() if f"{desc}[" in line]
            assert writes == expected, (desc, writes)
        assert "tt.atomic_rmw" not in ttgir and "tt.store " not in ttgir


# The TMA kernel with the weights in registers compiled for sm_90, single-partition and warp-specialized (at its
# register budget, and the 64-row one at four programs an SM's too): fp16 128 rows, words in tiles, a bias; bf16 64
# rows, words in rows, split in two, x in half tiles; warp-specialized only, fp16 256 rows in 4 stages, split in two.
# Each one's TTGIR, then its SASS as lines after "SASS".
_REGISTER_OPERAND_TMA_KERNEL = r"""
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from qpass.kernels import w4a16, w4a16_wgmma_tma

x_tiles = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
runs = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=3)
rows = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
sums = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
for dtype, block_m, split, bias, halves, stages in (("fp16", 128, 1, True, False, 3), ("bf16", 64, 2, False, True, 3),
                                                    ("fp16", 256, 2, False, False, 4)):
    constexprs = dict(GROUP_SIZE=128, BLOCK_M=block_m, STAGES=stages, SPLIT_K=split, HAS_BIAS=bias)
    pointers = {"b_ptr": "*" + dtype, "out_ptr": "*fp32" if split > 1 else "*" + dtype,
                "x_desc": f"tensordesc<{dtype}[{block_m},64],{x_tiles!r}>",
                "x_half_desc": f"tensordesc<{dtype}[{block_m // 2 if halves else block_m},64],{x_tiles!r}>",
                "w_desc": f"tensordesc<i32[1,8,64],{runs!r}>"}
    pointers |= {p: f"tensordesc<{dtype}[1,64],{rows!r}>" for p in ("s_desc", "z_desc")}
    # the tile's blocks as the TMA unit writes them (w4a16.wgmma_tma_launch): split, the float32 sums' (x in halves);
    # unsplit, the output's
    pointers["tile_desc"] = (f"tensordesc<fp32[{block_m // 2 if halves else block_m},32],{sums!r}>" if split > 1
                             else f"tensordesc<{dtype}[{block_m},64],{x_tiles!r}>")
    budgets = {64: [w4a16.RS_WS_REGISTERS, w4a16.rs_ws_registers(4)], 128: [w4a16.RS_WS_REGISTERS],
               256: [w4a16.RS_WS_256_REGISTERS]}[block_m]
    for kernel, budget in [(w4a16_wgmma_tma.w4a16_wgmma_tma_rs_kernel, {})] * (block_m < 256) + [
            (w4a16_wgmma_tma.w4a16_wgmma_tma_rs_ws_kernel, {"maxnreg": budget}) for budget in budgets]:
        kernel = compiled(kernel, pointers, constexprs, GluonASTSource, num_warps=4, **budget)
        print(kernel.asm["ttgir"])
        print("SASS")
        # "address instruction" a line
        print("\n".join(line.split("/*")[1].split("*/")[0] + " " + line.split("*/")[1].split(";")[0].strip()
                        for line in sass(kernel)))
"""


def wgmma_operand_registers_rewritten_in_flight(sass_lines):
    """The instructions of ``sass_lines`` ("address instruction" a line) that write a register-operand ``HGMMA``'s
    A registers while it may still read them: before the ``WARPGROUP.DEPBAR`` that retires its group. Each loop
    (a branch back) is read twice over, so that its next iteration meets what its last one left in flight."""
    code = [(int(line.split()[0], 16), line.split(None, 1)[1]) for line in sass_lines
            if re.match(r"[0-9a-f]{4,} \S", line)]
    addresses = [address for address, _ in code]
    loops = [code[addresses.index(int(target, 16)):i + 1] for i, (address, text) in enumerate(code)
             for target in re.findall(r"BRA \S*?(0x[0-9a-f]+)", text) if int(target, 16) < address]
    found = []
    for body in [code] + [loop + loop for loop in loops]:
        groups, group = [], set()
        for _, text in body:
            op = re.sub(r"^@!?U?P\w+\s+", "", text).split()
            hgmma = re.match(r"HGMMA\S* R\d+, R(\d+),", " ".join(op))
            if hgmma:
                group |= set(range(int(hgmma.group(1)), int(hgmma.group(1)) + 4))
                if "gsb0" in text:
                    groups, group = groups + [group], set()
            elif op and op[0] == "WARPGROUP.DEPBAR.LE":
                pending = int(op[-1], 16)
                groups = groups[len(groups) - pending:] if pending else []
            elif len(op) > 1 and not op[0].startswith(("ST", "RED", "ATOM", "BRA", "BAR", "SYNCS", "UTMA")):
                written = re.match(r"R(\d+)", op[1])
                if written and any(int(written.group(1)) in g for g in groups + [group]):
                    found.append(text)
    return found


def dequantized_under_mmas(sass_lines):
    """The dequantizing instructions of ``sass_lines`` (the words' shared loads ``LDS`` and their bytes' selection
    ``PRMT``) that run while a group of ``HGMMA`` is in flight: after its last HGMMA (``gsb0``), before the
    ``WARPGROUP.DEPBAR`` that waits for it. (ptxas leaves a step's last two, the zero's and the scale's, after it.)"""
    found, in_flight = [], False
    for line in sass_lines:
        if " HGMMA" in line and "gsb0" in line:
            in_flight = True
        elif "WARPGROUP.DEPBAR" in line:
            in_flight = False
        elif in_flight and re.search(r" (LDS|PRMT)\b", line):
            found.append(line)
    return found


@pytest.mark.skipif(not w4a16._GLUON, reason="this Triton has no Gluon")
def test_w4a16_register_operand_tma_kernel_dequantizes_into_the_mma_operand():
    """The TMA kernel with the weights in registers, compiled for sm_90: x (in whole tiles, or in halves), the words,
    scales and zeros reach shared memory by TMA only (for 3 stages, then a step each; warp-specialized, by the loader
    partition; the only global load left is the bias), warp-specialized the first stages' weights before the wait for
    the grid before and x after it; the wgmma's left operand is in registers and its right one in shared memory, and
    each step's MMAs are waited for before the loop goes on; the tile leaves by the TMA unit (split, added into the
    sums; unsplit, stored); in the SASS nothing spills and no instruction rewrites an
    operand register of an HGMMA in flight (Triton 3.6's ptxas did, with one step in flight across the loop's back
    edge). The same at 64 rows with four programs an SM's registers (``rs_ws_registers(4)``), and at 256 rows with
    one's (``RS_WS_256_REGISTERS``). The warp-specialized kernel's 128- and 256-row tiles dequantize each step while
    the MMAs of the step before run, and no other form does."""
    modules = compiled_for_sm90(_REGISTER_OPERAND_TMA_KERNEL).split("module attributes")[1:]
    assert len(modules) == 6
    # (x's blocks, the scales' block, a bias, warp-specialized, stages, the split sums' bulk reductions)
    cases = [(["128x64xf16"], "1x64xf16", True, loader_warp, 3, 0) for loader_warp in (False, True)]
    cases += [(["32x64xbf16"] * 2, "1x64xbf16", False, loader_warp, 3, 4) for loader_warp in (False, True, True)]
    cases += [(["256x64xf16"], "1x64xf16", False, True, 4, 2)]
    for module, (x_blocks, scales, bias, loader_warp, stages, reduced) in zip(modules, cases):
        ttgir, code = module.split("\nSASS\n")
        copies = [line for line in ttgir.splitlines() if "ttng.async_tma_copy_global_to_local" in line]
        blocks = sorted(copied_block(line) for line in copies)
        if loader_warp:  # (Triton 3.6 prints some copies twice)
            assert "ttg.warp_specialize" in ttgir and set(blocks) == {*x_blocks, "1x8x64xsi32", scales}, blocks
        else:
            assert blocks == sorted(4 * [*x_blocks, "1x8x64xsi32", scales, scales]), blocks  # 3 stages, the loop's
        assert ttgir.count("tt.load ") == int(bias)
        under_mmas = loader_warp and x_blocks[0][:3] in ("128", "256")  # (``w4a16_wgmma_tma._steps_under_mmas``)
        dots = [line for line in ttgir.splitlines() if "ttng.warp_group_dot " in line]
        # under the MMAs: the first step's, two steps an iteration and the last's
        assert len(dots) == (4 if under_mmas else 1), dots
        assert all("dot_op<{opIdx = 0" in dot and dot.count("!ttg.memdesc") == 1 for dot in dots), dots
        assert "pendings = 1" not in ttgir and "pendings = 0" in ttgir
        lines = code.splitlines()
        assert sum(" HGMMA" in line for line in lines) == 4 * len(dots)  # (4 a step)
        assert not any(re.search(r" (LDL|STL)\b", line) for line in lines)
        assert not wgmma_operand_registers_rewritten_in_flight(lines)
        assert bool(dequantized_under_mmas(lines)) == under_mmas
        # split: the tile added into the sums by the TMA unit, one bulk reduction a block of 32 columns (two of half
        # the rows: x in halves), no atomic instruction an element
        reductions = [line for line in ttgir.splitlines() if "ttng.async_tma_reduce" in line]
        assert len(reductions) == reduced, reductions
        assert sum(" UTMAREDG" in line for line in lines) == len(reductions)
        assert not any(re.search(r" (RED|ATOM)G?\b", line) for line in lines)
        # unsplit, the tile stored by the TMA unit too, in one block of 64 columns, no thread storing an element
        stores = [line for line in ttgir.splitlines() if "ttng.async_tma_copy_local_to_global" in line]
        assert len(stores) == int(not reduced), stores
        assert sum(" UTMASTG" in line for line in lines) == len(stores)
        assert not any(re.search(r" STG\b", line) for line in lines)
        # programmatic dependent launch (warp-specialized only): the first 3 stages' words, scales and zeros copied
        # before the wait for the grid before (which may write x), x's after it, in the TTGIR and in the SASS
        # (ACQBULK the wait)
        ir_lines = ttgir.splitlines()
        if not loader_warp:
            assert "griddepcontrol" not in ttgir and not any(" ACQBULK" in line for line in lines)
            continue
        waits = [i for i, line in enumerate(ir_lines) if "griddepcontrol.wait" in line]
        assert len(waits) == 1 and "griddepcontrol.launch_dependents" in ir_lines[waits[0]]
        early = sorted(copied_block(line) for line in ir_lines[:waits[0]]
                       if "ttng.async_tma_copy_global_to_local" in line)
        assert early == sorted(stages * ["1x8x64xsi32", scales, scales]), early
        wait = [i for i, line in enumerate(lines) if " ACQBULK" in line]
        assert len(wait) == 1 and sum(" PREEXIT" in line for line in lines[:wait[0]]) == 1
        early = [line for line in lines[:wait[0]] if " UTMALDG" in line]
        assert len(early) == 3 * stages and sum(" UTMALDG.3D" in line for line in early) == stages, early


# The register-fed wgmma kernel's SASS for sm_90 ("address instruction" a line), exact and scaled, one and two
# warpgroups, split or not
_SASS_OF_WGMMA_KERNEL = r"""
from triton.experimental.gluon._runtime import GluonASTSource
from qpass.kernels import w4a16_wgmma

for dtype, block_m, warpgroups, split, scaled in (("fp16", 32, 2, 1, False), ("bf16", 32, 1, 4, False),
                                                  ("fp16", 64, 2, 4, True)):
    constexprs = dict(TILE=64, GROUP_SIZE=128, BLOCK_M=block_m, WARPGROUPS=warpgroups, SPLIT_K=split, HAS_BIAS=False,
                      BF16=dtype == "bf16", SCALED=scaled)
    pointers = {p: "*" + dtype for p in ("x_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr")}
    pointers |= {"qw_ptr": "*i32", "sums_ptr": "*fp32"}
    kernel = compiled(w4a16_wgmma.w4a16_wgmma_kernel, pointers, constexprs, GluonASTSource, num_warps=4 * warpgroups)
    print("KERNEL")
    print("\n".join(line.split("/*")[1].split("*/")[0] + " " + line.split("*/")[1].split(";")[0].strip()
                    for line in sass(kernel)))
"""


@pytest.mark.skipif(not w4a16._GLUON, reason="this Triton has no Gluon")
def test_w4a16_wgmma_kernel_never_rewrites_an_operand_in_flight():
    """The register-fed wgmma kernel keeps one step's MMAs in flight while it dequantizes the next: in its sm_90 SASS
    no instruction writes the registers of an operand whose MMAs have not been waited for (two steps an iteration
    give each its own registers; with one, Triton 3.6's ptxas reused them)."""
    kernels = compiled_for_sm90(_SASS_OF_WGMMA_KERNEL).split("KERNEL\n")[1:]
    assert len(kernels) == 3
    for code in kernels:
        lines = code.splitlines()
        assert any(" HGMMA" in line for line in lines) and any("DEPBAR.LE gsb0, 0x1" in line for line in lines)
        assert not wgmma_operand_registers_rewritten_in_flight(lines)


@pytest.mark.parametrize("unit", [1.0, int4_pairs.F16_DOT_UNIT])  # the tile's and the GEMV dot's
def test_f16_nibble_arithmetic_is_exact_for_every_code_and_zero(unit):
    """The fp16 arithmetic of ``int4_pairs.f16_nibble_pairs`` and ``f16_zero_constants``, which the
    interpreter cannot run (inline PTX), emulated in torch with their constants: for every code q
    and zero z, the low nibble under the magic minus ``(1024 + z) unit`` and the high nibble (4 bits
    up) times 1/16 plus ``-(64 + z) unit`` are ``unit (q - z)`` exactly, each operation rounded to
    fp16 as the PTX rounds it."""
    import re

    def f16(bits):  # the fp16 of 16 bits
        return torch.tensor([bits - (bits >> 15 << 16)], dtype=torch.int16).view(torch.float16)

    ptx = int4_pairs.f16_zero_constants(unit)
    base_low, base_high = (f16(int(re.search(rf"mov\.b16 c, (0x[0-9A-F]{{4}});\s*{op}", ptx).group(1), 16))
                           for op in ("add", "sub"))
    magic = int(int4_pairs.f16_bits(1024 * unit), 16)
    sixteenth = torch.tensor([1 / 16], dtype=torch.float16)
    for z in range(16):
        zu = torch.tensor([z], dtype=torch.float16) * torch.tensor([unit], dtype=torch.float16)
        z_low, z_high = zu + base_low, base_high - zu
        for q in range(16):
            low = f16(magic | q) - z_low
            high = f16(magic | q << 4) * sixteenth + z_high  # the product is exact: one rounding, as the fma
            assert low.item() == high.item() == unit * (q - z), (q, z, low.item(), high.item())


def test_host_ceiling_division_and_powers_of_two_are_tritons():
    """The host's ``cdiv`` and ``next_power_of_2`` (plain functions: Triton's are constexpr functions, slow to call
    from the host) give Triton's values."""
    import triton

    from qpass.kernels.common import cdiv, next_power_of_2

    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(300) for b in (1, 2, 3, 7, 8, 64, 128))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 20000))


def test_kernel_sources_and_constants_survive_inductors_copy():
    """Under torch.compile Inductor copies each user kernel's source, with the module constants it
    reads (as their repr), into a triple-quoted string of its generated module, which torch 2.11
    does not escape: a backslash there (a newline in a PTX constant's repr) breaks the module
    (seen on the GPU: "unterminated string literal"). So neither may contain one; and every inline
    asm is pure, which that analysis needs, but for programmatic dependent launch's wait and trigger and the
    bulk prefetch into L2: qpass has the analysis read the kernel's IR with ``PDL=False`` and
    ``PREFETCH_GROUPS=0``, which leave them out (``qpass.kernel_analysis``)."""
    import inspect

    from triton.language import constexpr
    from triton.runtime.jit import KernelInterface  # (a JITFunction, or the interpreter's function)

    from qpass.kernels import common, w4a16_gemv, w4a16_warp_mma

    checked = 0
    for module in (common, fp8, int4_pairs, w4a16, w4a16_gemv, w4a16_warp_mma, w8a16):
        for name, value in vars(module).items():
            if isinstance(value, constexpr):
                text = repr(value.value)
            elif isinstance(value, KernelInterface):
                text = inspect.getsource(value.fn)
            else:
                continue
            assert "\\" not in text, f"{module.__name__}.{name} holds a backslash: {text[:200]}"
            # Inductor's mutation analysis gives up on inline asm with side effects and then takes
            # every pointer argument as written (seen on the GPU with the swap-AB tile's wait)
            if name not in ("wait_for_prior_grids", "launch_dependent_grids", "prefetch_to_l2"):
                assert "is_pure=False" not in text, f"{module.__name__}.{name}: inline asm not pure"
            checked += 1
    assert checked > 40


def test_w8a16_kernel_choice_by_rows():
    """The GEMV for a row or two (both rows in one program, which reads each weight once), the
    tensor-core kernel up to M = 4095, then the weight converted once and cuBLAS."""
    cpu = torch.device("cpu")
    for M in (1, 2):
        for K, N in [(4096, 4096), (4096, 28672), (14336, 4096)]:
            for packed in (True, False):
                cfg = w8a16.pick_config(M, N, K, cpu, packed=packed)
                assert isinstance(cfg, w8a16.GemvConfig) and cfg.block_m == M, (M, K, N, packed, cfg)
    assert isinstance(w8a16.pick_config(3, 4096, 4096, cpu), w8a16.MmaConfig)
    assert w8a16.pick_config(64, 4096, 4096, cpu)[:3] == (64, 128, 128)
    assert w8a16.pick_config(4095, 4096, 4096, cpu)[:3] == (128, 64, 128)
    assert w8a16.pick_config(4096, 4096, 4096, cpu) == w8a16.DequantMmConfig()


# The 8-bit GEMV compiled for sm_90 (``compiled_for_sm90``); its PTX counted.
_PTX_OF_W8_GEMV = r"""
import json
from qpass.kernels import w8a16

counts = {}
for weights in ("*i8", "*fp8e4nv"):
    for rows in (1, 2):
        constexprs = dict(BLOCK_M=rows, BLOCK_N=8, BLOCK_K=512, SPLIT_K=1, EVEN_N=True, EVEN_K=True, HAS_BIAS=False,
                          ACTIVATION="none", PACKED_F16=True, PACKED_BF16=False, UNROLLED_STEPS=8,
                          X_SCALED=weights != "*i8", stride_xk=1, stride_qk=1, stride_on=1)
        pointers = {"x_ptr": "*fp16", "xs_ptr": "*fp32", "qw_ptr": weights, "s_ptr": "*fp32", "b_ptr": "*fp16",
                    "out_ptr": "*fp16", "ws_ptr": "*fp32"}
        text = compiled(w8a16.w8_gemv_kernel, pointers, constexprs, num_warps=4).asm["ptx"]
        counts[f"{weights[1:]}-{rows}"] = {key: text.count(key) for key in (
            "ld.global.nc.L1::no_allocate.v4.b32", "ld.global.nc.v4.b32", "prmt.b32", "cvt.rn.f16x2.e4m3x2", "fma.rn.f32")}
print(json.dumps(counts))
"""


def test_w8_gemv_reads_and_converts_each_weight_once_for_two_rows():
    """With ``block_m`` 2 the 8-bit GEMV loads and converts each weight once for both rows of x: in
    its PTX for sm_90 (int8 and fp8 weights, fp16 x) two rows have the one-row kernel's weight loads
    and conversions (``prmt`` for int8, ``cvt ... e4m3x2`` for fp8), twice its x loads and twice its
    FFMAs."""
    counts = json.loads(compiled_for_sm90(_PTX_OF_W8_GEMV).strip().splitlines()[-1])
    for weights, conversion in (("i8", "prmt.b32"), ("fp8e4nv", "cvt.rn.f16x2.e4m3x2")):
        one, two = counts[f"{weights}-1"], counts[f"{weights}-2"]
        weight_loads = "ld.global.nc.L1::no_allocate.v4.b32"
        assert two[weight_loads] == one[weight_loads] > 0, (weights, one, two)
        assert two[conversion] == one[conversion] > 0, (weights, one, two)
        assert two["ld.global.nc.v4.b32"] == 2 * one["ld.global.nc.v4.b32"] > 0, (weights, one, two)
        assert two["fma.rn.f32"] == 2 * one["fma.rn.f32"] > 0, (weights, one, two)


# The W4A16 GEMV compiled for sm_90 at its picks (``compiled_for_sm90``), disassembled by the cuobjdump that
# Triton ships: the line numbers of its global loads and of its first nibble mask (the arithmetic's start).
_SASS_OF_W4A16_GEMV = r"""
import json
import torch
from qpass.kernels import w4a16

lines = {}
for dtype in ("fp16", "bf16"):
    for N, K in [(4096, 4096), (2048, 4096)]:
        torch_dtype = torch.float16 if dtype == "fp16" else torch.bfloat16
        cfg = w4a16.pick_config(1, N, K, 128, torch.device("cpu"), dtype=torch_dtype)
        for budget in (cfg.maxnreg, 0):
            code = sass(w4a16_gemv_sm90(dtype, N, K, budget=budget))
            lines[f"{dtype} {K}x{N} {budget}"] = dict(
                loads=[i for i, line in enumerate(code) if "LDG" in line],
                first_mask=min(i for i, line in enumerate(code) if "0xf000f," in line))
print(json.dumps(lines))
"""


def test_w4a16_gemv_issues_its_loads_before_its_arithmetic():
    """At the 16-warp picks of 4096x4096 and 4096x2048 (two steps of K a program), with the picks' register
    budget (``w4a16.gemv_registers``) the GEMV's SASS for sm_90 issues every global load (both steps' words, x,
    scales and zeros) before its first dequantization, fp16 and bf16, so a program waits for memory once.
    With ptxas's own register choice some loads follow the arithmetic (the waits the budget removes)."""
    out = json.loads(compiled_for_sm90(_SASS_OF_W4A16_GEMV).strip().splitlines()[-1])
    budgeted = [key for key in out if not key.endswith(" 0")]
    assert len(budgeted) == 4, out
    for key in budgeted:
        assert len(out[key]["loads"]) >= 8 and max(out[key]["loads"]) < out[key]["first_mask"], (key, out[key])
    assert any(max(v["loads"]) > v["first_mask"] for key, v in out.items() if key.endswith(" 0")), out


# The CTA barriers of the W4A16 GEMV's 16-warp (4096^2) and 8-warp (4096x6144) one-row picks compiled for sm_90
# (``compiled_for_sm90``), each tile order
_BARRIERS_OF_W4A16_GEMV = r"""
import json
from qpass.kernels import w4a16

out = {}
for groups_first in (False, True):
    w4a16.gemv_groups_first = lambda cfg: groups_first
    for dtype in ("fp16", "bf16"):
        for N in (4096, 6144):
            code = sass(w4a16_gemv_sm90(dtype, N, 4096))
            out[f"{dtype} {N} {groups_first}"] = sum(" BAR." in line for line in code)
print(json.dumps(out))
"""


_BARRIERS_OF_W4A16_GEMV_SHARED_SUMS = r"""
import json
from qpass.kernels import w4a16
out = {f"{dtype} {K}": sum(" BAR." in line for line in sass(w4a16_gemv_sm90(dtype, 4096, K, pdl=True)))
       for dtype in ("fp16", "bf16") for K in (4096, 12288)}
# 32 groups a step by 32 columns: their sums' buffer would not fit shared_address's 32 KB
wide = w4a16.GemvConfig(32, 4096, 1, 16, unrolled=True, maxnreg=80)
out["fp16 32 x 32"] = sum(" BAR." in line for line in sass(w4a16_gemv_sm90("fp16", 4096, 16384, config=wide)))
print(json.dumps(out))
"""


def test_w4a16_gemv_fp16_sums_meet_in_shared_memory_behind_one_barrier():
    """At the one-row picks of 4096^2 and 12288x4096 (16 warps, as many groups as columns a tile) the fp16 GEMV's
    column sums cross warps through shared memory behind one CTA barrier (``w4a16_gemv._sums_through_shared``),
    where Triton's two reductions took two (3.6) or three (3.9): sm_90 SASS, the Triton installed. bf16 keeps
    Triton's, which it was as fast with (H100: 3.36 -> 3.39 us at 4096^2; bench/NOTES-kernels.md, eighty-first
    session). A tile of 32 groups and 32 columns (no pick's) compiles with Triton's reductions."""
    out = json.loads(compiled_for_sm90(_BARRIERS_OF_W4A16_GEMV_SHARED_SUMS).strip().splitlines()[-1])
    assert out["fp16 4096"] == 1 and out["fp16 12288"] == 1, out
    assert out["bf16 4096"] > 1 and out["bf16 12288"] > 1 and out["fp16 32 x 32"] > 1, out


def test_w4a16_gemv_sums_cross_warps_once():
    """The 16- and 8-warp GEMV tiles' sums cross warps in one reduction at most, under the Triton installed: with
    the tile order ``w4a16.gemv_groups_first`` picks, the 16-warp pick's SASS for sm_90 has at most 3 CTA barriers and
    the 8-warp one's at most 2 (Triton 3.6 on its order: 2 and 2; 3.9: 3 and 1; in fp16 at 16 warps now 1, below),
    and the other order gives this Triton more (3.6: 5 at 16 warps; 3.9 on 3.6's order: 5 and 3, as main had it)."""
    out = json.loads(compiled_for_sm90(_BARRIERS_OF_W4A16_GEMV).strip().splitlines()[-1])
    picked = w4a16.gemv_groups_first(w4a16.GemvConfig(16, 2048, 1, 16))
    for dtype in ("fp16", "bf16"):
        assert out[f"{dtype} 4096 {picked}"] <= 3 and out[f"{dtype} 6144 {picked}"] <= 2, out
        assert out[f"{dtype} 4096 {not picked}"] > out[f"{dtype} 4096 {picked}"], out


# The W4A16 GEMV at the one-row pick of 4096x28672 (4 warps, 8 steps unrolled) compiled for sm_90
# (``compiled_for_sm90``) with ptxas's own register choice and with the pick's budget: registers and spill stores.
_REGISTERS_OF_W4A16_GEMV = r"""
import json, os, re, subprocess, tempfile

def usage(kernel):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        text = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    return {"registers": int(re.search(r"REG:(\d+)", text).group(1)),
            "spill_stores": sum(" STL" in line for line in sass(kernel))}

out = {}
for dtype in ("fp16", "bf16"):
    for budget in (None, 0):
        out[f"{dtype} {'pick' if budget is None else 'ptxas'}"] = usage(w4a16_gemv_sm90(dtype, 28672, 4096,
                                                                                        pdl=True, budget=budget))
print(json.dumps(out))
"""


def test_w4a16_gemv_adds_each_steps_sums_as_it_goes():
    """The packed GEMV adds each word pair's scaled sum to its float32 sums inside the dot's asm
    (``w4a16_gemv._word_pair_dot_f16x2``), so a loop unrolled whole keeps one step's sums live, not all of them:
    Triton 3.9's LLVM vectorized those adds when Triton wrote them and moved them all after the last step, and
    ptxas then took 127-132 registers a thread for the 4096x28672 pick (Triton 3.6: 62-72), or spilled 111-125
    stores at its budget of 72 (bench/NOTES-kernels.md, seventy-sixth session); now 62-76 of its own choice, and
    at 72 at most 5 spill stores (bf16 under 3.9)."""
    out = json.loads(compiled_for_sm90(_REGISTERS_OF_W4A16_GEMV).strip().splitlines()[-1])
    for key, usage in out.items():
        assert usage["registers"] <= 80 and usage["spill_stores"] <= 8, (key, out)


# The W4A16 GEMV compiled for sm_90 at one-row picks (``compiled_for_sm90``): its changes of layout.
_LAYOUTS_OF_W4A16_GEMV = r"""
import json

out = {}
for dtype, N, K, norm, bias in [("fp16", 4096, 4096, False, False), ("bf16", 6144, 4096, False, True),
                                ("fp16", 4096, 14336, False, True), ("bf16", 4096, 4096, True, False)]:
    kernel = w4a16_gemv_sm90(dtype, N, K, norm=norm, bias=bias, pdl=True)
    out[f"{dtype} {K}x{N}{' norm' if norm else ''}{' bias' if bias else ''}"] = kernel.asm["ttgir"].count(
        "ttg.convert_layout")
print(json.dumps(out))
"""


def test_w4a16_gemv_stores_its_sums_in_the_layout_it_summed_them_in():
    """The W4A16 GEMV stores its column sums from the tile they were summed over (``w4a16_gemv._as_tile``), at
    one-row picks (four shapes, fp16 and bf16, a bias, the RMSNorm folded in): no change of layout anywhere in the
    kernel. A store of the sums alone takes a layout of its own, reached through shared memory: two CTA barriers
    more (sm_90 SASS at 4096², 4 against 2 with Triton 3.6; 7 against 5 with 3.9), and 3.9-4.0% slower at one row
    of 4096² on the H100 (bench/NOTES-kernels.md, seventy-fourth session). The 8-bit GEMV keeps its store of the
    sums alone: the same change made it up to 34% slower at two rows."""
    out = json.loads(compiled_for_sm90(_LAYOUTS_OF_W4A16_GEMV).strip().splitlines()[-1])
    assert out == {"fp16 4096x4096": 0, "bf16 4096x6144 bias": 0, "fp16 14336x4096 bias": 0,
                   "bf16 4096x4096 norm": 0}, out


# What torch's analysis finds the GEMVs write (on their Triton IR for sm_90), as torch.compile runs it on a traced
# launch.
_WRITES_OF_GEMVS = r"""
import json, types
import torch
from torch._higher_order_ops import triton_kernel_wrap
from triton.runtime import driver
from qpass.kernels import w4a16, w8a16

driver.set_active(types.SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", 90, 32)))
tensor = lambda dtype=torch.float16: torch.empty(2, dtype=dtype)
name = next(n for n in ("identify_accessed_tensors", "identify_mutated_tensors") if hasattr(triton_kernel_wrap, n))
w4 = dict({p: tensor() for p in ("x_ptr", "g_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr")}, qw_ptr=tensor(torch.int32),
          ws_ptr=tensor(torch.float32), M=1, N_OUT=4096, N_UP=4096, K=4096, norm_eps=1e-5, stride_xm=4096, stride_xk=1,
          stride_qk=64, stride_qn=1, stride_qt=512 * 64, stride_sg=8192, stride_sn=1, stride_bm=0, stride_om=4096,
          stride_on=1, stride_wm=4096, TILE=64, GROUP_SIZE=128, GROUP_ROWS=16, GROUPS=16, BLOCK_N=16, SPLIT_K=1,
          EVEN_N=True, EVEN_K=True, HAS_BIAS=True, ACTIVATION="none", PACKED_F16=True, PACKED_BF16=False,
          HAS_NORM=False, NORM_BLOCK=4096, UNROLLED_STEPS=2, PDL=False, MAXNREG=64, UP_RUN=0, GROUPS_FIRST=False)
w8 = dict(x_ptr=tensor(), xs_ptr=tensor(torch.float32), qw_ptr=tensor(torch.int8), s_ptr=tensor(torch.float32),
          b_ptr=tensor(), out_ptr=tensor(), ws_ptr=tensor(torch.float32), M=1, N_OUT=4096, N_UP=4096, K=4096,
          stride_xm=4096, stride_xk=1, stride_qn=4096, stride_qk=1, stride_bm=0, stride_om=4096, stride_on=1,
          stride_wm=4096, BLOCK_M=1, BLOCK_N=4, BLOCK_K=1024, SPLIT_K=1, EVEN_N=True, EVEN_K=True, HAS_BIAS=True,
          ACTIVATION="none", PACKED_F16=True, PACKED_BF16=False, UNROLLED_STEPS=4, X_SCALED=True)
written = {}
for label, kernel, arguments in [
        ("w4a16", w4a16.w4a16_gemv_kernel, w4), ("w4a16 silu_mul", w4a16.w4a16_gemv_kernel,
                                                  dict(w4, ACTIVATION="silu_mul", UP_RUN=16)),
        ("w8 one row", w8a16.w8_gemv_kernel, w8), ("w8 two rows silu_mul", w8a16.w8_gemv_kernel,
                                                    dict(w8, M=2, BLOCK_M=2, ACTIVATION="silu_mul"))]:
    launch = triton.autotune(configs=[triton.Config({}, num_warps=4)], key=[])(kernel)
    analysis = getattr(triton_kernel_wrap, name)(launch, arguments, {})
    written[label] = sorted(analysis if isinstance(analysis, list)
                            else [dep.name for dep in analysis.read_writes.writes])
print(json.dumps(written))
"""


def test_torch_analysis_finds_the_gemvs_write_their_outputs_only():
    """torch's analysis of a traced launch (which tensors a kernel writes, followed back from its stores' pointers
    through its Triton IR, before Triton inlines its calls) takes each result of a call for made from all of the
    call's arguments: a store's pointers computed from a call that also gets the sums would make every tensor that
    the sums are loaded from look written. The GEMVs' columns come from no such call (``w4a16_gemv._as_tile`` builds
    them in the kernel): each GEMV writes its output only, one row or two, with a bias and under silu_mul."""
    out = json.loads(compiled_for_sm90(_WRITES_OF_GEMVS).strip().splitlines()[-1])
    assert out == {"w4a16": ["out_ptr"], "w4a16 silu_mul": ["out_ptr"], "w8 one row": ["out_ptr"],
                   "w8 two rows silu_mul": ["out_ptr"]}, out


# The warp-level MMA kernel compiled for sm_90 at its picks for 16 rows, unsplit (``compiled_for_sm90``): its CTA
# barriers and its shared-memory stores and loads.
_SASS_OF_WARP_MMA_EPILOGUE = r"""
import json

counts = {}
for dtype, N, K, activation in [("fp16", 4096, 4096, "none"), ("bf16", 6144, 4096, "none"),
                                ("bf16", 28672, 4096, "silu_mul")]:
    code = sass(w4a16_warp_mma_sm90(dtype, 16, N, K, activation, bias=True))
    counts[f"{dtype} {K}x{N} {activation}"] = {op: sum(op in line for line in code) for op in ("BAR", "STS", "LDS")}
print(json.dumps(counts))
"""


def test_w4a16_warp_mma_adds_its_warps_sums_behind_one_barrier():
    """The warps of a column block add their partial sums through shared memory behind one CTA barrier: each lane
    stores its 16 values an 8-row tile and loads as many partial sums back (8 warps a block on 4096², one 8-row
    tile a program; 8 warps of two tiles on 4096x6144; gate_up's 4 warps, two a block, of two tiles under
    silu_mul), where Triton's layouts took 53 barriers on 4096²."""
    out = json.loads(compiled_for_sm90(_SASS_OF_WARP_MMA_EPILOGUE).strip().splitlines()[-1])
    assert out == {"fp16 4096x4096 none": {"BAR": 1, "STS": 16, "LDS": 16},
                   "bf16 4096x6144 none": {"BAR": 1, "STS": 32, "LDS": 32},
                   "bf16 4096x28672 silu_mul": {"BAR": 1, "STS": 32, "LDS": 32}}, out


# The decode step's down at 16 rows (4 warps, split 4, 112 groups) compiled for sm_90 with its loop's body once and as
# picked (``compiled_for_sm90``): the MMA instructions of each.
_SASS_OF_WARP_MMA_LOOP_BODIES = r"""
import json
from unittest import mock
import torch
from qpass.kernels import w4a16

pick = w4a16.pick_config(16, 4096, 14336, 128, torch.device("cpu"))
counts = {}
for loop_unroll in (1, pick.loop_unroll):
    with mock.patch.object(w4a16, "pick_config", lambda *args, **kwargs: pick._replace(loop_unroll=loop_unroll)):
        counts[loop_unroll] = sum("HMMA" in line for line in sass(w4a16_warp_mma_sm90("bf16", 16, 4096, 14336)))
print(json.dumps(counts))
"""


def test_w4a16_warp_mma_loop_body_twice_as_picked():
    """Past 8 rows and 32 groups the split 4-warp pick repeats its loop's body twice an iteration: its code has the
    64 MMAs of a group (two 8-row tiles, 64 columns, 8 steps of 16 along K) three times, twice in the loop and once
    for an odd count of groups, where the plain loop has them once."""
    assert json.loads(compiled_for_sm90(_SASS_OF_WARP_MMA_LOOP_BODIES).strip().splitlines()[-1]) == {"1": 64, "2": 192}


# --- FP8 W8A8 ------------------------------------------------------------------------------

def fp8_reference(x, qweight, weight_scale, bias, activation="none"):
    """FP8 W8A8 in float32 from the kernels' own quantized activations, whose rounding to fp8 is
    checked on its own, bit for bit (``assert_quantized_like_reference``). On CUDA torch's
    division by the scale may be an ulp off, and that flips the rounding of values on an e4m3 tie:
    bf16 rows, with few mantissa bits, have so many that the row moves by percents (H200, K =
    14336: 2% from the exact product, which every FP8 kernel matched to 0.17%)."""
    xq, x_scale = fp8.quantize_rows(x)
    out = (xq.float() @ qweight.float().t()) * x_scale[:, None] * weight_scale[None, :]
    return reference.apply_activation(out if bias is None else out + bias.float(), activation)


@examples
@given(M=st.integers(1, 40), N=st.integers(16, 72), K=st.integers(1, 300),
       dtype=st.sampled_from(cpu_dtypes(gemv=False)), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_fp8_matches_reference(M, N, K, dtype, bias, seed):
    x, qweight, weight_scale, b = make_fp8(M, N, K, dtype, bias, seed)
    out = fp8.fp8_linear(x, qweight, weight_scale, b)
    assert out.dtype == dtype and out.shape == (M, N)
    assert relative_error(out, fp8_reference(x, qweight, weight_scale, b)) < FP8_BOUND[dtype]
    _, residual = norm_and_residual(M, N, K, dtype, seed)  # a bias shaped as the output: a residual
    out = fp8.fp8_linear(x, qweight, weight_scale, residual)
    assert relative_error(out, fp8_reference(x, qweight, weight_scale, residual)) < FP8_BOUND[dtype]


@settings(max_examples=6, deadline=None)
@given(M=st.integers(1, 9), K=st.integers(1, 300), dtype=st.sampled_from([torch.float16, torch.float32]),
       seed=st.integers(0, 2**16))
def test_fp8_activation_quantization_matches_the_reference(M, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 10 ** torch.empty(M, 1).uniform_(-4, 2, generator=g)).to(dtype)
    assert_quantized_like_reference(x.to(DEVICE))


def assert_quantized_like_reference(x):
    """The scale is amax / 448 (torch on CUDA divides by a scalar through its reciprocal, so
    allow one ulp); the fp8 values are x / scale rounded to nearest even, bit for bit."""
    xq, scale = fp8.quantize_rows(x)
    _, ref_scale = reference.quantize_fp8_per_token(x)
    torch.testing.assert_close(scale, ref_scale[:, 0], rtol=2.5e-7, atol=0)
    expected = (x.float() / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(xq.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype, decades", [(torch.float16, 3), (torch.bfloat16, 6), (torch.float32, 6)])
def test_fp8_quantization_divides_exactly_on_many_values(dtype, decades):
    """The kernel divides by the scale through its reciprocal and one FMA: bit for bit the
    rounded quotient on 128 x 2048 values spread over 2 * decades decades within a row (ties of
    the fp8 rounding, subnormals, negative values that round to -0.0, and signed zeros included)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 2048, generator=g) * 10 ** torch.empty(128, 2048).uniform_(-decades, decades, generator=g)
    x[::3, 5::97] = -0.0
    x[1::3, 7::89] = 0.0
    assert_quantized_like_reference(x.to(dtype).to(DEVICE))


@pytest.mark.parametrize("K", [300, 16384 + 40])  # one pass, two passes
def test_fp8_quantization_in_fp16_is_the_fp8_values(K):
    """What the GEMV reads at one or two rows (``fp8_linear``): the same e4m3 values written in fp16,
    exact there (subnormals, -0.0 and 448 included), with the same scales."""
    g = torch.Generator().manual_seed(K)
    x = torch.randn(2, K, generator=g) * 10 ** torch.empty(2, K).uniform_(-3, 3, generator=g)
    x[0, 3] = -0.0
    x = x.to(torch.float16).to(DEVICE)
    xq, scale = fp8.quantize_rows(x)
    xq16, scale16 = fp8.quantize_rows(x, torch.float16)
    assert xq16.dtype == torch.float16 and torch.equal(scale16, scale)
    assert torch.equal(xq16.view(torch.int16), xq.to(torch.float16).view(torch.int16))  # -0.0 too
    assert xq16.abs().max() == 448 and bool((xq16[xq16 != 0].abs() < 2 ** -6).any())  # the range's both ends


def test_fp8_rows_longer_than_one_block_quantize_in_two_passes():
    g = torch.Generator().manual_seed(0)
    assert_quantized_like_reference(torch.randn(2, 16384 + 40, generator=g).to(torch.float16).to(DEVICE))


FP8_CONFIGS = [
    fp8.MmaConfig(16, 32, 64, 3, 4, 2),
    fp8.MmaConfig(16, 32, 64, 3, 4, 2, tma=True),  # x's and the weight's tiles copied by TMA (K whole 16 bytes)
    w8a16.GemvConfig(8, 64, 3, 4, 2),  # W8A16's GEMV on the fp8 weights (packed on a GPU)
    w8a16.GemvConfig(8, 64, 2, 4, 2, block_m=2),  # two rows a program
    w8a16.GemvConfig(16, 128, 1, 4, 2, packed_f16=False, packed_bf16=False, block_m=2),  # float32 path on GPU too
]


@pytest.mark.parametrize("config", FP8_CONFIGS, ids=lambda c: type(c).__name__ + str(tuple(c)))
@settings(max_examples=3 if not CUDA else 6, deadline=None)
@given(M=st.integers(1, 20), N=st.integers(16, 50), K=st.integers(1, 300), seed=st.integers(0, 2**16), data=st.data())
def test_fp8_each_kernel_variant(config, M, N, K, seed, data):
    """Each FP8 kernel with a split of K, a bias and a residual, against dequantize-then-matmul."""
    gemv = isinstance(config, w8a16.GemvConfig)
    dtype = data.draw(st.sampled_from(cpu_dtypes(gemv=gemv)))
    if gemv and not CUDA:
        M = M % (2 * config.block_m + 1) + 1  # the interpreter runs one program per block of rows: keep them few
    if getattr(config, "tma", False):
        K = 16 * (K // 16 + 1)  # rows of whole 16 bytes, as the TMA copies them (``test_fp8_tma_needs_...``)
    x, qweight, weight_scale, b = make_fp8(M, N, K, dtype, True, seed)
    out = fp8.fp8_linear(x, qweight, weight_scale, b, config=config)
    assert out.dtype == dtype and out.shape == (M, N)
    assert relative_error(out, fp8_reference(x, qweight, weight_scale, b)) < FP8_BOUND[dtype]
    norm_weight, residual = norm_and_residual(M, N, K, dtype, seed)
    out = fp8.fp8_linear(x, qweight, weight_scale, residual, config=config)
    assert relative_error(out, fp8_reference(x, qweight, weight_scale, residual)) < FP8_BOUND[dtype]
    # the RMSNorm before the linear, computed by the quantization of x (as the pass that writes it rounds it:
    # ``test_fp8_quantization_of_the_rms_norm``; and the pass as torch: ``test_rms_norm_pass_rounds_as_the_reference``)
    out = fp8.fp8_linear(3 * x, qweight, weight_scale, residual, norm_weight=norm_weight, norm_eps=1e-5, config=config)
    normed = w4a16._rms_norm(3 * x, norm_weight, 1e-5)
    assert relative_error(out, fp8_reference(normed, qweight, weight_scale, residual)) < FP8_BOUND[dtype]


@pytest.mark.parametrize("dtype", cpu_dtypes(gemv=True))
@pytest.mark.parametrize("K", [300, 5000, 16384 + 40])  # one pass, one pass of 8192 values, two passes
def test_fp8_quantization_of_the_rms_norm(dtype, K):
    """x's quantization with the RMSNorm before it (``quantize_rows`` given ``norm_weight``) quantizes what the
    RMSNorm pass writes (``w4a16._rms_norm``, rounded as ``reference.rms_norm``): bit for bit in the interpreter, for
    both outputs of the quantization. Compiled, each kernel adds a row's squares in the order of its own warps, and
    in two passes (past 16384 values) the two add them in blocks of other lengths: there 1 / rms, and with it the
    scale and a value on a rounding boundary, may be an ulp apart."""
    g = torch.Generator().manual_seed(K)
    x = (torch.randn(3, K, generator=g) * 10 ** torch.empty(3, 1).uniform_(-2, 2, generator=g)).to(dtype).to(DEVICE)
    norm_weight = (torch.rand(K, generator=g) + 0.5).to(DEVICE)  # float32: taken in x's dtype, as the op does
    for out_dtype in (torch.float8_e4m3fn, torch.float16):
        xq, scale = fp8.quantize_rows(x, out_dtype, norm_weight, 1e-5)
        expected, expected_scale = fp8.quantize_rows(w4a16._rms_norm(x, norm_weight, 1e-5), out_dtype)
        if CUDA or K > 16384:
            torch.testing.assert_close(scale, expected_scale, rtol=2.5e-7, atol=0)
            assert (xq.float() != expected.float()).float().mean() < 1e-3
        else:
            assert torch.equal(scale, expected_scale)
            assert torch.equal(xq.view(torch.uint8), expected.view(torch.uint8))
    with pytest.raises(ValueError, match=rf"x \(3, {K}\) after an RMSNorm: norm_weight has shape \({K - 1},\), "
                                         rf"expected \({K},\)"):
        fp8.quantize_rows(x, norm_weight=norm_weight[1:])


def test_fp8_tma_needs_rows_of_whole_16_bytes(monkeypatch):
    """A TMA config given for a weight the TMA cannot copy (K not in whole 16 bytes, or rows 16-byte misaligned) is
    refused, naming the weight; a TMA pick copies such a weight through pointers instead, to the same result."""
    x, qweight, weight_scale, _ = make_fp8(20, 40, 80, torch.float16, False, 0)
    config = fp8.MmaConfig(16, 32, 64, 1, 4, 2, tma=True)
    expected = fp8_reference(x, qweight, weight_scale, None)
    assert relative_error(fp8.fp8_linear(x, qweight, weight_scale, config=config), expected) < FP8_BOUND[torch.float16]
    with pytest.raises(ValueError, match=r"by TMA .*needs K a multiple of 16.*got qweight \(40, 72\) strides "
                                         r"\(72, 1\) offset 0"):
        fp8.fp8_linear(x[:, :72], qweight[:, :72].contiguous(), weight_scale, config=config)
    shifted = torch.empty(40 * 80 + 8, dtype=qweight.dtype, device=qweight.device)[8:].view(40, 80)
    shifted.copy_(qweight)
    with pytest.raises(ValueError, match=r"got qweight \(40, 80\) strides \(80, 1\) offset 8 \(its address 8 bytes"):
        fp8.fp8_linear(x, shifted, weight_scale, config=config)
    assert not fp8.tma_ok(shifted) and fp8.tma_ok(qweight)
    # (the large-M pick, the one with TMA, at a size the interpreter runs quickly)
    monkeypatch.setattr(fp8, "pick_config", lambda *args: config)
    assert torch.equal(fp8.fp8_linear(x, shifted, weight_scale),
                       fp8.fp8_linear(x, qweight, weight_scale, config=config._replace(tma=False)))


def test_fp8_kernel_choice_by_rows():
    """W8A16's GEMV for a row or two (the same bytes a weight), the tensor-core kernel from three."""
    cpu = torch.device("cpu")
    for M in (1, 2):
        assert fp8.pick_config(M, 4096, 4096, cpu) == w8a16.pick_config(M, 4096, 4096, cpu, packed=False)
    assert isinstance(fp8.pick_config(3, 4096, 4096, cpu), fp8.MmaConfig)


def test_fp8_picks_fit_the_shared_memory():
    """Every tensor-core pick's pipeline fits an H100's shared memory (the picks on the CPU are the H100's), and one
    cut to a smaller device's (an sm_89 GPU's 99 KB) keeps two stages at least. Under silu_mul, where the GPU fills
    with 128 x 256 tiles, the gate and up tiles take 128 output columns instead of 256: four stages of 256 would need
    320 KB, three 240 KB."""
    cpu = torch.device("cpu")
    for M in (3, 16, 64, 200, 300, 1000, 4096, 16384):
        for n_out in (512, 4096, 28672):
            for activation in ("none", "silu_mul"):
                cfg = fp8.pick_config(M, n_out, 4096, cpu, activation)
                if isinstance(cfg, fp8.MmaConfig):
                    assert fp8.shared_bytes(cfg, activation) <= common.shared_memory(cpu) == 232448, (M, n_out, cfg)
                    small = fp8._within_shared_memory(cfg, activation, 101376)
                    assert fp8.shared_bytes(small, activation) <= 101376 and small.num_stages >= 2, small
    assert fp8.pick_config(4096, 4096, 14336, cpu) == fp8.MmaConfig(128, 256, 128, 1, 8, 4, 16, tma=True)
    assert fp8.pick_config(4096, 4096, 14336, cpu, "silu_mul") == fp8.MmaConfig(128, 128, 128, 1, 8, 4, 16, tma=True)
    assert fp8.shared_bytes(fp8.MmaConfig(128, 256, 128, 1, 8, 3), "silu_mul") == 245760


_SHARED_OF_FP8_MMA_KERNEL = r"""
from qpass.kernels import fp8

scalars = {"a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32", "bias_ptr": "*fp16", "out_ptr": "*fp16", "ws_ptr": "*fp32"}
for activation in ("none", "silu_mul"):
    cfg = fp8.pick_config(4096, 4096, 14336, fp8.torch.device("cpu"), activation)
    for tma in (True, False):
        operands = ({"a": f"tensordesc<fp8e4nv[{cfg.block_m},{cfg.block_k}]>",
                     "b": f"tensordesc<fp8e4nv[{cfg.block_n},{cfg.block_k}]>"} if tma
                    else {"a": "*fp8e4nv", "b": "*fp8e4nv"})
        kernel = compiled(fp8._fp8_mma_kernel, operands | scalars, dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                          BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=1, EVEN_K=True, HAS_BIAS=False,
                          ACTIVATION=activation, TMA=tma, stride_on=1), num_warps=cfg.num_warps,
                          num_stages=cfg.num_stages)
        print(tma, activation, kernel.metadata.shared, fp8.shared_bytes(cfg._replace(tma=tma), activation))
"""


def test_fp8_shared_bytes_are_what_triton_allots_for_sm90():
    """``fp8.shared_bytes``, which the picks are cut by, against the shared memory of the kernel compiled for sm_90 at
    the large-M picks (without and with silu_mul; the tiles copied by TMA and loaded through pointers)."""
    lines = compiled_for_sm90(_SHARED_OF_FP8_MMA_KERNEL).strip().splitlines()[-4:]
    assert [line.split()[:2] for line in lines] == [["True", "none"], ["False", "none"], ["True", "silu_mul"],
                                                     ["False", "silu_mul"]]
    for line in lines:
        allotted, counted = map(int, line.split()[2:])
        assert allotted == counted, line


# --- epilogues: silu_mul ([gate | up] columns, silu(gate) * up), gelu, gelu_tanh ------------

EPILOGUES = ("silu_mul", "gelu", "gelu_tanh")


def w4_epilogue_error(activation, M, N, K, dtype, bias, seed, config=None, group_size=64):
    x, qweight, scales, zeros, b = make_w4(M, N, K, group_size, dtype, False, bias, seed)
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, group_size, b, activation=activation, config=config)
    assert out.dtype == dtype and out.shape == (M, output_columns(activation, N))
    ref = w4_reference(x, qweight, scales, zeros, group_size, b)
    return relative_error(out, reference.apply_activation(ref, activation))


def w8_epilogue_error(activation, M, N, K, dtype, bias, seed, config=None):
    x, qweight, scales, b = make_w8(M, N, K, dtype, bias, seed)
    out = w8a16.w8a16_linear(x, qweight, scales, b, activation=activation, config=config)
    assert out.dtype == dtype and out.shape == (M, output_columns(activation, N))
    ref = reference.w8a16_linear(x.float(), qweight, scales.float(), None if b is None else b.float())
    return relative_error(out, reference.apply_activation(ref, activation))


def fp8_epilogue_error(activation, M, N, K, dtype, bias, seed, config=None):
    x, qweight, weight_scale, b = make_fp8(M, N, K, dtype, bias, seed)
    out = fp8.fp8_linear(x, qweight, weight_scale, b, activation=activation, config=config)
    assert out.dtype == dtype and out.shape == (M, output_columns(activation, N))
    return relative_error(out, fp8_reference(x, qweight, weight_scale, b, activation))


EPILOGUE_VARIANTS = [  # (error function, config, needs fp16/fp32 on the CPU, bound)
    (w4_epilogue_error, None, False, BOUND),
    (w4_epilogue_error, w4a16.GemvConfig(16, 64, 3, 4), False, BOUND),
    (w4_epilogue_error, w4a16.MmaConfig(16, 16, 32, 2, True, 4, 2), True, BOUND),
    (w4_epilogue_error, w4a16.MmaConfig(16, 16, 32, 1, False, 4, 2), True, BOUND),
    (w4_epilogue_error, w4a16.DequantMmConfig(4, 16), False, BOUND),
    (w4_epilogue_error, w4a16.DequantMmConfig(4, 16, chunk_n=24), False, BOUND),
    (w8_epilogue_error, w8a16.GemvConfig(8, 64, 2, 4, 2), False, BOUND),
    (w8_epilogue_error, w8a16.MmaConfig(16, 16, 32, 2, 4, 2), True, BOUND),
    (w8_epilogue_error, w8a16.DequantMmConfig(), False, BOUND),
    (fp8_epilogue_error, fp8.MmaConfig(16, 16, 64, 2, 4, 2), True, FP8_BOUND),
    (fp8_epilogue_error, w8a16.GemvConfig(8, 64, 2, 4, 2), False, FP8_BOUND),
]


@pytest.mark.parametrize("activation", EPILOGUES)
@pytest.mark.parametrize("variant", EPILOGUE_VARIANTS,
                         ids=lambda v: v[0].__name__.split("_")[0] + "-" + type(v[1]).__name__)
@settings(max_examples=2 if not CUDA else 6, deadline=None)
@given(M=st.integers(1, 20), half_n=st.integers(16, 40), groups=st.integers(1, 3), bias=st.booleans(),
       seed=st.integers(0, 2**16), data=st.data())
def test_epilogue_matches_reference(activation, variant, M, half_n, groups, bias, seed, data):
    error, config, tensor_cores, bound = variant
    dtype = data.draw(st.sampled_from(cpu_dtypes(gemv=not tensor_cores)))
    if not CUDA and config is None:  # the tuned choice, kept to the GEMV (float32 arithmetic, bf16 too)
        M = M % w4a16.GEMV_MAX_M + 1
    elif not CUDA and isinstance(config, (w4a16.GemvConfig, w8a16.GemvConfig)):  # (fp8's GEMV too)
        M = M % 3 + 1  # the interpreter runs one GEMV program per row: keep the rows few
    assert error(activation, M, 2 * half_n, 64 * groups, dtype, bias, seed, config) < bound[dtype]


def test_unknown_activation_or_odd_columns_raise():
    x, qweight, scales, zeros, _ = make_w4(2, 24, 64, 32, torch.float16, False, False, 0)
    with pytest.raises(ValueError, match="'gelu_erf'"):
        w4a16.w4a16_linear(x, qweight, scales, zeros, 32, activation="gelu_erf")
    x8, qweight8, scales8, _ = make_w8(2, 24, 64, torch.float16, False, 0)
    with pytest.raises(ValueError, match="'relu'"):
        w8a16.w8a16_linear(x8, qweight8, scales8, activation="relu")
    xf, qweightf, weight_scale, _ = make_fp8(2, 24, 64, torch.float16, False, 0)
    with pytest.raises(ValueError, match="'silu'"):
        fp8.fp8_linear(xf, qweightf, weight_scale, activation="silu")
    with pytest.raises(ValueError, match="N=23"):
        w8a16.w8a16_linear(x8, qweight8[:23], scales8[:23], activation="silu_mul")


# --- silu_mul with gate and up in alternating runs of up_run columns (the W4A16 methods' layout) ---

W4_GATE_UP_CONFIGS = [None, w4a16.GemvConfig(16, 64, 3, 4), w4a16.MmaConfig(16, 16, 32, 2, True, 4, 2),
                      w4a16.DequantMmConfig(4, 16)]


def w4_gate_up_runs_error(config, M, N, K, group_size, dtype, bias, seed, up_run, norm=False, tile=0):
    """The relative difference between silu_mul on weights whose columns are in runs of ``up_run`` (a vector bias
    too) and silu_mul on the same weights as ``[gate | up]``, through ``config`` (the pick for None); with
    ``norm`` the RMSNorm before it; with ``tile`` both words in column tiles of that many. (How close the halves
    come to the reference, the other tests say.) Each side is within ``BOUND`` of the reference, so their difference
    is within twice that (seen on the H100: 1.09e-3 in fp16, split K, with the norm and a bias)."""
    x, qweight, scales, zeros, b = make_w4(M, N, K, group_size, dtype, False, bias, seed)
    laid = [None if t is None else reference.gate_up_runs(t, up_run) for t in (qweight, scales, zeros, b)]
    if tile:
        qweight, laid[0] = (reference.tile_word_columns(q, tile) for q in (qweight, laid[0]))
    norm_weight = norm_and_residual(M, N, K, dtype, seed)[0] if norm else None
    extra = dict(activation="silu_mul", norm_weight=norm_weight, norm_eps=1e-6, config=config)
    out = w4a16.w4a16_linear(x, *laid[:3], group_size, laid[3], up_run=up_run, **extra)
    assert out.shape == (M, N // 2)
    return relative_error(out, w4a16.w4a16_linear(x, qweight, scales, zeros, group_size, b, **extra))


@pytest.mark.parametrize("config", W4_GATE_UP_CONFIGS, ids=lambda c: type(c).__name__)
@settings(max_examples=2 if not CUDA else 6, deadline=None)
@given(M=st.integers(1, 20), runs=st.integers(1, 3), up_run=st.sampled_from([4, 8, 16]), bias=st.booleans(),
       norm=st.booleans(), tile=st.sampled_from([0, 8, 32]), seed=st.integers(0, 2**16), data=st.data())
def test_gate_up_in_runs_match_halves(config, M, runs, up_run, bias, norm, tile, seed, data):
    """silu_mul with ``up_run``: every path (the GEMV, the tensor-core kernel, dequantize + GEMM, the tuned
    pick) gives on the columns in runs what it gives on the halves ``[gate | up]``, words in tiles or not."""
    dtype = data.draw(st.sampled_from(cpu_dtypes(gemv=not isinstance(config, w4a16.MmaConfig))))
    if not CUDA and not isinstance(config, w4a16.MmaConfig):
        M = M % w4a16.GEMV_MAX_M + 1  # the tuned choice kept to the GEMV, and few GEMV programs to interpret
    error = w4_gate_up_runs_error(config, M, 2 * up_run * runs, 128, 64, dtype, bias, seed, up_run, norm, tile)
    assert error < 2 * BOUND[dtype]


@pytest.mark.parametrize("config", W4_GATE_UP_CONFIGS + [w4a16.GemvConfig(32, 64, 1, 4)], ids=lambda c: repr(c)[:40])
@pytest.mark.parametrize("up_run", [16, 32])
def test_gate_up_runs_with_a_bias_and_the_norm(config, up_run):
    """A vector bias in runs too (the GEMV's epilogue reads it as halves), and the norm; a GEMV whose programs'
    columns are not one run (32 columns, runs of 16 or 32) takes the GEMM then the activation."""
    dtype = torch.float16 if isinstance(config, w4a16.MmaConfig) else torch.bfloat16
    assert w4_gate_up_runs_error(config, 2, 4 * up_run, 128, 64, dtype, True, 7, up_run, norm=True) < 2 * BOUND[dtype]


def test_gate_up_runs_are_checked():
    x, qweight, scales, zeros, _ = make_w4(2, 48, 64, 32, torch.float32, False, False, 0)
    with pytest.raises(ValueError, match="up_run 8 needs activation 'silu_mul'"):
        w4a16.w4a16_linear(x, qweight, scales, zeros, 32, up_run=8)
    with pytest.raises(ValueError, match="up_run 16 .* divides N / 2 = 24"):
        w4a16.w4a16_linear(x, qweight, scales, zeros, 32, activation="silu_mul", up_run=16)
    with pytest.raises(ValueError, match="up_run 6"):
        reference.w4a16_linear(x, qweight, scales, zeros, 32, activation="silu_mul", up_run=6)
    t = torch.arange(2 * 48).reshape(2, 48)
    runs = reference.gate_up_runs(t, 8)
    assert runs[0, :16].tolist() == list(range(8)) + list(range(24, 32))  # gate 0..7, then up 0..7
    assert torch.equal(reference.gate_up_halves(runs, 8), t)


# --- On the GPU: the sizes the tuned configs choose, and the ops under torch.compile -------

GPU_SHAPES = [(1, 4096, 4096), (2, 1000, 768), (16, 4100, 1024), (64, 768, 2048), (200, 1536, 512),
              (1000, 2048, 1024), (4096, 512, 256)]


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", GPU_SHAPES)
def test_gpu_every_kernel_at_tuned_sizes(M, N, K, dtype):
    for tile in (0, common.WORD_TILE):  # the words in rows, and in the W4A16 methods' column tiles
        args = make_w4(M, N, K, 128, dtype, False, True, M, tile)
        x, qweight, scales, zeros, b = args
        out = w4a16.w4a16_linear(x, qweight, scales, zeros, 128, b)
        assert relative_error(out, w4_reference(*args[:4], 128, b)) < BOUND[dtype]
        if N % 32 == 0:  # gate and up in runs of 16, as the W4A16 methods lay them out, with the norm (the GEMV's)
            error = w4_gate_up_runs_error(None, M, N, K, 128, dtype, True, M, 16, norm=True, tile=tile)
            assert error < 2 * BOUND[dtype]

    x, qweight, scales, b = make_w8(M, N, K, dtype, True, M)
    out = w8a16.w8a16_linear(x, qweight, scales, b)
    ref = reference.w8a16_linear(x.float(), qweight, scales.float(), b.float())
    assert relative_error(out, ref) < BOUND[dtype]

    x, qweight, weight_scale, b = make_fp8(M, N, K, dtype, True, M)
    out = fp8.fp8_linear(x, qweight, weight_scale, b)
    assert relative_error(out, fp8_reference(x, qweight, weight_scale, b)) < FP8_BOUND[dtype]


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ("none",) + EPILOGUES)
@pytest.mark.parametrize("M,n_out,K,group_size", [(24, 34000, 512, 64), (48, 34000, 512, 64), (100, 9000, 512, 64),
                                                  (128, 9000, 512, 64), (100, 9000, 4096, 128), (128, 9000, 4096, 128),
                                                  (128, 17000, 4096, 128)])
def test_gpu_w4a16_mma_unsplit_at_each_tuned_tile(M, n_out, K, group_size, activation, dtype):
    """Each block shape ``pick_config`` gives the tensor-core kernel, with N wide enough that K is
    not split: the kernel's own epilogue, and every register of its accumulators (two of them
    with silu_mul) live through the whole loop, 32 to 64 steps at K = 4096 (with the weight tile
    as the register operand and no wait for each step's wgmmas, Triton 3.6 gave wrong results now
    and then over long loops: ``common.mma_accumulate``)."""
    N = 2 * n_out if activation == "silu_mul" else n_out
    cfg = w4a16.pick_config(M, n_out, K, group_size, torch.device("cuda"), activation, wgmma=False)
    assert isinstance(cfg, w4a16.MmaConfig) and cfg.split_k == 1, cfg
    assert w4_epilogue_error(activation, M, N, K, dtype, True, M, group_size=group_size) < BOUND[dtype]


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ("none",) + EPILOGUES)
@pytest.mark.parametrize("M,n_out,K", [(300, 7000, 512), (1000, 4200, 512), (4096, 4200, 256)])
def test_gpu_fp8_mma_at_each_tuned_tile(M, n_out, K, activation, dtype):
    """The FP8 tensor-core kernel at each block shape ``pick_config`` gives it past 256 rows: 64 x 128, and 128 x 256
    (128 output columns under silu_mul) where those tiles fill the GPU, within the device's shared memory; a config
    given that does not fit is refused, naming what it needs."""
    N = 2 * n_out if activation == "silu_mul" else n_out
    cfg = fp8.pick_config(M, n_out, K, torch.device("cuda"), activation)
    assert isinstance(cfg, fp8.MmaConfig) and cfg.split_k == 1, cfg
    assert fp8.shared_bytes(cfg, activation) <= common.shared_memory(torch.device("cuda"))
    x, qweight, weight_scale, b = make_fp8(M, N, K, dtype, True, M)
    out = fp8.fp8_linear(x, qweight, weight_scale, b, activation)
    assert relative_error(out, fp8_reference(x, qweight, weight_scale, b, activation)) < FP8_BOUND[dtype]
    too_large = fp8.MmaConfig(128, 256, 128, 1, 8, 3)
    if fp8.shared_bytes(too_large, activation) > common.shared_memory(x.device):
        with pytest.raises(ValueError, match=f"needs {fp8.shared_bytes(too_large, activation)} bytes"):
            fp8.fp8_linear(x, qweight, weight_scale, b, activation, config=too_large)


# Register-operand tiles that gave wrong results on the H200 (Triton 3.6) before each step's wgmmas
# were waited for (bench/NOTES-kernels.md): unsplit over K = 4096, errors of 3e-3 to 1.2e-2.
RACED = [
    ("awq", w4a16.MmaConfig(128, 128, 64, 1, True, num_warps=4, num_stages=3), 1024, 4096, "none"),
    ("awq", w4a16.MmaConfig(128, 128, 64, 1, True, num_warps=4, num_stages=3), 512, 6144, "none"),
    ("awq", w4a16.MmaConfig(128, 128, 128, 1, True, num_warps=8, num_stages=3), 256, 2 * 14336, "silu_mul"),
    ("int8", w8a16.MmaConfig(128, 64, 128, 1, num_warps=4, num_stages=3, swap_ab=True), 100, 17000, "gelu"),
]


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,config,M,N,activation", RACED)
def test_gpu_register_operand_tiles_that_raced(kind, config, M, N, activation, dtype):
    if kind == "awq":
        assert w4_epilogue_error(activation, M, N, 4096, dtype, True, M, config, group_size=128) < BOUND[dtype]
    else:
        assert w8_epilogue_error(activation, M, N, 4096, dtype, True, M, config) < BOUND[dtype]


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ("none",) + EPILOGUES)
@pytest.mark.parametrize("M,n_out,K", [(48, 34000, 4096), (100, 17000, 4096), (300, 7000, 4096)])
def test_gpu_w8a16_mma_unsplit_at_each_tuned_tile(M, n_out, K, activation, dtype):
    """The W8A16 tensor-core kernel at each block shape ``pick_config`` gives it, K unsplit over
    4096: its converted weight tile is the MMA's register operand, as in the W4A16 test above."""
    N = 2 * n_out if activation == "silu_mul" else n_out
    cfg = w8a16.pick_config(M, n_out, K, torch.device("cuda"))
    assert isinstance(cfg, w8a16.MmaConfig) and cfg.split_k == 1, cfg
    assert w8_epilogue_error(activation, M, N, K, dtype, True, M) < BOUND[dtype]


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ("none",) + EPILOGUES)
@pytest.mark.parametrize("residual", [False, True])
# (1024 rows of 4200 columns: one wave of the Hopper kernel's 256 x 128 tiles, too short a K for it, and no tail; 600
# rows: past the 257-511 that run apart, ``w4a16._rows_apart``)
@pytest.mark.parametrize("M,N,K,chunk_n", [(1024, 4200, 512, 4096), (2048, 4096, 1024, 2048), (4200, 3000, 256, 1024),
                                            (600, 26000, 256, 8192)])
def test_gpu_w4a16_dequantize_matmul_in_chunks(M, N, K, chunk_n, residual, activation, dtype):
    """The weight in chunks on two streams: right eagerly, inside a captured CUDA graph (a side
    stream forked from and joined to the captured one), and the same as the whole weight's path."""
    args = make_w4(M, N, K, 128, dtype, False, not residual, M)
    x, qweight, scales, zeros, b = args
    if residual:
        b = torch.randn(M, N, device=DEVICE, dtype=dtype)
    assert w4a16.pick_config(M, output_columns(activation, N), K, 128, x.device, activation).chunk_n == chunk_n
    ref = reference.apply_activation(w4_reference(*args[:4], 128, b), activation)
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, 128, b, activation=activation)
    assert relative_error(out, ref) < BOUND[dtype]
    whole = w4a16.w4a16_linear(x, qweight, scales, zeros, 128, b, activation=activation,
                               config=w4a16.DequantMmConfig())
    assert relative_error(out, whole) < BOUND[dtype]

    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = w4a16.w4a16_linear(x, qweight, scales, zeros, 128, b, activation=activation)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    ref = reference.apply_activation(w4_reference(x, *args[1:4], 128, b), activation)
    assert relative_error(captured, ref) < BOUND[dtype]


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 28672, 4096), (16, 4096, 1024), (200, 1536, 512), (1000, 2048, 1024)])
@pytest.mark.parametrize("activation", EPILOGUES)
def test_gpu_epilogues_at_tuned_sizes(activation, M, N, K, dtype):
    assert w4_epilogue_error(activation, M, N, K, dtype, True, M) < BOUND[dtype]
    assert w8_epilogue_error(activation, M, N, K, dtype, True, M) < BOUND[dtype]
    assert fp8_epilogue_error(activation, M, N, K, dtype, True, M) < FP8_BOUND[dtype]


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config,K,steps", [
    (w8a16.GemvConfig(8, 512, 1, 4, 2, unrolled=True), 4096, 8),
    (w8a16.GemvConfig(4, 2048, 1, 2, 2, unrolled=True), 14336, 7),
    (w8a16.GemvConfig(16, 256, 2, 4, 2, unrolled=True), 1536, 3),
    (w8a16.GemvConfig(8, 512, 1, 4, 2, unrolled=True), 4096 + 16, 0),  # a partial step: the loop
    (w8a16.GemvConfig(8, 64, 1, 4, 2, unrolled=True), 4096, 0),  # 64 steps: the loop
])
@pytest.mark.parametrize("M,N,block_m", [(1, 4096, 1), (2, 1000, 1), (1, 50, 1), (2, 4096, 2), (3, 1000, 2),
                                         (5, 50, 2)])
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_gpu_w8_gemv_unrolled(kind, M, N, block_m, K, config, steps, dtype):
    """The packed 8-bit GEMV, on int8 weights (W8A16) and fp8 ones (FP8 W8A8), with its loop over K
    unrolled where each split is whole steps (and the loop kept where not), one or two rows a
    program (the last program's second row past M where M is odd), against the float32 reference:
    plain, with a residual and with each epilogue."""
    config = config._replace(block_m=block_m)
    if kind == "int8":
        x, qweight, scales, b = make_w8(M, N, K, dtype, True, N + K)
        linear, error, bound = w8a16.w8a16_linear, w8_epilogue_error, BOUND
        ref = lambda bias: reference.w8a16_linear(x.float(), qweight, scales.float(), bias.float())  # noqa: E731
        meta = w8a16.gemv_meta(config, x, qweight)
    else:  # (the GEMV reads the quantized activations in fp16)
        x, qweight, scales, b = make_fp8(M, N, K, dtype, True, N + K)
        linear, error, bound = fp8.fp8_linear, fp8_epilogue_error, FP8_BOUND
        ref = lambda bias: fp8_reference(x, qweight, scales, bias)  # noqa: E731
        meta = w8a16.gemv_meta(config, fp8.quantize_rows(x, torch.float16)[0], qweight)
    assert meta["PACKED_F16" if dtype == torch.float16 or kind == "fp8" else "PACKED_BF16"]
    assert meta["UNROLLED_STEPS"] == steps
    assert relative_error(linear(x, qweight, scales, b, config=config), ref(b)) < bound[dtype]
    _, residual = norm_and_residual(M, N, K, dtype, N)
    assert relative_error(linear(x, qweight, scales, residual, config=config), ref(residual)) < bound[dtype]
    for activation in EPILOGUES:
        assert error(activation, M, 2 * N, K, dtype, True, N, config=config) < bound[dtype], activation


@cuda
@needs_cuda
@pytest.mark.parametrize("groups_first", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,group_size,config", [
    (1, 4096, 4096, 128, w4a16.GemvConfig(16, 2048, 1, 16, unrolled=True, maxnreg=64)),
    (2, 1000, 768, 64, w4a16.GemvConfig(16, 256, 1, 8)), (1, 200, 14336, 128, w4a16.GemvConfig(16, 1024, 3, 8)),
    (1, 4100, 1280, 128, w4a16.GemvConfig(32, 512, 1, 4, unrolled=True)),
    (2, 4100, 14336, 128, w4a16.GemvConfig(16, 2048, 2, 16)),
    (1, 4072, 14336, 128, w4a16.GemvConfig(32, 2048, 1, 16, unrolled=True, maxnreg=80))])
def test_gpu_w4a16_gemv_either_tile_order(M, N, K, group_size, config, dtype, groups_first, monkeypatch):
    """The packed GEMV with its tile's groups first or its rows first (``w4a16.gemv_groups_first``; each Triton
    runs one of them, so the GPU's Triton runs the other here) against the float32 reference: 4, 8 and 16 warps,
    split or not, N off the blocks; plain with a bias, with the RMSNorm before it, and under silu_mul. The 16-warp
    tiles have as many groups as columns: in fp16 their sums meet in shared memory (``_sums_through_shared``), there
    also split, N and the split's steps off the blocks, two rows."""
    monkeypatch.setattr(w4a16, "gemv_groups_first", lambda cfg: groups_first)
    x, qweight, scales, zeros, b = make_w4(M, N, K, group_size, dtype, False, True, N + K)
    assert w4a16.gemv_meta(config, x, K, group_size)["GROUPS_FIRST"] == groups_first
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, group_size, b, config=config)
    assert relative_error(out, w4_reference(x, qweight, scales, zeros, group_size, b)) < BOUND[dtype]
    norm_weight, residual = norm_and_residual(M, N, K, dtype, N)
    out = w4a16.w4a16_linear(20 * x, qweight, scales, zeros, group_size, residual, norm_weight=norm_weight,
                             norm_eps=1e-5, config=config)
    normed = reference.rms_norm(20 * x, norm_weight, 1e-5)
    assert relative_error(out, w4_reference(normed, qweight, scales, zeros, group_size, residual)) < BOUND[dtype]
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, group_size, b, activation="silu_mul", config=config)
    ref = reference.apply_activation(w4_reference(x, qweight, scales, zeros, group_size, b), "silu_mul")
    assert relative_error(out, ref) < BOUND[dtype]


@cuda
@needs_cuda
@pytest.mark.parametrize("config", [None, w4a16.GemvConfig(16, 64, 3, 4), w4a16.GemvConfig(32, 1024, 1, 8),
                                    w4a16.GemvConfig(16, 256, 3, 4, unrolled=True),
                                    w4a16.GemvConfig(16, 64, 1, 4, unrolled=True)],
                         ids=lambda c: "tuned" if c is None else str(tuple(c)))
@pytest.mark.parametrize("M,N,K,group_size", [(1, 4096, 4096, 128), (2, 1000, 768, 128), (1, 200, 14336, 128),
                                              (2, 72, 320, 64), (1, 50, 96, 32), (2, 4100, 1280, 64)])
def test_gpu_w4a16_gemv_packed_bf16(M, N, K, group_size, config):
    """The bf16x2 GEMV path (bf16 products summed in bf16 per lane) against the float32
    reference, M, N and K off the block sizes; plain and with each epilogue, with bias."""
    args = make_w4(M, N, K, group_size, torch.bfloat16, False, True, N + K)
    x, qweight, scales, zeros, b = args
    cfg = config or w4a16.pick_config(M, N, K, group_size, x.device)
    assert w4a16.gemv_meta(cfg, x, K, group_size)["PACKED_BF16"]
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, group_size, b, config=config)
    assert relative_error(out, w4_reference(*args[:4], group_size, b)) < BOUND[torch.bfloat16]
    for dtype in (torch.bfloat16, torch.float16):  # with the RMSNorm before it and a residual after
        xd, *weights, _ = make_w4(M, N, K, group_size, dtype, False, False, N + K)
        norm_weight, residual = norm_and_residual(M, N, K, dtype, N)
        out = w4a16.w4a16_linear(20 * xd, *weights, group_size, residual, norm_weight=norm_weight, norm_eps=1e-5,
                                 config=config)
        normed = reference.rms_norm(20 * xd, norm_weight, 1e-5)
        assert relative_error(out, w4_reference(normed, *weights, group_size, residual)) < BOUND[dtype]
    for activation in EPILOGUES:
        out = w4a16.w4a16_linear(x, qweight, scales, zeros, group_size, b, activation=activation, config=config)
        ref = reference.apply_activation(w4_reference(*args[:4], group_size, b), activation)
        assert relative_error(out, ref) < BOUND[torch.bfloat16], activation


@cuda
@needs_cuda
@pytest.mark.parametrize("M,config", [(1, None), (2, None), (8, None), (64, None), (300, None),
                                      (1, w4a16.GemvConfig(16, 256, 2, 4)),  # a step of two groups, K split
                                      (2, w4a16.GemvConfig(32, 128, 1, 4, unrolled=True))],
                         ids=str)
def test_gpu_w4a16_fp16_activations_across_fp16s_range(M, config):
    """fp16 activations as large as fp16 holds (massive activations: SmolLM2-135M's layer-11
    down_proj input reaches 3047) against weight codes 15 from their zero, where each product
    x (q - z) is past fp16's range but the output is not: finite and within the bound on every
    path, the GEMV's fp16 lane sums included (two such x in one lane)."""
    N, K, group_size = 256, 1024, 128
    g = torch.Generator().manual_seed(M)
    q = torch.randint(0, 16, (K, N), generator=g)
    x = torch.randn(M, K, generator=g)
    # The GEMV sums 8 products a lane in fp16: rows 16 p + (0-3, 8-11) and 16 p + (4-7, 12-15)
    # of each word pair p. 8 and 9 share a lane; 37 and 100 have one each.
    massive = {37: 60000.0, 100: -20000.0, 8: 30000.0, 9: 30000.0}
    for k, value in massive.items():
        x[:, k] = value
        q[k] = 15
    qweight = reference.pack_int4_rows(q).to(DEVICE)
    scales = (torch.rand(K // group_size, N, generator=g) * 0.02 + 0.005).half().to(DEVICE)
    zeros = torch.zeros(K // group_size, N).half().to(DEVICE)
    x = x.half().to(DEVICE)
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, group_size, config=config)
    ref = w4_reference(x, qweight, scales, zeros, group_size, None)
    assert ref.abs().max() < 65504 and relative_error(out, ref) < BOUND[torch.float16]


@cuda
@needs_cuda
@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 16), eighth_n=st.integers(1, 40), groups=st.integers(1, 24),
       group_size=st.sampled_from([64, 128]), dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       symmetric=st.booleans(), bias=st.booleans(), activation=st.sampled_from(("none",) + EPILOGUES),
       warps=st.sampled_from([4, 8]), column_warps=st.sampled_from([1, 2, 4]), split=st.integers(1, 4),
       row_tiles=st.sampled_from([1, 2]), unrolled=st.booleans(), loop_unroll=st.sampled_from([1, 2, 3]),
       up_run=st.sampled_from([4, 8, 16]), maxnreg=st.sampled_from([0, 168, 200, 232]),
       tile=st.sampled_from([0, 8, 64]), prefetch=st.integers(0, 3), blocks=st.sampled_from([2, 4]),
       seed=st.integers(0, 2**16))
def test_gpu_w4a16_warp_mma(M, eighth_n, groups, group_size, dtype, symmetric, bias, activation, warps, column_warps,
                            split, row_tiles, unrolled, loop_unroll, up_run, maxnreg, tile, prefetch, blocks, seed):
    """The warp-level MMA kernel against the float32 reference: N off its 64- or 32-column tiles (a
    multiple of 8, so "silu_mul" halves stay whole), splits that leave warps without a group,
    one or two 8-row tiles a program (past 8 rows with one: two programs of rows), warps side
    by side on columns, 64 or 32 columns a warp, each epilogue, the loop over groups unrolled, rolled, or its
    body 2 or 3 times an iteration (with a remainder where the groups leave one), ptxas's registers or a budget,
    the words in column tiles or not, pulled into L2 ahead or not (where they are in tiles of 64);
    silu_mul on gate and up in runs of ``up_run`` too, where it divides N / 2."""
    assume(warps // column_warps <= 2 * blocks * row_tiles)  # (the rest: ``w4a16.w4a16_linear`` rejects them)
    config = w4a16.WarpMmaConfig(warps, split, row_tiles, column_warps, unrolled, maxnreg, prefetch, loop_unroll,
                                 blocks)
    N, K = 8 * eighth_n, groups * group_size
    check_w4_config(config, M, N, K, group_size, dtype, symmetric, bias, activation, seed, tile)
    if activation == "silu_mul" and (N // 2) % up_run == 0:
        error = w4_gate_up_runs_error(config, M, N, K, group_size, dtype, bias, seed, up_run, tile=tile)
        assert error < 2 * BOUND[dtype]


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [9, 16])
@pytest.mark.parametrize("N", [4096, 4072])
@pytest.mark.parametrize("tile", [0, common.WORD_TILE])
def test_gpu_w4a16_warp_mma_32_columns_as_picked(N, M, dtype, tile):
    """Past 8 rows on 4096 x 4096 the pick takes 32 columns a warp with both 8-row tiles a program: against the float32
    reference with a bias and gelu, then with the RMSNorm and a residual; N off the 32-column tiles too."""
    config = w4a16.pick_config(M, N, 4096, 128, torch.device("cuda"), dtype=dtype)
    assert config.column_blocks == 2 and config.row_tiles == 2, config
    check_w4_config(config, M, N, 4096, 128, dtype, False, True, "gelu", M, tile)


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [9, 16])
@pytest.mark.parametrize("N,K,activation", [(6144, 4096, "none"), (4096, 14336, "none"), (28672, 4096, "silu_mul")])
def test_gpu_w4a16_warp_mma_pulls_tiles_into_l2(N, K, activation, M, dtype):
    """The decode step's shapes past 8 rows, as the W4A16 methods lay them out (words in tiles of 64, gate and up
    in runs of 16): the pick pulls each warp's words into L2 a group ahead, and gives the reference's result."""
    x, qweight, scales, zeros, b = make_w4(M, N, K, 128, dtype, False, False, M, common.WORD_TILE)
    up_run = 16 if activation == "silu_mul" else 0
    cfg = w4a16.pick_config(M, output_columns(activation, N), K, 128, x.device, activation, dtype=dtype)
    assert cfg.prefetch_groups == 1 and w4a16.warp_mma_prefetch(cfg, qweight.shape[2], activation, up_run, x.device)
    laid = [reference.gate_up_runs(t, up_run) for t in (reference.word_rows(qweight), scales, zeros)]
    out = w4a16.w4a16_linear(x, reference.tile_word_columns(laid[0]), *laid[1:], 128, activation=activation,
                             up_run=up_run)
    ref = reference.apply_activation(w4_reference(x, qweight, scales, zeros, 128, None), activation)
    assert relative_error(out, ref) < BOUND[dtype]


def w4_bound(ref, x, qweight, scales, zeros, group_size, bias, activation="none"):
    """The bound on a W4A16 kernel's error against the float32 reference ``ref``: its dtype's, or twice the error of
    dequantize-then-matmul in x's dtype on the same problem where that is more (the weight rounded to x's dtype, the
    products summed in float32, the output with its bias rounded, then the activation). On a few outputs one sum's
    cancellation can take that path itself past the dtype's bound (H100: 1 row, 8 columns, K = 128, bf16, silu_mul,
    1.04e-2; the Hopper kernel's output was the path's bit for bit)."""
    weight = reference.dequantize_w4(qweight, scales.float(), zeros.float(), group_size).to(x.dtype).float()
    out = x.float() @ weight
    if bias is not None:
        out = out + bias.float()
    path = reference.activation_after_gemm(out.to(x.dtype), activation)
    return max(BOUND[x.dtype], 2 * relative_error(path, ref))


def check_w4_config(config, M, N, K, group_size, dtype, symmetric, bias, activation, seed, tile=0):
    """``config``'s kernel against the float32 reference (``w4_bound``): with the bias (or none) and ``activation``,
    then with the RMSNorm before it and a residual after it; with ``tile``, the words in column tiles."""
    args = make_w4(M, N, K, group_size, dtype, symmetric, bias, seed, tile)
    x, qweight, scales, zeros, b = args
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, group_size, b, activation=activation, config=config)
    ref = reference.apply_activation(w4_reference(*args[:4], group_size, b), activation)
    assert out.shape == (M, output_columns(activation, N))
    assert relative_error(out, ref) < w4_bound(ref, *args[:4], group_size, b, activation)
    norm_weight, residual = norm_and_residual(M, N, K, dtype, seed)
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, group_size, residual, norm_weight=norm_weight,
                             norm_eps=1e-6, config=config)
    normed = reference.rms_norm(x, norm_weight, 1e-6)
    ref = w4_reference(normed, *args[1:4], group_size, residual)
    assert relative_error(out, ref) < w4_bound(ref, normed, *args[1:4], group_size, residual)


needs_hopper = pytest.mark.skipif(not (CUDA and torch.cuda.get_device_capability() == (9, 0)),
                                  reason="wgmma is Hopper's")
# what the Hopper kernels' tests draw besides rows and their kernel's shape: N in eighths, K in whole 128-row
# chunks of groups of 64 to 256, and the epilogue
HOPPER_PROBLEMS = dict(eighth_n=st.integers(1, 40), chunks=st.integers(1, 12), group_size=st.sampled_from([64, 128, 256]),
                       dtype=st.sampled_from([torch.float16, torch.bfloat16]), symmetric=st.booleans(),
                       bias=st.booleans(), activation=st.sampled_from(("none",) + EPILOGUES), split=st.integers(1, 5),
                       seed=st.integers(0, 2**16))


@cuda
@needs_cuda
@needs_hopper
@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 140), block_m=st.sampled_from([16, 32, 64, 128]), warpgroups=st.sampled_from([1, 2]),
       scaled=st.booleans(), **HOPPER_PROBLEMS)
def test_gpu_w4a16_wgmma(M, eighth_n, chunks, group_size, dtype, symmetric, bias, activation, block_m, warpgroups,
                         split, scaled, seed):
    """The Hopper kernel against the float32 reference: N off its 64-column warpgroup tiles, M off its row
    tiles, chunks of one group, two groups or part of one, splits that leave programs without a chunk, a
    vector bias in its epilogue, a residual and each activation after it, and the RMSNorm before it."""
    config = w4a16.WgmmaConfig(block_m, warpgroups, split, scaled)
    K = chunks * max(128, group_size)
    check_w4_config(config, M, 8 * eighth_n, K, group_size, dtype, symmetric, bias, activation, seed)


# (block_m, block_n, num_warps) the TMA kernel lays out (``check_wgmma_tma_config``)
WGMMA_TMA_SHAPES = [(128, 128, 8), (256, 128, 8), (128, 256, 8), (128, 32, 8), (64, 64, 4), (64, 128, 4),
                    (128, 32, 4), (256, 64, 4)]


@cuda
@needs_cuda
@needs_hopper
@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 300), shape=st.sampled_from(WGMMA_TMA_SHAPES), stages=st.integers(2, 4), **HOPPER_PROBLEMS)
def test_gpu_w4a16_wgmma_tma(M, eighth_n, chunks, group_size, dtype, symmetric, bias, activation, shape, stages,
                             split, seed):
    """The TMA kernel against the float32 reference: M off its row tiles (x's rows past M zero-filled by the
    TMA), N off its column tiles, K of 2 to 48 steps of 64 in groups of one step, two or four, more stages
    than steps, splits that leave programs without a step, a vector bias in its epilogue, a residual and
    each activation after it, and the RMSNorm before it."""
    block_m, block_n, warps = shape
    config = w4a16.WgmmaTmaConfig(block_m, block_n, stages, split, warps)
    K = chunks * max(128, group_size)
    check_w4_config(config, M, 8 * eighth_n, K, group_size, dtype, symmetric, bias, activation, seed)


# (block_m, block_n, num_warps, dequant_warps) the warp-specialized TMA kernel lays out
WARP_SPECIALIZED_SHAPES = [(256, 128, 8, 4), (128, 128, 8, 8), (128, 64, 4, 8), (64, 128, 4, 4), (128, 64, 8, 4)]


@cuda
@needs_cuda
@needs_hopper
@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 300), shape=st.sampled_from(WARP_SPECIALIZED_SHAPES), stages=st.integers(3, 4),
       tile=st.sampled_from([0, 64]), whole_tiles=st.integers(0, 3), **HOPPER_PROBLEMS)
def test_gpu_w4a16_wgmma_tma_warp_specialized(M, eighth_n, chunks, group_size, dtype, symmetric, bias, activation,
                                              shape, stages, tile, whole_tiles, split, seed):
    """The warp-specialized TMA kernel against the float32 reference, its words in rows or in column tiles: M off
    its row tiles, N off its column tiles and runs (the TMA copies zero-fill past N), K of 2 to 48 steps in groups
    of one step, two or four, splits that leave programs without a step, split in all tiles or only in those past
    ``whole_tiles`` columns of tiles (a tail; unsplit, those columns dequantized and multiplied by cuBLAS), a vector
    bias in its epilogue, a residual and each activation after it, and the RMSNorm before it."""
    block_m, block_n, warps, dequant_warps = shape
    N = 8 * eighth_n
    first = whole_tiles * block_n if whole_tiles * block_n < N else 0  # (the GEMM's N columns)
    config = w4a16.WgmmaTmaConfig(block_m, block_n, stages, split, warps, dequant_warps)
    config = config._replace(**{"split_from_column" if split > 1 else "dequantized_from_column": first})
    K = chunks * max(128, group_size)
    check_w4_config(config, M, N, K, group_size, dtype, symmetric, bias, activation, seed, tile=tile)


@cuda
@needs_cuda
@needs_hopper
def test_gpu_w4a16_dequantized_tail_replays_in_a_cuda_graph():
    """The warp-specialized kernel with the columns past its first wave dequantized on the side stream and multiplied
    by cuBLAS (``dequantized_from_column``) is right eagerly and in a CUDA graph replayed on new x."""
    config = w4a16.WgmmaTmaConfig(256, 128, 4, 1, 8, 4, dequantized_from_column=256)
    x, qweight, scales, zeros, b = make_w4(512, 640, 2048, 128, torch.float16, False, True, 0, tile=64)
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, 128, b, config=config)
    assert relative_error(out, w4_reference(x, qweight, scales, zeros, 128, b)) < BOUND[torch.float16]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16.w4a16_linear(x, qweight, scales, zeros, 128, b, config=config)
    for seed in (1, 2):
        x.copy_(make_w4(512, 640, 2048, 128, torch.float16, False, True, seed)[0])
        graph.replay()
        assert relative_error(out, w4_reference(x, qweight, scales, zeros, 128, b)) < BOUND[torch.float16]


@cuda
@needs_cuda
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M, rule", [(200, "_register_fed_one_wave"), (300, "_register_fed_all_waves")])
def test_gpu_w4a16_register_fed_picks_past_128_rows(M, rule, dtype):
    """Past 128 rows the pick is the register-fed kernel where its rules give a config: 256-row tiles filling most of
    one wave (200 rows, one tile of rows, 64-column tiles for 80% of the SMs) or 128-row tiles over all their waves
    (300 rows, three tiles of rows, x's last one in halves, 90% of one wave of two an SM): right with a bias."""
    sms = common.sm_count(torch.device(DEVICE))
    N = 64 * (sms * 8 // 10 if M == 200 else 2 * sms * 9 // 10 // 3)
    x, qweight, scales, zeros, b = make_w4(M, N, 1024, 128, dtype, False, True, 0, tile=64)
    expected = getattr(w4a16, rule)(M, N, 1024, sms)
    assert expected is not None and w4a16.pick_config(M, N, 1024, 128, x.device, dtype=dtype) == expected
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, 128, b)
    assert relative_error(out, w4_reference(x, qweight, scales, zeros, 128, b)) < BOUND[dtype]


@cuda
@needs_cuda
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_w4a16_rows_apart(dtype):
    """Past 256 rows, x's first 256 rows apart from the rest where the pick for them all is the register-fed kernel
    on 128-row tiles over three waves (``_rows_apart``): at 300 rows the rest 44 (the 64-row register-fed kernel), at
    260 rows 4 (the warp-level MMA); right with a bias, and with the RMSNorm, a residual and silu_mul."""
    device = torch.device(DEVICE)
    sms = common.sm_count(device)
    N, K = 64 * (5 * sms // 3), 1024  # 5 sms programs of 128 rows: 83% of three waves of two an SM
    for M in (260, 300):
        x, qweight, scales, zeros, b = make_w4(M, N, K, 128, dtype, False, True, M, tile=64)
        whole = w4a16._pick_for_all_rows(M, N, K, 128, device, "none", True, dtype, True, False, True)
        assert whole == w4a16._register_fed_all_waves(M, N, K, sms) is not None
        assert w4a16.pick_config(M, N, K, 128, device, dtype=dtype) == w4a16.RowSplitConfig(256)
        out = w4a16.w4a16_linear(x, qweight, scales, zeros, 128, b)
        assert relative_error(out, w4_reference(x, qweight, scales, zeros, 128, b)) < BOUND[dtype]
        norm_weight, residual = norm_and_residual(M, N, K, dtype, M)
        out = w4a16.w4a16_linear(x, qweight, scales, zeros, 128, residual, "silu_mul", norm_weight, 1e-5)
        normed = reference.rms_norm(x, norm_weight, 1e-5)
        expected = reference.epilogue(w4_reference(normed, qweight, scales, zeros, 128, None), residual, "silu_mul",
                                      torch.float32)
        assert relative_error(out, expected) < BOUND[dtype]


@cuda
@needs_cuda
@needs_hopper
def test_gpu_w4a16_tail_split_within_the_weight():
    """A tail split from the weight's last column or past it is refused before any launch, naming both."""
    x, qweight, scales, zeros, _ = make_w4(300, 256, 1024, 128, torch.float16, False, False, 0, tile=64)
    config = w4a16.WgmmaTmaConfig(256, 128, 4, 2, 8, 4, split_from_column=256)
    with pytest.raises(ValueError, match=r"split_from_column 256: .* within the weight's 256 columns"):
        w4a16.w4a16_linear(x, qweight, scales, zeros, 128, config=config)


@cuda
@needs_cuda
@needs_hopper
@settings(max_examples=40, deadline=None)
@given(M=st.integers(1, 300), form=st.sampled_from([(64, False, 0), (128, False, 0), (256, False, 0), (64, True, 0),
                                                    (128, True, 0), (64, True, 80), (64, True, 64),
                                                    (256, True, w4a16.RS_WS_256_REGISTERS)]),
       stages=st.integers(2, 4), tile=st.sampled_from([0, 64]), **HOPPER_PROBLEMS)
def test_gpu_w4a16_wgmma_tma_register_operand(M, eighth_n, chunks, group_size, dtype, symmetric, bias, activation,
                                              form, stages, tile, split, seed):
    """The TMA kernel with the weights in registers, single-partition or warp-specialized, against the float32
    reference, its words in rows or in column tiles: M off its row tiles (x's rows past M zero-filled by the TMA), N
    off its 64 columns (the copies zero-fill past N), K of 2 to 48 steps in groups of one step, two or four, more
    stages than steps, splits that leave programs without a step, a vector bias in its epilogue, a residual and each
    activation after it, and the RMSNorm before it. Tiles of 64, 128 or 256 rows (warp-specialized too, 64 also with
    three or four programs an SM's registers, 256 with one's)."""
    block_m, loader_warp, maxnreg = form  # (maxnreg 80 / 64: three / four programs an SM; 168: one)
    config = w4a16.WgmmaTmaConfig(block_m, 64, stages, split, 4, registers=True, loader_warp=loader_warp,
                                  maxnreg=maxnreg)
    K = chunks * max(128, group_size)
    check_w4_config(config, M, 8 * eighth_n, K, group_size, dtype, symmetric, bias, activation, seed, tile=tile)


# (config, rows, whether x is copied in half tiles): the last tile just far enough past x's end for half tiles, and
# just short of it, for the TMA kernels with the weights in registers and warp-specialized, K split or not, one tile
# or more; and the single-partition kernel, x always in whole tiles
REGISTERS_128, REGISTERS_64 = (w4a16.WgmmaTmaConfig(rows, 64, 3, 3, 4, registers=True) for rows in (128, 64))
REGISTERS_256 = w4a16.WgmmaTmaConfig(256, 64, 4, 2, 4, registers=True, loader_warp=True,
                                     maxnreg=w4a16.RS_WS_256_REGISTERS)
HALVES_CASES = [(REGISTERS_128._replace(split_k=1), 65, True), (REGISTERS_128, 20, True), (REGISTERS_128, 104, True),
                (REGISTERS_128, 105, False), (REGISTERS_128, 200, True), (REGISTERS_64, 40, True),
                (REGISTERS_64, 41, False), (REGISTERS_64._replace(loader_warp=True), 40, True),
                (REGISTERS_128._replace(loader_warp=True), 105, False),
                (REGISTERS_256, 488, True), (REGISTERS_256, 489, False), (REGISTERS_256._replace(split_k=1), 300, True)]
HALVES_CASES += [(w4a16.WgmmaTmaConfig(256, 128, 4, 2, dequant_warps=4), M, halves)
                 for M, halves in ((44, True), (136, True), (137, False), (300, True))]
HALVES_CASES += [(w4a16.WgmmaTmaConfig(128, 128, 3, 2, 8), 65, False)]  # (the single-partition kernel: never)


@cuda
@needs_cuda
@needs_hopper
@pytest.mark.parametrize("config", [REGISTERS_64._replace(split_k=1), REGISTERS_128._replace(split_k=4),
                                    REGISTERS_64._replace(split_k=2, loader_warp=True),
                                    REGISTERS_64._replace(split_k=2, loader_warp=True, maxnreg=64),
                                    REGISTERS_128._replace(split_k=1, loader_warp=True), REGISTERS_256])
def test_gpu_register_operand_tma_kernels_read_x_after_the_grid_before(config):
    """The warp-specialized register-fed TMA kernel launches with programmatic dependent launch: it starts while the
    kernel before finishes and copies its first weights then, but x only once that kernel has written it (the
    single-partition kernel, launched plainly, is chained the same way). A chain of such GEMMs, each one's x the
    output of the one before (96 rows, K = N = 1024, launched back to back), is right at every link, eagerly and
    replayed in a CUDA graph three times, each on a new x."""
    layers = [make_w4(96, 1024, 1024, 128, torch.float16, False, seed % 2 == 0, seed, tile=64)[1:]
              for seed in range(4)]
    x0 = make_w4(96, 1024, 1024, 128, torch.float16, False, False, 9)[0]

    def chain(x):
        outs = [x]
        for qweight, scales, zeros, b in layers:
            outs.append(w4a16.w4a16_linear(outs[-1], qweight, scales, zeros, 128, b, config=config))
        return outs

    def check(outs):
        for x, out, (qweight, scales, zeros, b) in zip(outs, outs[1:], layers):
            assert relative_error(out, w4_reference(x, qweight, scales, zeros, 128, b)) < BOUND[torch.float16]

    check(chain(x0))
    x = x0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain(x)
    for seed in range(3):
        x.copy_(make_w4(96, 1024, 1024, 128, torch.float16, False, False, 10 + seed)[0])
        graph.replay()
        check(outs)


@pytest.mark.parametrize("M, N, dtype, bias, first", [(5, 37, torch.float16, True, 0),
                                                       (3, 1000, torch.bfloat16, False, 0),
                                                       (7, 300, torch.float16, True, 212)])
@pytest.mark.parametrize("block", [w4a16.split_total_block(True), w4a16.split_total_block(False)])
def test_split_total_kernel_finishes_the_sums_and_leaves_them_zero(M, N, dtype, bias, first, block):
    """What finishes a split of the TMA kernels (``w4a16.wgmma_tma_matmul``): the float32 sums ``[M, N - first]``
    plus the bias's columns from ``first`` on, cast into the output's columns from ``first`` on (all of them, or the
    tail whose K alone was split), over sizes off either block it takes (``w4a16.split_total_block``); the other
    columns untouched, the sums left at zero for the next split."""
    g = torch.Generator().manual_seed(M)
    # bf16 sums as bf16 holds them: Triton's interpreter rounds float32 to bf16 toward zero, the GPU to nearest
    sums = torch.randn(M * (N - first), generator=g)
    sums = (sums.to(dtype).float() if dtype == torch.bfloat16 else sums).to(DEVICE)
    b = torch.randn(N, generator=g).to(dtype).to(DEVICE) if bias else None
    expected = sums.view(M, N - first) + (b[first:].float() if bias else 0)
    out = torch.full((M, N), 7.0, dtype=dtype, device=DEVICE)
    replay.launch(common.split_total_kernel, (common.cdiv(sums.numel(), block),), sums, b[first:] if bias else out,
                  out[:, first:], sums.numel(), N - first, N, BLOCK=block, HAS_BIAS=bias, PDL=False)
    torch.testing.assert_close(out[:, first:], expected.to(dtype), rtol=0, atol=0)
    assert (out[:, :first] == 7).all() and not sums.any()


def test_w4a16_x_in_halves_where_the_last_tile_reaches_far_past_x():
    """x in half tiles where the last tile reaches 24 rows or more past x's end, or for the warp-specialized kernel
    all its second half but a sixteenth (for 256-row tiles, 120 rows); else in whole tiles."""
    for config, M, halves in HALVES_CASES:
        if config.registers or config.dequant_warps:
            assert w4a16.x_in_halves(M, config.block_m, config.dequant_warps > 0) == halves, (config, M)
    assert not any(w4a16.x_in_halves(M, rows, ws) for M, rows in ((128, 128), (256, 128), (64, 64)) for ws in (0, 1))


@cuda
@needs_cuda
@needs_hopper
@pytest.mark.parametrize("config, M", [(config, M) for config, M, _ in HALVES_CASES])
def test_gpu_w4a16_tma_kernels_copy_x_within_its_rows(config, M):
    """Each TMA kernel where its last tile reaches far enough past x's end for x in half tiles (moved back within x,
    some of their rows another tile's or copied twice) and where it does not (one box, the TMA zero-filling past
    the end): every row right, with a bias, K split or not (each row's sums added once)."""
    x, qweight, scales, zeros, b = make_w4(M, 192, 1024, 128, torch.float16, False, True, 0, tile=64)
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, 128, b, config=config)
    assert out.shape == (M, 192)
    assert relative_error(out, w4_reference(x, qweight, scales, zeros, 128, b)) < BOUND[torch.float16]


@cuda
@needs_cuda
@needs_hopper
@pytest.mark.parametrize("M, kernel", [(200, "dequant_warps"), (100, "registers"), (48, "registers")])
def test_gpu_w4a16_pick_leaves_words_tma_cannot_read(M, kernel):
    """Past 128 rows the pick is the warp-specialized kernel, from 33 to 128 the one with the weights in registers;
    words they cannot copy (tiles of 32) run the kernels that load them (the TMA kernel without warp
    specialization, or to 64 rows the wgmma kernel), right, and the config given for them is refused with the
    strides it saw."""
    x, qweight, scales, zeros, _ = make_w4(M, 256, 1024, 128, torch.float16, False, False, 0, tile=32)
    config = w4a16.pick_config(M, 256, 1024, 128, x.device)
    assert isinstance(config, w4a16.WgmmaTmaConfig) and getattr(config, kernel)
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, 128)
    assert relative_error(out, w4_reference(x, qweight, scales, zeros, 128, None)) < BOUND[torch.float16]
    with pytest.raises(ValueError, match=r"reads qweight, scales and zeros by TMA.*got qweight \(128, 8, 32\)"):
        w4a16.w4a16_linear(x, qweight, scales, zeros, 128, config=config)


@cuda
@needs_cuda
@needs_hopper
@pytest.mark.parametrize("M, K, split, tile, tail, waves", [(1024, 4096, 1, 64, 0, 1), (500, 8192, 2, 0, 0, 1),
                                                            (1000, 4096, 1, 32, 0, 1), (512, 8192, None, 64, 10, 1),
                                                            (700, 8192, None, 0, 10, 1), (768, 4096, None, 64, 10, 1),
                                                            (1024, 4096, None, 0, 3, 1), (1024, 1024, None, 64, 10, 3),
                                                            (768, 2048, None, 0, 7, 2)])
def test_gpu_w4a16_pick_past_256_rows_in_whole_waves(M, K, split, tile, tail, waves, monkeypatch):
    """Past 256 rows the pick is the warp-specialized kernel where its tiles fill whole waves, unsplit or split in
    two, or where ``waves`` waves of whole columns leave ``tail`` columns of tiles, those split to fill a second (K >=
    8192, after one wave) or dequantized, then multiplied by cuBLAS (``_wgmma_tma_waves``): right with a bias, its
    words in tiles or rows. Words TMA cannot read (tiles of 32) take the dequantized weight + cuBLAS instead (the TMA
    kernel is never called), right as well. (500 rows of 4224 columns, whose 64-column tiles fill a wave, would take
    the register-fed kernel first: ``_register_fed_one_wave``, left out here.)"""
    monkeypatch.setattr(w4a16, "_register_fed_one_wave", lambda M, N, K, sms: None)
    sms = common.sm_count(torch.device(DEVICE))
    whole = sms // common.cdiv(M, 256)  # columns of 256-row tiles in a wave
    N = 128 * (waves * whole + tail if tail else sms // 4)  # (without a tail: M / 256 x sms / 4 tiles)
    expected = w4a16.WgmmaTmaConfig(256, 128, 4, split or 1, dequant_warps=4)
    if tail and K >= 8192:  # its tiles split as often as a wave holds them (6 and 4 on 132 SMs)
        split = min(sms // (common.cdiv(M, 256) * tail), 8)
        expected = expected._replace(split_k=split, split_from_column=128 * whole)
    elif tail:
        expected = expected._replace(dequantized_from_column=128 * waves * whole)
    x, qweight, scales, zeros, b = make_w4(M, N, K, 128, torch.float16, False, True, 0, tile=tile)
    assert w4a16.pick_config(M, N, K, 128, x.device) == expected
    if tile == 32:
        monkeypatch.setattr(w4a16, "wgmma_tma_matmul", lambda *args: pytest.fail("the TMA kernel took tiles of 32"))
    out = w4a16.w4a16_linear(x, qweight, scales, zeros, 128, b)
    assert out.shape == (M, N) and out.dtype == x.dtype
    assert relative_error(out, w4_reference(x, qweight, scales, zeros, 128, b)) < BOUND[torch.float16]


@cuda
@needs_cuda
@pytest.mark.parametrize("config, rows", [
    pytest.param(w4a16.WgmmaConfig(64, 2, 4, scaled=True), (50, 20), marks=needs_hopper),
    pytest.param(w4a16.WgmmaConfig(32, 1, 3), (50, 20), marks=needs_hopper),
    (w4a16.WarpMmaConfig(4, 4, 2, maxnreg=232), (16, 9)), (w4a16.WarpMmaConfig(8, 2, 1), (5, 8)),
    (w4a16.GemvConfig(64, 64, 4, num_warps=4), (1, 3)), (w4a16.MmaConfig(32, 32, 64, 3, False, 4, 2), (40, 20)),
    pytest.param(w4a16.WgmmaTmaConfig(64, 64, 3, 4, 4, registers=True), (50, 20), marks=needs_hopper),
    pytest.param(w4a16.WgmmaTmaConfig(128, 64, 3, 2, 4, 8), (150, 60), marks=needs_hopper),
    pytest.param(w4a16.WgmmaTmaConfig(128, 64, 3, 2, 4, 8, split_from_column=128), (150, 60), marks=needs_hopper),
    pytest.param(w4a16.WgmmaTmaConfig(64, 64, 3, 3, 4), (50, 20), marks=needs_hopper)])
def test_gpu_split_gemms_leave_their_workspace_zero(config, rows):
    """The splits of K of each kernel meet in a workspace kept between calls, zeroed only when made
    (``replay.kept_zeros``): each launch leaves it at zero. So the same split GEMM is right every time, eager,
    replayed from its record and replayed in a CUDA graph (which keeps the workspace's address), between GEMMs of
    other shapes, and every workspace is zero afterwards."""
    from torch._library.triton import set_wrap_triton_enabled

    replayed = replay.Replayed(w4a16.w4a16_linear)

    def gemm(M, N, seed):
        x, qweight, scales, zeros, b = make_w4(M, N, 2048, 128, torch.bfloat16, False, True, seed)
        return (lambda: replayed(x, qweight, scales, zeros, 128, b, config=config),
                w4_reference(x, qweight, scales, zeros, 128, b))

    (first, first_ref), (other, other_ref) = gemm(rows[0], 320, 0), gemm(rows[1], 200, 1)
    with set_wrap_triton_enabled(False):  # (as the ops' CUDA backend runs it: the second call of each replays)
        for run, ref in ((first, first_ref), (other, other_ref), (first, first_ref), (first, first_ref)):
            assert relative_error(run(), ref) < BOUND[torch.bfloat16]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = first()
        for _ in range(3):
            out.zero_()
            graph.replay()
            assert relative_error(out, first_ref) < BOUND[torch.bfloat16]
            assert relative_error(other(), other_ref) < BOUND[torch.bfloat16]
    torch.cuda.synchronize()
    if not isinstance(config, (w4a16.WgmmaConfig, w4a16.WgmmaTmaConfig)):  # (Gluon's launches are not recorded)
        assert all(isinstance(record, replay._Record) for record in replayed.records.values())
    assert replay._KEPT and not any(w.any() for w in replay._KEPT.values())


@cuda
@needs_cuda
def test_gpu_split_k_workspace_first_made_in_a_compiled_cuda_graphs_warm_up(monkeypatch):
    """A split-K workspace first needed while torch.compile's CUDA graphs warm a graph up is made outside the
    graph's memory pool (there it would be a live allocation the graph does not track, which it refuses to record):
    the graph records and replays, right each time, and the workspace is left at zero."""
    import torch._dynamo

    import qpass  # noqa: F401

    monkeypatch.setattr(replay, "_KEPT", {})
    x, qweight, scales, zeros, b = make_w4(8, 512, 1024, 128, torch.float16, False, True, 0)
    assert w4a16.pick_config(8, 512, 1024, 128, x.device).split_k > 1
    ref = w4_reference(x, qweight, scales, zeros, 128, b)
    torch._dynamo.reset()
    step = torch.compile(lambda x: torch.ops.qpass.w4a16_linear(x, qweight, scales, zeros, 128, b),
                         mode="reduce-overhead", fullgraph=True)
    for _ in range(4):
        torch.compiler.cudagraph_mark_step_begin()
        assert relative_error(step(x), ref) < BOUND[torch.float16]
    torch.cuda.synchronize()
    assert replay._KEPT and not any(kept.any() for kept in replay._KEPT.values())


@cuda
@needs_cuda
def test_gpu_ops_dispatch_to_the_kernels_for_3d_activations():
    import qpass  # noqa: F401  (registers torch.ops.qpass.*)

    x, qweight, scales, zeros, b = make_w4(12, 96, 256, 64, torch.float16, False, True, 0)
    out = torch.ops.qpass.w4a16_linear(x.view(3, 4, 256), qweight, scales, zeros, 64, b)
    ref = w4_reference(x, qweight, scales, zeros, 64, b).view(3, 4, 96)
    assert relative_error(out, ref) < BOUND[torch.float16]

    x, qweight, scales, b = make_w8(12, 96, 256, torch.float16, True, 0)
    out = torch.ops.qpass.w8a16_linear(x.view(3, 4, 256), qweight, scales, b)
    ref = reference.w8a16_linear(x.float(), qweight, scales.float(), b.float()).view(3, 4, 96)
    assert relative_error(out, ref) < BOUND[torch.float16]

    x, qweight, weight_scale, b = make_fp8(12, 96, 256, torch.float16, True, 0)
    out = torch.ops.qpass.fp8_linear(x.view(3, 4, 256), qweight, weight_scale, b)
    ref = reference.fp8_linear(x.float(), qweight, weight_scale, b.float()).view(3, 4, 96)
    assert relative_error(out, ref) < FP8_BOUND[torch.float16]


@cuda
@needs_cuda
@pytest.mark.parametrize("M", [1, 12])
def test_gpu_eager_calls_launch_the_kernels_without_the_dispatcher(M, monkeypatch):
    """``qpass.ops``' functions, in plain eager use, launch the Triton kernels from the ops' bodies themselves
    (``wrap_triton`` switched off for the call, as the ops' CUDA backends do) and give their results."""
    import contextlib

    from qpass import ops

    switched = []

    @contextlib.contextmanager
    def counted_switch(enabled):
        switched.append(enabled)
        with set_wrap_triton_enabled(enabled):
            yield

    set_wrap_triton_enabled = ops.set_wrap_triton_enabled
    monkeypatch.setattr(ops, "set_wrap_triton_enabled", counted_switch)
    x, qweight, scales, zeros, b = make_w4(M, 96, 256, 64, torch.float16, False, True, 0)
    out = ops.w4a16_linear(x, qweight, scales, zeros, 64, b)
    assert relative_error(out, w4_reference(x, qweight, scales, zeros, 64, b)) < BOUND[torch.float16]
    x, qweight, scales, b = make_w8(M, 96, 256, torch.float16, True, 0)
    out = ops.w8a16_linear(x, qweight, scales, b)
    assert relative_error(out, reference.w8a16_linear(x.float(), qweight, scales.float(), b.float())) < \
        BOUND[torch.float16]
    x, qweight, weight_scale, b = make_fp8(M, 96, 256, torch.float16, True, 0)
    out = ops.fp8_linear(x, qweight, weight_scale, b)
    assert relative_error(out, reference.fp8_linear(x.float(), qweight, weight_scale, b.float())) < \
        FP8_BOUND[torch.float16]
    assert switched == [False] * 3


@cuda
@needs_cuda
@pytest.mark.parametrize("M", [1, 8, 64, 128, 1024])
def test_gpu_compiled_op_calls_the_triton_kernel_without_graph_break(M):
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    import qpass  # noqa: F401

    x, qweight, scales, zeros, b = make_w4(M, 512, 1024, 128, torch.float16, False, True, 0)

    def f(x):
        return torch.nn.functional.silu(torch.ops.qpass.w4a16_linear(x, qweight, scales, zeros, 128, b))

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    out, codes = run_and_get_code(compiled, x)
    ref = torch.nn.functional.silu(w4_reference(x, qweight, scales, zeros, 128, b))
    assert relative_error(out, ref) < BOUND[torch.float16]
    kernels = {w4a16.GemvConfig: "w4a16_gemv_kernel", w4a16.MmaConfig: "_w4a16_mma_kernel",
               w4a16.WarpMmaConfig: "w4a16_warp_mma_kernel", w4a16.DequantMmConfig: "_w4a16_dequantize_kernel",
               w4a16.WgmmaConfig: "w4a16_wgmma_matmul",  # (opaque ops: Inductor cannot copy a Gluon kernel)
               w4a16.WgmmaTmaConfig: "w4a16_wgmma_tma_matmul"}
    cfg = w4a16.pick_config(M, 512, 1024, 128, x.device)
    kernel = kernels[type(cfg)]
    if kernel in ("w4a16_gemv_kernel", "_w4a16_mma_kernel", "w4a16_warp_mma_kernel") and cfg.split_k > 1:
        kernel = "torch.ops.qpass.w4a16_linear_split_k.default("  # (the op keeps the split's workspace)
    assert any(kernel in code for code in codes), f"Inductor's code does not launch {kernel}"


@cuda
@needs_cuda
@pytest.mark.parametrize("activation", ["none", "silu_mul"])
def test_gpu_compiled_fp8_op_at_a_tma_pick(activation):
    """Compiled, the FP8 op at its large-M pick (tiles copied by TMA on Hopper, eagerly) launches the kernel in
    Inductor's code, copying through pointers (``fp8_linear``), with no graph break, and gives the eager op's result."""
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    import qpass  # noqa: F401

    M, n_out, K = 2048, 2560, 512
    N = 2 * n_out if activation == "silu_mul" else n_out
    cfg = fp8.pick_config(M, n_out, K, torch.device("cuda"), activation)
    assert cfg.tma == (common.capability(torch.device("cuda"))[0] >= 9), cfg
    x, qweight, weight_scale, b = make_fp8(M, N, K, torch.float16, True, 0)

    def f(x):
        return torch.ops.qpass.fp8_linear(x, qweight, weight_scale, b, activation) * 2

    torch._dynamo.reset()
    out, codes = run_and_get_code(torch.compile(f, fullgraph=True), x)
    assert relative_error(out, 2 * fp8_reference(x, qweight, weight_scale, b, activation)) < FP8_BOUND[torch.float16]
    assert any("_fp8_mma_kernel" in code for code in codes), "Inductor's code does not launch _fp8_mma_kernel"
    assert relative_error(out, 2 * fp8.fp8_linear(x, qweight, weight_scale, b, activation)) < FP8_BOUND[torch.float16]


def test_opaque_gemm_ops_run_under_torch_compile():
    """The W4A16 GEMMs that torch.compile cannot trace are ops of their own (``qpass.ops._opaque_gemm``): on
    the CPU the chunked one runs inside a compiled graph as it runs eagerly, and both ops' fake
    implementations give the output's shape."""
    import torch._dynamo
    from torch._subclasses.fake_tensor import FakeTensorMode

    import qpass  # noqa: F401

    x, qweight, scales, zeros, _ = make_w4(5, 48, 256, 64, torch.float32, False, False, 0)
    gemm = torch.ops.qpass.w4a16_dequantize_matmul
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: torch.relu(gemm(x, qweight, scales, zeros, 64, None, 4, 16, 32)), fullgraph=True)
    eager = torch.relu(w4a16.dequantize_matmul(x, qweight, scales, zeros, 64, None, 4, 16, 32))
    assert torch.equal(compiled(x), eager)
    with FakeTensorMode():
        fake = (torch.empty(7, 256), torch.empty(32, 48, dtype=torch.int32), torch.empty(4, 48), torch.empty(4, 48))
        assert gemm(*fake, 64, None, 4, 16, 32).shape == (7, 48)
        assert torch.ops.qpass.w4a16_wgmma_matmul(*fake, 64, None, 32, 1, 1).shape == (7, 48)
        assert torch.ops.qpass.w4a16_wgmma_tma_matmul(*fake, 64, None, 128, 128, 4, 1).shape == (7, 48)


def _split_k_case(kind: str, M: int):
    """For ``kind`` (w4a16, w8a16, fp8): its kernels' module, a config of theirs that splits K, and the entry
    point's arguments for a call of ``M`` rows with silu_mul (and for W4A16 and FP8 the norm; for W4A16 a residual
    and gate/up runs too), 96 GEMM columns: 48 out."""
    if kind == "w4a16":
        x, qweight, scales, zeros, _ = make_w4(M, 96, 256, 64, torch.float32, False, False, 0)
        norm_weight, residual = norm_and_residual(M, 96, 256, torch.float32, 0)
        return w4a16, w4a16.GemvConfig(16, 32, 4, num_warps=4), (x, qweight, scales, zeros, 64, residual, "silu_mul",
                                                                  norm_weight, 1e-5, 16)
    config = w8a16.GemvConfig(8, 64, 3, num_warps=4, num_stages=2)
    if kind == "w8a16":
        return w8a16, config, (*make_w8(M, 96, 256, torch.float32, True, 0), "silu_mul")
    norm_weight, _ = norm_and_residual(M, 96, 256, torch.float32, 0)
    return fp8, config, (*make_fp8(M, 96, 256, torch.float32, True, 0), "silu_mul", norm_weight, 1e-5)


def _entry(module):
    return {w4a16: w4a16.w4a16_linear, w8a16: w8a16.w8a16_linear, fp8: fp8.fp8_linear}[module]


@pytest.mark.parametrize("kind", ["w4a16", "w8a16", "fp8"])
def test_a_traced_call_whose_kernel_splits_k_goes_to_the_split_k_op(kind, monkeypatch):
    """Traced (fake tensors), a call whose kernel splits K hands itself, all its arguments (norm, residual,
    activation and all), to ``split_k_linear_op``, which ``qpass.ops`` makes an op that torch.compile runs as it
    is (the split's workspace is kept between calls: a compiled graph could not keep it). With real tensors the
    kernels run; so they do with a config given."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = []

    def split_k_linear_op(*args):
        calls.append(args)
        return "the op's result"

    module, config, call = _split_k_case(kind, 2)
    monkeypatch.setattr(module, "pick_config", lambda *args, **kwargs: config)
    entry = _entry(module)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in call]
        assert entry(*fake, split_k_linear_op=split_k_linear_op) == "the op's result"
    assert len(calls) == 1 and all(got is want for got, want in zip(calls[0], fake)) and len(calls[0]) == len(call)
    for passed in (None, config):
        out = entry(*call, config=passed, split_k_linear_op=split_k_linear_op)
        assert len(calls) == 1 and out.shape == (2, 48)
    # a split past the kept workspace's size zeroes a fresh one: traced as it is
    monkeypatch.setattr(common, "KEPT_WORKSPACE_MAX", 2 * 96 - 1)
    assert not common.traced_split(config, fake[0], 96) and common.traced_split(config, fake[0], 95)


@pytest.mark.parametrize("kind", ["w4a16", "w8a16", "fp8"])
def test_split_k_ops_are_their_ops_run_as_they_are_under_torch_compile(kind):
    """``qpass::<op>_split_k``, what a traced call of ``qpass::<op>`` whose kernel splits K becomes: the op's schema,
    and its body, which torch.compile runs as it is (on the CPU the plain-torch reference): inside a compiled graph
    it gives what the op gives eagerly, with silu_mul (and the norm; W4A16's residual and gate/up runs); its fake
    implementation gives the output's shape."""
    import torch._dynamo
    from torch._subclasses.fake_tensor import FakeTensorMode

    import qpass  # noqa: F401

    _, _, call = _split_k_case(kind, 3)
    op = getattr(torch.ops.qpass, f"{kind}_linear")
    split_k_linear = getattr(torch.ops.qpass, f"{kind}_linear_split_k")
    assert str(split_k_linear.default._schema) == str(op.default._schema).replace("_linear(", "_linear_split_k(")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: torch.relu(split_k_linear(x, *call[1:])), fullgraph=True)
    for _ in range(2):  # (on a GPU the split's float32 sums meet in the order its programs finish)
        out, eager = compiled(call[0]), torch.relu(op(*call))
        assert relative_error(out, eager) < 1e-6 if CUDA else torch.equal(out, eager)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in call]
        fake[0] = torch.empty(7, 256)
        assert split_k_linear(*fake).shape == (7, 48)
        fake[{"w4a16": 6, "w8a16": 4, "fp8": 4}[kind]] = "none"  # the activation
        assert split_k_linear(*fake).shape == (7, 96)


@cuda
@needs_cuda
def test_gpu_compiled_op_runs_the_chunked_path_as_an_opaque_op():
    """Past 1024 rows the weight goes in chunks on two streams, which torch.compile cannot trace:
    the W4A16 op calls ``qpass::w4a16_dequantize_matmul`` for it, and Inductor's code calls that op,
    with CUDA graphs too (``mode="reduce-overhead"``)."""
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    import qpass  # noqa: F401

    x, qweight, scales, zeros, b = make_w4(2048, 4096, 512, 128, torch.bfloat16, False, True, 0)
    assert w4a16.pick_config(2048, 4096, 512, 128, x.device).chunk_n == 2048

    def f(x):
        return torch.ops.qpass.w4a16_linear(x, qweight, scales, zeros, 128, b, "silu_mul")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, mode="reduce-overhead")
    out, codes = run_and_get_code(compiled, x)
    assert any("w4a16_dequantize_matmul" in code for code in codes)
    for _ in range(3):  # warmed up, recorded, replayed
        x = torch.randn_like(x)
        ref = reference.apply_activation(w4_reference(x, qweight, scales, zeros, 128, b), "silu_mul")
        assert relative_error(compiled(x), ref) < BOUND[torch.bfloat16]


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,M,kernel", [("int8", 1, "w8_gemv_kernel"), ("int8", 64, "_w8a16_mma_kernel"),
                                           ("fp8", 1, "w8_gemv_kernel"), ("fp8", 16, "_fp8_mma_kernel"),
                                           ("fp8", 512, "_fp8_mma_kernel")])
def test_gpu_compiled_w8_ops_call_their_triton_kernels(kind, M, kernel, dtype):
    """The W8A16 and FP8 ops under torch.compile, as the W4A16 one above: Inductor's generated module
    holds each kernel's source and the PTX constants it reads (``common.asm_constant``), or, where the kernel
    splits K, calls the op that keeps the split's workspace."""
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    import qpass  # noqa: F401

    if kind == "int8":
        x, qweight, scales, b = make_w8(M, 512, 1024, dtype, True, 0)
        op, args = torch.ops.qpass.w8a16_linear, (qweight, scales, b)
        ref = reference.w8a16_linear(x.float(), qweight, scales.float(), b.float())
        bound = BOUND[dtype]
        cfg = w8a16.pick_config(M, 512, 1024, x.device, packed=w8a16._packed_ok(x, qweight))
    else:
        x, qweight, weight_scale, b = make_fp8(M, 512, 1024, dtype, True, 0)
        op, args = torch.ops.qpass.fp8_linear, (qweight, weight_scale, b)
        ref = reference.fp8_linear(x.float(), qweight, weight_scale, b.float())
        bound = FP8_BOUND[dtype]
        cfg = fp8.pick_config(M, 512, 1024, x.device)
    if cfg.split_k > 1:  # (the op that keeps the split's workspace: it launches the kernel itself)
        kernel = f"torch.ops.qpass.{'w8a16' if kind == 'int8' else 'fp8'}_linear_split_k.default("

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: torch.nn.functional.silu(op(x, *args)), fullgraph=True)
    out, codes = run_and_get_code(compiled, x)
    assert relative_error(out, torch.nn.functional.silu(ref)) < bound
    assert any(kernel in code for code in codes), f"Inductor's code does not launch {kernel}"
