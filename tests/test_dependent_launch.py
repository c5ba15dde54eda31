"""Programmatic dependent launch of the W4A16 GEMV (``kernels.common.dependent_launch``): launched eagerly on
Hopper, the GEMV starts while the kernel before it finishes, loads its first weights, and waits for that kernel
before it reads anything the kernel may have written. Traced (torch.compile) the same: Inductor's code launches
it so, and compiles it with its register budget as eager launches do (``qpass.inductor_launch``), and torch's
analysis of what it writes sees past its wait."""

import inspect
import json
import subprocess
import sys
import types

import pytest
import torch
from torch._inductor.codegen.wrapper import PythonWrapperCodegen
from torch._subclasses.fake_tensor import FakeTensorMode

from qpass import inductor_launch
from qpass.kernels import common, w4a16
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
    the norm, whose 1 / rms reads x first. In the SASS ptxas keeps those loads above the wait, and may move
    up read-only loads, which under PDL are the norm weight's only."""
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
        # ptxas may move read-only loads (.nc; CONSTANT in the SASS) above the wait: the norm weight's only
        nc = [line for line in ptx if "ld.global.nc" in line]
        assert all("ld.global.nc.v4.b32 {e, f, g, h}" in line for line in nc) and bool(nc) == ("norm=True" in case)
        sass = code["sass"]
        preexit, acqbulk = sass.index("PREEXIT"), sass.index("ACQBULK")
        early_sass = [line for line in sass[:acqbulk] if line.startswith("LDG")]
        coherent = [line for line in early_sass if "CONSTANT" not in line]  # the words: Triton's coherent loads
        assert preexit < acqbulk and len(coherent) == len(early), (case, early_sass)
        assert len(early_sass) == len(coherent) or nc, (case, early_sass)


# The warp-level MMA kernel's and the RMSNorm kernel's PTX and SASS for sm_90 with PDL: the decode step's ops at
# 16 rows (split K for down) and gate_up at 8 (ptxas's own register choice)
_WARP_MMA_AND_NORM_AROUND_THE_WAIT = r"""
import json
from qpass.kernels import common, w4a16

def lines(kernel):
    return dict(ptx=[line.strip() for line in kernel.asm["ptx"].splitlines()],
                sass=[line.split("*/")[1].split(";")[0].strip() for line in sass(kernel)])

out = {}
for dtype in ("fp16", "bf16"):
    for M, N, K, activation, bias in [(16, 6144, 4096, "none", False), (16, 4096, 4096, "none", True),
                                      (16, 28672, 4096, "silu_mul", False), (16, 4096, 14336, "none", True),
                                      (8, 28672, 4096, "silu_mul", False)]:
        out[f"mma {dtype} {M} {K}x{N} {activation}"] = lines(
            w4a16_warp_mma_sm90(dtype, M, N, K, activation, bias, pdl=True))
    pointers = {"x_ptr": "*" + dtype, "g_ptr": "*" + dtype, "out_ptr": "*" + dtype, "eps": "fp32"}
    out[f"norm {dtype}"] = lines(compiled(w4a16.rms_norm_kernel, pointers,
                                          dict(BLOCK_K=4096, ONE_PASS=True, PDL=True, stride_xk=1), num_warps=8))
out["zero"] = lines(compiled(common.zero_kernel, {"ptr": "*fp32"}, dict(BLOCK=1024, PDL=True), num_warps=4))
out["split total"] = lines(compiled(common.split_total_kernel, {"ws_ptr": "*fp32", "b_ptr": "*bf16",
                                                                "out_ptr": "*bf16"},
                                    dict(BLOCK=1024, HAS_BIAS=True, PDL=True), num_warps=4))
print(json.dumps(out))
"""


