"""qpass.quantize on real pretrained models and real text (../shared/ASSETS.md): the
accuracy bars of the core issue, round-to-nearest (calibration has its own tests)."""

import pytest
import torch

import qpass
from qpass.layers.linear import QuantLinear

assets = pytest.importorskip("assets", reason="examples/assets.py")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    model, tokenizer = assets.load_minilm()
    texts = assets.sentences(assets.austen_text(), 256)
    return model, tokenizer, texts, assets.embed(model, tokenizer, texts)


@pytest.mark.parametrize("method, bar", [("awq", 0.94), ("int8", 0.999)])
def test_minilm_embeddings_keep_their_direction(minilm, method, bar):
    model, tokenizer, texts, reference = minilm
    qmodel = qpass.quantize(model, method)
    assert type(qmodel) is type(model)  # a Hugging Face model keeps its class
    assert sum(isinstance(m, QuantLinear) for m in qmodel.modules()) == 36 + 1  # 37 linears, pooler's included
    mean, worst = assets.mean_cosine(assets.embed(qmodel, tokenizer, texts), reference)
    print(f"all-MiniLM-L6-v2 {method}: mean cosine {mean:.4f}, min {worst:.4f} over {len(texts)} sentences")
    assert mean >= bar


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = assets.load_smollm2()
    windows = assets.token_windows(tokenizer, assets.austen_text(), window=512, max_tokens=4096)
    return model, windows, assets.perplexity(model, windows)


@pytest.mark.parametrize("method, bar", [("int8", 0.01), ("awq", 0.40)])
def test_smollm2_perplexity(smollm2, method, bar):
    model, windows, base = smollm2
    qmodel = qpass.quantize(model, method, skip=["lm_head"])
    assert qmodel.lm_head.weight is qmodel.model.embed_tokens.weight
    if method == "awq":  # 576 inputs: groups of 64; 1536 inputs: groups of 128
        assert qmodel.model.layers[0].self_attn.q_proj.quant_method.quant_config.group_size == 64
        assert qmodel.model.layers[0].mlp.down_proj.quant_method.quant_config.group_size == 128
    ppl = assets.perplexity(qmodel, windows)
    print(f"SmolLM2-135M {method}: perplexity {ppl:.3f} vs float {base:.3f} ({100 * (ppl / base - 1):+.2f}%)")
    assert ppl <= base * (1 + bar)
