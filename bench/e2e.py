"""End to end: the decode step of ../shared/ANCHORS.md through every peer.

16 layers of Llama-3-8B's linears (RMSNorm, qkv 4096->6144, o 4096->4096, RMSNorm,
gate_up 4096->28672, SiLU*mul, down 14336->4096, residual adds; attention left out, so
o reads the q part of qkv), bf16, random weights. For each peer: batch 1 and 16 (one
token each) and one 2048-token prefill, median ms per step; weight memory; the time of
the first call (compile, and quantization for the backend); the device memory held.

Not run by default: ``qpass_awq_tree_backend_cg``, the way of a model that does not trace (a
Hugging Face model): ``qpass.quantize`` keeps its module tree (one op per linear, nothing
merged), then ``backend="qpass"`` lowers it (norms and residual adds folded into the ops).

The backend peer frees the float weights it replaced (``free_float_weights=True``, what a
server that drops the eager model wants); ``qpass_backend_awq_cg_keepfloat`` is the same
with the default (the eager model intact), measured at batch 1 only, for its memory.

    python bench/e2e.py                      # on the GPU: writes bench/results/e2e-h100.json
    python bench/e2e.py --tiny --out /tmp/e2e.json   # small shapes, a check on the CPU
    python bench/e2e.py --peers bf16_compile_cg qpass_awq_compile_cg --cases batch1 --out /tmp/e2e.json
    python bench/e2e.py --plot bench/results/e2e-h100.json   # the png and md beside it
    python bench/e2e.py --peers qpass_awq_compile_cg --cases batch1 --profile --out /tmp/e2e.json
                                             # and where each step's time goes, kernel by kernel

Inductor's caches are off (TORCHINDUCTOR_FORCE_DISABLE_CACHES) so that every peer's first
call compiles from scratch rather than reusing the previous peer's graphs. Kernels compiled in
the same process (and Triton's cache on disk) still carry over from one peer to the next, so a
peer that compiles the graphs of the one before it (bf16_compile_cg after bf16_compile) starts
faster. ``--isolate`` runs each peer in a process of its own with empty Inductor and Triton cache
directories: first calls as a user's first run sees them.

    python bench/e2e.py --isolate --peers bf16_compile_cg qpass_awq_compile_cg --cases batch1 --out /tmp/e2e.json
"""

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import qpass  # noqa: E402
from qpass.backend import cached_stubs  # noqa: E402

SHAPES = {  # dim, qkv, hidden, layers
    "llama3-8b": (4096, 6144, 14336, 16),
    "tiny": (256, 384, 512, 2),
}
PEERS = ["bf16_eager", "qpass_awq_eager", "bf16_compile", "bf16_compile_cg", "torchao_int4wo_compile_cg",
         "qpass_awq_compile_cg", "qpass_backend_awq_cg", "qpass_backend_awq_cg_keepfloat"]