def test_warp_mma_norm_and_zero_kernels_read_only_weights_before_they_wait_for_the_kernel_before():
    """Compiled for sm_90 with PDL: the warp-level MMA kernel lets the next kernel start before any load, loads
    its first group's words, zeros and scales (coherent: ptxas would sink read-only loads below the wait), waits
    once, and only then loads x (coherent); ptxas keeps exactly those 12 loads above the wait. The RMSNorm kernel
    loads its weight before the wait and x after it, both vectorized (the wait's 0 goes on the row, not the
    pointer); ptxas keeps the weight's loads above the wait.
    The split-K workspace's zero kernel writes only after the wait, and the kernel that finishes a split into it
    reads and writes only after it, its zeros after a CTA barrier that follows its reads of the sums."""
    cases = json.loads(compiled_for_sm90(_WARP_MMA_AND_NORM_AROUND_THE_WAIT).strip().splitlines()[-1])
    assert len(cases) == 14
    for case, code in cases.items():
        ptx = [line for line in code["ptx"] if line and not line.startswith(("//", "."))]
        trigger = [i for i, line in enumerate(ptx) if "griddepcontrol.launch_dependents" in line]
        wait = [i for i, line in enumerate(ptx) if "griddepcontrol.wait" in line]
        memory = [i for i, line in enumerate(ptx)
                  if line.lstrip("@%p0123456789! ").startswith(("ld.global", "st.global"))]  # (past a predicate)
        assert len(trigger) == 1 and len(wait) == 1 and trigger[0] < memory[0], case
        sass = code["sass"]
        preexit, acqbulk = sass.index("PREEXIT"), sass.index("ACQBULK")
        early_sass = [line for line in sass[:acqbulk] if "LDG" in line or "STG" in line]
        assert preexit < acqbulk, case
        loads = [i for i in memory if "ld.global" in ptx[i]]
        if case in ("zero", "split total"):
            assert bool(loads) == (case == "split total") and not early_sass and memory[0] > wait[0], case
            if case == "split total":  # the sums are all read before any thread writes zeros over them
                barrier = [i for i, line in enumerate(ptx) if line.startswith("bar.sync")]
                stores = [i for i in memory if "st.global" in ptx[i]]
                assert len(barrier) == 1 and loads[0] < barrier[0] < stores[0], case
            continue
        if case.startswith("norm"):  # g's loads, then the wait, then x's
            early = [i for i in loads if i < wait[0]]
            assert early and len(loads) == 2 * len(early), case
            assert all(ptx[i].lstrip("@%p0123456789! ").startswith("ld.global.v4.b32") for i in loads), case
            assert len(early_sass) == len(early) and all("LDG.E.128" in line for line in early_sass), case
            continue
        early = [ptx[i] for i in loads if i < wait[0]]
        x_loads = [i for i, line in enumerate(ptx) if line.startswith("ld.global.v4.b32")]
        # (the words 4 or 2 columns a load, the zeros and scales 4 or 2: 16 or 8 bytes, 8 or 4 with 32 columns a warp)
        assert len(early) == 12 and all(line.startswith(("ld.global.L1::no_allocate.v4.b32", "ld.global.v2.b32",
                                                         "ld.global.L1::no_allocate.v2.b32", "ld.global.b32"))
                                        for line in early), case
        assert x_loads and min(x_loads) > wait[0], case
        assert not [line for line in ptx if line.startswith("ld.global.nc.v4.b32")], case  # x never read-only
        assert len(early_sass) == 12 and not [line for line in early_sass if "CONSTANT" in line], (case, early_sass)


def test_dependent_launch_on_hopper_traced_or_not_and_nowhere_else(monkeypatch):
    """Eager and traced launches (x a fake tensor) on sm_90 and later ask for PDL; older GPUs, the CPU and the
    interpreter do not."""
    monkeypatch.setattr(common, "triton_interpreted", lambda: False)
    with FakeTensorMode():
        traced = torch.empty(2, 8, device="cuda")
    for capability, pdl in [((9, 0), True), ((10, 0), True), ((8, 9), False)]:
        monkeypatch.setattr(common, "capability", lambda device: capability)
        assert w4a16.dependent_launch(traced) == ({"PDL": True, "launch_pdl": True} if pdl else {"PDL": False})
    assert w4a16.dependent_launch(torch.empty(2, 8)) == {"PDL": False}
    monkeypatch.setattr(common, "triton_interpreted", lambda: True)
    assert w4a16.dependent_launch(traced) == {"PDL": False}


