"""Calibration on real models (../shared/ASSETS.md): calibrated on one of Jane Austen's novels
(*Emma*, conftest's CALIBRATION_NOVEL) and evaluated on her other five (SmolLM2: the start of
*Sense and Sensibility*). Minutes on 2 CPU cores.

The bars are the calibration issue's: recover at least 50% of the perplexity that rounding to
nearest loses (SmolLM2-135M), keep a mean cosine of at least 0.98 (all-MiniLM-L6-v2), in at
most 5 minutes on 2 CPU cores. Out-of-domain calibration (Python's documentation and the Jargon
File for the same evaluation) recovers less: bench/NOTES-calibration.md."""

import time

import pytest
import torch

import qpass
from qpass.calib.data import text_windows
from qpass.calib.gptq import gptq_quantize, hessian
from models import rtn_weight

pytestmark = pytest.mark.slow

CALIBRATION_WINDOWS = 16  # x 512 tokens


@pytest.fixture(scope="module")
def smollm2_calib(smollm2, calibration_text):
    _, tokenizer, _, _ = smollm2
    return text_windows(tokenizer, calibration_text, window=512, n=CALIBRATION_WINDOWS, batch_size=2)


def calibrated_recovery(assets, smollm2, calib, rounded, method, note):
    """(share of the rounding loss that calibrating with ``method`` recovers, seconds of calibration)."""
    model, _, windows, base = smollm2
    start = time.perf_counter()
    qmodel = qpass.quantize(model, method, calib=calib, skip=["lm_head"])
    seconds = time.perf_counter() - start
    ppl = assets.perplexity(qmodel, windows)
    recovered = (rounded - ppl) / (rounded - base)
    print(f"SmolLM2-135M {method} ({note}): perplexity {ppl:.3f} (float {base:.3f}, round-to-nearest {rounded:.3f}); "
          f"recovers {100 * recovered:.0f}% of the loss; calibration {seconds:.0f} s on {torch.get_num_threads()} threads")
    return recovered, seconds


def test_smollm2_awq_calibration_recovers_what_rounding_loses(assets, smollm2, smollm2_calib,
                                                              smollm2_awq_rtn_perplexity):
    recovered, seconds = calibrated_recovery(assets, smollm2, smollm2_calib, smollm2_awq_rtn_perplexity, "awq",
                                             "group 128; 64 where 576")
    assert recovered >= 0.5
    assert seconds <= 300  # the bar for 2 CPU cores


def test_smollm2_gptq_calibration_recovers_what_rounding_loses(assets, smollm2, smollm2_calib):
    model, _, windows, _ = smollm2
    rounded = assets.perplexity(qpass.quantize(model, "gptq", skip=["lm_head"]), windows)  # symmetric, as below
    recovered, seconds = calibrated_recovery(assets, smollm2, smollm2_calib, rounded, "gptq", "act-order, symmetric")
    assert recovered >= 0.5
    assert seconds <= 300


def test_gptq_token_norm_cap_saves_a_massive_activation_layer(assets, smollm2, smollm2_calib):
    """Layer 28's down_proj reads one channel that a few tokens (the first of each window)
    drive ~1000x above the rest: plain GPTQ fits those tokens and costs every other one."""
    model, _, windows, _ = smollm2
    layer = model.model.layers[28].mlp.down_proj
    inputs = []
    hook = layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            for batch in smollm2_calib:
                model.model(**batch)  # the layers only: the head's logits are not needed
    finally:
        hook.remove()
    x, weight = torch.cat(inputs), layer.weight.detach().clone()
    candidates = {"float": weight, "round to nearest": rtn_weight(weight, 128, sym=True),
                  "gptq": gptq_quantize(weight, hessian(x), 128, True, False, 0.01)[4],
                  "gptq, token norms capped": gptq_quantize(weight, hessian(x, 2.0), 128, True, False, 0.01)[4]}
    ppl = {}
    try:
        for name, candidate in candidates.items():
            layer.weight.data = candidate
            ppl[name] = assets.perplexity(model, windows[:4])
    finally:
        layer.weight.data = weight
    print("SmolLM2-135M, layer 28's down_proj alone quantized: perplexity on 2048 tokens",
          {name: round(value, 3) for name, value in ppl.items()})
    assert ppl["gptq, token norms capped"] < ppl["round to nearest"] < ppl["gptq"]


def test_minilm_awq_mean_cosine(assets, minilm, calibration_text):
    model, tokenizer, texts, reference = minilm
    calib_texts = assets.sentences(calibration_text, 128)
    calib = [dict(tokenizer(calib_texts[i:i + 16], padding=True, return_tensors="pt")) for i in range(0, 128, 16)]
    qmodel = qpass.quantize(model, "awq", calib=calib)
    mean, worst = assets.mean_cosine(assets.embed(qmodel, tokenizer, texts), reference)
    print(f"all-MiniLM-L6-v2 awq: mean cosine {mean:.4f}, min {worst:.4f} over {len(texts)} sentences")
    assert mean >= 0.98  # round to nearest: 0.948
