"""The register-fed TMA kernel warp-specialized (a loader warp issues the copies) against its single-partition form.

From 33 to 128 rows on Hopper the W4A16 op runs the TMA kernel with the weights in registers
(``w4a16._wgmma_registers_config``). This script times, for each row count and shape, that kernel at its own split
(programs up to 4 an SM at 64 rows, 3 at 128) against the warp-specialized form at its split (programs up to one wave
at two an SM), both through ``w4a16.w4a16_linear`` (split sums finished by the op's launch after), one weight
replayed, CUDA-graph medians, two rounds in turns; it records which of the two the pick runs and each one's relative
error against a float32 reference. fp16 on six shapes, bf16 on two.

    python bench/loader_warp.py --out bench/results/ab-w4a16-loader-warp-h200.json    # on an sm_90 GPU
"""

import argparse
import datetime
import json
from pathlib import Path

import torch
import triton

# beside this script
from decode_ops import time_us
from x_halves import GROUP, problems
from qpass.kernels import common, reference, w4a16

SHAPES = [(4096, 4096), (4096, 6144), (4096, 28672), (14336, 4096), (4096, 8192), (4096, 2048)]  # (K, N)
ROWS = [33, 48, 64, 96, 128]
BF16_SHAPES, BF16_ROWS = [(4096, 4096), (14336, 4096)], [48, 128]


def forms(M, N, K, sms):
    """The single-partition and warp-specialized configs for M rows of K x N, each at the split its residency
    allows."""
    block_m = 64 if M <= 64 else 128
    tiles = common.cdiv(N, 64) * common.cdiv(M, block_m)
    single = w4a16._wgmma_split(tiles, K, (4 if block_m == 64 else 3) * sms, most=8)
    return {"single": w4a16.WgmmaTmaConfig(block_m, 64, 3, single, num_warps=4, registers=True),
            "loader_warp": w4a16.WgmmaTmaConfig(block_m, 64, 3, w4a16._wgmma_split(tiles, K, 2 * sms, most=8),
                                                num_warps=4, registers=True, loader_warp=True)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sms = common.sm_count(torch.device("cuda"))
    rows = []
    plan = ((torch.float16, SHAPES, ROWS), (torch.bfloat16, BF16_SHAPES, BF16_ROWS))
    for dtype, K, N, M, x, qweight, scales, zeros in problems(plan):
        configs = forms(M, N, K, sms)
        ref = reference.w4a16_linear(x.float(), qweight, scales.float(), zeros.float(), GROUP, None)
        times = {form: [] for form in configs}
        for form in [*configs, *configs]:
            run = lambda cfg=configs[form]: w4a16.w4a16_linear(x, qweight, scales, zeros, GROUP, config=cfg)
            times[form].append(time_us(run, x.device))
        errors = {form: ((w4a16.w4a16_linear(x, qweight, scales, zeros, GROUP, config=cfg).float() - ref).norm()
                         / ref.norm()).item() for form, cfg in configs.items()}
        pick = w4a16.pick_config(M, N, K, GROUP, x.device, dtype=dtype)
        rows.append(dict(dtype=str(dtype).split(".")[1], K=K, N=N, M=M,
                         configs={form: repr(cfg) for form, cfg in configs.items()}, us=times, error=errors,
                         picked="loader_warp" if pick.loader_warp else "single"))
        print(f"{rows[-1]['dtype']} {K}x{N} M={M}: " + ", ".join(
            f"{form} (split {configs[form].split_k}) {min(times[form]):.2f} us" for form in configs)
            + f"; picked {rows[-1]['picked']}, error {max(errors.values()):.1e}", flush=True)
    args.out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                        triton=triton.__version__, date=datetime.date.today().isoformat(),
                                        sms=sms, rows=rows), indent=1))


if __name__ == "__main__":
    main()