# torch's analysis of kernels traced with PDL, compiled for sm_90: what they write. The GEMV (bf16, the norm and a
# residual), the warp-level MMA kernel with K split (its workspace written too) and the RMSNorm kernel.
_WRITES_OF_PDL_KERNELS = r"""
import json, types
import torch
from torch._higher_order_ops import triton_kernel_wrap
from triton.runtime import driver
from qpass.kernels import w4a16

driver.set_active(types.SimpleNamespace(get_current_target=lambda: GPUTarget("cuda", 90, 32)))
tensor = lambda dtype=torch.bfloat16: torch.empty(2, dtype=dtype)
gemv = dict({p: tensor() for p in ("x_ptr", "g_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr")},
            qw_ptr=tensor(torch.int32), ws_ptr=tensor(torch.float32), M=1, N_OUT=4096, N_UP=0, K=4096,
            norm_eps=1e-5, stride_xm=4096, stride_xk=1, stride_qk=64, stride_qn=1, stride_qt=512 * 64, stride_sg=4096,
            stride_sn=1, stride_bm=4096, stride_om=4096, stride_on=1, stride_wm=4096, TILE=64, GROUP_SIZE=128,
            GROUP_ROWS=16, GROUPS=2, BLOCK_N=64, SPLIT_K=1, EVEN_N=True, EVEN_K=True, HAS_BIAS=True,
            ACTIVATION="none", PACKED_F16=False, PACKED_BF16=True, HAS_NORM=True, NORM_BLOCK=4096,
            UNROLLED_STEPS=4, PDL=True, MAXNREG=64, UP_RUN=0, GROUPS_FIRST=False)
# down's warp-level MMA at 16 rows: split 4, its loop's body twice an iteration
mma = dict({p: tensor() for p in ("x_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr")}, qw_ptr=tensor(torch.int32),
           ws_ptr=tensor(torch.float32), M=16, N_OUT=4096, N_UP=0, K=14336, stride_xm=14336, stride_qk=64,
           stride_qt=1792 * 64, stride_sg=4096, stride_bm=4096, stride_om=4096, stride_on=1, stride_wm=4096, TILE=64,
           GROUP_SIZE=128, M_TILES=2, WARPS=4, COLUMN_WARPS=1, SPLIT_K=4, HAS_BIAS=True, ACTIVATION="none", BF16=True,
           UNROLLED_ITERS=0, UP_RUN=0, MAXNREG=232, PDL=True, PREFETCH_GROUPS=1, LOOP_UNROLL=2, BLOCKS=4)
norm = dict(x_ptr=tensor(), g_ptr=tensor(), out_ptr=tensor(), K=4096, stride_xm=4096, stride_xk=1, stride_om=4096,
            eps=1e-5, BLOCK_K=4096, ONE_PASS=True, PDL=True)
name = next(n for n in ("identify_accessed_tensors", "identify_mutated_tensors") if hasattr(triton_kernel_wrap, n))
# gate_up's warp-level MMA at 16 rows: two warps a column block, unsplit, its sums through shared memory
mma_pairs = dict(mma, N_OUT=14336, N_UP=14336, K=4096, stride_xm=4096, stride_qk=64, stride_qt=512 * 64,
                 stride_sg=28672, COLUMN_WARPS=2, SPLIT_K=1, ACTIVATION="silu_mul", UP_RUN=16, MAXNREG=232,
                 LOOP_UNROLL=1)
written = {}
for label, kernel, arguments, warps in [
        ("w4a16_gemv_kernel", w4a16.w4a16_gemv_kernel, gemv, 4),
        ("w4a16_warp_mma_kernel", w4a16.w4a16_warp_mma_kernel, mma, 4),
        ("w4a16_warp_mma_kernel, two warps a block", w4a16.w4a16_warp_mma_kernel, mma_pairs, 4),
        ("rms_norm_kernel", w4a16.rms_norm_kernel, norm, 8)]:
    launch = triton.autotune(configs=[triton.Config({}, num_warps=warps)], key=[])(kernel)
    analysis = getattr(triton_kernel_wrap, name)(launch, arguments, {})
    written[label] = sorted(analysis if isinstance(analysis, list)
                            else [dep.name for dep in analysis.read_writes.writes])
print(json.dumps(written))
"""


