"""Replayed launches (``kernels/replay.py``): the first call of each input signature runs the entry point and records
its buffers and launches; the calls after it replay the record, and give the entry point's result on their own inputs.

On the CPU the kernels run in Triton's interpreter, where a replay launches each kernel through the interpreter again;
on the GPU (``-m cuda``) it launches the compiled kernels directly.
"""

import pytest
import torch
import triton
import triton.language as tl
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.tools.tensor_descriptor import TensorDescriptor

from qpass.kernels import common, fp8, reference, replay, w4a16, w8a16
from test_kernels import (BOUND, CUDA, DEVICE, FP8_BOUND, make_fp8, make_w4, make_w8, needs_cuda, needs_hopper,
                          norm_and_residual,
                          relative_error, w4_reference)

cuda = pytest.mark.cuda


class Counted:
    """An entry point that counts its calls."""

    def __init__(self, entry):
        self.entry, self.calls = entry, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.entry(*args, **kwargs)


def replayed(entry):
    counted = Counted(entry)
    return replay.Replayed(counted), counted


def kernel_names(record) -> list:
    return [getattr(launch.kernel, "fn", launch.kernel).__name__ for launch in record.launches]


def assert_replays(entry, make_inputs, kernels, **kwargs):
    """``entry`` replayed: the first call records ``kernels``, the second (new values, the same signature) replays them
    with the entry point's result on its own inputs, which the record did not keep."""
    run, counted = replayed(entry)
    first, second = make_inputs(0), make_inputs(1)
    with set_wrap_triton_enabled(False):
        run(*first, **kwargs)
        out = run(*second, **kwargs)
        expected = entry(*second, **kwargs)
    assert counted.calls == 1
    (record,) = run.records.values()
    assert kernel_names(record) == kernels
    assert not any(kept.any() for kept in replay._KEPT.values())  # a split-K workspace is left at zero
    # (on the GPU a K split adds its partial sums in whatever order they arrive)
    assert torch.equal(out, expected) if not CUDA else relative_error(out, expected) < BOUND[out.dtype]
    return out


@pytest.mark.parametrize("case", ["bias", "residual", "norm", "silu_mul", "split_k", "split_k_large", "mma",
                                  "mma_norm"])
def test_w4a16_calls_replay_their_launches(case, monkeypatch):
    M = 20 if case.startswith("mma") else 1
    N = 96

    def inputs(seed):
        x, qweight, scales, zeros, b = make_w4(M, N, 256, 64, torch.float32, False, case == "bias", seed)
        if case == "residual":
            b = norm_and_residual(M, N, 256, torch.float32, seed)[1]
        return x, qweight, scales, zeros, 64, b

    kwargs = {}
    if case.endswith("norm"):
        kwargs = dict(norm_weight=norm_and_residual(M, N, 256, torch.float32, 0)[0], norm_eps=1e-5)
    elif case == "silu_mul":
        kwargs = dict(activation="silu_mul")
    elif case.startswith("split_k"):
        kwargs = dict(config=w4a16.GemvConfig(16, 32, 4, num_warps=4))
    if case == "split_k_large":  # (past the kept workspace's size: a fresh one, zeroed first)
        monkeypatch.setattr(common, "KEPT_WORKSPACE_MAX", M * N - 1)
    # (split K: the workspace kept between calls, passed to the replayed launch as it is; no zeroing before it)
    kernels = {"mma": ["_w4a16_mma_kernel"], "mma_norm": ["rms_norm_kernel", "_w4a16_mma_kernel"],
               "split_k_large": ["zero_kernel", "w4a16_gemv_kernel"]}
    out = assert_replays(w4a16.w4a16_linear, inputs, kernels.get(case, ["w4a16_gemv_kernel"]), **kwargs)
    x, qweight, scales, zeros, _, b = inputs(1)
    if case in ("bias", "residual", "split_k", "split_k_large", "mma"):  # (the norm and silu_mul: the kernels' own tests)
        assert relative_error(out, w4_reference(x, qweight, scales, zeros, 64, b)) < BOUND[torch.float32]


