"""qpass.quantize on small models: outputs, options, merging, module trees, state dicts."""

import copy
import logging

import pytest
import torch
from torch import nn

import qpass
from qpass.kernels.common import WORD_TILE, output_columns
from qpass.kernels import reference
from qpass.kernels.reference import apply_activation
from qpass.layers.linear import QuantLinear
from qpass.layers.quantize_base import UnquantizedLinearMethod
from qpass.methods.awq import AWQLinearMethod, fitting_group_size
from qpass.methods.int8 import Int8LinearMethod
from models import MLP, Block, FunctionalLinears, TinyLM, relative_error, seeded


def stubs(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("method, bound", [("awq", 0.06), ("int8", 0.01), ("fp8", 0.03)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_output_close_to_float(method, bound, dtype):
    model = seeded(Block).to(dtype)
    x = torch.randn(2, 9, 256, dtype=dtype)
    q = qpass.quantize(model, method)
    out, ref = q(x), model(x)
    assert out.dtype == dtype
    tolerance = bound if dtype == torch.float32 else bound + 0.02
    assert relative_error(out, ref) < tolerance


def test_input_untouched_and_inplace():
    model = seeded(MLP)
    before = copy.deepcopy(model.state_dict())
    q = qpass.quantize(model, "awq")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.fc1, nn.Linear) and q is not model
    same = qpass.quantize(model, "awq", inplace=True)
    assert same is model and isinstance(model.fc1, QuantLinear)
    x = torch.randn(4, 256)
    torch.testing.assert_close(model(x), q(x))


def test_module_tree_without_merge_keeps_class_and_one_stub_per_linear():
    model = seeded(Block)
    q = qpass.quantize(model, "awq", merge=False)
    assert type(q) is Block
    assert sorted(stubs(q)) == sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    x = torch.randn(2, 5, 256)
    torch.testing.assert_close(q(x), qpass.quantize(model, "awq")(x))  # merging changes nothing


def test_merged_stub_shards_follow_the_original_linears():
    q = qpass.quantize(seeded(Block), "awq")
    qkv = q.attn.q_proj_k_proj_v_proj
    assert qkv.shard_names == ["attn.q_proj", "attn.k_proj", "attn.v_proj"]
    assert qkv.output_partition_sizes == [256, 128, 128]
    assert isinstance(qkv.quant_method, AWQLinearMethod)


def test_group_size_option_and_awq_checkpoint_shapes():
    q = qpass.quantize(seeded(MLP), "awq", group_size=64)
    sd = q.state_dict()
    assert sd["fc1.qweight"].shape == (256, 512 // 8) and sd["fc1.qweight"].dtype == torch.int32
    assert sd["fc1.qzeros"].shape == (256 // 64, 512 // 8)
    assert sd["fc1.scales"].shape == (256 // 64, 512)
    assert q.fc1.quant_method.quant_config.group_size == 64


def test_skip_and_overrides():
    model = seeded(TinyLM, layers=2)
    q = qpass.quantize(model, "awq", merge=False, skip=["lm_head"],
                       overrides={"*.down_proj": {"method": "int8"}, "layers.1.*": {"group_size": 64}})
    assert isinstance(q.lm_head.quant_method, UnquantizedLinearMethod)
    assert q.lm_head.weight is q.embed.weight  # tied weights stay tied
    assert isinstance(q.layers[0].mlp.down_proj.quant_method, Int8LinearMethod)
    assert q.layers[1].attn.q_proj.quant_method.quant_config.group_size == 64
    assert q.layers[0].attn.q_proj.quant_method.quant_config.group_size == 128
    ids = torch.randint(0, 512, (2, 16))
    assert relative_error(q(ids), model(ids)) < 0.1


@pytest.mark.parametrize("method, kept_for_out_features", [
    ("awq", "kept in float: out_features 100 is not a multiple of 8"),
    ("gptq", "kept in float: in_features 8 and out_features 100 must be multiples of 8"),
])
def test_indivisible_in_features_use_the_largest_halved_group(caplog, method, kept_for_out_features):
    assert fitting_group_size(128, 576) == 64
    assert fitting_group_size(128, 1536) == 128
    assert fitting_group_size(128, 100) is None
    model = nn.Sequential(nn.Linear(576, 192), nn.ReLU(), nn.Linear(192, 200), nn.ReLU(), nn.Linear(200, 8),
                          nn.ReLU(), nn.Linear(8, 100)).eval()
    with caplog.at_level(logging.INFO, logger="qpass"):
        q = qpass.quantize(model, method)
    first, second, third, fourth = (q.get_submodule(name) for name in "0246")  # a GraphModule: no indexing
    assert first.quant_method.quant_config.group_size == 64
    assert second.quant_method.quant_config.group_size == 64
    assert isinstance(third.quant_method, UnquantizedLinearMethod)  # in 200: no group of 32 or more divides it
    assert isinstance(fourth.quant_method, UnquantizedLinearMethod)  # out 100: not a multiple of 8
    assert "group_size 128 does not divide in_features 576; using 64" in caplog.text
    assert "group_size 128 does not divide in_features 192; using 64" in caplog.text
    assert "kept in float: in_features 200 has no group size >= 32 that divides it (halving from 128)" in caplog.text
    assert kept_for_out_features in caplog.text


@pytest.mark.parametrize("merge", [True, False])
def test_load_state_dict_of_the_float_model_goes_through_the_loaders(merge):
    model = seeded(Block)
    other = seeded(Block, seed=1)
    q = qpass.quantize(model, "awq", merge=merge)
    result = q.load_state_dict(other.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 5, 256)
    torch.testing.assert_close(q(x), qpass.quantize(other, "awq", merge=merge)(x))


def test_state_dict_is_checkpoint_layout_and_round_trips():
    model = seeded(Block)
    q = qpass.quantize(model, "awq")
    sd = q.state_dict()
    assert "attn.q_proj_k_proj_v_proj.qzeros" in sd and "attn.q_proj_k_proj_v_proj.zeros" not in sd
    fresh = qpass.quantize(seeded(Block, seed=3), "awq")
    fresh.load_state_dict(sd)
    x = torch.randn(1, 4, 256)
    torch.testing.assert_close(fresh(x), q(x))


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_gate_up_stub_lays_its_columns_in_runs_and_saves_halves(method):
    """The W4A16 methods lay a stub's columns out for its folded silu_mul as gate and up in runs of 16 (what the
    batch-1 GEMV reads fastest), and back to ``[gate | up]`` when it is unfolded; its output, its state dict and
    its checkpoint tensors are those of the halves. Either way the words are in column tiles."""
    q = qpass.quantize(seeded(Block), method)
    (name, stub), = [(n, m) for n, m in stubs(q).items() if m.activation == "silu_mul"]
    assert stub.up_run == stub.quant_method.gate_up_run == 16
    x = torch.randn(2, 3, 256)
    fused, fused_state = stub(x), {k: v.clone() for k, v in stub.state_dict().items()}
    runs = {t: reference.word_rows(getattr(stub, t).detach()) for t in ("qweight", "scales", "zeros")}
    stub.set_activation("none")
    assert stub.up_run == 0
    assert stub.qweight.shape == (256 // 8, stub.scales.shape[1] // WORD_TILE, WORD_TILE)
    for t, laid in runs.items():
        assert torch.equal(reference.gate_up_runs(reference.word_rows(getattr(stub, t).detach()), 16), laid)
    assert fused_state.keys() == stub.state_dict().keys()
    assert all(torch.equal(v, stub.state_dict()[k]) for k, v in fused_state.items())
    torch.testing.assert_close(fused, apply_activation(stub(x).float(), "silu_mul").to(x.dtype))
    stub.set_activation("silu_mul")
    assert stub.up_run == 16 and torch.equal(stub(x), fused)


def test_partial_float_state_dict_reports_missing_shards():
    q = qpass.quantize(seeded(Block), "awq")
    sd = {k: v for k, v in seeded(Block).state_dict().items() if "k_proj" not in k}
    with pytest.raises(RuntimeError, match="attn.k_proj.weight"):
        q.load_state_dict(sd)


def test_functional_linears_quantize():
    model = seeded(FunctionalLinears)
    q = qpass.quantize(model, "awq")
    assert set(stubs(q)) == {"w_in", "w_out"}
    assert not hasattr(q, "b_in") or isinstance(q.b_in, nn.Module) is False
    x = torch.randn(3, 256)
    assert relative_error(q(x), model(x)) < 0.2


def test_quantized_model_compiles_without_graph_break():
    model = seeded(Block)
    q = qpass.quantize(model, "awq")
    x = torch.randn(1, 3, 256)
    compiled = torch.compile(q, fullgraph=True)
    torch.testing.assert_close(compiled(x), q(x), rtol=1e-4, atol=1e-4)


def test_compiles_with_module_guards_skipped():
    """The README's option for a host-bound decode loop: torch.compile without guards on the model's modules
    (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``) runs the quantized model in one graph, as without it."""
    q = qpass.quantize(seeded(Block), "awq")
    compiled = torch.compile(q, fullgraph=True,
                             options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    for batch in (1, 3):
        x = torch.randn(batch, 3, 256)
        torch.testing.assert_close(compiled(x), q(x), rtol=1e-4, atol=1e-4)


def test_gradients_reach_the_activations():
    model = seeded(Block)
    x = torch.randn(1, 3, 256, requires_grad=True)
    for method in ("awq", "int8"):
        q = qpass.quantize(model, method)
        q(x).sum().backward()
        grad_q, x.grad = x.grad, None
        model(x).sum().backward()
        grad_f, x.grad = x.grad, None
        assert relative_error(grad_q, grad_f) < 0.1


def test_eager_calls_skip_the_dispatcher_only_where_nothing_else_sees_them():
    """``qpass.ops``' functions run an op's body themselves in plain eager use, and go through torch's dispatcher
    wherever something would see the op: torch.compile, modes (fake tensors, ``with torch.device``), the profiler,
    torch.func transforms, tensor subclasses, meta tensors, and a gradient to record."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from qpass import ops

    x, frozen = torch.randn(2, 8), nn.Parameter(torch.ones(8), requires_grad=False)
    trainable = torch.randn(2, 8, requires_grad=True)
    assert ops._plain_eager([x, frozen])
    assert not ops._plain_eager([x, trainable])
    with torch.no_grad():
        assert ops._plain_eager([x, trainable])
    with torch.device("cpu"):
        assert not ops._plain_eager([x])
    with FakeTensorMode():
        assert not ops._plain_eager([torch.empty(2, 8)])
    with torch.profiler.profile():
        assert not ops._plain_eager([x])
    seen = []
    torch.vmap(lambda row: seen.append(ops._plain_eager([row])) or row)(x)
    torch.func.grad(lambda t: seen.append(ops._plain_eager([t])) or t.sum())(x)
    assert seen == [False, False]
    assert not ops._plain_eager([x.as_subclass(type("Subclass", (torch.Tensor,), {}))])
    assert not ops._plain_eager([x, torch.empty(2, 8, device="meta")])
    compiled = torch.compile(lambda t: t + ops._plain_eager([t]), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), x)  # False, as Dynamo traced it


def test_eager_calls_give_the_dispatchers_result_and_traces_keep_the_op(monkeypatch):
    """A quantized model's eager forward runs its ops' bodies directly (one switch of ``wrap_triton`` a call)
    with the result of the ops through the dispatcher, and a trace of it still records the ops themselves."""
    import contextlib
    from torch.fx.experimental.proxy_tensor import make_fx
    from qpass import ops

    direct_calls = []

    @contextlib.contextmanager
    def counted_switch(enabled):
        direct_calls.append(enabled)
        yield

    model = seeded(Block)
    q = qpass.quantize(model, "awq", merge=False)
    x = torch.randn(1, 3, 256)
    with torch.no_grad():
        monkeypatch.setattr(ops, "set_wrap_triton_enabled", counted_switch)
        out = q(x)
        monkeypatch.undo()
        assert direct_calls == [False] * len(stubs(q))
        layer = q.mlp.down_proj
        h = torch.randn(1, 3, layer.qweight.shape[0] * 8)
        direct = ops.w4a16_linear(h, layer.qweight, layer.scales, layer.zeros, 128)
        assert torch.equal(direct, torch.ops.qpass.w4a16_linear(h, layer.qweight, layer.scales, layer.zeros, 128))
    graph = make_fx(q)(x).graph
    calls = [n for n in graph.nodes if n.op == "call_function" and "qpass.w4a16_linear" in str(n.target)]
    assert len(calls) == len(stubs(q))
    torch.testing.assert_close(out, q(x), rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["silu_mul", "gelu", "gelu_tanh"])
def test_fused_activation_gradients_match_torch(activation):
    """The backward of an op with an epilogue: the epilogue's own derivative, as torch's."""
    g = torch.Generator().manual_seed(0)
    qweight = torch.randint(-2**31, 2**31 - 1, (256 // 8, 64), dtype=torch.int32, generator=g)
    scales, zeros = torch.rand(2, 64, generator=g) / 16, torch.full((2, 64), 8.0)
    x = torch.randn(3, 256, generator=g, requires_grad=True)
    grad_out = torch.randn(3, output_columns(activation, 64), generator=g)
    fused = torch.ops.qpass.w4a16_linear(x, qweight, scales, zeros, 128, activation=activation)
    (grad_fused,) = torch.autograd.grad(fused, x, grad_out)
    plain = apply_activation(torch.ops.qpass.w4a16_linear(x, qweight, scales, zeros, 128), activation)
    (grad_plain,) = torch.autograd.grad(plain, x, grad_out)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(grad_fused, grad_plain, rtol=1e-5, atol=1e-5)


def test_fused_silu_mul_gradients_with_gate_up_in_runs():
    """The backward of silu_mul on columns in runs of 16 (the W4A16 methods' layout): the gradient of the same
    op on ``[gate | up]``."""
    g = torch.Generator().manual_seed(0)
    qweight = torch.randint(-2**31, 2**31 - 1, (256 // 8, 64), dtype=torch.int32, generator=g)
    scales, zeros = torch.rand(2, 64, generator=g) / 16, torch.randint(0, 16, (2, 64), generator=g).float()
    x = torch.randn(3, 256, generator=g, requires_grad=True)
    grad_out = torch.randn(3, 32, generator=g)
    runs = [reference.gate_up_runs(t, 16) for t in (qweight, scales, zeros)]
    fused = torch.ops.qpass.w4a16_linear(x, *runs, 128, activation="silu_mul", up_run=16)
    (grad_runs,) = torch.autograd.grad(fused, x, grad_out)
    halves = torch.ops.qpass.w4a16_linear(x, qweight, scales, zeros, 128, activation="silu_mul")
    (grad_halves,) = torch.autograd.grad(halves, x, grad_out)
    torch.testing.assert_close(fused, halves)
    torch.testing.assert_close(grad_runs, grad_halves, rtol=1e-5, atol=1e-5)


def test_method_registry_lists_builtin_methods():
    assert {"awq", "int8", "fp8"} <= set(qpass.method_names())
