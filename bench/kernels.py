"""One quantized linear through every peer: the table of ../shared/ANCHORS.md, plus qpass.

Peers: fp16 cuBLAS (``F.linear``, the baseline), torch's tinygemm int4
(``aten._weight_int4pack_mm``, bf16), torchao 0.17 ``Int4WeightOnlyConfig`` (tile_packed_to_4d,
bf16), GemLite 0.6 ``GemLiteLinear`` (A16W4, fp16), and qpass's W4A16 (awq layout), W8A16 and
FP8 W8A8 kernels (fp16). Group size 128, no bias, random data. Every time is the median of
CUDA-graph replays (``triton.testing.do_bench_cudagraph``), as in ANCHORS.md, over three rounds
that time each peer once in turns (``run_table``): launch overhead is out, and a weight that fits
in L2 (50 MB on the H100) stays there between replays, as it did for the peers' figures there.
Each timing starts from an empty L2 (``empty_l2``), so no peer's figure depends on which ran before it.

    python bench/kernels.py --out bench/results/kernels-h100.json   # on the GPU; md and png beside it
    python bench/kernels.py --sweep --out /tmp/sweep.json           # time qpass's block shapes
    python bench/kernels.py --sweep --cold --out /tmp/sweep.json    # the same, weights from DRAM
    python bench/kernels.py --sweep --cold --dtype bfloat16 --sweep-plan awq:16 --registers 0,168,200,255 \
        --out /tmp/registers.json                                   # the warp-level MMA kernel's register budgets
    python bench/kernels.py --plot bench/results/kernels-h100.json  # only the md and png, from the json

A peer that fails to import or run is recorded under "errors" and the run goes on. The GPU
machine has neither torchao nor GemLite: carry them as wheels (torchao's from PyPI; GemLite
0.6.0.post2 is an sdist of pure Python, so ``pip wheel --no-deps gemlite==0.6.0.post2`` makes
its wheel; it needs numpy, tqdm and triton >= 3.6) and ``pip install --no-deps`` them there.
"""

import argparse
import datetime
import itertools
import json
import statistics
import time
import traceback
from pathlib import Path

import triton
import triton.language as tl

SHAPES = [(4096, 4096), (4096, 6144), (4096, 28672), (14336, 4096)]  # (K, N)
MS = [1, 16, 64, 128, 1024, 4096]
GROUP = 128
SWEEP_PLAN = "awq:1,awq:16,awq:128,awq:1024,awq:4096,awq:64,fp8:4096,fp8:1024,int8:1,int8:2,fp8:2,int8:16"
TABLE_TURNS = 3  # rounds of the table, each peer once a round (``run_table``)
PEERS = ["fp16_cublas", "tinygemm_int4", "torchao_int4wo", "gemlite_a16w4", "qpass_awq", "qpass_int8", "qpass_fp8"]


def bench(fn, rep=20):
    """Median us of ``fn``'s CUDA-graph replays, from an empty L2 (``empty_l2``)."""
    empty_l2()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1000.0  # us


@triton.jit
def _discard_lines_kernel(ptr, LINES: tl.constexpr):
    """Drops a program's ``LINES`` 128-byte lines at ``ptr`` from L2, written back or not."""
    lines = tl.program_id(0) * LINES + tl.arange(0, LINES)
    tl.inline_asm_elementwise("discard.global.L2 [$1], 128; mov.b32 $0, 0;", "=r,l", [ptr + lines * 32],
                              dtype=tl.int32, is_pure=False, pack=1)


_L2_SCRATCH = {}
_LINES_A_PROGRAM = 1024


