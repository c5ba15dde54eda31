"""Where the first call's compile time goes: bench/e2e.py's peers and cases, each first call
followed by how many times torch analysed the ops' Triton kernels (and the seconds spent
generating their Triton IR for it), how many Triton kernel definitions Inductor compiled, and
Dynamo's table of compile phases.

    python bench/first_call.py --peers bf16_compile_cg qpass_awq_compile_cg --cases batch1 --out /tmp/fc.json
"""

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e  # noqa: E402  (sets the cache switches before torch is imported)

import torch  # noqa: E402
from torch._higher_order_ops import triton_kernel_wrap  # noqa: E402
from torch._inductor.async_compile import AsyncCompile  # noqa: E402

ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")  # its names across torch versions
COUNTS = collections.Counter()
SECONDS = collections.Counter()


def counted(name, fn):
    """``fn``, counting its calls and their seconds under ``name``."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            COUNTS[name] += 1
            SECONDS[name] += time.perf_counter() - start
    return wrapper


def count_triton_definitions():
    triton = AsyncCompile.triton

    def counted_triton(self, kernel_name, *args, **kwargs):
        COUNTS["triton definitions"] += 1
        COUNTS["qpass triton definitions"] += "w4a16" in kernel_name or "w8a16" in kernel_name or "fp8" in kernel_name
        return triton(self, kernel_name, *args, **kwargs)

    AsyncCompile.triton = counted_triton


def _seconds(line):
    """The seconds ending a line of Dynamo's table ("phase   1.2345", or "phase, 1.2345" in later
    torch); 0 for other lines."""
    try:
        return float(line.replace(",", " ").split()[-1])
    except (ValueError, IndexError):
        return 0.0


def report_after_first_calls(log):
    """Prints and logs the counters after each first call (e2e times the steady state right after it)."""
    median_ms = e2e.median_ms

    def reporting_median_ms(fn, x, device):
        times = torch._dynamo.utils.compile_times(repr="str", aggregate=True)
        entry = {"input": list(x.shape), "counts": dict(COUNTS),
                 "seconds": {k: round(v, 2) for k, v in SECONDS.items()}, "compile_times": times}
        print(json.dumps({k: v for k, v in entry.items() if k != "compile_times"}), flush=True)
        print("\n".join(line for line in times.splitlines() if _seconds(line) >= 0.5), flush=True)
        log.append(entry)
        COUNTS.clear()
        SECONDS.clear()
        torch._dynamo.utils.compilation_time_metrics.clear()
        return median_ms(fn, x, device)

    e2e.median_ms = reporting_median_ms


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", nargs="*", default=["bf16_compile_cg", "qpass_awq_compile_cg"])
    parser.add_argument("--cases", nargs="*", choices=["batch1", "batch16", "prefill"], default=["batch1"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import qpass  # (wraps the analysis first, so that the count below is of the asks)

    print(f"qpass from {Path(qpass.__file__).parent}; analysis cached: "
          f"{any(hasattr(getattr(triton_kernel_wrap, n, None), 'qpass_kernel_ids') for n in ANALYSES)}")

    for name in ("generate_ttir", *ANALYSES):
        if hasattr(triton_kernel_wrap, name):
            setattr(triton_kernel_wrap, name, counted(name, getattr(triton_kernel_wrap, name)))
    count_triton_definitions()
    log = []
    report_after_first_calls(log)
    cases = {"batch1": (1, 1), "batch16": (16, 1), "prefill": (1, 2048)}
    result = e2e.measure("llama3-8b", "cuda", args.peers, [cases[c] for c in args.cases], args.out)
    Path(args.out).with_suffix(".phases.json").write_text(json.dumps(log, indent=1) + "\n")
    print(e2e.summary(result))


if __name__ == "__main__":
    main()
