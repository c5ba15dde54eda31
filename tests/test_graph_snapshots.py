"""Snapshots of the graphs qpass.quantize writes: the merge of siblings, the stubs, the
split of merged outputs, the lowering of silu(gate) * up into the gate/up stub. A change
in the pass shows up here as a diff."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from expecttest import TestCase
from torch import nn

import qpass
from models import MLP, Block, FunctionalLinears, TinyLM, relative_error, seeded
from qpass.methods.int8 import Int8Config, Int8LinearMethod


def code(gm):
    return gm.code.strip()


class GraphSnapshots(TestCase):
    def test_mlp(self):
        q = qpass.quantize(seeded(MLP), "awq")
        self.assertExpectedInline(code(q), """\
def forward(self, x):
    fc1 = self.fc1(x);  x = None
    fc2 = self.fc2(fc1);  fc1 = None
    return fc2""")

    def test_block_merges_qkv_and_gate_up(self):
        model = seeded(Block)
        q = qpass.quantize(model, "awq")
        self.assertExpectedInline(code(q), """\
def forward(self, x):
    input_norm_weight = self.input_norm.weight
    getattr_1 = x.shape
    getitem = getattr_1[0]
    getitem_1 = getattr_1[1];  getattr_1 = None
    attn_q_proj_k_proj_v_proj = self.attn.q_proj_k_proj_v_proj(x, norm_weight = input_norm_weight, norm_eps = 1e-06);  input_norm_weight = None
    split = torch.functional.split(attn_q_proj_k_proj_v_proj, [256, 128, 128], dim = -1);  attn_q_proj_k_proj_v_proj = None
    getitem_3 = split[0]
    getitem_4 = split[1]
    getitem_5 = split[2];  split = None
    view = getitem_3.view(getitem, getitem_1, 4, 64);  getitem_3 = None
    transpose = view.transpose(1, 2);  view = None
    view_1 = getitem_4.view(getitem, getitem_1, 2, 64);  getitem_4 = None
    transpose_1 = view_1.transpose(1, 2);  view_1 = None
    view_2 = getitem_5.view(getitem, getitem_1, 2, 64);  getitem_5 = None
    transpose_2 = view_2.transpose(1, 2);  view_2 = None
    scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(transpose, transpose_1, transpose_2, is_causal = True, enable_gqa = True);  transpose = transpose_1 = transpose_2 = None
    transpose_3 = scaled_dot_product_attention.transpose(1, 2);  scaled_dot_product_attention = None
    reshape = transpose_3.reshape(getitem, getitem_1, -1);  transpose_3 = getitem = getitem_1 = None
    attn_o_proj = self.attn.o_proj(reshape, residual = x);  reshape = x = None
    post_norm_weight = self.post_norm.weight
    mlp_gate_proj_up_proj = self.mlp.gate_proj_up_proj(attn_o_proj, norm_weight = post_norm_weight, norm_eps = 1e-06);  post_norm_weight = None
    mlp_down_proj = self.mlp.down_proj(mlp_gate_proj_up_proj, residual = attn_o_proj);  mlp_gate_proj_up_proj = attn_o_proj = None
    return mlp_down_proj""")
        x = torch.randn(2, 7, 256)
        self.assertLess(relative_error(q(x), model(x)), 0.05)

    def test_functional_linears(self):
        model = seeded(FunctionalLinears)
        q = qpass.quantize(model, "int8")
        self.assertExpectedInline(code(q), """\
def forward(self, x):
    w_in_1 = self.w_in(x);  x = None
    relu = torch.relu(w_in_1);  w_in_1 = None
    w_out_1 = self.w_out(relu);  relu = None
    return w_out_1""")
        x = torch.randn(3, 256)
        self.assertLess(relative_error(q(x), model(x)), 0.02)

    def test_skip(self):
        q = qpass.quantize(seeded(TinyLM, layers=1), "awq", skip=["lm_head", "*.down_proj"])
        self.assertExpectedInline(code(q), """\