def empty_l2(device="cuda"):
    """Leave L2 empty, as a fresh process finds it, so that no timing depends on what ran before it. L2 keeps the
    lines it holds against a weight that would replay from it but arrives when L2 is full: after fp16 cuBLAS (or
    any other peer, or a 256 MB ``fill_``) the int8 GEMV read its 16.8 MB on 4096^2 from DRAM at every replay, 7.8-9.0
    us a call, and 5.0-5.4 where L2 was empty (H100, bench/NOTES-kernels.md, sixty-eighth and eightieth sessions).
    Loads at any eviction priority do not empty it, nor ``discard`` of lines read; twice L2's size written, then
    discarded, does."""
    import torch

    if device not in _L2_SCRATCH:
        lines = 2 * torch.cuda.get_device_properties(device).L2_cache_size // 128
        _L2_SCRATCH[device] = torch.empty(triton.cdiv(lines, _LINES_A_PROGRAM) * _LINES_A_PROGRAM * 32,
                                          dtype=torch.int32, device=device)
    scratch = _L2_SCRATCH[device]
    scratch.zero_()
    _discard_lines_kernel[(scratch.numel() // (32 * _LINES_A_PROGRAM),)](scratch, LINES=_LINES_A_PROGRAM)
    torch.cuda.synchronize(device)


class Weights:
    """Random int4 codes with scales and zeros for one (K, N), and an fp16 weight."""

    def __init__(self, K, N):
        import torch

        self.K, self.N = K, N
        self.q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device="cuda")  # nn.Linear orientation
        self.scales = torch.rand(N, K // GROUP, device="cuda") * 0.01 + 0.001
        self.zeros = torch.randint(0, 16, (N, K // GROUP), device="cuda").float()
        self.w16 = torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02


def make_peer(name, w):
    """A function of x -> (the linear, the activation dtype); built once per shape."""
    import torch
    import torch.nn.functional as F

    K, N = w.K, w.N
    if name == "fp16_cublas":
        return (lambda x: F.linear(x, w.w16)), torch.float16
    if name == "tinygemm_int4":
        packed = (w.q[:, ::2] << 4 | w.q[:, 1::2]).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        # tinygemm's zero is a float offset: w = (q - 8) * scale + zero_point
        zp = (8 - w.zeros) * w.scales
        scales_and_zeros = torch.stack([w.scales.t(), zp.t()], dim=-1).contiguous().to(torch.bfloat16)
        return (lambda x: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, scales_and_zeros)), torch.bfloat16
    if name == "torchao_int4wo":
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        linear = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        linear.weight.data.copy_(w.w16)
        quantize_(linear, Int4WeightOnlyConfig(group_size=GROUP, int4_packing_format="tile_packed_to_4d"))
        return linear, torch.bfloat16
    if name == "gemlite_a16w4":
        from gemlite import DType, GemLiteLinear

        linear = GemLiteLinear(4, group_size=GROUP, in_features=K, out_features=N,
                               input_dtype=DType.FP16, output_dtype=DType.FP16)
        linear.pack(w.q, w.scales.half(), w.zeros.half(), bias=None)
        return linear, torch.float16
    if name == "qpass_awq":
        from qpass.kernels import reference
        from qpass.kernels.w4a16 import w4a16_linear

        qweight = reference.tile_word_columns(reference.pack_int4_rows(w.q.t().contiguous()))
        scales = w.scales.t().contiguous().half()
        zeros = w.zeros.t().contiguous().half()
        return (lambda x: w4a16_linear(x, qweight, scales, zeros, GROUP)), torch.float16
    if name == "qpass_int8":
        from qpass.kernels.w8a16 import w8a16_linear

        qweight = (w.q.to(torch.int16) * 16 - 128).to(torch.int8)
        scales = w.scales[:, 0].half().contiguous()
        return (lambda x: w8a16_linear(x, qweight, scales)), torch.float16
    if name == "qpass_fp8":
        from qpass.kernels.fp8 import fp8_linear

        qweight = (w.w16.float() * 1000).clamp(-448, 448).to(torch.float8_e4m3fn)
        weight_scale = torch.full((N,), 1e-3, device="cuda")
        return (lambda x: fp8_linear(x, qweight, weight_scale)), torch.float16
    raise ValueError(name)


def run_table(peers, shapes, ms, turns=TABLE_TURNS, device="cuda"):
    """Each peer at each shape and M: the median over ``turns`` rounds in which every peer is timed once, in
    turns (forward, backward, ...), so that no peer is always timed first or last, as clocks drift."""
    import torch

    rows, errors = [], {}
    for K, N in shapes:
        w = Weights(K, N)
        made = {}
        for peer in peers:
            try:
                made[peer] = make_peer(peer, w)
            except Exception as e:  # a peer that does not import or pack is recorded, not fatal
                errors.setdefault(peer, f"{type(e).__name__}: {e}")
                print(f"{peer} K={K} N={N}: {errors[peer]}", flush=True)
        for M in ms:
            xs = {dtype: torch.randn(M, K, device=device, dtype=dtype) for dtype in {d for _, d in made.values()}}
            times = {peer: [] for peer in made}
            for turn in range(turns):
                for peer in (list(times) if turn % 2 == 0 else list(times)[::-1]):
                    fn, dtype = made[peer]
                    try:
                        with torch.no_grad():
                            times[peer].append(bench(lambda: fn(xs[dtype])))
                    except Exception as e:
                        errors[f"{peer} M={M} K={K} N={N}"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                        print(f"{peer} M={M} K={K} N={N} failed: {errors[f'{peer} M={M} K={K} N={N}']}", flush=True)
                        del times[peer]
            for peer, us in times.items():
                rows.append({"peer": peer, "M": M, "K": K, "N": N, "us": round(statistics.median(us), 3),
                             "turns": [round(t, 3) for t in us]})
                print(f"{peer:15s} M={M:5d} K={K:5d} N={N:5d} {statistics.median(us):9.2f} us", flush=True)
        del made, w
        torch.cuda.empty_cache()
    return rows, errors


def sweep_plan(text):
    """``"awq:1,int8:16"`` -> ``[("awq", 1), ("int8", 16)]``: the kernel families and M that ``--sweep`` times."""
    return [(kind, int(M)) for kind, M in (entry.split(":") for entry in text.split(","))]


def sweep_candidates(kind, M, N, activation="none", registers=None):
    """Block shapes worth timing for one kernel family, M rows and N output columns (W4A16's ``activation``
    may make them half the weight's; bench/NOTES-kernels.md); ``registers``: the warp-level MMA kernel's shapes
    with each of these budgets (0: ptxas's choice), not the picks'."""
    from qpass.kernels import fp8, w4a16, w8a16

    out = []
    if kind == "awq":
        if M <= 2:
            for bn, bk, warps in [(8, 1024, 4), (8, 2048, 8), (8, 4096, 16), (16, 1024, 8), (16, 2048, 8),
                                  (16, 2048, 16), (16, 4096, 16), (32, 512, 4), (32, 512, 8), (32, 1024, 8),
                                  (32, 1024, 16), (32, 2048, 16), (64, 512, 8), (64, 1024, 16), (16, 512, 4),
                                  (16, 256, 2), (8, 512, 2)]:
                for unrolled in (False, True):  # each with the picks' register budget (on 132 SMs)
                    cfg = w4a16.GemvConfig(bn, bk, 1, warps, unrolled=unrolled)
                    out.append(cfg._replace(maxnreg=w4a16.gemv_registers(cfg, M, N, 132)))
            for bn, bk, split, warps in [(16, 1024, 2, 8), (16, 2048, 2, 8), (16, 1024, 4, 8), (8, 1024, 2, 4),
                                         (16, 512, 2, 4), (16, 512, 4, 4), (32, 512, 2, 4)]:
                out.append(w4a16.GemvConfig(bn, bk, split, warps))
            out.append(w4a16.GemvConfig(16, 2048, 1, 8, packed_f16=False))
        if 2 <= M <= 16:  # the warp-level MMA kernel, 64 or 32 columns a warp, its warps on one column block or
            # side by side on two, one program for all rows or (past 8) a program an 8-row tile, its loop rolled (its
            # body once or twice an iteration) or unrolled (where ``warp_mma_unrolled_iterations`` allows); each with
            # the picks' register budget and L2 prefetch (``w4a16._pick_for_all_rows``: 64 columns past 8 rows)
            tiles = -(-N // w4a16.warp_mma_columns(activation))  # (as the pick counts them for the budget)
            loops = ((False, 1), (False, 2), (True, 1))  # (unrolled, loop_unroll)
            for column_blocks, row_tiles, warps, column_warps, split, (unrolled, loop_unroll) in itertools.product(
                    (4, 2), sorted({1, (M + 7) // 8}), (4, 8), (1, 2), (1, 2, 4, 8), loops):
                cfg = w4a16.WarpMmaConfig(warps, split, row_tiles, column_warps, unrolled,
                                          prefetch_groups=int(M > 8 and column_blocks == 4), loop_unroll=loop_unroll,
                                          column_blocks=column_blocks)
                if warps <= w4a16.warp_mma_most_warps(cfg) * column_warps:
                    budgets = registers or [w4a16.warp_mma_registers(cfg, M, tiles, 132)]
                    out.extend(cfg._replace(maxnreg=budget) for budget in budgets)
        if 16 < M <= 64:  # the Hopper kernel, its weights exact or scaled in the MMA (other GPUs: reported as
            # failed, the sweep goes on)
            for warpgroups in (1, 2):
                for split in (1, 2, 4, 8):
                    for scaled in (False, True):
                        out.append(w4a16.WgmmaConfig(32 if M <= 32 else 64, warpgroups, split, scaled))
        swaps = (True, False)  # the weight tile as the MMA's register operand, or through shared memory
        if 2 < M <= 64:
            if M <= 16:  # the split rule against fixed splits, for the tensor-core kernel's tuned block shape
                for split in (1, 2, 4, 8, 16):
                    out.append(w4a16.MmaConfig(16, 128, 128, split, swaps[0], 4, 3))
            bm = 32 if M <= 32 else 64
            for bn, bk, warps, stages in [(64, 64, 4, 4), (64, 64, 4, 5), (128, 64, 4, 3), (128, 64, 4, 4),
                                          (64, 128, 4, 2), (64, 128, 4, 3), (128, 128, 4, 3), (256, 64, 8, 3)]:
                for swap in swaps:
                    out.append(w4a16.MmaConfig(bm, bn, bk, 0, swap, warps, stages))
        if 64 < M <= 256:  # the TMA kernel (Hopper; elsewhere reported as failed, the sweep goes on)
            for bm, bn, stages, warps in [(128, 128, 4, 8), (64, 128, 4, 4), (128, 256, 4, 8), (256, 128, 4, 8)]:
                for split in (1, 2, 4, 8):
                    out.append(w4a16.WgmmaTmaConfig(bm, bn, stages, split, warps))
            for bm, bn, stages, warps, dequant_warps in [(128, 128, 5, 8, 4), (128, 128, 5, 8, 8), (256, 128, 4, 8, 4)]:
                for split in (1, 2, 4, 8):  # warp-specialized
                    out.append(w4a16.WgmmaTmaConfig(bm, bn, stages, split, warps, dequant_warps))
            for bm, bn, bk, warps, stages in [(128, 128, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 64, 8, 3),
                                              (128, 128, 64, 8, 4), (128, 64, 64, 4, 3), (128, 64, 64, 4, 4),
                                              (128, 64, 128, 4, 2), (128, 64, 128, 4, 3),
                                              (128, 256, 64, 8, 3), (64, 128, 64, 4, 3)]:
                for swap in swaps:
                    out.append(w4a16.MmaConfig(bm, bn, bk, 0, swap, warps, stages))
            out.append(w4a16.DequantMmConfig())
        if 128 < M <= 512:  # the register-fed kernel on 256-row tiles, one program an SM (``_register_fed_one_wave``)
            for split in (1, 2, 4):
                for stages in (3, 4):
                    out.append(w4a16.WgmmaTmaConfig(256, 64, stages, split, 4, registers=True, loader_warp=True,
                                                    maxnreg=w4a16.RS_WS_256_REGISTERS))
        if 256 < M <= 640:  # the register-fed kernel on 128-row tiles over all its waves (``_register_fed_all_waves``)
            out.append(w4a16.WgmmaTmaConfig(128, 64, 3, 1, 4, registers=True, loader_warp=True,
                                            maxnreg=w4a16.RS_WS_REGISTERS))
        if M > 256:
            for bm, bn, bk, warps in [(128, 128, 64, 8), (128, 256, 64, 8), (256, 128, 64, 8)]:
                for swap in swaps:
                    out.append(w4a16.MmaConfig(bm, bn, bk, 0, swap, warps, 3))
            out.append(w4a16.DequantMmConfig())
            out.append(w4a16.DequantMmConfig(32, 64))
            out.extend(w4a16.DequantMmConfig(chunk_n=c) for c in (8192, 4096, 2048, 1024) if c < N)
    elif kind in ("int8", "fp8") and M <= w8a16.GEMV_MAX_M:  # W8A16's GEMV, on int8 or fp8 weights
        block_m = M  # both rows in one program
        if kind == "int8":
            for bn, bk in [(4, 1024), (8, 512), (16, 256)]:  # the float32 path's tuned shapes (H100, 2026-11-24)
                out.append(w8a16.GemvConfig(bn, bk, 0, 4, 2, packed_f16=False, block_m=block_m))
        # packed path: a thread holds BLOCK_N / (warps along N) rows of a 16-weight chunk, and widens
        # the chunk's x once for all of them
        for bn, bk, warps in [(4, 1024, 4), (8, 512, 4), (8, 1024, 8), (4, 512, 1), (8, 512, 1), (4, 1024, 2),
                              (8, 1024, 2), (4, 2048, 2), (4, 2048, 4), (8, 2048, 4), (16, 2048, 8),
                              (4, 4096, 4), (8, 4096, 8), (16, 512, 2), (16, 1024, 4), (32, 512, 4),
                              (32, 1024, 8), (4, 512, 4), (8, 256, 4), (16, 256, 8)]:
            for unrolled in (False, True):
                out.append(w8a16.GemvConfig(bn, bk, 0, warps, 2, unrolled=unrolled, block_m=block_m))
    elif kind == "int8":
        for bm, bn, bk, warps, stages in [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 32, 128, 4, 5),
                                          (64, 128, 64, 4, 4), (64, 128, 128, 4, 3), (64, 64, 128, 4, 4),
                                          (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 128, 4, 3),
                                          (128, 128, 128, 8, 3)]:
            if (M <= 16) == (bm == 16):
                for swap in (True, False):
                    out.append(w8a16.MmaConfig(bm, bn, bk, 0, warps, stages, swap_ab=swap))
    elif kind == "fp8":
        if M >= 1024:
            for bm, bn, bk, warps, stages in [(128, 256, 128, 8, 3), (128, 256, 128, 8, 4), (128, 128, 128, 8, 4),
                                              (256, 128, 128, 8, 3), (128, 256, 64, 8, 4)]:
                out.append(fp8.MmaConfig(bm, bn, bk, 0, warps, stages))
        else:
            for bm, bn, bk, warps, stages in [(16, 64, 256, 4, 4), (16, 128, 128, 4, 4), (64, 64, 128, 4, 4)]:
                out.append(fp8.MmaConfig(bm, bn, bk, 0, warps, stages))
    return out


def run_sweep(shapes, plan, deadline, dtype_name="float16", activation="none", cold=False, registers=None):
    """Time each candidate block shape; split_k 0 in a candidate means the launcher's rule.
    ``cold``: each timed call runs over enough copies of the weights to overflow L2 several
    times, so every byte comes from DRAM as in a model's decode step (a weight under L2's
    size otherwise stays there between replays); times are per copy."""
    import torch
    import torch.nn.functional as F

    from qpass.kernels import fp8, reference, w4a16, w8a16
    from qpass.kernels.common import output_columns, split_for

    dtype = getattr(torch, dtype_name)  # activations, scales and zeros, and the cuBLAS baseline

    def weight_set(K, N):
        w = Weights(K, N)
        return dict(qweight4=reference.tile_word_columns(reference.pack_int4_rows(w.q.t().contiguous())),
                    scales4=w.scales.t().contiguous().to(dtype), zeros4=w.zeros.t().contiguous().to(dtype),
                    base=w.w16.to(dtype), qweight8=(w.q.to(torch.int16) * 16 - 128).to(torch.int8),
                    scales8=w.scales[:, 0].half().contiguous(),
                    qweightf8=(w.w16.float() * 1000).clamp(-448, 448).to(torch.float8_e4m3fn),
                    wscale=torch.full((N,), 1e-3, device="cuda"))

    def call(kind, x, cfg, s):
        if kind == "awq":
            return w4a16.w4a16_linear(x, s["qweight4"], s["scales4"], s["zeros4"], GROUP, activation=activation,
                                      config=cfg)
        if kind == "int8":
            return w8a16.w8a16_linear(x, s["qweight8"], s["scales8"], config=cfg)
        return fp8.fp8_linear(x, s["qweightf8"], s["wscale"], config=cfg)

    results = []
    for K, N in shapes:
        copies = 1
        if cold:  # int4 weights with their scales and zeros: K N / 2 + 4 N K / 128 bytes
            l2 = torch.cuda.get_device_properties(0).L2_cache_size
            copies = -(-8 * l2 // (K * N // 2 + K * N // 32))
        sets = [weight_set(K, N) for _ in range(copies)]
        for kind, M in plan:
            if time.time() > deadline:
                return results
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            base = bench(lambda: [F.linear(x, s["base"]) for s in sets], rep=10) / copies
            n_out = output_columns(activation, N) if kind == "awq" else N  # only W4A16 runs the activation
            candidates = sweep_candidates(kind, M, n_out, activation if kind == "awq" else "none", registers)
            if kind == "awq":  # the pick itself, whose split may differ from its block shape's rule
                candidates.append(w4a16.pick_config(M, n_out, K, GROUP, x.device, activation, dtype=dtype))
            for cfg in candidates:
                if time.time() > deadline:
                    return results
                if getattr(cfg, "split_k", 1) == 0:  # the launchers' rule for this block shape
                    row_tiles = -(-M // cfg.block_m) if hasattr(cfg, "block_m") else M
                    if isinstance(cfg, w4a16.MmaConfig):  # what pick_config gives this block shape
                        split = w4a16.mma_split_k(cfg, M, n_out, K, 132)
                    else:
                        split = split_for(row_tiles * -(-n_out // cfg.block_n), -(-K // cfg.block_k), 132)
                    cfg = cfg._replace(split_k=split)
                try:
                    us = bench(lambda: [call(kind, x, cfg, s) for s in sets], rep=10) / copies
                except Exception as e:
                    print(f"{kind} M={M} K={K} N={N} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                results.append({"kind": kind, "M": M, "K": K, "N": N, "config": [type(cfg).__name__, *cfg],
                                "us": round(us, 3), "fp16_us": round(base, 3), "cold": cold})
                print(f"{kind:4s} M={M:5d} K={K:5d} N={N:5d} {type(cfg).__name__}{tuple(cfg)} {us:8.2f} us "
                      f"x{base / us:5.2f}", flush=True)
        sets.clear()  # the weights freed before the next shape
        torch.cuda.empty_cache()
    return results


def _read_table(path):
    """The json at ``path``, its rows, fp16 cuBLAS's us by (M, K, N), and its shapes in ``SHAPES``' order."""
    data = json.loads(Path(path).read_text())
    rows = data["rows"]
    base = {(r["M"], r["K"], r["N"]): r["us"] for r in rows if r["peer"] == "fp16_cublas"}
    return data, rows, base, sorted({(r["K"], r["N"]) for r in rows}, key=SHAPES.index)


def write_plot(path):
    """Each peer's speed-up over fp16 cuBLAS against M, a panel a shape, as a png beside the json at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, rows, base, shapes = _read_table(path)
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.2), sharey=True)
    for ax, (K, N) in zip(axes, shapes):
        for peer in PEERS[1:]:
            pts = sorted((r["M"], base[(r["M"], K, N)] / r["us"]) for r in rows
                         if r["peer"] == peer and (r["K"], r["N"]) == (K, N) and (r["M"], K, N) in base)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=peer, lw=2.2 if peer.startswith("qpass") else 1.2)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_title(f"K={K}, N={N}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up over fp16 cuBLAS")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"One linear, {data['device']}, torch {data['torch']}, triton {data['triton']}, {data['date']}")
    fig.tight_layout()
    fig.savefig(Path(path).with_suffix(".png"), dpi=110)


def write_markdown(path):
    """The table of the json at ``path`` as markdown beside it: each peer's speed-up over fp16 cuBLAS."""
    data, rows, base, shapes = _read_table(path)
    lines = ["# One quantized linear: speed-up over fp16 cuBLAS", "",
             f"{data['device']}, torch {data['torch']}, triton {data['triton']}, {data['date']}. "
             "Median of CUDA-graph replays (`triton.testing.do_bench_cudagraph`) over rounds that time each peer "
             "once in turns, each timing from an empty L2 (`empty_l2`); group size 128; "
             "fp16 activations (bf16 for tinygemm and torchao). Raw times in the json beside this.", "",
             "| K, N | M | fp16 us | " + " | ".join(PEERS[1:]) + " |",
             "|---|---|---|" + "---|" * (len(PEERS) - 1)]
    for K, N in shapes:
        for M in sorted({r["M"] for r in rows}):
            if (M, K, N) not in base:
                continue
            cells = []
            for peer in PEERS[1:]:
                us = [r["us"] for r in rows if (r["peer"], r["M"], r["K"], r["N"]) == (peer, M, K, N)]
                cells.append(f"{base[(M, K, N)] / us[0]:.2f}" if us else "-")
            lines.append(f"| {K}, {N} | {M} | {base[(M, K, N)]:.1f} | " + " | ".join(cells) + " |")
    if data.get("errors"):
        lines += ["", "Errors:", ""] + [f"- {k}: {v}" for k, v in data["errors"].items()]
    if data.get("notes"):  # what a reader must know of a row (one kept out, one from another run)
        lines += ["", "Notes:", ""] + [f"- {note}" for note in data["notes"]]
    Path(path).with_suffix(".md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/kernels-h100.json")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-plan", default=SWEEP_PLAN, help="kernel family:M pairs, comma-separated")
    parser.add_argument("--budget-s", type=float, default=1e9, help="stop the sweep after this many seconds")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="the sweep's activations")
    parser.add_argument("--activation", default="none", choices=["none", "silu_mul"],
                        help="the W4A16 sweep's epilogue (silu_mul: N columns of [gate | up], N / 2 out)")
    parser.add_argument("--cold", action="store_true", help="the sweep reads its weights from DRAM (see run_sweep)")
    parser.add_argument("--registers", type=lambda text: [int(r) for r in text.split(",")],
                        help="the warp-level MMA sweep's register budgets, comma-separated, 0 for ptxas's choice "
                             "(default: each block shape with the picks' budget)")
    parser.add_argument("--plot", metavar="JSON")
    args = parser.parse_args()
    if args.plot:
        write_markdown(args.plot)
        write_plot(args.plot)
        return
    import torch

    if args.sweep:
        results = run_sweep(SHAPES, sweep_plan(args.sweep_plan), time.time() + args.budget_s, args.dtype,
                            args.activation, args.cold, args.registers)
        Path(args.out).write_text(json.dumps(results, indent=1))
        return
    data = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "rows": [], "errors": {}}
    for shape in SHAPES:  # written after each shape, so a run cut short keeps what it measured
        rows, errors = run_table(args.peers.split(","), [shape], MS)
        data["rows"] += rows
        data["errors"].update(errors)
        Path(args.out).write_text(json.dumps(data, indent=1))
    write_markdown(args.out)
    try:
        write_plot(args.out)  # the png beside the json
    except ImportError as e:
        print(f"no plot ({e}); on a machine with matplotlib: python bench/kernels.py --plot {args.out}")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
