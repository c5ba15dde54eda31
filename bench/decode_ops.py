"""The decode step's W4A16 ops without torch.compile: where a change to their kernels shows first.

16 layers of Llama-3-8B's linears at batch 1 (``--batch``: more tokens; bf16; random int4 codes,
scales and zeros), each op called as qpass's lowering calls it: qkv with the RMSNorm folded in, o with
the residual as its bias, gate_up with the RMSNorm and silu_mul, down with the residual. Times, us: each
op alone, cycled over the 16 layers' weights (so its bytes come from DRAM, as in a decode step), and the
64 ops as one eager CUDA-graph chain (the decode step of ``bench/e2e.py`` but for the graph's input copy;
past the GEMV's rows, the ops run the RMSNorm as a pass of their own). ``--baseline DIR``: another copy
of ``kernels/`` (say an older commit's, below), timed the same way in the same process (the two decode
steps in turns), each with its own block-shape picks, its outputs compared with the current ones.

    python bench/decode_ops.py --out /tmp/ops.json
    mkdir -p /tmp/base && git archive HEAD~1 kernels | tar -x -C /tmp/base
    python bench/decode_ops.py --baseline /tmp/base/kernels --out /tmp/ops.json
    python bench/decode_ops.py --batch 16 --baseline /tmp/base/kernels --out /tmp/ops16.json
    python bench/decode_ops.py --tiny       # small shapes on the CPU: a check, not a measurement
"""

import argparse
import datetime
import functools
import importlib
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(hidden=4096, qkv=6144, intermediate=14336, layers=16)
TINY = dict(hidden=256, qkv=384, intermediate=512, layers=2)
GROUP = 128
STEP_TURNS = 4  # the decode step's timings of each kernel set (``time_steps``)


