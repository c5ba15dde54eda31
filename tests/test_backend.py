"""The ``qpass`` torch.compile backend: the rewritten Dynamo graph (snapshots), the entry
point with no import, recompiles, options and mode, quantized models under plain
torch.compile, and (on CUDA) the kernels a compiled decode layer launches."""

import functools
import operator
import subprocess
import sys
import textwrap
from typing import List

import pytest
import torch
import torch.nn.functional as F
from expecttest import TestCase
from torch import fx, nn

import qpass
from models import Block, RMSNorm, relative_error, seeded
from qpass.backend import qpass_backend, quantize_graph, taking_inputs
from qpass.layers.linear import QuantLinear


def normalised(gm: fx.GraphModule) -> str:
    """The graph with values numbered in order and ops by short name, so that it reads the
    same whatever names Dynamo gives its nodes in a torch version."""
    names = {}
    lines = []
    for node in gm.graph.nodes:
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: names[n])
        text = ", ".join([*map(repr, args[0]), *(f"{k}={v!r}" for k, v in args[1].items())]).replace("'", "")
        if node.op == "output":
            lines.append(f"return {text}")
            continue
        names[node] = name = f"v{len(names)}"
        if node.op == "placeholder":
            lines.append(f"{name} = input")
        elif node.op == "get_attr":
            lines.append(f"{name} = self.{node.target}")
        elif node.op == "call_module":
            stub = gm.get_submodule(node.target)
            fused = f", {stub.activation}" if stub.activation != "none" else ""
            lines.append(f"{name} = {node.target}({text})  # {type(stub.quant_method).__name__}{fused}")
        elif node.op == "call_method":
            receiver, _, rest = text.partition(", ")
            lines.append(f"{name} = {receiver}.{node.target}({rest})")
        else:
            target = "getitem" if node.target is operator.getitem else node.target.__name__
            lines.append(f"{name} = {target}({text})")
    return "\n".join(lines)


def capture(graphs, method="awq", **options):
    """A backend that runs the qpass rewrite and keeps the result, with no Inductor."""

    def compile_graph(gm, example_inputs):
        quantized, kept = quantize_graph(gm, example_inputs, method, **options)
        graphs.append(quantized)
        return taking_inputs(quantized.forward, kept)

    return compile_graph


def lowered_by_the_backend(qmodel: nn.Module) -> str:
    """The graph (``normalised``) the backend writes for a model quantized already, whose
    result on a batch of two rows must be the eager model's."""
    graphs = []
    x = torch.randn(2, 1, 256)
    try:
        with torch.no_grad():
            out = torch.compile(qmodel, backend=capture(graphs), fullgraph=True)(x)
            assert relative_error(out, qmodel(x)) == 0.0
    finally:
        torch._dynamo.reset()  # (Dynamo's caches of the model class would change how later tests trace it)
    return normalised(graphs[0])


