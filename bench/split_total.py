"""A split of K finished by one launch after the TMA kernels, against fresh zeros before them and the bias and the
cast after.

Split, ``w4a16.wgmma_tma_matmul`` has the programs add their float32 sums into the workspace kept between calls and
finishes them with ``common.split_total_kernel`` (bias, cast, the workspace zero again). This script times that
against the same kernel into fresh zeros, then ``(sums + bias).to(dtype)`` (three launches, two without a bias), at
the pick's config for each row count and shape where it splits (one weight replayed, CUDA-graph medians, two rounds
in turns), fp16 on the four shapes and bf16 on two, with and without a bias, and both results' relative error
against a float32 reference.

    python bench/split_total.py --out bench/results/ab-w4a16-split-total-h200.json    # on an sm_90 GPU
"""

import argparse
import datetime
import json
from pathlib import Path

import torch
import triton

# beside this script
from decode_ops import time_us
from x_halves import GROUP, SHAPES, problems
from qpass.kernels import reference, w4a16
from qpass.kernels.common import word_columns

ROWS = [33, 48, 64, 65, 96, 128, 129, 192, 256]
BF16_SHAPES, BF16_ROWS = [(4096, 4096), (14336, 4096)], [40, 128, 192]


def zeros_then_cast(x, qweight, scales, zeros, bias, cfg):
    """The kernel's split into fresh zeros, then the bias and the cast."""
    sums = torch.zeros((x.shape[0], word_columns(qweight)), device=x.device, dtype=torch.float32)
    w4a16.wgmma_tma_launch(x, qweight, scales, zeros, GROUP, None, sums, *cfg)
    return (sums if bias is None else sums + bias).to(x.dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    plan = ((torch.float16, SHAPES, ROWS), (torch.bfloat16, BF16_SHAPES, BF16_ROWS))
    for dtype, K, N, M, x, qweight, scales, zeros in problems(plan):
        cfg = w4a16.pick_config(M, N, K, GROUP, x.device, dtype=dtype)
        if not isinstance(cfg, w4a16.WgmmaTmaConfig) or cfg.split_k == 1:
            continue
        bias = torch.randn(N, device="cuda", dtype=dtype)
        ref = reference.w4a16_linear(x.float(), qweight, scales.float(), zeros.float(), GROUP, bias.float())
        row = dict(dtype=str(dtype).split(".")[1], K=K, N=N, M=M, config=repr(cfg))
        for name, b in (("plain", None), ("bias", bias)):
            paths = {"zeros_then_cast": lambda: zeros_then_cast(x, qweight, scales, zeros, b, cfg),
                     "split_total": lambda: w4a16.wgmma_tma_matmul(x, qweight, scales, zeros, GROUP, b, *cfg)}
            times = {path: [] for path in paths}
            for path in [*paths, *paths]:
                times[path].append(time_us(paths[path], x.device))
            row[name] = times
            if b is not None:
                row["error"] = {path: ((run().float() - ref).norm() / ref.norm()).item()
                                for path, run in paths.items()}
        rows.append(row)
        print(f"{row['dtype']} {K}x{N} M={M}: " + "; ".join(
            f"{name} {min(row[name]['zeros_then_cast']):.2f} -> {min(row[name]['split_total']):.2f} us"
            for name in ("plain", "bias")) + f", error {max(row['error'].values()):.1e}", flush=True)
    args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                        triton=triton.__version__, date=datetime.date.today().isoformat(),
                                        rows=rows), indent=1))


if __name__ == "__main__":
    main()
