"""Calibration: GPTQ's math, AWQ's scales and folds, the block runner, the gptq method's
checkpoint layout, determinism and bad calibration data. Small models, CPU, seconds."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qpass
import qpass.calib.awq as awq_calib
from qpass.api import _plan
from qpass.calib.blocks import find_blocks
from qpass.calib.data import text_windows
from qpass.calib.gptq import HESSIAN_TOKENS_PER_STEP, gptq_quantize, hessian
from qpass.calib.rtn import quantize_groupwise
from qpass.layers.linear import QuantLinear
from qpass.methods import awq as awq_method
from qpass.methods.gptq import GPTQConfig, checkpoint_from_quantized, pack_columns, unpack_columns
from qpass.passes.finalise import finalise
from qpass.passes.load import load_shard
from models import MLP, TinyLM, relative_error, rtn_weight, seeded


class NormMLP(nn.Module):
    """LayerNorm -> gate/up -> SwiGLU -> down, with a residual: AWQ folds the gate/up scales
    into the LayerNorm (weight and bias) and the down scales into up's rows (and bias)."""

    def __init__(self, dim=128, hidden=256):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, hidden)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        with torch.no_grad():  # a few loud channels, as real models have
            self.norm.weight[:4] = 12.0
            self.norm.bias.normal_(0, 0.1)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Stack(nn.Module):
    def __init__(self, dim=128, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(NormMLP(dim) for _ in range(layers))
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def correlated(n, dim=128, seed=0):
    """Inputs [n, 16, dim] with correlated channels (a random low-rank mix plus noise)."""
    mix = torch.randn(32, dim, generator=torch.Generator().manual_seed(1234))  # one mix for all samples
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, 32, generator=g) @ mix + 0.1 * torch.randn(n, 16, dim, generator=g)


def batches(n=4, seed=0):
    return list(correlated(4 * n, seed=seed).split(4))


# --- GPTQ's math ----------------------------------------------------------------------------

