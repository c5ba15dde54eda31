"""The main job: quantize a real model (SmolLM2-135M-Instruct, a Llama) with qpass and
print accuracy (perplexity on real text), weight size and speed before and after.

    python examples/quantize_smollm2.py [--methods int8 awq gptq] [--tokens 4096] [--calib-windows 8] [--device cuda]

awq and gptq are calibrated on windows of 512 tokens of one of Jane Austen's novels, *Emma*
(``--calib-windows 0``: rounded to nearest), and every method is evaluated on the start of
another, *Sense and Sensibility* (``--eval-text python-docs``: on Python's documentation, a
domain the calibration text does not cover).

Runs on the GPU when there is one (fp16 there, fp32 on the CPU).
"""

import argparse
import time

import torch

import qpass
from assets import austen_text, load_smollm2, perplexity, python_docs_text, token_windows
from qpass.calib.data import text_windows

CALIBRATED = ("awq", "gptq")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, shared (tied) tensors counted once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


@torch.no_grad()
def tokens_per_second(model, windows, device) -> float:
    batch = windows[:2].to(device)
    model(batch)  # warm up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch.numel() / (time.perf_counter() - start)


def report(name, model, windows, device):
    ppl = perplexity(model, windows.to(device))
    size = weight_bytes(model) / 2**20
    speed = tokens_per_second(model, windows, device)
    print(f"{name:>8} | perplexity {ppl:8.3f} | weights {size:7.1f} MiB | {speed:8.0f} tokens/s", flush=True)
    return ppl


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["int8", "awq", "gptq"])
    parser.add_argument("--tokens", type=int, default=4096, help="evaluation tokens")
    parser.add_argument("--eval-text", choices=["austen", "python-docs"], default="austen",
                        help="Sense and Sensibility, or Python's documentation")
    parser.add_argument("--calib-windows", type=int, default=8, help="512-token windows of Emma to calibrate awq/gptq on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model, tokenizer = load_smollm2()
    model = model.to(device=device, dtype=dtype)
    text, text_name = ((austen_text("Sense & Sensibility"), "Sense and Sensibility") if args.eval_text == "austen"
                       else (python_docs_text(), "Python's documentation"))
    windows = token_windows(tokenizer, text, window=512, max_tokens=args.tokens)
    print(f"SmolLM2-135M-Instruct on {device} ({dtype}), {windows.numel()} tokens of {text_name}")
    base = report("float", model, windows, device)
    calib = None
    if args.calib_windows > 0:
        calib = [{k: v.to(device) for k, v in batch.items()}
                 for batch in text_windows(tokenizer, austen_text("Emma"), window=512, n=args.calib_windows, batch_size=2)]
    for method in args.methods:
        start = time.perf_counter()
        qmodel = qpass.quantize(model, method, skip=["lm_head"], calib=calib if method in CALIBRATED else None)
        seconds = time.perf_counter() - start
        ppl = report(method, qmodel, windows, device)
        how = f"calibrated on {args.calib_windows} x 512 tokens of Emma, " if calib and method in CALIBRATED else ""
        print(f"{'':>8} | {100 * (ppl / base - 1):+.1f}% perplexity, {how}quantized in {seconds:.1f} s")


if __name__ == "__main__":
    main()