@pytest.mark.parametrize("case", ["bias", "residual", "norm_silu_mul"])
def test_w4a16_row_split_replays_into_one_output(case):
    """A ``RowSplitConfig``'s two parts replay as one record: x's (and a residual's) rows viewed on each call's own,
    each part's launches writing its rows of one output, nothing copied; where the second part's rows start off 16
    bytes (a TMA store could not start there) the call is not replayed, and still runs right."""
    M, K = 7, 256

    def inputs(seed, N=96):
        x, qweight, scales, zeros, b = make_w4(M, N, K, 64, torch.float32, False, case == "bias", seed)
        if case == "residual":
            b = norm_and_residual(M, N, K, torch.float32, seed)[1]
        return x, qweight, scales, zeros, 64, b

    kwargs = dict(config=w4a16.RowSplitConfig(1))
    if case == "norm_silu_mul":
        kwargs.update(activation="silu_mul", norm_weight=norm_and_residual(M, 96, K, torch.float32, 0)[0],
                      norm_eps=1e-5)
    norm = ["rms_norm_kernel"] if case.startswith("norm") else []
    out = assert_replays(w4a16.w4a16_linear, inputs, ["w4a16_gemv_kernel", *norm, "_w4a16_mma_kernel"], **kwargs)
    run, _ = replayed(w4a16.w4a16_linear)
    with set_wrap_triton_enabled(False):
        run(*inputs(0), **kwargs)
    (record,) = run.records.values()
    # x's two views (and the residual's), then the parts' outputs as rows 0:1 and 1:7 of the whole, the result
    views = [record.buffers[index] for index in record.views]
    assert [(rows.start, rows.stop) for rows in views if not rows.from_inputs] == [(0, 1), (1, M)]
    assert all(rows.index == record.result for rows in views if not rows.from_inputs)
    assert sum(rows.from_inputs for rows in views) == (4 if case == "residual" else 2)
    if case != "norm_silu_mul":
        x, qweight, scales, zeros, _, b = inputs(1)
        assert relative_error(out, w4_reference(x, qweight, scales, zeros, 64, b)) < BOUND[torch.float32]
    # 98 float32 columns: the second part's rows start 392 bytes in
    run, counted = replayed(w4a16.w4a16_linear)
    with set_wrap_triton_enabled(False):
        for seed in range(2):
            args = inputs(seed, N=98)
            got, expected = run(*args, **kwargs), w4a16.w4a16_linear(*args, **kwargs)
            # (on the GPU a K split adds its partial sums in whatever order they arrive)
            assert torch.equal(got, expected) if not CUDA else relative_error(got, expected) < BOUND[torch.float32]
    assert counted.calls == 2 and list(run.records.values()) == [replay._NOT_REPLAYABLE]


def test_w8a16_and_fp8_calls_replay_their_launches():
    out = assert_replays(w8a16.w8a16_linear, lambda seed: make_w8(1, 96, 256, torch.float32, True, seed),
                         ["w8_gemv_kernel"])
    x, qweight, scales, b = make_w8(1, 96, 256, torch.float32, True, 1)
    assert relative_error(out, reference.w8a16_linear(x, qweight, scales, b)) < BOUND[torch.float32]
    # two launches: the rows quantized into a buffer, then the GEMM (K split: its workspace kept between calls)
    out = assert_replays(fp8.fp8_linear, lambda seed: make_fp8(24, 96, 256, torch.float16, True, seed),
                         ["_quantize_rows_kernel", "_fp8_mma_kernel"])
    x, qweight, weight_scale, b = make_fp8(24, 96, 256, torch.float16, True, 1)
    ref = reference.fp8_linear(x.float(), qweight, weight_scale, b.float())
    assert relative_error(out, ref) < FP8_BOUND[torch.float16]
    # x's and the weight's tiles copied by TMA: descriptors of the quantized rows (a recorded buffer) and the weight
    out = assert_replays(fp8.fp8_linear, lambda seed: make_fp8(24, 96, 256, torch.float16, True, seed),
                         ["_quantize_rows_kernel", "_fp8_mma_kernel"], config=fp8.MmaConfig(16, 32, 64, 1, 4, 2,
                                                                                            tma=True))
    assert relative_error(out, ref) < FP8_BOUND[torch.float16]