def test_torch_analysis_of_traced_pdl_kernels_finds_only_their_outputs_written():
    """torch's analysis of which tensors a kernel writes (on its Triton IR) takes every tensor argument for
    written where it meets inline asm with side effects, as the PDL wait and trigger and the bulk prefetch into L2
    are; through qpass it sees the kernels without them: traced with PDL (the words in column tiles, pulled into L2
    ahead), each writes its output only (and its split-K workspace); the warp-level MMA kernel's warps add their
    sums through shared memory by pure inline asm, which the analysis passes over."""
    assert json.loads(compiled_for_sm90(_WRITES_OF_PDL_KERNELS).strip().splitlines()[-1]) == {
        "w4a16_gemv_kernel": ["out_ptr"], "w4a16_warp_mma_kernel": ["out_ptr", "ws_ptr"],
        "w4a16_warp_mma_kernel, two warps a block": ["out_ptr"], "rms_norm_kernel": ["out_ptr"]}


class _Wrapper:
    """Inductor's wrapper code generation as the hook sees it: ``define_kernel`` takes a kernel's module text."""

    def __init__(self):
        self.modules = []

    def define_kernel(self, name, kernel_module, metadata=None):
        self.modules.append(kernel_module)


# The user kernel's compile call as Inductor's wrapper writes it (a part)
_USER_KERNEL_MODULE = """async_compile.triton('w4a16_gemv_kernel_0', '''
@triton_heuristics.user_autotune(
    configs=[{'num_warps': 4, 'num_stages': 3}],
    inductor_meta={'kernel_name': 'w4a16_gemv_kernel_0'},
    triton_meta={'signature': {'x_ptr': '*bf16'}, 'constants': {'PDL': True}},
    filename=__file__,
    custom_kernel=True,
)
@triton.jit
''', device_str='cuda')"""


def _define_user_kernel(self, kernel, configs, kwargs, restore_value_args, reset_to_zero_args, grids,
                        epilogue_fusion):
    """A stand-in of Inductor's ``define_user_defined_triton_kernel``: the same parameters, one module written."""
    self.define_kernel("w4a16_gemv_kernel_0", _USER_KERNEL_MODULE, "# Original path: w4a16_gemv.py")
    if kwargs.get("fail"):
        raise RuntimeError("codegen failed")
    return "w4a16_gemv_kernel_0"


def test_inductor_code_launches_the_gemv_with_its_options_where_traced_with_them():
    """The GEMV traced with a true PDL gets ``'launch_pdl': True`` in the triton_meta of Inductor's code, with a
    MAXNREG above 0 ``'maxnreg'`` and an import of qpass before the decorator that compiles it; other kernels
    and the GEMV traced without them get Inductor's code unchanged; the wrapper's own ``define_kernel`` is back
    afterwards, after an error too."""
    define = inductor_launch._with_kernel_launch_options(_define_user_kernel, {id(w4a16.w4a16_gemv_kernel)})
    wrapper = _Wrapper()
    gemv, other = w4a16.w4a16_gemv_kernel, w4a16._w4a16_mma_kernel
    cases = [((gemv, {"PDL": True, "MAXNREG": 0}), "'launch_pdl': True, "),
             ((gemv, {"PDL": 1}), "'launch_pdl': True, "),
             ((gemv, {"PDL": True, "MAXNREG": 72}), "'launch_pdl': True, 'maxnreg': 72, "),
             ((gemv, {"PDL": False, "MAXNREG": 64}), "'maxnreg': 64, "),
             ((gemv, {"PDL": False, "MAXNREG": 0}), ""), ((gemv, {"MAXNREG": True}), ""), ((gemv, {}), ""),
             ((other, {"PDL": True, "MAXNREG": 64}), "")]
    for (kernel, kwargs), _ in cases:
        assert define(wrapper, kernel, [], kwargs, [], [], [[1, 1, 1]], None) == "w4a16_gemv_kernel_0"
    for module, (_, options) in zip(wrapper.modules, cases):
        imported = "maxnreg" in options
        assert module == _USER_KERNEL_MODULE.replace("triton_meta={", "triton_meta={" + options).replace(
            "@triton_heuristics", "import qpass\n@triton_heuristics" if imported else "@triton_heuristics")
    with pytest.raises(RuntimeError, match="codegen failed"):
        define(wrapper, gemv, [], {"PDL": True, "fail": True}, [], [], [[1, 1, 1]], None)
    assert "define_kernel" not in vars(wrapper)
    with pytest.warns(UserWarning) as warned:
        assert inductor_launch.with_launch_options("no meta", "k", {"launch_pdl": True, "maxnreg": 64}) == "no meta"
    assert [str(w.message).split("; ")[1] for w in warned] == [
        "the kernel runs without launch_pdl and maxnreg (slower)",
        "the kernel runs without its register budget (slower)"]


