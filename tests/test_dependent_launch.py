"""Programmatic dependent launch of the W4A16 GEMV (``kernels.common.dependent_launch``): launched eagerly on
Hopper, the GEMV starts while the kernel before it finishes, loads its first weights, and waits for that kernel
before it reads anything the kernel may have written. Traced (torch.compile) it runs without."""

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from qpass.kernels import w4a16
from test_kernels import compiled_for_sm90, cuda, make_w4, needs_cuda, norm_and_residual, relative_error

# The GEMV's PTX and SASS for sm_90 with PDL, at the decode step's picks: where its loads are against the wait.
_LOADS_AROUND_THE_WAIT = r"""
import json

out = {}
for dtype in ("fp16", "bf16"):
    for N, K, activation, norm in [(6144, 4096, "none", True), (28672, 4096, "silu_mul", True),
                                   (4096, 14336, "none", False)]:
        kernel = w4a16_gemv_sm90(dtype, N, K, activation, norm, bias=not norm, pdl=True)
        out[f"{dtype} {K}x{N} {activation} norm={norm}"] = dict(
            ptx=[line.strip() for line in kernel.asm["ptx"].splitlines()],
            sass=[line.split("*/")[1].split(";")[0].strip() for line in sass(kernel)])
print(json.dumps(out))
"""


def test_gemv_reads_only_weights_before_it_waits_for_the_kernel_before_it():
    """Compiled for sm_90 with PDL (fp16 and bf16; the RMSNorm, silu_mul and residual epilogues): the kernel
    lets the next one start before any load, waits once, and loads x (its inline-asm loads, coherent, no
    ``.nc``) only after the wait. The packed paths load their first step's words before it, except fp16 with
    the norm, whose 1 / rms reads x first. In the SASS ptxas keeps exactly those loads above the wait."""
    cases = json.loads(compiled_for_sm90(_LOADS_AROUND_THE_WAIT).strip().splitlines()[-1])
    assert len(cases) == 6
    for case, code in cases.items():
        ptx = [line for line in code["ptx"] if line and not line.startswith(("//", "."))]
        trigger = [i for i, line in enumerate(ptx) if "griddepcontrol.launch_dependents" in line]
        wait = [i for i, line in enumerate(ptx) if "griddepcontrol.wait" in line]
        loads = [i for i, line in enumerate(ptx) for _ in range(line.count("ld.global"))]
        x_loads = [i for i, line in enumerate(ptx) if ".v4.b32 {a, b, c, d}" in line]  # (the asm's registers)
        assert len(trigger) == 1 and len(wait) == 1 and trigger[0] < loads[0], case
        assert x_loads and min(x_loads) > wait[0], case
        assert not any("ld.global.nc.v4.b32 {a, b, c, d}" in ptx[i] for i in x_loads), case
        early = [i for i in loads if i < wait[0]]
        assert bool(early) == (not case.startswith("fp16") or "norm=False" in case), case
        sass = code["sass"]
        preexit, acqbulk = sass.index("PREEXIT"), sass.index("ACQBULK")
        early_sass = [line for line in sass[:acqbulk] if line.startswith("LDG")]
        assert preexit < acqbulk and len(early_sass) == len(early), (case, early_sass)
        assert not any("CONSTANT" in line for line in early_sass), case  # the words: Triton's coherent loads


def test_no_dependent_launch_where_traced_or_off_a_gpu():
    """torch.compile drops a user kernel's launch options (Triton's launch_pdl), so a traced launch (x a fake
    tensor, on "cuda" too) asks for no PDL; nor does one on the CPU."""
    with FakeTensorMode():
        traced = torch.empty(2, 8, device="cuda")
    assert w4a16.dependent_launch(traced) == {"PDL": False}
    assert w4a16.dependent_launch(torch.empty(2, 8)) == {"PDL": False}


def _decode_layers(dtype, layers=3, hidden=1024, qkv=1536, intermediate=2048):
    """Int4 weights of a few Llama-style layers (group 128) and their norms, for the ops as the lowering calls
    them."""
    made = []
    for i in range(layers):
        made.append(dict(qkv=make_w4(1, qkv, hidden, 128, dtype, False, False, 10 * i)[1:4],
                         o=make_w4(1, hidden, hidden, 128, dtype, False, False, 10 * i + 1)[1:4],
                         gate_up=make_w4(1, 2 * intermediate, hidden, 128, dtype, False, False, 10 * i + 2)[1:4],
                         down=make_w4(1, hidden, intermediate, 128, dtype, False, False, 10 * i + 3)[1:4],
                         norm1=norm_and_residual(1, 1, hidden, dtype, 10 * i)[0],
                         norm2=norm_and_residual(1, 1, hidden, dtype, 10 * i + 1)[0]))
    return made


def _decode_step(layers, x, synchronize=False):
    """Each op reads the output of the one before it: the chain programmatic dependent launch overlaps
    (``synchronize``: not, each op waited for)."""
    done = torch.cuda.synchronize if synchronize else (lambda: None)
    h = x
    for L in layers:
        qkv = w4a16.w4a16_linear(h, *L["qkv"], 128, norm_weight=L["norm1"], norm_eps=1e-5)
        done()
        o = w4a16.w4a16_linear(qkv[:, :h.shape[1]], *L["o"], 128, bias=h)
        done()
        m = w4a16.w4a16_linear(o, *L["gate_up"], 128, activation="silu_mul", norm_weight=L["norm2"], norm_eps=1e-5)
        done()
        h = w4a16.w4a16_linear(m, *L["down"], 128, bias=o)
        done()
    return h


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_gemv_chain_with_dependent_launch_reads_what_the_kernel_before_wrote(dtype, monkeypatch):
    """A decode step's chain of GEMVs (norm, residual, silu_mul) with PDL, its kernels overlapping (queued behind
    a long kernel, and replayed from a CUDA graph with new inputs), gives bitwise what the same kernels give one
    at a time (a synchronization after each); and the chain without PDL within rounding (the two compilations
    may round differently: a kernel reading stale inputs would be off by far more)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    layers = _decode_layers(dtype)
    assert isinstance(w4a16.pick_config(1, 1536, 1024, 128, torch.device("cuda"), dtype=dtype), w4a16.GemvConfig)
    inputs = [torch.randn(1, 1024, device="cuda", dtype=dtype) for _ in range(4)]
    assert w4a16.dependent_launch(inputs[0]) == {"PDL": True, "launch_pdl": True}
    one_at_a_time = [_decode_step(layers, x, synchronize=True) for x in inputs]
    torch.cuda._sleep(20_000_000)  # the launches below queue behind it and run back to back
    queued = [_decode_step(layers, x) for x in inputs]
    static_x = inputs[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _decode_step(layers, static_x)
    replayed = []
    for x in inputs * 2:
        static_x.copy_(x)
        graph.replay()
        replayed.append(static_out.clone())
    for want, got in zip(one_at_a_time * 3, queued + replayed):
        assert torch.isfinite(want).all() and want.abs().max() > 0
        assert torch.equal(got, want)
    monkeypatch.setattr(w4a16, "dependent_launch", lambda x: {"PDL": False})
    for x, want in zip(inputs, one_at_a_time):
        assert relative_error(want, _decode_step(layers, x)) < 1e-2