def test_calls_a_replay_would_not_repeat_run_the_entry_point():
    """A signature whose call computes a tensor, returns one it did not allocate, or takes one tensor in two places
    runs the entry point at every call, and each call still gives its result."""
    x, qweight, scales, zeros, _ = make_w4(3, 96, 256, 64, torch.float32, False, False, 0)
    residual = norm_and_residual(96, 3, 256, torch.float32, 0)[1].t()  # [3, 96], not contiguous: copied first
    large = make_w4(w4a16.DEQUANT_MM_MIN_M, 96, 256, 64, torch.float32, False, False, 0)[0]  # dequantize, then mm
    cases = [(x, qweight, scales, zeros, 64, residual), (large, qweight, scales, zeros, 64), (x[:0], qweight, scales,
                                                                                               zeros, 64)]
    run, counted = replayed(w4a16.w4a16_linear)
    with set_wrap_triton_enabled(False):
        for args in cases:
            for _ in range(2):
                assert torch.equal(run(*args), w4a16.w4a16_linear(*args))
        assert counted.calls == 2 * len(cases)
        assert all(record is replay._NOT_REPLAYABLE for record in run.records.values())
        # one tensor as two arguments: a record could not tell which one a slot is
        x8, qweight8, scales8, _ = make_w8(1, 96, 256, torch.float32, False, 0)
        run8, counted8 = replayed(w8a16.w8a16_linear)
        for _ in range(2):
            assert torch.equal(run8(x8, qweight8, scales8, scales8), w8a16.w8a16_linear(x8, qweight8, scales8, scales8))
        assert counted8.calls == 2 and not run8.records