def forward(self, ids):
    embed = self.embed(ids);  ids = None
    layers_0_input_norm_weight = getattr(self.layers, "0").input_norm.weight
    getattr_1 = embed.shape
    getitem = getattr_1[0]
    getitem_1 = getattr_1[1];  getattr_1 = None
    layers_0_attn_q_proj_k_proj_v_proj = getattr(self.layers, "0").attn.q_proj_k_proj_v_proj(embed, norm_weight = layers_0_input_norm_weight, norm_eps = 1e-06);  layers_0_input_norm_weight = None
    split = torch.functional.split(layers_0_attn_q_proj_k_proj_v_proj, [256, 128, 128], dim = -1);  layers_0_attn_q_proj_k_proj_v_proj = None
    getitem_3 = split[0]
    getitem_4 = split[1]
    getitem_5 = split[2];  split = None
    view = getitem_3.view(getitem, getitem_1, 4, 64);  getitem_3 = None
    transpose = view.transpose(1, 2);  view = None
    view_1 = getitem_4.view(getitem, getitem_1, 2, 64);  getitem_4 = None
    transpose_1 = view_1.transpose(1, 2);  view_1 = None
    view_2 = getitem_5.view(getitem, getitem_1, 2, 64);  getitem_5 = None
    transpose_2 = view_2.transpose(1, 2);  view_2 = None
    scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention(transpose, transpose_1, transpose_2, is_causal = True, enable_gqa = True);  transpose = transpose_1 = transpose_2 = None
    transpose_3 = scaled_dot_product_attention.transpose(1, 2);  scaled_dot_product_attention = None
    reshape = transpose_3.reshape(getitem, getitem_1, -1);  transpose_3 = getitem = getitem_1 = None
    layers_0_attn_o_proj = getattr(self.layers, "0").attn.o_proj(reshape, residual = embed);  reshape = embed = None
    layers_0_post_norm_weight = getattr(self.layers, "0").post_norm.weight
    layers_0_mlp_gate_proj_up_proj = getattr(self.layers, "0").mlp.gate_proj_up_proj(layers_0_attn_o_proj, norm_weight = layers_0_post_norm_weight, norm_eps = 1e-06);  layers_0_post_norm_weight = None
    layers_0_mlp_down_proj = getattr(self.layers, "0").mlp.down_proj(layers_0_mlp_gate_proj_up_proj);  layers_0_mlp_gate_proj_up_proj = None
    add_3 = layers_0_attn_o_proj + layers_0_mlp_down_proj;  layers_0_attn_o_proj = layers_0_mlp_down_proj = None
    pow_3 = add_3.pow(2)
    mean_2 = pow_3.mean(-1, keepdim = True);  pow_3 = None
    add_4 = mean_2 + 1e-06;  mean_2 = None
    rsqrt_2 = torch.rsqrt(add_4);  add_4 = None
    mul_5 = add_3 * rsqrt_2;  add_3 = rsqrt_2 = None
    norm_weight = self.norm.weight
    mul_6 = mul_5 * norm_weight;  mul_5 = norm_weight = None
    lm_head = self.lm_head(mul_6);  mul_6 = None
    return lm_head""")
        self.assertIs(q.lm_head.weight, q.embed.weight)


class SiLUModuleMLP(nn.Module):
    """gate/up as siblings, SiLU as a module, the product written up * act(gate). (The merged
    stub's shards follow the graph's order: were up computed first, the stub would be
    [up | gate] and stay unfused.)"""

    def __init__(self, dim=256, hidden=512):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=True)
        self.up = nn.Linear(dim, hidden, bias=True)
        self.act = nn.SiLU()
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        gate = self.act(self.gate(x))
        return self.down(self.up(x) * gate)


class GateReadTwice(nn.Module):
    """gate is read past the product too: the split must stay."""

    def __init__(self, dim=256, hidden=512):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).split(512, dim=-1)
        return F.silu(gate) * up + gate


class GeluMLPs(nn.Module):
    """Three GELUs: a tanh nn.GELU module, F.gelu, and an F.gelu whose input is read again."""

    def __init__(self, dim=256, hidden=512):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc3, self.fc4 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.fc2(self.act(self.fc1(x)))
        h = self.fc3(x)
        return x + self.fc4(F.gelu(h) + h)


class LlamaRMSNorm(nn.Module):
    """Hugging Face Llama's RMSNorm, as written there."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class FunctionalRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (self.weight.shape[0],), self.weight, self.eps)


def module_rms_norm(dim):
    norm = nn.RMSNorm(dim, eps=1e-6)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    return norm


NORMS = {"llama": LlamaRMSNorm, "functional": FunctionalRMSNorm, "module": module_rms_norm}