def gptq_problem(k=256, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(32, k, generator=g) * torch.linspace(0.1, 3, k)  # low rank, uneven channel energies
    x = torch.randn(2048, 32, generator=g) @ mix + 0.1 * torch.randn(2048, k, generator=g)
    held_out = torch.randn(2048, 32, generator=g) @ mix + 0.1 * torch.randn(2048, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    return w, x, held_out


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(sym, desc_act):
    w, x, held_out = gptq_problem()
    q, scales, zeros, g_idx, deq = gptq_quantize(w, hessian(x), 64, sym, desc_act, 0.01)
    rtn = rtn_weight(w, 64, sym)
    error = lambda weight: relative_error(held_out @ weight.t(), held_out @ w.t())
    assert error(deq) < 0.8 * error(rtn)
    # The returned tensors are exactly the weight they stand for.
    rebuilt = (q.float() - zeros.float()[:, g_idx.long()]) * scales[:, g_idx.long()]
    torch.testing.assert_close(rebuilt, deq, rtol=0, atol=1e-6)
    assert q.min() >= 0 and q.max() <= 15
    if sym:
        assert bool((zeros == 8).all())
    else:
        assert zeros.min() >= 1 and zeros.max() <= 15  # what the v1 checkpoint can store


def test_hessian_caps_massive_tokens():
    x = torch.randn(1000, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(hessian(x, 2.0), hessian(x))  # no token norm is twice the median
    loud = x.clone()
    loud[7] *= 1000  # an attention sink
    cut = loud.clone()
    cut[7] *= 2 * loud.norm(dim=1).median() / loud[7].norm()
    torch.testing.assert_close(hessian(loud, 2.0), hessian(cut))
    assert hessian(loud).diagonal().sum() > 100 * hessian(loud, 2.0).diagonal().sum()


def test_hessian_in_chunks_of_scaled_inputs():
    """Inputs past one chunk, divided per channel on the fly: the H of ``x / divisor`` in one go."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(HESSIAN_TOKENS_PER_STEP + 1000, 32, generator=g)
    x[5] *= 500  # a token past the cap
    divisor = torch.rand(32, generator=g) + 0.5
    scaled = (x / divisor).double()
    norms = scaled.norm(dim=1, keepdim=True)
    capped = scaled * (2 * norms.median() / norms).clamp(max=1)
    torch.testing.assert_close(hessian(x, 2.0, divisor=divisor), 2 * capped.t() @ capped / x.shape[0], rtol=1e-5, atol=1e-5)


def test_gptq_act_order_g_idx():
    w, x, _ = gptq_problem()
    h = hessian(x)
    _, _, _, g_idx, _ = gptq_quantize(w, h, 64, True, True, 0.01)
    assert torch.bincount(g_idx.long()).tolist() == [64] * 4
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    assert g_idx[order].tolist() == [i // 64 for i in range(256)]  # groups follow activation order
    _, _, _, plain, _ = gptq_quantize(w, h, 64, True, False, 0.01)
    assert plain.tolist() == [i // 64 for i in range(256)]


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_on_a_fixed_grid(sym):
    """AWQ's rounding="gptq": act-order over the natural groups of a grid chosen beforehand."""
    w, x, held_out = gptq_problem()
    _, scales, zeros = quantize_groupwise(w, 4, 64, symmetric=sym)
    q, got_scales, got_zeros, g_idx, deq = gptq_quantize(w, hessian(x), 64, sym, True, 0.01, grid=(scales, zeros))
    assert torch.equal(got_scales, scales) and torch.equal(got_zeros, zeros)
    assert g_idx.tolist() == [i // 64 for i in range(256)]  # act-order, yet no g_idx needed
    rebuilt = (q.float() - zeros.float().repeat_interleave(64, dim=1)) * scales.repeat_interleave(64, dim=1)
    torch.testing.assert_close(rebuilt, deq, rtol=0, atol=1e-6)
    error = lambda weight: relative_error(held_out @ weight.t(), held_out @ w.t())
    assert error(deq) < 0.8 * error(rtn_weight(w, 64, sym))


def test_gptq_dead_inputs_and_bad_hessian():
    w, x, _ = gptq_problem()
    x[:, 5] = 0
    q, scales, zeros, g_idx, deq = gptq_quantize(w, hessian(x), 64, True, False, 0.01)
    assert torch.isfinite(deq).all()
    with pytest.raises(ValueError, match=r"gptq: the Hessian \[256, 256\] of 'fc' is not positive definite"):
        gptq_quantize(w, -torch.eye(256, dtype=torch.float64), 64, True, False, 0.01, name="fc")


# --- the gptq method: checkpoint layout and runtime repack ------------------------------------

def gptq_stub(k, n, **options):
    config = GPTQConfig(**options)
    return QuantLinear(k, [n], bias=False, params_dtype=torch.float32, quant_method=config.get_linear_method())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_pack_unpack_round_trip(act_order):
    k, n, group = 256, 64, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 16, (n, k // group), generator=g, dtype=torch.int32)
    scales = torch.rand(n, k // group, generator=g) + 0.01
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    tensors = checkpoint_from_quantized(q, scales, zeros, g_idx, torch.float32)
    assert tensors["qweight"].shape == (k // 8, n) and tensors["qzeros"].shape == (k // group, n // 8)
    assert ((tensors["qweight"][0, 0] >> 4 * 3) & 0xF) == q[0, 3]  # nibble j of word i = row 8i+j
    assert ((tensors["qzeros"][0, 0] >> 4 * 2) & 0xF) == zeros[2, 0] - 1  # v1: zero - 1, column 8i+j
    stub = gptq_stub(k, n, group_size=group, desc_act=act_order)
    load_shard(stub, 0, tensors, None)
    finalise(stub)
    assert (stub.perm is not None) == act_order
    for name, tensor in stub.quant_method.checkpoint_tensors(stub).items():
        assert torch.equal(tensor, tensors[name]), name
    x = torch.randn(3, k)
    weight = (q.float() - zeros.float()[:, g_idx]) * scales[:, g_idx]
    torch.testing.assert_close(stub(x), x @ weight.t(), rtol=1e-4, atol=1e-4)


def test_gptq_sym_zeros_are_0x77777777():
    stub_method = GPTQConfig(group_size=64).get_linear_method()
    tensors = stub_method.quantize_weight(torch.randn(16, 128))
    assert bool((tensors["qzeros"] == 0x77777777).all())
    assert torch.equal(unpack_columns(pack_columns(torch.full((2, 16), 7))), torch.full((2, 16), 7, dtype=torch.int32))


def test_gptq_parameters_carry_loader_attributes():
    stub = gptq_stub(256, 64, group_size=128)
    attrs = {name: (getattr(p, "input_dim", None), getattr(p, "output_dim", None), getattr(p, "packed_dim", None),
                    getattr(p, "packed_factor", None)) for name, p in stub.named_parameters()}
    assert attrs == {"qweight": (0, 1, 0, 8), "qzeros": (0, 1, 1, 8), "scales": (0, 1, None, None),
                     "g_idx": (0, None, None, None)}


# --- GPTQ and AWQ through qpass.quantize ----------------------------------------------------

@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("method, options, bar", [("awq", {}, 0.9), ("awq", {"rounding": "nearest"}, 0.95),
                                                  ("gptq", {}, 0.85),
                                                  ("gptq", {"desc_act": True, "sym": False}, 0.85)])
def test_calibration_beats_round_to_nearest(method, options, bar, merge):
    model = seeded(Stack)
    x = correlated(8, seed=99)
    reference = model(x)
    calibrated = qpass.quantize(model, method, calib=batches(), merge=merge, group_size=32, **options)
    rounded = qpass.quantize(model, method, merge=merge, group_size=32, **options)
    assert relative_error(calibrated(x), reference) < bar * relative_error(rounded(x), reference)


def test_awq_folds_keep_the_function(monkeypatch):
    """With the clipping search off, scaled weights plus folds compute what the model did."""
    monkeypatch.setattr(awq_calib, "search_clipping", lambda weight, x, config: weight)
    model = seeded(Stack)
    options = {"group_size": 32, "rounding": "nearest"}  # the weights before rounding, not checkpoint tensors
    target, plan, config = _plan(model, "awq", options, [], None, True, False, None, True)
    calibration = config.calibrate(target, plan, batches())
    assert sorted(calibration.folds) == [f"layers.{i}.{p}" for i in range(2)
                                         for p in ("norm.bias", "norm.weight", "up.bias")]
    assert list(calibration.input_scales) == ["head"]  # it reads the residual stream: nothing absorbs
    folded = copy.deepcopy(model)
    calibration.apply_folds(folded)
    with torch.no_grad():
        for name, weight in calibration.weights.items():
            folded.get_submodule(name).weight.copy_(weight * calibration.input_scales.get(name, 1))
    x = correlated(2, seed=7)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    assert not torch.equal(folded.layers[0].norm.weight, model.layers[0].norm.weight)


def test_awq_input_scale_where_nothing_absorbs():
    model = seeded(MLP, dim=128, hidden=256)  # fc2 reads gelu(fc1): nothing can absorb its scales
    calib = [torch.randn(8, 128) for _ in range(2)]
    q = qpass.quantize(model, "awq", calib=calib, group_size=32)
    assert q.fc2.input_scale is not None and q.fc2.input_scale.shape == (256,)
    tree = qpass.quantize(model, "awq", calib=calib, group_size=32, merge=False)
    assert tree.fc2.input_scale is not None
    x = torch.randn(4, 128)
    torch.testing.assert_close(q(x), tree(x))


def test_calibration_is_deterministic():
    for method in ("awq", "gptq"):
        model = seeded(Stack)
        first = qpass.quantize(model, method, calib=batches(), group_size=32).state_dict()
        second = qpass.quantize(model, method, calib=batches(), group_size=32).state_dict()
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), (method, key)


def test_awq_without_calibration_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(awq_method, "_WARNED_UNCALIBRATED", set())
    with caplog.at_level(logging.WARNING, logger="qpass"):
        qpass.quantize(seeded(MLP), "awq")
        qpass.quantize(seeded(MLP), "awq")
    warnings = [r for r in caplog.records if "without calibration data" in r.getMessage()]
    assert len(warnings) == 1 and "rounded to nearest" in warnings[0].getMessage()


# --- the block runner -----------------------------------------------------------------------

def test_find_blocks():
    target, plan, _ = _plan(seeded(TinyLM, layers=3), "awq", {}, [], None, True, False, None, True)
    assert [path for path, _ in find_blocks(target, plan)] == ["layers.0", "layers.1", "layers.2"]
    target, plan, _ = _plan(seeded(MLP), "awq", {}, [], None, True, False, None, True)
    assert find_blocks(target, plan) == [("", target)]


class CacheBlock(nn.Module):
    """A block taking keyword inputs, one of them a cache it fills in place (as Hugging
    Face decoder layers do): each call must see the cache as it was captured."""

    def __init__(self, dim=64):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x, *, mask, cache):
        assert cache == [], "the block was handed a cache already filled"
        cache.append(x)
        return (x + self.fc(x) * mask,)


class CacheModel(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.blocks = nn.ModuleList(CacheBlock(dim) for _ in range(3))

    def forward(self, x):
        mask = torch.ones(x.shape[-1])
        for block in self.blocks:
            x = block(x, mask=mask, cache=[])[0]
        return x


def test_blocks_take_keyword_inputs_and_caches():
    model = seeded(CacheModel)
    calib = [torch.randn(4, 64) for _ in range(3)]
    for method in ("awq", "gptq"):
        q = qpass.quantize(model, method, calib=calib, group_size=32, merge=False)
        assert relative_error(q(calib[0]), model(calib[0])) < 0.05


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_calibration_on_another_device(method):
    model = seeded(Stack)
    on_cpu = qpass.quantize(model, method, calib=batches(), group_size=32, calib_device="cpu").state_dict()
    default = qpass.quantize(model, method, calib=batches(), group_size=32).state_dict()
    assert all(torch.equal(on_cpu[k], default[k]) for k in default)


class TokenMLPs(nn.Module):
    """Token ids -> embeddings -> NormMLP blocks, each token on its own; the padding id's
    embedding is loud, as garbage at padded positions can be."""

    def __init__(self, dim=128, layers=2):
        super().__init__()
        self.embed = nn.Embedding(16, dim)
        self.layers = nn.ModuleList(NormMLP(dim) for _ in range(layers))
        with torch.no_grad():
            self.embed.weight[0] = 1000.0

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x * attention_mask.unsqueeze(-1)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_padding_tokens_are_left_out_of_the_statistics(method):
    model = seeded(TokenMLPs)
    ids = torch.randint(1, 16, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, 16:], mask[1, 16:] = 0, 0  # the second sequence is padded from token 16 on
    padded = [{"input_ids": ids, "attention_mask": mask}]
    unpadded = [{"input_ids": ids[:1], "attention_mask": mask[:1]}, {"input_ids": ids[1:, :16], "attention_mask": mask[1:, :16]}]
    with_padding = qpass.quantize(model, method, calib=padded, group_size=32).state_dict()
    without = qpass.quantize(model, method, calib=unpadded, group_size=32).state_dict()
    assert all(torch.allclose(with_padding[k].float(), without[k].float(), atol=1e-6) for k in without)


# --- calibration data -----------------------------------------------------------------------

class WordTokenizer:
    """Stands for a Hugging Face tokenizer: one token id per word."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = torch.tensor([[len(word) for word in text.split()]])
        return {"input_ids": ids}


def test_text_windows():
    text = " ".join(["a", "bb", "ccc"] * 20)
    windows = text_windows(WordTokenizer(), text, window=8, n=5, batch_size=2)
    assert [w["input_ids"].shape for w in windows] == [(2, 8), (2, 8), (1, 8)]
    assert windows[0]["input_ids"][0].tolist() == [1, 2, 3, 1, 2, 3, 1, 2]
    assert bool((windows[0]["attention_mask"] == 1).all())
    with pytest.raises(ValueError, match="the text has 60 tokens, fewer than 10 windows of 8"):
        text_windows(WordTokenizer(), text, window=8, n=10)


# --- bad calibration data: a clear error, the model untouched -------------------------------

def assert_untouched(model, before):
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("method", ["awq", "gptq"])
@pytest.mark.parametrize("inplace", [False, True])
def test_bad_calibration_data(method, inplace):
    model = seeded(Stack)
    before = copy.deepcopy(model.state_dict())
    cases = [
        ([], r"calibration data is empty"),
        ([torch.randn(2, 16, 64)], r"calibration batch 0: block 'layers.0' rejected its inputs: RuntimeError: Given normalized_shape=\[128\]"),
        ([torch.randn(2, 16, 128), torch.full((2, 16, 128), float("nan"))],
         r"the input \(32, 128\) of linear 'layers.0.(gate|up)' has 4096 NaN/Inf values"),
    ]
    for calib, message in cases:
        with pytest.raises(ValueError, match=message):
            qpass.quantize(model, method, calib=calib, group_size=32, inplace=inplace)
        assert_untouched(model, before)


@pytest.mark.parametrize("group_size", [32, 64])
def test_awq_clipping_search_picks_the_clip_with_the_least_output_error(group_size):
    """Each group's clip is the candidate whose rounding least changes that group's partial
    outputs, counted on the outputs themselves (the search counts it through a Gram matrix)."""
    torch.manual_seed(0)
    n, k = 70, 4 * group_size
    x = torch.randn(96, k) * torch.rand(k) * 3
    weight = torch.randn(n, k) * 0.05
    weight[:, ::7] *= 6  # outliers, so that clipping pays somewhere
    config = awq_method.AWQConfig(group_size=group_size)
    clipped = awq_calib.search_clipping(weight, x, config)
    groups = k // group_size
    wg, cg = weight.view(n, groups, group_size), clipped.view(n, groups, group_size)
    xg = x.view(-1, groups, group_size)
    amax = wg.abs().amax(dim=-1)
    shrinks = torch.tensor([1 - step / awq_calib.CLIP_GRID
                            for step in range(int(awq_calib.CLIP_MAX_SHRINK * awq_calib.CLIP_GRID))])
    errors = []
    for shrink in shrinks:
        limit = (amax * shrink).unsqueeze(-1)
        candidate = awq_calib.fake_quantize(torch.maximum(torch.minimum(wg, limit), -limit).reshape(n, k), config)
        change = (candidate.view(n, groups, group_size) - wg)
        errors.append(torch.einsum("tgc,ngc->tng", xg, change).pow(2).sum(dim=0))  # [rows, groups]
    best = shrinks[torch.stack(errors).argmin(dim=0)]  # [rows, groups]
    chosen = cg.abs().amax(dim=-1) / amax
    assert (best < 1).any()  # the test reaches a clip below the max
    torch.testing.assert_close(chosen, best, rtol=1e-5, atol=0)