def test_inductor_compiles_with_the_maxnreg_of_a_kernels_triton_meta_on_cuda():
    """Inductor's compile options for a user kernel (this torch's ``CachingAutotuner._create_compile_options``,
    from the compile metadata it copies from the kernel's triton_meta) take ``maxnreg`` from it through qpass,
    on CUDA only; kernels without one, as Inductor's own, compile as before."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    create = CachingAutotuner._create_compile_options
    assert create.qpass_takes_maxnreg
    assert "compile_meta = copy.deepcopy(self.triton_meta)" in inspect.getsource(CachingAutotuner._create_compile_meta)
    assert "self._create_compile_options(cfg, compile_meta)" in inspect.getsource(CachingAutotuner._precompile_config)
    meta = {"num_warps": 4, "num_stages": 3, "debug": False}
    on = {kind: types.SimpleNamespace(device_props=types.SimpleNamespace(type=kind)) for kind in ("cuda", "hip")}
    options = create(on["cuda"], None, {**meta, "maxnreg": 72, "launch_pdl": True})
    assert options["maxnreg"] == 72 and options["launch_pdl"] and options["num_warps"] == 4
    assert "maxnreg" not in create(on["cuda"], None, meta)
    assert "maxnreg" not in create(on["hip"], None, {**meta, "maxnreg": 72})


def test_import_hooks_inductor_where_its_code_writes_a_user_kernels_triton_meta():
    """qpass's import wraps Inductor's code generation of user kernels for the GEMV, and this torch's version
    of it writes the triton_meta that the hook adds to and the decorator it puts the import before, once each,
    with the parameters the hook reads."""
    define = PythonWrapperCodegen.define_user_defined_triton_kernel
    assert {id(k) for k in (w4a16.w4a16_gemv_kernel, w4a16.w4a16_warp_mma_kernel, w4a16.rms_norm_kernel)} <= (
        define.qpass_kernel_ids)
    source = inspect.getsource(define.__wrapped__)
    assert source.count("triton_meta={triton_meta!r}") == 1
    assert source.count("@triton_heuristics.user_autotune(") == 1
    assert {"kernel", "kwargs"} <= set(inspect.signature(define.__wrapped__).parameters)


def test_a_process_that_runs_inductors_code_for_the_gemv_compiles_with_maxnreg():
    """Inductor's compile workers run a kernel's module text in processes of their own: the ``import qpass``
    the hook puts there is enough to have their compile options take ``maxnreg``."""
    script = ("import torch._inductor.runtime.triton_heuristics as heuristics\n"
              "assert not hasattr(heuristics.CachingAutotuner._create_compile_options, 'qpass_takes_maxnreg')\n"
              "import qpass\n"
              "assert heuristics.CachingAutotuner._create_compile_options.qpass_takes_maxnreg\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


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


# gate and up in alternating runs of 16 columns, as the methods lay them out (``qpass.methods.base``)
GATE_UP_RUN = 16


def _decode_step(layers, x, synchronize=False, linear=w4a16.w4a16_linear):
    """Each op reads the output of the one before it: the chain programmatic dependent launch overlaps
    (``synchronize``: not, each op waited for). ``linear``: the kernels' entry point, or the op."""
    done = torch.cuda.synchronize if synchronize else (lambda: None)
    h = x
    for L in layers:
        qkv = linear(h, *L["qkv"], 128, norm_weight=L["norm1"], norm_eps=1e-5)
        done()
        o = linear(qkv[:, :h.shape[1]], *L["o"], 128, bias=h)
        done()
        m = linear(o, *L["gate_up"], 128, activation="silu_mul", norm_weight=L["norm2"], norm_eps=1e-5,
                   up_run=GATE_UP_RUN)
        done()
        h = linear(m, *L["down"], 128, bias=o)
        done()
    return h


