"""qpass.quantize on real pretrained models and real text (../shared/ASSETS.md): the
accuracy bars of the core issue, round-to-nearest (calibration has its own tests)."""

import pytest

import qpass
from qpass.layers.linear import QuantLinear

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method, bar", [("awq", 0.94), ("int8", 0.999)])
def test_minilm_embeddings_keep_their_direction(assets, minilm, method, bar):
    model, tokenizer, texts, reference = minilm
    qmodel = qpass.quantize(model, method)
    assert type(qmodel) is type(model)  # a Hugging Face model keeps its class
    assert sum(isinstance(m, QuantLinear) for m in qmodel.modules()) == 36 + 1  # 37 linears, pooler's included
    mean, worst = assets.mean_cosine(assets.embed(qmodel, tokenizer, texts), reference)
    print(f"all-MiniLM-L6-v2 {method}: mean cosine {mean:.4f}, min {worst:.4f} over {len(texts)} sentences")
    assert mean >= bar


def test_smollm2_int8_perplexity(assets, smollm2):
    model, _, windows, base = smollm2
    qmodel = qpass.quantize(model, "int8", skip=["lm_head"])
    assert qmodel.lm_head.weight is qmodel.model.embed_tokens.weight
    ppl = assets.perplexity(qmodel, windows)
    print(f"SmolLM2-135M int8: perplexity {ppl:.3f} vs float {base:.3f} ({100 * (ppl / base - 1):+.2f}%)")
    assert ppl <= base * 1.01


def test_smollm2_awq_perplexity(smollm2, smollm2_awq_rtn_perplexity):
    model, _, _, base = smollm2
    qmodel = qpass.quantize(model, "awq", skip=["lm_head"])
    assert qmodel.lm_head.weight is qmodel.model.embed_tokens.weight
    # 576 inputs: groups of 64; 1536 inputs: groups of 128
    assert qmodel.model.layers[0].self_attn.q_proj.quant_method.quant_config.group_size == 64
    assert qmodel.model.layers[0].mlp.down_proj.quant_method.quant_config.group_size == 128
    ppl = smollm2_awq_rtn_perplexity  # the same quantization, evaluated once for this and calibration's tests
    print(f"SmolLM2-135M awq: perplexity {ppl:.3f} vs float {base:.3f} ({100 * (ppl / base - 1):+.2f}%)")
    assert ppl <= base * 1.40