ONE_CASE_PEERS = ("qpass_backend_awq_cg_keepfloat",)  # measured for memory: batch 1 only
BASELINE = "bf16_compile_cg"


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class DecodeLayer(nn.Module):
    def __init__(self, dim, qkv, hidden):
        super().__init__()
        self.input_norm = RMSNorm(dim)
        self.qkv_proj = nn.Linear(dim, qkv, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.post_norm = RMSNorm(dim)
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        q = self.qkv_proj(self.input_norm(x))[..., : x.shape[-1]]
        x = x + self.o_proj(q)
        gate, up = self.gate_up_proj(self.post_norm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class DecodeStack(nn.Module):
    def __init__(self, dim, qkv, hidden, layers):
        super().__init__()
        self.layers = nn.ModuleList(DecodeLayer(dim, qkv, hidden) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def build_model(shape, device):
    torch.manual_seed(0)
    with torch.device(device):
        return DecodeStack(*SHAPES[shape]).to(torch.bfloat16).eval().requires_grad_(False)


def prepare(peer, shape, device):
    """(callable, seconds spent before compiling) for one peer."""
    model = build_model(shape, device)
    cg = "reduce-overhead"
    start = time.perf_counter()
    if peer == "bf16_eager":
        fn = model
    elif peer == "qpass_awq_eager":  # a model run without torch.compile (Hugging Face's generate)
        fn = qpass.quantize(model, "awq")
        del model
    elif peer == "bf16_compile":
        fn = torch.compile(model)
    elif peer == "bf16_compile_cg":
        fn = torch.compile(model, mode=cg)
    elif peer == "torchao_int4wo_compile_cg":
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
        fn = torch.compile(model, mode=cg)
    elif peer == "qpass_awq_compile_cg":
        quantized = qpass.quantize(model, "awq")  # a copy on the same device; the float model goes
        del model
        fn = torch.compile(quantized, mode=cg)
    elif peer == "qpass_backend_awq_cg":
        fn = torch.compile(model, backend="qpass", options={"method": "awq", "mode": cg, "free_float_weights": True})
    elif peer == "qpass_backend_awq_cg_keepfloat":
        fn = torch.compile(model, backend="qpass", options={"method": "awq", "mode": cg})
    elif peer == "qpass_awq_tree_backend_cg":  # a Hugging Face model's way: qpass.quantize keeps the module tree
        quantized = qpass.quantize(model, "awq", merge=False)
        del model
        fn = torch.compile(quantized, backend="qpass", options={"mode": cg})  # lowered, not quantized again
    else:
        raise ValueError(peer)
    sync(device)
    return fn, time.perf_counter() - start


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, x, device):
    def step():
        torch.compiler.cudagraph_mark_step_begin()
        fn(x)

    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(step, warmup=50, rep=200, return_mode="median")
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def kernel_profile(fn, x, steps=20, top=12):
    """Where a step's GPU time goes: the profiler over ``steps`` calls (CUDA-graph replays
    included, kernel by kernel). ``span_us``: first kernel start to last kernel end, per step;
    ``busy_us``: the kernels' own time per step (the rest is gaps between kernels)."""
    from collections import defaultdict

    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            torch.compiler.cudagraph_mark_step_begin()
            fn(x)
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    by_name = defaultdict(list)
    for e in events:
        by_name[e.name].append(e.time_range.elapsed_us())
    kernels = sorted(({"name": name, "per_step": len(us) / steps, "avg_us": round(sum(us) / len(us), 3),
                       "us_per_step": round(sum(us) / steps, 3)} for name, us in by_name.items()),
                     key=lambda k: -k["us_per_step"])
    return {"span_us": round((events[-1].time_range.end - events[0].time_range.start) / steps, 1),
            "busy_us": round(sum(k["us_per_step"] for k in kernels), 1),
            "kernels_per_step": len(events) / steps, "top": kernels[:top]}


def storages(t):
    """The storages of a tensor, or of the plain tensors inside a tensor subclass (torchao's)."""
    if type(t) in (torch.Tensor, nn.Parameter):
        return [t.untyped_storage()]
    names, _ = t.__tensor_flatten__()
    return [s for name in names for s in storages(getattr(t, name))]


def weight_bytes(modules):
    """Bytes of the storages behind the modules' parameters and buffers, each counted once
    (a freed storage counts nothing)."""
    found = {s.data_ptr(): s.nbytes() for m in modules for t in [*m.parameters(), *m.buffers()] for s in storages(t)}
    return sum(found.values())


def allocated_bytes(device):
    gc.collect()
    return torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else 0


def run_peer(peer, shape, device, cases, profile=False):
    start_bytes = allocated_bytes(device)
    with torch.no_grad():
        fn, prepare_s = prepare(peer, shape, device)
        prepared_bytes = allocated_bytes(device) - start_bytes
        dim = SHAPES[shape][0]
        cases = [(1, 1)] if peer in ONE_CASE_PEERS else cases
        rows = []
        for batch, tokens in cases:
            x = torch.randn(batch, tokens, dim, dtype=torch.bfloat16, device=device)
            start = time.perf_counter()
            torch.compiler.cudagraph_mark_step_begin()
            fn(x)
            sync(device)
            first_call_s = time.perf_counter() - start
            rows.append({"peer": peer, "batch": batch, "tokens": tokens, "ms": median_ms(fn, x, device),
                         "first_call_s": round(first_call_s, 3), "prepare_s": round(prepare_s, 3)})
            print(f"{peer:28s} batch {batch:3d} tokens {tokens:5d}: {rows[-1]['ms']:8.3f} ms  "
                  f"first call {first_call_s:6.1f} s", flush=True)
            if profile:
                rows[-1]["profile"] = kernel_profile(fn, x)
                p = rows[-1]["profile"]
                print(f"    per step: {p['span_us']} us from first kernel to last, {p['busy_us']} us in "
                      f"{p['kernels_per_step']:.0f} kernels", flush=True)
                for k in p["top"]:
                    print(f"    {k['us_per_step']:9.1f} us  {k['per_step']:5.1f} x {k['avg_us']:7.2f} us  "
                          f"{k['name'][:90]}", flush=True)
        # the model's weights; the backend's model holds its float weights (freed or not)
        # and the backend the stubs
        weights = weight_bytes([getattr(fn, "_orig_mod", fn), *cached_stubs()])
    held_bytes = allocated_bytes(device) - start_bytes
    for row in rows:
        row.update(weights_gb=round(weights / 1e9, 3), allocated_after_prepare_gb=round(prepared_bytes / 1e9, 3),
                   allocated_after_calls_gb=round(held_bytes / 1e9, 3))
    print(f"{peer:28s} weights {weights / 1e9:.2f} GB; allocated after prepare {prepared_bytes / 1e9:.2f} GB, "
          f"after the calls {held_bytes / 1e9:.2f} GB", flush=True)
    del fn
    torch._dynamo.reset()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure(shape, device, peers, cases, out, profile=False):
    """Runs every peer, writing ``out`` after each so that a cut-off run keeps what it has."""
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "shape": shape, "rows": []}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    for peer in peers:
        try:
            result["rows"].extend(run_peer(peer, shape, device, cases, profile))
        except Exception as err:  # one peer failing (a missing package) must not lose the others
            print(f"{peer}: failed: {type(err).__name__}: {err}", flush=True)
            torch._dynamo.reset()
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def measure_isolated(peers, case_names, out, tiny):
    """``measure`` with each peer in a fresh process and fresh, empty Inductor and Triton cache
    directories; the rows merged into ``out``."""
    result = None
    for peer in peers:
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{tmp}/inductor", TRITON_CACHE_DIR=f"{tmp}/triton")
            peer_out = f"{tmp}/{peer}.json"
            command = [sys.executable, __file__, "--peers", peer, "--cases", *case_names, "--out", peer_out]
            subprocess.run(command + (["--tiny"] if tiny else []), env=env, check=True)
            peer_result = json.loads(Path(peer_out).read_text())
        if result is None:
            result = peer_result
        else:
            result["rows"].extend(peer_result["rows"])
        result["isolated"] = True
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def peers_in_order(rows):
    """The peers of ``rows`` in the order of PEERS, whatever order they ran in."""
    return sorted({r["peer"] for r in rows}, key=lambda p: PEERS.index(p) if p in PEERS else len(PEERS))


def summary(result):
    """Markdown table: ms and speed-up over the baseline per case, weights, first call."""
    rows = result["rows"]
    cases = sorted({(r["batch"], r["tokens"]) for r in rows}, key=lambda c: (c[1], c[0]))
    base = {(r["batch"], r["tokens"]): r for r in rows if r["peer"] == BASELINE}
    head = " | ".join(f"batch {b}, {t} tok" for b, t in cases)
    lines = [f"Device {result['device']}, torch {result['torch']}, {result['date']}. Median ms per step "
             f"(speed-up over {BASELINE}); weights in GB (x of {BASELINE}); device memory still allocated "
             f"after the peer's calls, in GB (weights, CUDA-graph pools, caches); first call in s, batch 1 "
             f"(x of {BASELINE}).", "", f"| peer | {head} | weights | allocated | first call |",
             "|---" * (len(cases) + 4) + "|"]
    for peer in peers_in_order(rows):
        mine = {(r["batch"], r["tokens"]): r for r in rows if r["peer"] == peer}
        cells = []
        for case in cases:
            r = mine.get(case)
            ratio = f" ({base[case]['ms'] / r['ms']:.2f}x)" if r and case in base else ""
            cells.append(f"{r['ms']:.3f}{ratio}" if r else "-")
        first = mine[cases[0]]
        b0 = base.get(cases[0])
        w = f"{first['weights_gb']:.2f}" + (f" ({first['weights_gb'] / b0['weights_gb']:.2f}x)" if b0 else "")
        fc = f"{first['first_call_s']:.1f}" + (f" ({first['first_call_s'] / b0['first_call_s']:.2f}x)" if b0 else "")
        held = f"{first['allocated_after_calls_gb']:.2f}" if "allocated_after_calls_gb" in first else "-"
        lines.append(f"| {peer} | " + " | ".join(cells) + f" | {w} | {held} | {fc} |")
    if result.get("note"):
        lines += ["", f"Note: {result['note']}."]
    return "\n".join(lines)


def plot(json_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(Path(json_path).read_text())
    rows = result["rows"]
    cases = sorted({(r["batch"], r["tokens"]) for r in rows}, key=lambda c: (c[1], c[0]))
    peers = peers_in_order(rows)
    base = {(r["batch"], r["tokens"]): r["ms"] for r in rows if r["peer"] == BASELINE}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(peers)
    for i, peer in enumerate(peers):
        mine = {(r["batch"], r["tokens"]): r["ms"] for r in rows if r["peer"] == peer}
        speedups = [base[c] / mine[c] if c in mine and c in base else 0 for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], speedups, width, label=peer)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"batch {b}, {t} token{'s' if t > 1 else ''}" for b, t in cases])
    ax.set_ylabel(f"speed-up over {BASELINE}")
    ax.set_title(f"Decode step, 16 Llama-3-8B layers (linears), {result['device']}, torch {result['torch']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(json_path).with_suffix(".png"), dpi=120)
    Path(json_path).with_suffix(".md").write_text(summary(result) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU: a check, not a measurement")
    parser.add_argument("--peers", nargs="*", default=PEERS)
    parser.add_argument("--out", default="bench/results/e2e-h100.json")
    parser.add_argument("--plot", metavar="JSON", help="only plot an existing result")
    parser.add_argument("--cases", nargs="*", choices=["batch1", "batch16", "prefill"],
                        default=["batch1", "batch16", "prefill"], help="which calls to measure, in this order")
    parser.add_argument("--profile", action="store_true",
                        help="also record, per case, the GPU time of each kernel of a step (GPU only)")
    parser.add_argument("--isolate", action="store_true",
                        help="each peer in a process of its own, with empty compile caches (first calls)")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot)
        return
    if args.profile and (args.tiny or not torch.cuda.is_available()):
        parser.error("--profile times CUDA kernels: it needs a GPU and the full shapes (no --tiny)")
    shape, device, prefill = ("tiny", "cpu", 64) if args.tiny else ("llama3-8b", "cuda", 2048)
    if args.isolate:
        if args.profile:
            parser.error("--profile runs in one process: leave out --isolate")
        print(summary(measure_isolated(args.peers, args.cases, args.out, args.tiny)))
        return
    cases = {"batch1": (1, 1), "batch16": (16, 1), "prefill": (1, prefill)}
    print(summary(measure(shape, device, args.peers, [cases[c] for c in args.cases], args.out, args.profile)))


if __name__ == "__main__":
    main()