def _step_picks(layers, rows, dtype):
    """The kernel configs that ``w4a16.pick_config`` gives the decode step's four ops at ``rows`` rows."""
    picks = []
    for op in ("qkv", "o", "gate_up", "down"):
        K, N = layers[0][op][0].shape[0] * 8, layers[0][op][0].shape[1]
        picks.append(w4a16.pick_config(rows, N // 2 if op == "gate_up" else N, K, 128, torch.device("cuda"),
                                       activation="silu_mul" if op == "gate_up" else "none", dtype=dtype,
                                       norm=op in ("qkv", "gate_up")))
    return picks


@cuda
@needs_cuda
@pytest.mark.parametrize("rows", [1, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_decode_chain_with_dependent_launch_reads_what_the_kernel_before_wrote(dtype, rows, monkeypatch):
    """A decode step's chain of ops (norm, residual, silu_mul) with PDL: GEMVs at one row; at 8 and 16 the
    RMSNorm kernel and the warp-level MMA kernel (K split at 8 rows, into the workspace kept between calls). Its
    kernels overlapping (queued behind a long kernel, and replayed from a CUDA graph with new inputs), it gives
    bitwise what the same kernels give one at a time (a synchronization after each); and the chain without PDL
    within rounding (the two compilations may round differently: a kernel reading stale inputs would be off by
    far more)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    layers = _decode_layers(dtype)
    picks = _step_picks(layers, rows, dtype)
    kernel = w4a16.GemvConfig if rows == 1 else w4a16.WarpMmaConfig
    assert all(isinstance(cfg, kernel) for cfg in picks), picks
    assert rows != 8 or any(cfg.split_k > 1 for cfg in picks), picks
    inputs = [torch.randn(rows, 1024, device="cuda", dtype=dtype) for _ in range(4)]
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
    # Split more than twice, K's partial sums are added in the order the programs arrive: rounding may differ
    deterministic = all(getattr(cfg, "split_k", 1) <= 2 for cfg in picks)
    for want, got in zip(one_at_a_time * 3, queued + replayed):
        assert torch.isfinite(want).all() and want.abs().max() > 0
        assert torch.equal(got, want) if deterministic else relative_error(want, got) < 1e-2
    monkeypatch.setattr(w4a16, "dependent_launch", lambda x: {"PDL": False})
    for x, want in zip(inputs, one_at_a_time):
        assert relative_error(want, _decode_step(layers, x)) < 1e-2


@cuda
@needs_cuda
@pytest.mark.parametrize("rows, pdl_kernels", [(1, ("w4a16_gemv_kernel",)), (8, ()),
                                               (16, ("w4a16_warp_mma_kernel", "rms_norm_kernel"))])
def test_gpu_compiled_decode_chain_is_launched_with_dependent_launch_and_register_budgets(rows, pdl_kernels,
                                                                                          monkeypatch):
    """torch.compile of the decode step's chain of ops (CUDA graphs, "reduce-overhead"), compiled in Inductor's
    worker processes: Inductor's code compiles each of the chain's kernels (the GEMV at one row; the RMSNorm and
    warp-level MMA kernels at 16) with launch_pdl, and each linear with the pick's register budget (Triton
    compiled it with that maxnreg); a linear whose kernel splits K (all of them at 8 rows) is a call of
    ``qpass::w4a16_linear_split_k``, which launches its kernels as eager calls do, into the workspace kept between
    calls, with no zero kernel. Nothing is copied for want of knowing what a kernel writes (no CUDA graph is
    skipped), and the replays give bitwise what the kernels give eagerly, one at a time (within rounding where K
    is split more than twice: the partial sums are added in the order the programs arrive)."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90")
    from torch._dynamo.utils import counters
    from torch._inductor.async_compile import AsyncCompile
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    from torch._inductor.utils import run_and_get_code

    layers = _decode_layers(torch.bfloat16)
    inputs = [torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    picks = _step_picks(layers, rows, torch.bfloat16)
    assert 0 not in {cfg.maxnreg for cfg in picks}
    split = [cfg for cfg in picks if cfg.split_k > 1]
    assert (len(split) == len(picks)) if rows == 8 else not split, picks
    budgets = {cfg.maxnreg for cfg in picks if cfg.split_k == 1}  # (the split ones: the op's, not Inductor's)
    same = torch.equal if all(cfg.split_k <= 2 for cfg in picks) else (lambda a, b: relative_error(a, b) < 1e-2)
    eager = [_decode_step(layers, x, synchronize=True) for x in inputs]
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(lambda x: _decode_step(layers, x, linear=torch.ops.qpass.w4a16_linear),
                         mode="reduce-overhead", fullgraph=True)
    ran, run = {}, CachingAutotuner.run  # the compiled kernels, as Inductor's code runs them

    def recording_run(self, *args, **kwargs):
        ran[id(self)] = self
        return run(self, *args, **kwargs)

    monkeypatch.setattr(CachingAutotuner, "run", recording_run)
    # (store_cubin: the launchers keep Triton's compiled kernel, whose metadata has the options it was compiled with)
    with torch._inductor.config.patch({"compile_threads": 2, "force_disable_caches": True, "triton.store_cubin": True}):
        AsyncCompile.use_process_pool()  # (starts the workers)
        AsyncCompile.wait_pool_ready()
        assert AsyncCompile.use_process_pool(), "Inductor's compile workers are not running"
        first, code = run_and_get_code(step, inputs[0])
    assert same(first, eager[0])
    # (Inductor's code compiles each kernel in a block that starts with its name)
    blocks = {name: [block for block in "".join(code).split("async_compile.triton(")[1:]
                     if block.startswith(f"'{name}")] for name in pdl_kernels}
    assert all(blocks.values()), {name: len(found) for name, found in blocks.items()}
    assert all("triton_meta={'launch_pdl': True, " in block for found in blocks.values() for block in found)
    unbudgeted = [block[:2000] for block in (blocks[pdl_kernels[0]] if pdl_kernels else [])  # (the linear's)
                  if "'maxnreg': " not in block or "import qpass\n@triton_heuristics.user_autotune(" not in block]
    assert not unbudgeted, unbudgeted
    code = "".join(code)
    assert code.count("torch.ops.qpass.w4a16_linear_split_k.default(") == (4 * len(layers) if split else 0)
    assert "zero_kernel" not in code and (not split or "w4a16_warp_mma_kernel" not in code)
    compiled = [kernel for kernel in ran.values() if kernel.triton_meta.get("maxnreg")]
    assert {kernel.triton_meta["maxnreg"] for kernel in compiled} == budgets, (len(ran), budgets)
    for kernel in compiled:
        for launcher in kernel.launchers:
            assert launcher.bin.metadata.maxnreg == kernel.triton_meta["maxnreg"] >= launcher.n_regs
    for _ in range(2):
        for x, want in zip(inputs, eager):
            assert same(step(x).clone(), want)
    assert not counters["inductor"]["cudagraph_skips"]


@cuda
@needs_cuda
def test_gpu_compiled_warp_mma_kernel_takes_its_register_budget():
    """Under torch.compile the warp-level MMA kernel (2 to 16 rows) is compiled with the pick's register budget
    (``w4a16.warp_mma_registers``) and gives bitwise what it gives eagerly."""
    from torch._inductor.utils import run_and_get_code

    x, qweight, scales, zeros, _ = make_w4(16, 6144, 4096, 128, torch.bfloat16, False, False, 0)
    budget = w4a16.pick_config(16, 6144, 4096, 128, x.device, dtype=torch.bfloat16).maxnreg
    assert budget > 0
    eager = w4a16.w4a16_linear(x, qweight, scales, zeros, 128)
    torch._dynamo.reset()
    linear = torch.compile(lambda x: torch.ops.qpass.w4a16_linear(x, qweight, scales, zeros, 128), fullgraph=True)
    with torch._inductor.config.patch({"force_disable_caches": True}):
        out, code = run_and_get_code(linear, x)
    assert torch.equal(out, eager)
    mmas = [block for block in "".join(code).split("async_compile.triton(")[1:]
            if block.startswith("'w4a16_warp_mma_kernel")]
    assert mmas and all(f"'maxnreg': {budget}" in block for block in mmas)
