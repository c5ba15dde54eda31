"""What the bytes alone cost: the fastest plain read of each op's bytes, against cuBLAS and qpass.

At M = 1 a linear is bound by the bytes it reads and by what a launch costs, so no kernel can
beat a kernel that only reads those bytes. This script times such a kernel (the best of a grid of
block shapes; each program sums its words and stores one number) and gives the highest speed-up
over fp16 cuBLAS that any W4A16 kernel could reach on the device:

- each shape of ``bench/kernels.py``: the int4 weight with its fp16 scales and zeros per group of
  128 (``K N / 2 + 4 N K / 128`` bytes) and the fp16 weight, read from L2 (one buffer replayed:
  the table's method) and from DRAM (copies cycled past L2, as a decode step reads them); fp16
  cuBLAS and qpass W4A16 at M = 1 on the same data, in the same process;
- the decode step of ``bench/e2e.py`` (16 Llama-3-8B layers' qkv, o, gate_up, down: 64 ops in one
  CUDA graph): the int4 bytes and the bf16 bytes read op after op, 64 empty launches, 64 bf16
  cuBLAS GEMVs, and qpass's 64 ops as ``bench/decode_ops.py`` calls them.

    python bench/read_floor.py --out bench/results/read-floor-h200.json
    python bench/read_floor.py --tiny     # small shapes on the CPU, interpreted: a check, not a measurement
"""

import argparse
import datetime
import json
from pathlib import Path

import torch

# beside this script
from decode_ops import (GROUP, LLAMA3_8B, TINY, decode_step, int4_weights, make_layers, measuring_device, method_layout,
                        time_us)

SHAPES = [(4096, 4096), (4096, 6144), (4096, 28672), (14336, 4096)]  # (K, N), as bench/kernels.py
TINY_SHAPES = [(256, 128)]
# (words a block, blocks a program, warps); a thread loads 16 bytes at a time from 1024 words up
CANDIDATES = [(block, steps, warps) for block in (1024, 4096) for steps in (1, 4, 8) for warps in (4, 8)]


def int4_bytes(K, N):
    return K * N // 2 + 4 * N * (K // GROUP)