def load_kernels(path: str):
    """``w4a16`` of the kernels package at ``path``, imported under a name of its own."""
    spec = importlib.util.spec_from_file_location("baseline_kernels", Path(path) / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["baseline_kernels"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("baseline_kernels.w4a16")


def int4_weights(K, N, device):
    """Packed codes ``[K / 8, N]`` with bf16 scales and zeros ``[K / GROUP, N]``."""
    words = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=device)
    scales = (torch.rand(K // GROUP, N, device=device) * 0.002 + 0.0005).bfloat16()
    zeros = torch.randint(0, 16, (K // GROUP, N), device=device).bfloat16()
    return words, scales, zeros


def make_layers(shape, device):
    h, i = shape["hidden"], shape["intermediate"]
    return [dict(qkv=int4_weights(h, shape["qkv"], device), o=int4_weights(h, h, device),
                 gate_up=int4_weights(h, 2 * i, device), down=int4_weights(i, h, device),
                 norm1=torch.rand(h, device=device).bfloat16() + 0.5, norm2=torch.rand(h, device=device).bfloat16() + 0.5)
            for _ in range(shape["layers"])]


def method_layout(w4a16, layers):
    """Each layer's weights as the W4A16 methods give them to ``w4a16``: gate_up's columns in runs of
    ``W4A16LinearMethod.gate_up_run`` (``gate_up_options``: its ``up_run``) and the words in column tiles, where
    these kernels read them (kernels from before: ``[gate | up]``, words in rows)."""
    # (after measuring_device: qpass imports triton)
    from qpass.kernels.reference import gate_up_runs, tile_word_columns
    from qpass.methods.base import W4A16LinearMethod

    run = W4A16LinearMethod.gate_up_run if "up_run" in inspect.signature(w4a16.w4a16_linear).parameters else 0
    tiles = hasattr(w4a16, "word_strides")
    laid = []
    for L in layers:
        L = dict(L, gate_up=tuple(gate_up_runs(t, run) for t in L["gate_up"]),
                 gate_up_options={"up_run": run} if run else {})
        for op in ("qkv", "o", "gate_up", "down") if tiles else ():
            L[op] = (tile_word_columns(L[op][0]),) + L[op][1:]
        laid.append(L)
    return laid


def ops(w4a16, layers, x, x_down):
    """Each op over every layer's weights (``method_layout``'s), as the lowering calls it."""
    linear = w4a16.w4a16_linear
    return {
        "qkv": lambda: [linear(x, *L["qkv"], GROUP, norm_weight=L["norm1"], norm_eps=1e-5) for L in layers],
        "o": lambda: [linear(x, *L["o"], GROUP, bias=x) for L in layers],
        "gate_up": lambda: [linear(x, *L["gate_up"], GROUP, activation="silu_mul", norm_weight=L["norm2"],
                                   norm_eps=1e-5, **L["gate_up_options"]) for L in layers],
        "down": lambda: [linear(x_down, *L["down"], GROUP, bias=x) for L in layers],
    }


def decode_step(w4a16, layers, x, hidden):
    """One decode step of the 64 ops over ``method_layout``'s layers."""
    h = x
    for L in layers:
        qkv = w4a16.w4a16_linear(h, *L["qkv"], GROUP, norm_weight=L["norm1"], norm_eps=1e-5)
        o = w4a16.w4a16_linear(qkv[:, :hidden], *L["o"], GROUP, bias=h)
        m = w4a16.w4a16_linear(o, *L["gate_up"], GROUP, activation="silu_mul", norm_weight=L["norm2"], norm_eps=1e-5,
                               **L["gate_up_options"])
        h = w4a16.w4a16_linear(m, *L["down"], GROUP, bias=o)
    return h


def measuring_device(tiny: bool, script: str) -> torch.device:
    """The GPU; with ``tiny`` (or none) the CPU, the kernels interpreted there: a check, not a measurement."""
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu":
        if not tiny:
            sys.exit(f"{script} measures on a GPU; on the CPU run it with --tiny (a check, not a measurement)")
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported
    return device


def time_us(fn, device):
    """Median us of ``fn``: CUDA-graph replays on a GPU, wall clock elsewhere."""
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1000.0
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return sorted(times)[1]


def relative_difference(a, b):
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def measure(kernels, shape, batch, device):
    torch.manual_seed(0)
    layers = make_layers(shape, device)
    x = torch.randn(batch, shape["hidden"], device=device).bfloat16()
    x_down = torch.randn(batch, shape["intermediate"], device=device).bfloat16()
    rows = []
    reference = {}
    steps = {}
    step_diffs = {}
    for name, w4a16 in kernels.items():
        laid = method_layout(w4a16, layers)
        for op, fn in ops(w4a16, laid, x, x_down).items():
            out = fn()[0]
            reference.setdefault(op, out)
            rows.append(dict(kernels=name, op=op, us=round(time_us(fn, device) / len(layers), 2),
                             rel_diff=relative_difference(reference[op], out)))
            print(rows[-1], flush=True)
        steps[name] = functools.partial(decode_step, w4a16, laid, x, shape["hidden"])
        out = steps[name]()
        reference.setdefault("step", out)
        step_diffs[name] = relative_difference(reference["step"], out)
    for name, turns in time_steps(steps, device).items():
        rows.append(dict(kernels=name, op="step", us=round(statistics.median(turns), 1),
                         turns=[round(t, 1) for t in turns], rel_diff=step_diffs[name]))
        print(rows[-1], flush=True)
    return rows


def time_steps(steps, device):
    """Each kernel set's decode step timed ``STEP_TURNS`` times, in turns (A B B A A B B A): the set timed second
    came out about 10 us a step faster than the same kernels timed first (H200, batch 8 and 16;
    bench/NOTES-kernels.md, fifty-first session), a drift that turns share out evenly. Us, by set."""
    times = {name: [] for name in steps}
    order = list(steps)
    for turn in range(STEP_TURNS):
        for name in order if turn % 2 == 0 else order[::-1]:
            times[name].append(time_us(steps[name], device))
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", metavar="DIR", help="another copy of kernels/ to time against")
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU: a check, not a measurement")
    parser.add_argument("--batch", type=int, default=1, help="rows of activations (tokens of the decode step)")
    parser.add_argument("--out", default="/tmp/decode_ops.json")
    args = parser.parse_args()
    device = measuring_device(args.tiny, "decode_ops.py")
    from qpass.kernels import w4a16

    kernels = {"current": w4a16}
    if args.baseline:
        kernels["baseline"] = load_kernels(args.baseline)
    shape = TINY if args.tiny else LLAMA3_8B
    rows = measure(kernels, shape, args.batch, device)
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                  date=datetime.date.today().isoformat(), shape=shape, batch=args.batch, baseline=args.baseline,
                  rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