class NormedMLPs(nn.Module):
    """Two pre-norm residual MLPs; the second norm is read by separate gate and up linears,
    and the last residual reads its input's sum again."""

    def __init__(self, norm="llama", dim=256, hidden=512):
        super().__init__()
        self.norm1, self.norm2 = NORMS[norm](dim), NORMS[norm](dim)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down1 = nn.Linear(hidden, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=True)
        self.down2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(self.norm1(x)).chunk(2, dim=-1)
        x = x + self.down1(F.silu(gate) * up)
        h = self.norm2(x)
        return x + self.down2(F.silu(self.gate(h)) * self.up(h))


class Int8WithoutEpilogues(Int8LinearMethod):
    fused_activations = ()  # as a method ported from elsewhere, which declares none
    residual_bias = False


@qpass.register_method("test_int8_no_epilogue")
@dataclass(frozen=True)
class Int8WithoutEpiloguesConfig(Int8Config):
    def get_linear_method(self):
        return Int8WithoutEpilogues(self)


class Lowering(TestCase):
    def test_silu_module_and_either_order(self):
        model = seeded(SiLUModuleMLP)
        q = qpass.quantize(model, "int8")
        self.assertExpectedInline(code(q), """\
def forward(self, x):
    gate_up = self.gate_up(x);  x = None
    down = self.down(gate_up);  gate_up = None
    return down""")
        self.assertEqual(q.gate_up.activation, "silu_mul")
        self.assertFalse(hasattr(q, "act"))
        x = torch.randn(3, 256)
        self.assertLess(relative_error(q(x), qpass.quantize(model, "int8", merge=False)(x)), 1e-5)  # bias first

    def test_half_read_elsewhere_stays_unfused(self):
        q = qpass.quantize(seeded(GateReadTwice), "awq")
        self.assertExpectedInline(code(q), """\
def forward(self, x):
    gate_up = self.gate_up(x);  x = None
    split = gate_up.split(512, dim = -1);  gate_up = None
    getitem = split[0]
    getitem_1 = split[1];  split = None
    silu = torch.nn.functional.silu(getitem, inplace = False)
    mul = silu * getitem_1;  silu = getitem_1 = None
    add = mul + getitem;  mul = getitem = None
    return add""")
        self.assertEqual(q.gate_up.activation, "none")

    def test_gelu_module_and_function(self):
        model = seeded(GeluMLPs)
        q = qpass.quantize(model, "awq")
        self.assertExpectedInline(code(q), """\
def forward(self, x):
    fc1 = self.fc1(x)
    fc2 = self.fc2(fc1);  fc1 = None
    add = x + fc2;  x = fc2 = None
    fc3 = self.fc3(add)
    gelu = torch._C._nn.gelu(fc3)
    add_1 = gelu + fc3;  gelu = fc3 = None
    fc4 = self.fc4(add_1);  add_1 = None
    add_2 = add + fc4;  add = fc4 = None
    return add_2""")
        self.assertEqual((q.fc1.activation, q.fc3.activation), ("gelu_tanh", "none"))
        x = torch.randn(3, 256)
        self.assertLess(relative_error(q(x), qpass.quantize(model, "awq", merge=False)(x)), 1e-5)

    def test_method_without_fused_activations_stays_unfused(self):
        q = qpass.quantize(seeded(Block), "test_int8_no_epilogue")
        self.assertEqual(q.mlp.gate_proj_up_proj.activation, "none")
        self.assertIn("silu", code(q))
        self.assertNotIn("residual", code(q))
        self.assertNotIn(", norm_weight = ", code(q))  # int8 has no apply_after_rms_norm

    def test_norms_and_residuals_fold(self):
        q = qpass.quantize(seeded(NormedMLPs, "llama"), "awq")
        self.assertExpectedInline(code(q), """\
def forward(self, x):
    norm1_weight = self.norm1.weight
    gate_up = self.gate_up(x, norm_weight = norm1_weight, norm_eps = 1e-06);  norm1_weight = None
    down1 = self.down1(gate_up, residual = x);  gate_up = x = None
    norm2_weight = self.norm2.weight
    gate = self.gate(down1, norm_weight = norm2_weight, norm_eps = 1e-06)
    silu_1 = torch.nn.functional.silu(gate, inplace = False);  gate = None
    up = self.up(down1, norm_weight = norm2_weight, norm_eps = 1e-06);  norm2_weight = None
    mul_5 = silu_1 * up;  silu_1 = up = None
    down2 = self.down2(mul_5, residual = down1);  mul_5 = down1 = None
    return down2""")
        self.assertEqual(q.gate_up.activation, "silu_mul")
        for norm in NORMS:  # nn.RMSNorm and F.rms_norm the same way (only node names differ)
            lowered = code(qpass.quantize(seeded(NormedMLPs, norm), "awq"))
            self.assertEqual((lowered.count(", norm_weight = "), lowered.count(", residual = ")), (3, 2), norm)
            self.assertNotIn("rsqrt", lowered)
            self.assertNotIn("rms_norm", lowered)
            self.assertNotIn("getattr", lowered)

    def test_stub_called_twice_keeps_its_activation(self):
        class GateUpTwice(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate_up = nn.Linear(256, 1024, bias=False)

            def forward(self, x):
                gate, up = self.gate_up(x).chunk(2, dim=-1)
                return F.silu(gate) * up + self.gate_up(2 * x)[..., :512]  # the second call: no silu * up

        model = seeded(GateUpTwice)
        q = qpass.quantize(model, "awq")
        self.assertEqual(q.gate_up.activation, "none")
        self.assertIn("silu", code(q))
        x = torch.randn(3, 256)
        self.assertLess(relative_error(q(x), qpass.quantize(model, "awq", merge=False)(x)), 1e-5)

    def test_norm_read_elsewhere_stays(self):
        class NormReadTwice(nn.Module):
            def __init__(self):
                super().__init__()
                self.norm, self.fc = LlamaRMSNorm(256), nn.Linear(256, 256, bias=False)

            def forward(self, x):
                h = self.norm(x)
                return self.fc(h) + h  # the norm's output is read past the linear: it stays

        q = qpass.quantize(seeded(NormReadTwice), "awq")
        self.assertIn("rsqrt", code(q))
        self.assertIn("residual = ", code(q))  # the add after the linear still folds


def test_stub_call_computes_what_was_folded_whatever_it_is_given():
    """A stub called with a residual or a norm computes ``residual + linear(x)`` and
    ``linear(rms_norm(x))`` in the op where it can, and after or before it where it cannot: a
    residual that broadcasts or has another dtype, a norm weight of another dtype, a layer with
    a bias (``residual_problem``)."""
    from qpass.kernels.reference import rms_norm

    q = qpass.quantize(seeded(NormedMLPs, "llama"), "awq")
    stub, biased = q.down1, q.up  # (up has a bias)
    x, h = torch.randn(3, 512), torch.randn(3, 256)
    for residual in (torch.randn(3, 256), torch.randn(256), torch.randn(3, 256, dtype=torch.float64)):
        assert torch.allclose(stub(x, residual=residual), residual + stub(x), rtol=1e-5, atol=1e-5)
    assert biased.residual_problem() is not None
    residual = torch.randn(3, 512)
    assert torch.allclose(biased(h, residual=residual), residual + biased(h), rtol=1e-5, atol=1e-5)
    for weight in (torch.rand(256) + 0.5, (torch.rand(256) + 0.5).double()):
        folded = q.gate(h, norm_weight=weight, norm_eps=1e-6)
        assert folded.dtype == (q.gate(rms_norm(h, weight, 1e-6))).dtype
        assert torch.allclose(folded, q.gate(rms_norm(h, weight, 1e-6)).to(folded.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("method", ["awq", "gptq", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_norms_and_residuals_match_unlowered(norm, method, dtype):
    """Norms and residual adds folded into the ops against the module tree (no lowering)."""
    model = seeded(NormedMLPs, norm).to(dtype)
    lowered = qpass.quantize(model, method)
    assert ", norm_weight = " in code(lowered) and ", residual = " in code(lowered)
    unlowered = qpass.quantize(model, method, merge=False)
    x = 3 * torch.randn(2, 5, 256, dtype=dtype)
    with torch.no_grad():
        error = relative_error(lowered(x), unlowered(x))
    assert error < (1e-5 if dtype == torch.float32 else 1e-2), error


@pytest.mark.parametrize("method", ["awq", "fp8"])
def test_folded_norm_and_residual_gradients_match_unlowered(method):
    """Gradients reach the input and the norm weights through the folded ops as through the
    unfused ones."""
    model = seeded(NormedMLPs, "llama").requires_grad_(False)
    x = torch.randn(2, 5, 256)
    grads = []
    for q in (qpass.quantize(model, method), qpass.quantize(model, method, merge=False)):
        inputs = (x.clone().requires_grad_(True), q.norm1.weight.requires_grad_(True),
                  q.norm2.weight.requires_grad_(True))
        q(inputs[0]).square().sum().backward()
        grads.append([t.grad for t in inputs])
    for fused, plain in zip(*grads):
        assert relative_error(fused, plain) < 1e-5