def read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read_words(src, out, n_words, BLOCK: tl.constexpr, STEPS: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK * STEPS
        total = tl.zeros([BLOCK], dtype=tl.int32)
        for step in tl.static_range(STEPS):
            offsets = start + step * BLOCK + tl.arange(0, BLOCK)
            total += tl.load(src + offsets, mask=offsets < n_words, other=0)
        tl.store(out + tl.program_id(0), tl.sum(total, axis=0))  # stored, so no load is dead code

    return read_words


class Reader:
    """Reads int32 buffers with one block shape; ``out`` holds one number a program."""

    def __init__(self, kernel, candidate, device):
        self.kernel, (self.block, self.steps, self.warps) = kernel, candidate
        self.out = torch.empty(1 << 20, dtype=torch.int32, device=device)

    def __call__(self, words):
        programs = -(-words.numel() // (self.block * self.steps))
        self.kernel[(max(programs, 1),)](words, self.out, words.numel(), BLOCK=self.block, STEPS=self.steps,
                                         num_warps=self.warps)


def words_of(n_bytes, device):
    return torch.randint(-2**31, 2**31 - 1, (-(-n_bytes // 4),), dtype=torch.int32, device=device)


def copies_past_l2(n_bytes, device):
    """Copies of ``n_bytes`` that overflow L2 eight times (1 on the CPU)."""
    if device.type != "cuda":
        return 1
    return max(2, -(-8 * torch.cuda.get_device_properties(device).L2_cache_size // n_bytes))


def fastest_read(readers, buffers, device):
    """(us a buffer, the candidate) of the fastest reader over ``buffers``."""
    best = None
    for reader in readers:
        us = time_us(lambda: [reader(b) for b in buffers], device) / len(buffers)
        if best is None or us < best[0]:
            best = (us, (reader.block, reader.steps, reader.warps))
    return best


def shape_rows(readers, shapes, device):
    """Per shape: the int4 and fp16 floors from L2 and DRAM, fp16 cuBLAS and qpass W4A16 at M = 1."""
    import torch.nn.functional as F

    from qpass.kernels import w4a16

    rows = []
    for K, N in shapes:
        for what, n_bytes in (("int4", int4_bytes(K, N)), ("fp16", 2 * K * N)):
            buffers = [words_of(n_bytes, device) for _ in range(copies_past_l2(n_bytes, device))]
            for source, used in (("l2", buffers[:1]), ("dram", buffers)):
                us, candidate = fastest_read(readers, used, device)
                rows.append(dict(kind=f"read_{what}", source=source, K=K, N=N, bytes=n_bytes, us=round(us, 3),
                                 tb_s=round(n_bytes / us / 1e6, 3), config=candidate))
                print(rows[-1], flush=True)
            del buffers
        copies = copies_past_l2(int4_bytes(K, N), device)
        weights = [tuple(t.half() if t.is_floating_point() else t for t in int4_weights(K, N, device))
                   for _ in range(copies)]  # scales and zeros in fp16, the table's dtype
        fp16 = [torch.randn(N, K, device=device, dtype=torch.float16) for _ in range(copies_past_l2(2 * K * N, device))]
        x = torch.randn(1, K, device=device, dtype=torch.float16)
        for source in ("l2", "dram"):
            int4_set, fp16_set = (weights[:1], fp16[:1]) if source == "l2" else (weights, fp16)
            timed = {"fp16_cublas": time_us(lambda: [F.linear(x, w) for w in fp16_set], device) / len(fp16_set),
                     "qpass_awq": time_us(lambda: [w4a16.w4a16_linear(x, *w, GROUP) for w in int4_set],
                                          device) / len(int4_set)}
            for kind, us in timed.items():
                rows.append(dict(kind=kind, source=source, K=K, N=N, M=1, us=round(us, 3)))
                print(rows[-1], flush=True)
        del weights, fp16
    return rows


def decode_rows(readers, shape, device):
    """The decode step's 64 ops, each kind in one CUDA graph: reads of their int4 and of their bf16
    bytes (each op with its fastest reader from DRAM), empty launches, bf16 cuBLAS GEMVs, and
    qpass's ops as ``bench/decode_ops.py`` calls them."""
    import torch.nn.functional as F

    from qpass.kernels import w4a16

    h, i, layers = shape["hidden"], shape["intermediate"], shape["layers"]
    ops = {"qkv": (h, shape["qkv"]), "o": (h, h), "gate_up": (h, 2 * i), "down": (i, h)}
    rows = []

    def add(row):
        rows.append(row)
        print(row, flush=True)

    for what, size in (("int4", int4_bytes), ("bf16", lambda K, N: 2 * K * N)):
        buffers = {op: [words_of(size(K, N), device) for _ in range(layers)] for op, (K, N) in ops.items()}
        fastest = {}
        for op, (K, N) in ops.items():
            us, candidate = fastest_read(readers, buffers[op], device)
            fastest[op] = next(r for r in readers if (r.block, r.steps, r.warps) == candidate)
            add(dict(kind=f"read_{what}", op=op, K=K, N=N, bytes=size(K, N), us=round(us, 3),
                     tb_s=round(size(K, N) / us / 1e6, 3), config=candidate))
        step_bytes = layers * sum(size(K, N) for K, N in ops.values())
        us = time_us(lambda: [fastest[op](buffers[op][layer]) for layer in range(layers) for op in ops], device)
        add(dict(kind=f"read_{what}", op="step", bytes=step_bytes, us=round(us, 1),
                 tb_s=round(step_bytes / us / 1e6, 3)))
        del buffers

    reader = readers[0]
    nothing = torch.empty(0, dtype=torch.int32, device=device)
    programs = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    add(dict(kind="empty_launches", op="step", programs=programs, us=round(time_us(
        lambda: [reader.kernel[(programs,)](nothing, reader.out, 0, BLOCK=reader.block, STEPS=1, num_warps=4)
                 for _ in range(4 * layers)], device), 1)))

    weights = [{op: torch.randn(N, K, device=device, dtype=torch.bfloat16) for op, (K, N) in ops.items()}
               for _ in range(layers)]
    x, x_down = torch.randn(1, h, device=device).bfloat16(), torch.randn(1, i, device=device).bfloat16()
    add(dict(kind="bf16_cublas", op="step", us=round(time_us(
        lambda: [F.linear(x_down if op == "down" else x, w[op]) for w in weights for op in ops], device), 1)))
    del weights

    int4_layers = method_layout(w4a16, make_layers(shape, device))
    add(dict(kind="qpass_awq", op="step", us=round(time_us(lambda: decode_step(w4a16, int4_layers, x, h), device), 1)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU: a check, not a measurement")
    parser.add_argument("--out", default="/tmp/read_floor.json")
    args = parser.parse_args()
    device = measuring_device(args.tiny, "read_floor.py")
    kernel = read_kernel()
    candidates = CANDIDATES[:1] if args.tiny else CANDIDATES
    readers = [Reader(kernel, candidate, device) for candidate in candidates]
    rows = shape_rows(readers, TINY_SHAPES if args.tiny else SHAPES, device)
    rows += decode_rows(readers, TINY if args.tiny else LLAMA3_8B, device)
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                  date=datetime.date.today().isoformat(), rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
