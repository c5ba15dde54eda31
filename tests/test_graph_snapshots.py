"""Snapshots of the graphs qpass.quantize writes: the merge of siblings, the stubs, the
split of merged outputs. A change in the pass shows up here as a diff."""

import torch
from expecttest import TestCase

import qpass
from models import MLP, Block, FunctionalLinears, TinyLM, relative_error, seeded


def code(gm):
    return gm.code.strip()


class GraphSnapshots(TestCase):
    def test_mlp(self):
        q = qpass.quantize(seeded(MLP), "awq")
        self.assertExpectedInline(code(q), """\
def forward(self, x):
    fc1 = self.fc1(x);  x = None
    gelu = torch._C._nn.gelu(fc1);  fc1 = None
    fc2 = self.fc2(gelu);  gelu = None
    return fc2""")

    def test_block_merges_qkv_and_gate_up(self):
        model = seeded(Block)
        q = qpass.quantize(model, "awq")
        self.assertExpectedInline(code(q), """\
def forward(self, x):
    pow_1 = x.pow(2)
    mean = pow_1.mean(-1, keepdim = True);  pow_1 = None
    add = mean + 1e-06;  mean = None
    rsqrt = torch.rsqrt(add);  add = None
    mul = x * rsqrt;  rsqrt = None
    input_norm_weight = self.input_norm.weight
    mul_1 = mul * input_norm_weight;  mul = input_norm_weight = None
    getattr_1 = mul_1.shape
    getitem = getattr_1[0]
    getitem_1 = getattr_1[1];  getattr_1 = None
    attn_q_proj_k_proj_v_proj = self.attn.q_proj_k_proj_v_proj(mul_1);  mul_1 = None
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
    attn_o_proj = self.attn.o_proj(reshape);  reshape = None
    add_1 = x + attn_o_proj;  x = attn_o_proj = None
    pow_2 = add_1.pow(2)
    mean_1 = pow_2.mean(-1, keepdim = True);  pow_2 = None
    add_2 = mean_1 + 1e-06;  mean_1 = None
    rsqrt_1 = torch.rsqrt(add_2);  add_2 = None
    mul_2 = add_1 * rsqrt_1;  rsqrt_1 = None
    post_norm_weight = self.post_norm.weight
    mul_3 = mul_2 * post_norm_weight;  mul_2 = post_norm_weight = None
    mlp_gate_proj_up_proj = self.mlp.gate_proj_up_proj(mul_3);  mul_3 = None
    split_1 = torch.functional.split(mlp_gate_proj_up_proj, [512, 512], dim = -1);  mlp_gate_proj_up_proj = None
    getitem_6 = split_1[0]
    getitem_7 = split_1[1];  split_1 = None
    silu = torch.nn.functional.silu(getitem_6, inplace = False);  getitem_6 = None
    mul_4 = silu * getitem_7;  silu = getitem_7 = None
    mlp_down_proj = self.mlp.down_proj(mul_4);  mul_4 = None
    add_3 = add_1 + mlp_down_proj;  add_1 = mlp_down_proj = None
    return add_3""")
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
    pow_1 = embed.pow(2)
    mean = pow_1.mean(-1, keepdim = True);  pow_1 = None
    add = mean + 1e-06;  mean = None
    rsqrt = torch.rsqrt(add);  add = None
    mul = embed * rsqrt;  rsqrt = None
    layers_0_input_norm_weight = getattr(self.layers, "0").input_norm.weight
    mul_1 = mul * layers_0_input_norm_weight;  mul = layers_0_input_norm_weight = None
    getattr_1 = mul_1.shape
    getitem = getattr_1[0]
    getitem_1 = getattr_1[1];  getattr_1 = None
    layers_0_attn_q_proj_k_proj_v_proj = getattr(self.layers, "0").attn.q_proj_k_proj_v_proj(mul_1);  mul_1 = None
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
    layers_0_attn_o_proj = getattr(self.layers, "0").attn.o_proj(reshape);  reshape = None
    add_1 = embed + layers_0_attn_o_proj;  embed = layers_0_attn_o_proj = None
    pow_2 = add_1.pow(2)
    mean_1 = pow_2.mean(-1, keepdim = True);  pow_2 = None
    add_2 = mean_1 + 1e-06;  mean_1 = None
    rsqrt_1 = torch.rsqrt(add_2);  add_2 = None
    mul_2 = add_1 * rsqrt_1;  rsqrt_1 = None
    layers_0_post_norm_weight = getattr(self.layers, "0").post_norm.weight
    mul_3 = mul_2 * layers_0_post_norm_weight;  mul_2 = layers_0_post_norm_weight = None
    layers_0_mlp_gate_proj_up_proj = getattr(self.layers, "0").mlp.gate_proj_up_proj(mul_3);  mul_3 = None
    split_1 = torch.functional.split(layers_0_mlp_gate_proj_up_proj, [512, 512], dim = -1);  layers_0_mlp_gate_proj_up_proj = None
    getitem_6 = split_1[0]
    getitem_7 = split_1[1];  split_1 = None
    silu = torch.nn.functional.silu(getitem_6, inplace = False);  getitem_6 = None
    mul_4 = silu * getitem_7;  silu = getitem_7 = None
    layers_0_mlp_down_proj = getattr(self.layers, "0").mlp.down_proj(mul_4);  mul_4 = None
    add_3 = add_1 + layers_0_mlp_down_proj;  add_1 = layers_0_mlp_down_proj = None
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
