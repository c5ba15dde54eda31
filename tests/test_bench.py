"""The benchmark scripts' CPU-side logic (their timings need the GPU and are not tests)."""

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_sweep_of_the_default_plan_has_candidates():
    """``bench/kernels.py --sweep`` builds each entry's block shapes before it times them: every entry of its
    default plan, on every shape, gives a list of configs of its kernel family (W4A16 past 256 rows once
    failed here, on a name the function did not have)."""
    kernels = load_script("kernels")
    for K, N in kernels.SHAPES:
        for kind, M in kernels.sweep_plan(kernels.SWEEP_PLAN):
            candidates = kernels.sweep_candidates(kind, M, N)
            assert candidates, (kind, M, K, N)
            families = {type(c).__module__.rsplit(".", 1)[-1] for c in candidates}
            assert families <= {"awq": {"w4a16", "common"}, "int8": {"w8a16", "common"},
                                "fp8": {"fp8", "w8a16", "common"}}[kind], (kind, M, families)  # (fp8's GEMV is W8A16's)


def test_the_w4a16_gemv_sweep_gives_each_block_shape_the_picks_register_budget():
    """The GEMV's and the warp-level MMA kernel's sweeps time each block shape as the pick would run it: with
    ``gemv_registers``' and ``warp_mma_registers``' budget."""
    kernels = load_script("kernels")
    from qpass.kernels import w4a16

    for M, N, activation in [(1, 4096, "none"), (1, 28672, "none"), (2, 4096, "none"), (1, 14336, "silu_mul")]:
        candidates = kernels.sweep_candidates("awq", M, N, activation)
        gemvs = [c for c in candidates if type(c).__name__ == "GemvConfig"]
        budgeted = [c for c in gemvs if c.split_k == 1 and c.packed_f16]
        assert budgeted and all(c.maxnreg == w4a16.gemv_registers(c, M, N, 132) for c in budgeted), (M, N)
        assert any(c.maxnreg for c in budgeted) or M == 2, (M, N)
    for M, N, activation in [(8, 4096, "none"), (16, 14336, "silu_mul")]:
        tiles = -(-N // w4a16.warp_mma_columns(activation))
        mmas = [c for c in kernels.sweep_candidates("awq", M, N, activation) if type(c).__name__ == "WarpMmaConfig"]
        assert mmas and all(c.maxnreg == w4a16.warp_mma_registers(c, M, tiles, 132) for c in mmas), (M, N)
        assert any(c.maxnreg for c in mmas) and not all(c.maxnreg for c in mmas), (M, N)
        asked = [c for c in kernels.sweep_candidates("awq", M, N, activation, registers=[0, 232])
                 if type(c).__name__ == "WarpMmaConfig"]  # budgets asked for: each shape with each
        assert asked == [c._replace(maxnreg=r) for c in mmas for r in (0, 232)], (M, N)


def test_the_warp_mma_sweep_times_the_picks_and_only_shapes_the_launcher_takes():
    """At 2-16 rows ``--sweep`` times the warp-level MMA kernel's 32-column form beside its 64-column one: each pick of
    the table's shapes is among its candidates as the pick runs it, and the launcher refuses none of them for its
    warps (on the CPU it stops at the next check, which asks for a GPU)."""
    import pytest

    kernels = load_script("kernels")
    from qpass.kernels import w4a16

    cpu = torch.device("cpu")
    x = torch.zeros(16, 4096, dtype=torch.float16)
    qweight = torch.zeros(512, 4096, dtype=torch.int32)
    scales = torch.ones(32, 4096, dtype=torch.float16)
    shapes = set()  # every shape swept, its budget aside
    for M, K, N in [(16, 4096, 4096), (9, 4096, 4096), (8, 4096, 4096), (16, 4096, 6144), (16, 4096, 28672),
                    (16, 14336, 4096)]:
        mmas = [c for c in kernels.sweep_candidates("awq", M, N) if type(c).__name__ == "WarpMmaConfig"]
        assert w4a16.pick_config(M, N, K, 128, cpu) in mmas, (M, K, N)
        assert {c.column_blocks for c in mmas} == {2, 4}, (M, N)
        shapes |= {c._replace(maxnreg=0) for c in mmas}
    for cfg in shapes:
        with pytest.raises(ValueError, match="on a GPU"):
            w4a16.w4a16_linear(x, qweight, scales, scales, 128, config=cfg)


def test_the_8bit_gemv_sweep_takes_every_row_in_one_program():
    """At one or two rows the 8-bit GEMV's sweep times the shapes the pick can give: both rows in one program."""
    kernels = load_script("kernels")
    for kind in ("int8", "fp8"):
        for M in (1, 2):
            gemvs = [c for c in kernels.sweep_candidates(kind, M, 4096) if type(c).__name__ == "GemvConfig"]
            assert gemvs and {c.block_m for c in gemvs} == {M}, (kind, M)


def test_the_eager_bench_times_every_method_each_way():
    """``bench/eager.py`` gives a row for each way of calling each method's linear, after checking that the op
    through the dispatcher and through ``qpass.ops`` give the same output."""
    import torch

    eager = load_script("eager")
    rows = eager.measure(eager.TINY_SHAPES, torch.device("cpu"), calls=2)
    assert {(r["case"], r["method"]) for r in rows} == {("fp16_linear", "")} | {
        (case, method) for case in ("op", "direct", "stub") for method in eager.METHODS}
    assert all(r["us"] > 0 for r in rows)


def test_the_table_times_every_peer_once_a_round_in_turns(monkeypatch):
    """``bench/kernels.py``'s table times each peer once a round, forward then backward, and keeps the median of
    the rounds; a peer that fails to pack or to run at some M is recorded under errors and left out there."""
    kernels = load_script("kernels")
    times = iter(range(1, 1000))

    def make_peer(name, w):
        if name == "broken":
            raise RuntimeError("no such kernel")

        def fn(x):
            if name == "small_only" and x.shape[0] > 1:
                raise ValueError("too many rows")
            return x

        return fn, torch.float32

    def bench(fn):
        fn()
        return float(next(times))

    monkeypatch.setattr(kernels, "Weights", lambda K, N: None)
    monkeypatch.setattr(kernels, "make_peer", make_peer)
    monkeypatch.setattr(kernels, "bench", bench)
    rows, errors = kernels.run_table(["a", "broken", "small_only", "b"], [(8, 4)], [1, 2], turns=3, device="cpu")
    assert set(errors) == {"broken", "small_only M=2 K=8 N=4"}
    by_peer = {(r["peer"], r["M"]): r for r in rows}
    assert set(by_peer) == {("a", 1), ("small_only", 1), ("b", 1), ("a", 2), ("b", 2)}
    # M = 1: rounds a, small_only, b | b, small_only, a | a, small_only, b, timed 1..9
    assert by_peer["a", 1]["turns"] == [1, 6, 7] and by_peer["a", 1]["us"] == 6
    assert by_peer["b", 1]["turns"] == [3, 4, 9] and by_peer["b", 1]["us"] == 4
    assert by_peer["small_only", 1]["turns"] == [2, 5, 8]
    # M = 2: small_only fails in the first round and is not timed again
    assert by_peer["a", 2]["turns"][0] == 10 and len(by_peer["b", 2]["turns"]) == 3