@triton.jit
def _doubled_rows_kernel(x_desc, out_ptr, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
    """``out = 2 x``, each program's ROWS rows of x read through a TMA descriptor."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    block = x_desc.load([tl.program_id(0) * ROWS, 0])
    tl.store(out_ptr + rows[:, None] * COLUMNS + tl.arange(0, COLUMNS)[None, :], block * 2)


def doubled_rows(x: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """An entry point that gives its kernel x, or x + offset where ``offset``, through a descriptor, as the Gluon
    kernels take theirs."""
    source = x + offset if offset else x
    out = replay.new_empty(x.shape, x.dtype, x.device)
    replay.launch(_doubled_rows_kernel, (x.shape[0] // 8,), TensorDescriptor.from_tensor(source, [8, x.shape[1]]),
                  out, ROWS=8, COLUMNS=x.shape[1])
    return out


def test_descriptor_arguments_replay_on_each_calls_tensors():
    """A kernel's TMA descriptor of an input is recorded without its tensor, and each replay passes it on the call's
    own; a descriptor of a tensor the entry point computed makes the call not replayable, and it still runs right."""
    run, counted = replayed(doubled_rows)
    with set_wrap_triton_enabled(False):
        for seed in range(3):
            x = torch.randn(32, 16, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
            assert torch.equal(run(x), 2 * x)
            assert torch.equal(run(x, 1.0), 2 * (x + 1.0))
    assert counted.calls == 1 + 3  # one recording; the computed source's call runs each time
    replayed_record, computed = run.records.values()
    (launch,) = replayed_record.launches
    assert [position for position, *_ in launch.descriptors] == [0] and launch.values[0].base is None
    assert computed is replay._NOT_REPLAYABLE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation, up_run", [("none", 0), ("silu_mul", 0), ("silu_mul", 16), ("gelu", 0),
                                                ("gelu_tanh", 0)])
@pytest.mark.parametrize("residual", [False, True])
def test_after_gemm_is_one_replayed_launch(dtype, activation, up_run, residual):
    """What follows a Hopper or dequantized GEMM (``w4a16.after_gemm``: a residual added, then the activation) is one
    launch into a recorded buffer, replayed on each call's tensors, as the torch ops compute it; traced (fake
    tensors), those torch ops. A residual with silu_mul stays the torch ops'."""
    M, N = 33, 160

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        out = torch.randn(M, N, generator=g).to(dtype).to(DEVICE)
        return out, torch.randn(M, N, generator=g).to(dtype).to(DEVICE) if residual else None

    def expected(out, r):
        return reference.activation_after_gemm(out if r is None else out + r, activation, up_run)

    run, counted = replayed(lambda out, r: w4a16.after_gemm(out, r, activation, up_run))
    with set_wrap_triton_enabled(False):
        for seed in range(3):
            out, r = inputs(seed)
            got, want = run(out, r), expected(out, r)
            # the residual's sum rounds as torch's (but bfloat16's in the interpreter, whose casts round their own
            # way); the activations' float32 functions are not torch's, a last bit apart here and there
            exact = activation == "none" and (dtype == torch.float16 or CUDA)
            assert torch.equal(got, want) if exact else relative_error(got, want) < BOUND[dtype]
    # (nothing to do returns out itself, an input: no record)
    replays = (residual or activation != "none") and not (residual and activation == "silu_mul")
    assert counted.calls == (1 if replays else 3)
    (record,) = run.records.values()
    assert (record is replay._NOT_REPLAYABLE) != replays
    if replays:
        assert kernel_names(record) == ["_after_gemm_kernel"]
    with FakeTensorMode():
        fake_out, fake_r = (torch.empty(M, N, dtype=dtype), torch.empty(M, N, dtype=dtype) if residual else None)
        assert w4a16.after_gemm(fake_out, fake_r, activation, up_run).shape == expected(fake_out, fake_r).shape


def test_signatures_tell_apart_what_changes_a_launch():
    """Alignment, strides and dtypes each make a signature of their own; calls that agree on them share a record."""
    x, qweight, scales, zeros, _ = make_w4(1, 96, 264, 8, torch.float32, False, False, 0)
    run, counted = replayed(w4a16.w4a16_linear)
    wide = torch.randn(2, 272, device=x.device)
    # x and its copy share a record, as do two slices 4 bytes past a 16-byte boundary; fp16 x has its own
    calls = [x, x.clone(), wide[:1, 1:265], wide[1:, 1:265], x.half()]
    with set_wrap_triton_enabled(False):
        for inputs in calls:
            assert torch.equal(run(inputs, qweight, scales, zeros, 8), w4a16.w4a16_linear(inputs, qweight, scales,
                                                                                           zeros, 8))
    keys = list(run.records)
    assert counted.calls == len(keys) == 3
    assert {key[1][0] for key in keys} == {torch.float32, torch.float16}
    with set_wrap_triton_enabled(False):  # equal scalars of two types: two signatures
        for eps in (0, 0.0, 0.0):
            run(x, qweight, scales, zeros, 8, norm_eps=eps)
    assert counted.calls == len(run.records) == 5


def test_replays_only_where_the_kernels_run_for_real():
    """With ``wrap_triton`` on (a tracer could be watching) a replayed entry point runs the entry point and records
    nothing."""
    run, counted = replayed(w8a16.w8a16_linear)
    args = make_w8(1, 96, 256, torch.float32, False, 0)[:3]
    for _ in range(2):
        run(*args)
    assert counted.calls == 2 and not run.records