class DecodeLayer(nn.Module):
    """The decode layer of the e2e benchmark, small: norm, qkv, o, norm, gate_up, SiLU*mul,
    down, residual adds (attention left out: o reads the q part)."""

    def __init__(self, dim=256, hidden=512):
        super().__init__()
        self.input_norm = RMSNorm(dim)
        self.qkv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.post_norm = RMSNorm(dim)
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        q = self.qkv_proj(self.input_norm(x))[..., : x.shape[-1]]
        x = x + self.o_proj(q)
        gate, up = self.gate_up_proj(self.post_norm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class GeluMLP(nn.Module):
    def __init__(self, dim=256, hidden=512):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class RewrittenGraphs(TestCase):
    def test_llama_block(self):
        graphs = []
        model = seeded(Block, 64, 4, 2, 128)
        x = torch.randn(2, 5, 64)
        with torch.no_grad():
            out = torch.compile(model, backend=capture(graphs, group_size=32), fullgraph=True)(x)
            self.assertEqual(relative_error(out, qpass.quantize(model, "awq", group_size=32)(x)), 0.0)
        self.assertExpectedInline(normalised(graphs[0]), """\
v0 = input
v1 = self.input_norm_weight
v2 = self.post_norm_weight
v3 = attn.q_proj_k_proj_v_proj(v0, norm_weight=v1, norm_eps=1e-06)  # AWQLinearMethod
v4 = split(v3, [64, 32, 32], dim=-1)
v5 = getitem(v4, 0)
v6 = getitem(v4, 1)
v7 = getitem(v4, 2)
v8 = v5.view(2, 5, 4, 16)
v9 = v8.transpose(1, 2)
v10 = v6.view(2, 5, 2, 16)
v11 = v10.transpose(1, 2)
v12 = v7.view(2, 5, 2, 16)
v13 = v12.transpose(1, 2)
v14 = scaled_dot_product_attention(v9, v11, v13, is_causal=True, enable_gqa=True)
v15 = v14.transpose(1, 2)
v16 = v15.reshape(2, 5, -1)
v17 = attn.o_proj(v16, residual=v0)  # AWQLinearMethod
v18 = mlp.gate_proj_up_proj(v17, norm_weight=v2, norm_eps=1e-06)  # AWQLinearMethod, silu_mul
v19 = mlp.down_proj(v18, residual=v17)  # AWQLinearMethod
return (v19,)""")

    def test_quantized_module_tree_is_lowered_not_quantized_again(self):
        """A model qpass.quantize kept as a module tree (merge=False here; a Hugging Face model
        always): Dynamo inlines its stubs into op calls, and the backend folds the norms, the
        residual adds and silu * up into those ops' arguments; the layer it skipped stays float."""
        qmodel = qpass.quantize(seeded(DecodeLayer), "awq", merge=False, skip=["o_proj"])
        self.assertExpectedInline(lowered_by_the_backend(qmodel), """\
v0 = input
v1 = self.input_norm_weight
v2 = self.qkv_proj_qweight
v3 = self.qkv_proj_scales
v4 = self.qkv_proj_zeros
v5 = self.o_proj_weight
v6 = self.post_norm_weight
v7 = self.gate_up_proj_qweight
v8 = self.gate_up_proj_scales
v9 = self.gate_up_proj_zeros
v10 = self.down_proj_qweight
v11 = self.down_proj_scales
v12 = self.down_proj_zeros
v13 = w4a16_linear(v0, v2, v3, v4, 128, None, none, v1, 1e-06, 0)
v14 = getitem(v13, (Ellipsis, slice(None, 256, None)))
v15 = linear(v14, v5, None)
v16 = add(v0, v15)
v17 = w4a16_linear(v16, v7, v8, v9, 128, None, silu_mul, v6, 1e-06, 0)
v18 = w4a16_linear(v17, v10, v11, v12, 128, v16, none, None, 0.0, 0)
return (v18,)""")

    def test_quantized_module_tree_ops_of_each_method_take_their_gelu(self):
        for method, op in (("int8", "w8a16_linear"), ("fp8", "fp8_linear"), ("gptq", "w4a16_linear")):
            graph = lowered_by_the_backend(qpass.quantize(seeded(GeluMLP), method, merge=False))
            calls = [line for line in graph.splitlines() if f" = {op}(" in line]
            self.assertEqual(len(calls), 2, method)
            self.assertTrue(", gelu" in calls[0] and ", none" in calls[1], calls)  # fc1's op computes it
            self.assertIn("add(v0", graph, method)  # fc2 has a bias: the residual add stays

    def test_quantized_module_tree_keeps_a_residual_that_broadcasts(self):
        class BroadcastResidual(nn.Module):
            def __init__(self):
                super().__init__()
                self.offset = nn.Parameter(torch.randn(256))
                self.fc = nn.Linear(256, 256, bias=False)

            def forward(self, x):
                return self.offset + self.fc(x)  # [256] + [2, 1, 256]: not the op's output shape

        graph = lowered_by_the_backend(qpass.quantize(seeded(BroadcastResidual), "awq", merge=False))
        self.assertExpectedInline(graph, """\
v0 = input
v1 = self.offset
v2 = self.fc_qweight
v3 = self.fc_scales
v4 = self.fc_zeros
v5 = w4a16_linear(v0, v2, v3, v4, 128, None, none, up_run=0)
v6 = add(v1, v5)
return (v6,)""")

    def test_skip_and_bias(self):
        graphs = []
        model = seeded(GeluMLP, 64, 128)
        with torch.no_grad():
            torch.compile(model, backend=capture(graphs, "int8", skip=["fc2"]), fullgraph=True)(torch.randn(3, 64))
        self.assertExpectedInline(normalised(graphs[0]), """\
v0 = input
v1 = fc1(v0)  # Int8LinearMethod, gelu
v2 = fc2(v1)  # UnquantizedLinearMethod
v3 = add(v0, v2)
return (v3,)""")
        self.assertIs(graphs[0].fc2.weight, model.fc2.weight)  # kept in float: shared, not copied

    def test_decode_layer_folds_silu_mul(self):
        """One gate_up linear split by ``chunk``: the stub computes silu(gate) * up itself."""
        graphs = []
        model = seeded(DecodeLayer, 64, 128)
        x = torch.randn(2, 3, 64)
        with torch.no_grad():
            out = torch.compile(model, backend=capture(graphs, group_size=32), fullgraph=True)(x)
            self.assertLess(relative_error(out, qpass.quantize(model, "awq", group_size=32, merge=False)(x)), 1e-6)
        self.assertExpectedInline(normalised(graphs[0]), """\
v0 = input
v1 = self.input_norm_weight
v2 = self.post_norm_weight
v3 = qkv_proj(v0, norm_weight=v1, norm_eps=1e-06)  # AWQLinearMethod
v4 = getitem(v3, (Ellipsis, slice(None, 64, None)))
v5 = o_proj(v4, residual=v0)  # AWQLinearMethod
v6 = gate_up_proj(v5, norm_weight=v2, norm_eps=1e-06)  # AWQLinearMethod, silu_mul
v7 = down_proj(v6, residual=v5)  # AWQLinearMethod
return (v7,)""")


def test_recompile_reuses_quantized_weights():
    graphs = []
    model = seeded(Block, 64, 4, 2, 128)
    compiled = torch.compile(model, backend=capture(graphs, group_size=32), fullgraph=True)
    with torch.no_grad():
        for batch, tokens in [(2, 5), (3, 7), (4, 9), (5, 3)]:
            compiled(torch.randn(batch, tokens, 64))
    assert len(graphs) == 2  # one static graph, then one dynamic in batch and sequence
    first, second = ([m for m in g.modules() if isinstance(m, QuantLinear)] for g in graphs)
    assert [id(m) for m in first] == [id(m) for m in second]


def test_free_float_weights():
    """``free_float_weights=True``: the replaced float weights lose their storage (shapes
    kept), what else the graph reads stays; recompiles reuse the stubs; a compile that
    would need the freed weights again says so."""
    torch._dynamo.reset()  # so that the first graph is static, the second dynamic
    graphs = []
    model = seeded(Block, 64, 4, 2, 128)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = qpass.quantize(model, "awq", group_size=32, skip=["o_proj"])(x)
        compiled = torch.compile(model, backend=capture(graphs, group_size=32, skip=["o_proj"], free_float_weights=True),
                                 fullgraph=True)
        assert relative_error(compiled(x), expected) == 0.0
        compiled(torch.randn(3, 7, 64))  # a recompile, from the cached stubs
    assert len(graphs) == 2
    freed = [model.attn.q_proj.weight, model.attn.k_proj.weight, model.mlp.gate_proj.weight, model.mlp.down_proj.weight]
    assert all(w.untyped_storage().nbytes() == 0 for w in freed)
    assert model.attn.o_proj.weight.untyped_storage().nbytes() > 0  # skipped: the float stub shares it
    assert model.input_norm.weight.untyped_storage().nbytes() > 0
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="free_float_weights=True"):
        torch.compile(model, backend=capture([], group_size=64), fullgraph=True)(x)


