"""What a linear costs a model run without torch.compile (Hugging Face's ``generate``): one token's call, eager.

At one token the GPU work of a linear takes a few us; an eager call costs what the host spends to launch it. For each
shape and method, us a call (wall clock over ``--calls`` calls, one synchronisation at the end; the median of 7 rounds):

- ``fp16_linear``: ``F.linear`` on the float weight, the baseline;
- ``op``: the method's ``torch.ops.qpass`` op, through torch's dispatcher (what ported code calling it pays);
- ``direct``: the same op through ``qpass.ops`` (the methods' way), which skips the dispatcher in plain eager use;
  both routes replay the launches recorded at their first call of the shape (``kernels/replay.py``);
- ``stub``: the quantized layer itself (``QuantLinear.forward``, the method's ``apply``), as a model calls it.

    python bench/eager.py --out bench/results/eager-h200.json
    python bench/eager.py --tiny    # the CPU's reference ops: a check, not a measurement
"""

import argparse
import datetime
import functools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_ops import measuring_device  # noqa: E402

SHAPES = [(576, 576), (4096, 4096)]  # SmolLM2-135M's attention, Llama-3-8B's o_proj
TINY_SHAPES = [(128, 64)]
METHODS = ("awq", "int8", "fp8")


def per_call_us(cases, device, calls: int, rounds: int = 7):
    """Median over ``rounds`` of each case's us a call, the cases interleaved within a round (a host's speed
    drifts: a case timed alone at another moment differs by tens of us)."""
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            for _ in range(10):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def quantized_layer(weight: torch.Tensor, method: str):
    """The one stub of ``qpass.quantize`` on a linear of ``weight``."""
    import qpass
    from qpass.layers.linear import QuantLinear

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    options = {"group_size": 64} if method == "awq" else {}  # (576 = 9 groups of 64)
    quantized = qpass.quantize(torch.nn.Sequential(linear), method, **options)
    return next(m for m in quantized.modules() if isinstance(m, QuantLinear))


def op_calls(stub, method: str):
    """The method's op with the stub's tensors, through the dispatcher and through ``qpass.ops``."""
    from qpass import ops

    if method == "awq":
        args = (stub.qweight, stub.scales, stub.zeros, 64)
        return (lambda x: torch.ops.qpass.w4a16_linear(x, *args)), (lambda x: ops.w4a16_linear(x, *args))
    if method == "int8":
        args = (stub.qweight, stub.scales)
        return (lambda x: torch.ops.qpass.w8a16_linear(x, *args)), (lambda x: ops.w8a16_linear(x, *args))
    args = (stub.qweight, stub.weight_scale)
    return (lambda x: torch.ops.qpass.fp8_linear(x, *args)), (lambda x: ops.fp8_linear(x, *args))


def measure(shapes, device, calls: int):
    rows = []
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.no_grad():
        for K, N in shapes:
            weight = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
            x = torch.randn(1, K, device=device, dtype=dtype)
            cases = {("fp16_linear", ""): lambda: F.linear(x, weight)}
            for method in METHODS:
                stub = quantized_layer(weight, method)
                op, direct = op_calls(stub, method)
                torch.testing.assert_close(op(x), direct(x), rtol=0, atol=0)
                for case, fn in (("op", op), ("direct", direct), ("stub", stub)):
                    cases[case, method] = functools.partial(fn, x)
            for (case, method), us in per_call_us(cases, device, calls).items():
                rows.append(dict(case=case, method=method, K=K, N=N, us=round(us, 1)))
                print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the CPU's reference ops: a check, not a measurement")
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--out", default="/tmp/eager.json")
    args = parser.parse_args()
    device = measuring_device(args.tiny, "eager.py")
    rows = measure(TINY_SHAPES if args.tiny else SHAPES, device, 20 if args.tiny else args.calls)
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                  date=datetime.date.today().isoformat(), rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
