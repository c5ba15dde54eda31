"""Calibration time: AWQ (and GPTQ) of the 16-layer Llama-3-8B-shaped stack of bench/e2e.py
on 128 x 512 tokens, block by block on the GPU (the calibration issue's bar: AWQ <= 3 minutes
on the H100).

The stack reads hidden states, so the calibration batches are random bf16 activations
[batch, 512, 4096] (seeded): the time depends on the shapes, not on the values.

    python bench/calibration.py --out bench/results/calibration-h200.json   # on the GPU
    python bench/calibration.py --methods awq awq:rounding=nearest --out ...   # with method options
    python bench/calibration.py --tiny --sequences 4 --out /tmp/calibration.json   # a check on the CPU
"""

import argparse
import ast
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qpass  # noqa: E402
from e2e import SHAPES, build_model, sync  # noqa: E402


def calibration_batches(dim, sequences, tokens, batch_size, device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randn(min(batch_size, sequences - start), tokens, dim, generator=generator)
            .to(device, torch.bfloat16) for start in range(0, sequences, batch_size)]


def parse_method(spec: str):
    """"awq" or "awq:rounding=nearest,group_size=64" -> (method, options)."""
    method, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value  # a plain string
    return method, options


def time_method(spec, shape, device, batches):
    method, options = parse_method(spec)
    model = build_model(shape, device)
    sync(device)
    start = time.perf_counter()
    quantized = qpass.quantize(model, method, calib=batches, **options)
    sync(device)
    seconds = time.perf_counter() - start
    del model, quantized
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=["awq", "gptq"])
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="the small shapes of bench/e2e.py")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = "tiny" if args.tiny else "llama3-8b"
    batches = calibration_batches(SHAPES[shape][0], args.sequences, args.tokens, args.batch_size, device)
    rows = []
    for method in args.methods:
        seconds = time_method(method, shape, device, batches)
        rows.append({"method": method, "seconds": round(seconds, 1)})
        print(f"{method}: {seconds:.1f} s for {args.sequences} x {args.tokens} tokens, {shape}", flush=True)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "shape": shape, "sequences": args.sequences,
              "tokens": args.tokens, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