def kernel_paths(batches, shapes, device) -> int:
    """How many different kernel choices the W4A16 op makes over ``batches`` (one token
    each) for linears of ``shapes`` (K, N): each is a branch on M that a dynamic graph
    guards on. The CPU reference has one."""
    if device.type != "cuda":
        return 1
    from qpass.kernels.w4a16 import pick_config

    return len({tuple(pick_config(m, n, k, 128, device) for k, n in shapes) for m in batches})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_recompiles_once_per_kernel_path(device):
    """New batch sizes through ``backend="qpass"`` (Inductor): one static graph, then at
    most one recompile per kernel path (the op's kernel choice is a guard on M)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device(device)
    batches = [1, 2, 3, 5, 8, 16, 32] if device.type == "cuda" else [1, 2, 3, 5]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layer = seeded(DecodeLayer).to(device, dtype)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = torch.compile(layer, backend="qpass", options={"method": "awq"}, fullgraph=True)
    with torch.no_grad():
        for batch in batches:
            compiled(torch.randn(batch, 1, 256, device=device, dtype=dtype))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    assert graphs <= 1 + kernel_paths(batches, [(256, 512), (256, 256), (256, 1024), (512, 256)], device)


def tiny_hugging_face_llama(device: torch.device, dtype: torch.dtype):
    """A randomly initialised ``LlamaForCausalLM`` (two layers, grouped-query attention)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device, dtype).eval()