def test_a_failed_recording_keeps_nothing_and_records_are_bounded(monkeypatch):
    run, counted = replayed(w8a16.w8a16_linear)
    x, qweight, scales, _ = make_w8(1, 96, 256, torch.float32, False, 0)
    with set_wrap_triton_enabled(False):
        with pytest.raises(AssertionError):
            run(x[:, :128], qweight, scales)  # K of x against the weight's
        assert not run.records and replay._recording() is None
        monkeypatch.setattr(replay, "MAX_SIGNATURES", 2)
        for M in (1, 2, 3):
            run(make_w8(M, 96, 256, torch.float32, False, 0)[0], qweight, scales)
    assert len(run.records) == 1  # cleared at the third


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_replayed_launches_give_the_entry_points_results(dtype):
    """On the GPU a replay launches the compiled kernels themselves: each decode-sized path of the three ops (the
    W4A16 GEMV with its norm and silu_mul, with a residual, the warp-level MMA kernel, W8A16's GEMV, FP8's two
    launches), then replays inside a CUDA graph."""
    K, N = 512, 256
    norm_weight, _ = norm_and_residual(1, N, K, dtype, 0)
    # (split K or not: the same launches, a split's workspace kept between calls)
    cases = [
        (w4a16.w4a16_linear, lambda s: make_w4(1, N, K, 128, dtype, False, False, s)[:4] + [128],
         dict(norm_weight=norm_weight, norm_eps=1e-5, activation="silu_mul"), ["w4a16_gemv_kernel"]),
        (w4a16.w4a16_linear, lambda s: make_w4(1, N, K, 128, dtype, False, False, s)[:4] + [
            128, norm_and_residual(1, N, K, dtype, s)[1]], {}, ["w4a16_gemv_kernel"]),
        (w4a16.w4a16_linear, lambda s: make_w4(12, N, K, 128, dtype, False, False, s)[:4] + [128], {},
         ["w4a16_warp_mma_kernel"]),
        (w8a16.w8a16_linear, lambda s: make_w8(1, N, K, dtype, True, s), {}, ["w8_gemv_kernel"]),
        (fp8.fp8_linear, lambda s: make_fp8(64, N, K, dtype, True, s), {},
         ["_quantize_rows_kernel", "_fp8_mma_kernel"]),
    ]
    for entry, inputs, kwargs, kernels in cases:
        assert_replays(entry, inputs, kernels, **kwargs)
    # replays captured in a CUDA graph, then the graph replayed on new values copied into its inputs
    entry, inputs, kwargs, _ = cases[2]
    run, _ = replayed(entry)
    static = inputs(0)
    with set_wrap_triton_enabled(False):
        run(*static, **kwargs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run(*static, **kwargs)
        fresh = inputs(1)
        for t, new in zip(static, fresh):
            if isinstance(t, torch.Tensor):
                t.copy_(new)
        graph.replay()
        assert relative_error(out, entry(*fresh, **kwargs)) < BOUND[dtype]


# (config, rows, words in column tiles of 64, the kernels): the Hopper GEMMs, whose Gluon kernels take TMA descriptors
REGISTERS = w4a16.WgmmaTmaConfig(64, 64, 3, 2, 4, registers=True, loader_warp=True)
HOPPER_CASES = [
    (None, 24, 64, ["w4a16_wgmma_kernel"]),
    (REGISTERS, 40, 64, ["w4a16_wgmma_tma_rs_ws_kernel", "split_total_kernel"]),
    (REGISTERS._replace(split_k=1), 64, 0, ["w4a16_wgmma_tma_rs_ws_kernel"]),
    (REGISTERS._replace(block_m=128, split_k=1, loader_warp=False), 100, 64, ["w4a16_wgmma_tma_rs_kernel"]),
    (w4a16.WgmmaTmaConfig(256, 128, 4, 2, dequant_warps=4), 200, 0, ["w4a16_wgmma_tma_ws_kernel", "split_total_kernel"]),
    (w4a16.WgmmaTmaConfig(128, 128, 3, 2, 8), 96, 64, ["w4a16_wgmma_tma_kernel", "split_total_kernel"]),
]


@cuda
@needs_cuda
@needs_hopper
@pytest.mark.parametrize("config, M, tile, kernels", HOPPER_CASES)
@pytest.mark.parametrize("epilogue", ["none", "bias", "residual", "silu_mul"])
def test_gpu_hopper_calls_replay_their_launches(config, M, tile, kernels, epilogue):
    """Eager W4A16 calls on Hopper replay their Gluon kernels: each descriptor (x, the words as runs, in rows or
    column tiles, scales, zeros, the output tile or the split's sums) is made again on the call's own tensors, a
    split's sums are finished by its launch after, a residual or an activation by ``w4a16.after_gemm``'s, and the
    result is the entry point's and the reference's."""
    K, N = 512, 256

    def inputs(seed):
        x, qweight, scales, zeros, b = make_w4(M, N, K, 128, torch.float16, False, epilogue == "bias", seed, tile=tile)
        if epilogue == "residual":
            b = norm_and_residual(M, N, K, torch.float16, seed)[1]
        return x, qweight, scales, zeros, b

    kwargs = {} if config is None else {"config": config}
    activation = "silu_mul" if epilogue == "silu_mul" else "none"
    if epilogue in ("residual", "silu_mul"):
        kwargs["activation"] = activation
        kernels = kernels + ["_after_gemm_kernel"]
    out = assert_replays(w4a16.w4a16_linear, lambda seed: [*inputs(seed)[:4], 128, inputs(seed)[4]], kernels,
                         **kwargs)
    x, qweight, scales, zeros, b = inputs(1)
    ref = reference.w4a16_linear(x.float(), qweight, scales.float(), zeros.float(), 128,
                                 None if b is None else b.float(), activation)
    assert relative_error(out, ref) < BOUND[torch.float16]


@cuda
@needs_cuda
@needs_hopper
@pytest.mark.parametrize("M, tail", [(257, "w4a16_gemv_kernel"), (260, "w4a16_warp_mma_kernel"),
                                     (300, "w4a16_wgmma_tma_rs_ws_kernel")])
@pytest.mark.parametrize("epilogue", ["bias", "residual", "silu_mul"])
def test_gpu_w4a16_row_split_replays_into_one_output(M, tail, epilogue):
    """``RowSplitConfig(256)`` on Hopper, replayed: x's first 256 rows by the warp-specialized kernel, the rest (1, 4,
    44) by theirs, on views of each call's own x (and residual), each part's launches (a residual or silu_mul after a
    Hopper GEMM by ``after_gemm``'s) writing its rows of one output; the entry point's result and the reference's."""
    K, N = 512, 256

    def inputs(seed):
        x, qweight, scales, zeros, b = make_w4(M, N, K, 128, torch.float16, False, epilogue == "bias", seed, tile=64)
        if epilogue == "residual":
            b = norm_and_residual(M, N, K, torch.float16, seed)[1]
        return [x, qweight, scales, zeros, 128, b]

    activation = "silu_mul" if epilogue == "silu_mul" else "none"
    after = [] if epilogue == "bias" else ["_after_gemm_kernel"]
    kernels = ["w4a16_wgmma_tma_ws_kernel", *after, tail, *(after if "wgmma" in tail else [])]
    out = assert_replays(w4a16.w4a16_linear, inputs, kernels, config=w4a16.RowSplitConfig(256), activation=activation)
    x, qweight, scales, zeros, _, b = inputs(1)
    ref = reference.w4a16_linear(x.float(), qweight, scales.float(), zeros.float(), 128,
                                 None if b is None else b.float(), activation)
    assert relative_error(out, ref) < BOUND[torch.float16]
