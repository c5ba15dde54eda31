"""Calibrated AWQ on real models (../shared/ASSETS.md), calibrated on one text (Python's
documentation) and evaluated on another (Jane Austen). Minutes on 2 CPU cores.

The bars are what the code reaches today, below the calibration issue's (SmolLM2: recover
50% of what rounding loses, measured 42%; MiniLM: mean cosine 0.98, measured 0.9655), which
stays open; GPTQ on SmolLM2 does worse than rounding today and has no real-model test yet
(tests/test_calib.py checks it beats rounding on synthetic layers)."""

import time

import pytest
import torch

import qpass
from qpass.calib.data import text_windows

pytestmark = pytest.mark.slow

CALIBRATION_WINDOWS = 8  # x 512 tokens of Python's documentation


@pytest.fixture(scope="module")
def smollm2_calib(assets, smollm2):
    _, tokenizer, _, _ = smollm2
    return text_windows(tokenizer, assets.python_docs_text(), window=512, n=CALIBRATION_WINDOWS, batch_size=2)


def test_smollm2_awq_calibration_recovers_what_rounding_loses(assets, smollm2, smollm2_calib,
                                                              smollm2_awq_rtn_perplexity):
    model, _, windows, base = smollm2
    rounded = smollm2_awq_rtn_perplexity
    start = time.perf_counter()
    qmodel = qpass.quantize(model, "awq", calib=smollm2_calib, skip=["lm_head"])  # group 128; 64 where 576
    seconds = time.perf_counter() - start
    ppl = assets.perplexity(qmodel, windows)
    recovered = (rounded - ppl) / (rounded - base)
    print(f"SmolLM2-135M awq: perplexity {ppl:.3f} (float {base:.3f}, round-to-nearest {rounded:.3f}); "
          f"recovers {100 * recovered:.0f}% of the loss; calibration {seconds:.0f} s on {torch.get_num_threads()} threads")
    assert recovered >= 0.3


def test_minilm_awq_mean_cosine(assets, minilm):
    model, tokenizer, texts, reference = minilm
    calib_texts = assets.sentences(assets.python_docs_text(), 64)
    calib = [dict(tokenizer(calib_texts[i:i + 16], padding=True, return_tensors="pt")) for i in range(0, 64, 16)]
    qmodel = qpass.quantize(model, "awq", calib=calib)
    mean, worst = assets.mean_cosine(assets.embed(qmodel, tokenizer, texts), reference)
    print(f"all-MiniLM-L6-v2 awq: mean cosine {mean:.4f}, min {worst:.4f} over {len(texts)} sentences")
    assert mean >= 0.96  # round to nearest: 0.947