@pytest.mark.parametrize("entry", ["eager", "backend"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_hugging_face_generate_with_the_kv_cache(device, entry):
    """``generate`` on a quantized Hugging Face Llama: a prefill, then one row a step with the KV
    cache (on CUDA through the GEMV); with ``entry="backend"``, every forward compiled by
    ``backend="qpass"``, norms and residuals folded into the ops. Each step's logits are the eager
    model's on the same tokens, recomputed without the cache."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    q = qpass.quantize(tiny_hugging_face_llama(device, dtype), "awq", skip=["lm_head"])
    eager_forward = q.forward
    if entry == "backend":
        torch._dynamo.reset()
        q.forward = torch.compile(q.forward, backend="qpass")
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        out = q.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
        recomputed = eager_forward(out.sequences, use_cache=False).logits
    assert out.sequences.shape == (1, 12 + 16) and len(out.logits) == 16
    bound = 2e-2 if dtype == torch.float16 else 1e-4  # fp16: the folds and the cache round differently
    for step, logits in enumerate(out.logits):
        assert torch.isfinite(logits).all()
        assert relative_error(logits, recomputed[:, 11 + step]) < bound, step


def test_mode_and_options_reach_inductor(monkeypatch):
    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.update(config_patches)
        return gm.forward

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", fake_compile_fx)
    model = seeded(GeluMLP, 64, 128)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.compile(model, backend=qpass.backend("awq", group_size=32, mode="reduce-overhead"))(x)
        assert seen == {"triton.cudagraphs": True}
        torch._dynamo.reset()
        seen.clear()
        options = {"method": "int8", "inductor": {"max_autotune": True}}
        torch.compile(model, backend="qpass", options=options)(x)
        assert seen == {"max_autotune": True}
    with pytest.raises(ValueError, match="group_size"):
        qpass.backend("awq", group_size=3)
    assert qpass_backend.__module__ == "qpass.backend"


def test_entry_point_with_no_import():
    """``backend="qpass"`` in a fresh interpreter that never imports qpass: Inductor on CPU,
    matching ``qpass.quantize`` run eagerly, one recompile for new shapes."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        from models import Block, seeded, relative_error
        model = seeded(Block, 64, 4, 2, 128)
        assert "qpass" not in sys.modules
        compiled = torch.compile(model, backend="qpass", options={"method": "awq", "group_size": 32}, fullgraph=True)
        with torch.no_grad():
            outs = [(x, compiled(x)) for x in (torch.randn(2, 5, 64), torch.randn(3, 7, 64), torch.randn(4, 9, 64))]
            import qpass
            reference = qpass.quantize(model, "awq", group_size=32)
            print(max(relative_error(out, reference(x)) for x, out in outs))
        print(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    error, graphs = run.stdout.split()
    assert float(error) < 1e-3
    assert int(graphs) == 2


def test_quantized_model_compiles_with_no_graph_break():
    model = seeded(Block, 64, 4, 2, 128)
    quantized = qpass.quantize(model, "awq", group_size=32)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        explanation = torch._dynamo.explain(quantized)(x)
        assert explanation.graph_break_count == 0
        out = torch.compile(quantized, fullgraph=True)(x)
    assert relative_error(out, quantized(x)) < 1e-3


def launched_kernels(fn, *args) -> List[str]:
    """Names of the CUDA kernels one call of ``fn`` launches (after a warm-up call)."""
    fn(*args)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def op_kernels(k: int, n: int, x: torch.Tensor, activation: str = "none") -> List[str]:
    """What one compiled W4A16 op of ``k`` inputs and ``n`` outputs launches on ``x``'s
    rows: its kernel, and the split-K reduction where the op splits K."""
    weights = (torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda"),
               torch.rand(k // 128, n, dtype=x.dtype, device="cuda") / 64,
               torch.full((k // 128, n), 8.0, dtype=x.dtype, device="cuda"))
    op = torch.compile(functools.partial(torch.ops.qpass.w4a16_linear, group_size=128, activation=activation))
    return launched_kernels(op, x.new_empty(*x.shape[:-1], k).normal_(), *weights)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 16])
def test_kernel_budget_of_compiled_layers(batch):
    """The budget of a decode layer under ``backend="qpass"``: each quantized linear costs
    what its op costs alone (its kernel, plus a split-K reduction where the op splits K), and
    nothing else at batch 1: the qkv and gate_up GEMVs compute the RMSNorms before them, the
    o and down ops add the residuals in their epilogues, gate_up's computes SiLU*mul (the op
    with "silu_mul" launches no more than without). At 16 rows the two norms are passes of
    their own (Inductor's), 2 kernels. The GELU MLP: 2 ops (fc1's computes the GELU) + the
    residual add (fc2 has a bias: the residual stays out of its op, whose bias it would cost an
    add of its own to join)."""
    torch.manual_seed(0)
    with torch.no_grad(), torch.device("cuda"):
        x = torch.randn(batch, 1, 256, dtype=torch.bfloat16)
        ops = [op_kernels(256, 512, x), op_kernels(256, 256, x), op_kernels(256, 1024, x, "silu_mul"),
               op_kernels(512, 256, x)]
        assert len(ops[2]) == len(op_kernels(256, 1024, x)), ops[2]
        layer = DecodeLayer().to(torch.bfloat16).eval()
        kernels = launched_kernels(torch.compile(layer, backend="qpass", options={"method": "awq"}, fullgraph=True), x)
        budget = sum(map(len, ops)) + (0 if batch == 1 else 2)
        print(f"\ndecode layer, batch {batch}: {len(kernels)} kernels (budget {budget}): {kernels}")
        assert len(kernels) <= budget, (kernels, ops)
        mlp = GeluMLP().to(torch.bfloat16).eval()
        kernels = launched_kernels(torch.compile(mlp, backend="qpass", options={"method": "awq"}, fullgraph=True), x)
        assert len(op_kernels(256, 512, x, "gelu")) == len(op_kernels(256, 512, x))
        budget = len(op_kernels(256, 512, x)) + len(op_kernels(512, 256, x)) + 1
        print(f"GELU MLP, batch {batch}: {len(kernels)} kernels (budget {budget}): {kernels}")
        assert len(kernels) <= budget, kernels
