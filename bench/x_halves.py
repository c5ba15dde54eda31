"""x copied in one box against two of half a tile's rows, for row counts whose last tile reaches past x's end.

The Hopper TMA kernels copy x a tile of rows at a time; where the last tile reaches past x's last row the TMA
zero-fills the rest, and far enough past it that copy is slow. ``w4a16.x_in_halves`` picks two boxes of half the
rows instead, each moved back within x. This script times both at the pick's config for each row count and shape
(one weight replayed, CUDA-graph medians, two rounds in turns), fp16 on the four shapes and bf16 on two, and the
relative error of the halves against a float32 reference.

    python bench/x_halves.py --out bench/results/ab-w4a16-x-halves-h200.json    # on an sm_90 GPU
"""

import argparse
import datetime
import json
from pathlib import Path

import torch
import triton

# beside this script
from decode_ops import time_us
from qpass.kernels import reference, w4a16

GROUP = 128
SHAPES = [(4096, 4096), (4096, 6144), (4096, 28672), (14336, 4096)]  # (K, N)
ROWS = [33, 40, 44, 48, 65, 80, 96, 104, 112, 129, 160, 192, 232, 240, 300, 448, 600]
BF16_SHAPES, BF16_ROWS = [(4096, 28672), (14336, 4096)], [40, 65, 96, 129, 160, 300]


def weight(K, N, dtype):
    """Random codes, scales and zeros in the awq method's layout (words in column tiles)."""
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device="cuda")
    scales = (torch.rand(K // GROUP, N, device="cuda") * 0.01 + 0.001).to(dtype)
    zeros = torch.randint(0, 16, (K // GROUP, N), device="cuda").to(dtype)
    return reference.tile_word_columns(reference.pack_int4_rows(q.t().contiguous())), scales, zeros


def problems(plan):
    """``(dtype, K, N, M, x, qweight, scales, zeros)`` for each dtype's shapes and row counts in ``plan``
    (``[(dtype, [(K, N), ...], [M, ...]), ...]``): random x, one random weight a shape."""
    for dtype, shapes, counts in plan:
        for K, N in shapes:
            qweight, scales, zeros = weight(K, N, dtype)
            for M in counts:
                yield dtype, K, N, M, torch.randn(M, K, device="cuda", dtype=dtype), qweight, scales, zeros


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    chosen = w4a16.x_in_halves
    rows = []
    plan = ((torch.float16, SHAPES, ROWS), (torch.bfloat16, BF16_SHAPES, BF16_ROWS))
    for dtype, K, N, M, x, qweight, scales, zeros in problems(plan):
        cfg = w4a16.pick_config(M, N, K, GROUP, x.device, dtype=dtype)
        if not isinstance(cfg, w4a16.WgmmaTmaConfig):
            continue
        call = (x, qweight, scales, zeros, GROUP, None, *cfg)
        times = {False: [], True: []}
        for halves in (False, True, False, True):
            w4a16.x_in_halves = lambda *_, halves=halves: halves
            times[halves].append(time_us(lambda: w4a16.wgmma_tma_matmul(*call), x.device))
        ref = reference.w4a16_linear(x.float(), qweight, scales.float(), zeros.float(), GROUP, None)
        error = ((w4a16.wgmma_tma_matmul(*call).float() - ref).norm() / ref.norm()).item()
        w4a16.x_in_halves = chosen
        rows.append(dict(dtype=str(dtype).split(".")[1], K=K, N=N, M=M, config=repr(cfg),
                         rows_past_end=-M % cfg.block_m, one_box_us=times[False], halves_us=times[True],
                         halves_error=error, picked=chosen(M, cfg.block_m, cfg.dequant_warps > 0)))
        print(f"{rows[-1]['dtype']} {K}x{N} M={M}: one box {min(times[False]):.2f} us, halves "
              f"{min(times[True]):.2f} us, picked {'halves' if rows[-1]['picked'] else 'one box'}", flush=True)
    args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                        triton=triton.__version__, date=datetime.date.today().isoformat(),
                                        rows=rows), indent=1))


if __name__ == "__main__":
    main()
