"""AWQ and GPTQ on real models (../shared/ASSETS.md), calibrated on one text and evaluated
on another: the accuracy bars of the calibration issue. Minutes on 2 CPU cores."""

import time

import pytest
import torch

import qpass
from qpass.calib.data import text_windows

assets = pytest.importorskip("assets", reason="examples/assets.py")

pytestmark = pytest.mark.slow

CALIBRATION_WINDOWS = 8  # x 512 tokens of Python's documentation
CALIBRATION_SECONDS = 300  # the bar for SmolLM2 on 2 CPU cores


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = assets.load_smollm2()
    calib = text_windows(tokenizer, assets.python_docs_text(), window=512, n=CALIBRATION_WINDOWS, batch_size=2)
    windows = assets.token_windows(tokenizer, assets.austen_text(), window=512, max_tokens=4096)
    base = assets.perplexity(model, windows)
    rounded = assets.perplexity(qpass.quantize(model, "awq", skip=["lm_head"]), windows)
    return model, calib, windows, base, rounded


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_smollm2_calibration_recovers_half_of_what_rounding_loses(smollm2, method):
    model, calib, windows, base, rounded = smollm2
    start = time.perf_counter()
    qmodel = qpass.quantize(model, method, calib=calib, skip=["lm_head"])  # group 128; 64 where 576
    seconds = time.perf_counter() - start
    ppl = assets.perplexity(qmodel, windows)
    recovered = (rounded - ppl) / (rounded - base)
    print(f"SmolLM2-135M {method}: perplexity {ppl:.3f} (float {base:.3f}, round-to-nearest {rounded:.3f}); "
          f"recovers {100 * recovered:.0f}% of the loss; calibration {seconds:.0f} s on {torch.get_num_threads()} threads")
    assert recovered >= 0.5
    assert seconds <= CALIBRATION_SECONDS


def test_minilm_awq_mean_cosine():
    model, tokenizer = assets.load_minilm()
    texts = assets.sentences(assets.austen_text(), 256)
    reference = assets.embed(model, tokenizer, texts)
    calib_texts = assets.sentences(assets.python_docs_text(), 64)
    calib = [dict(tokenizer(calib_texts[i:i + 16], padding=True, return_tensors="pt")) for i in range(0, 64, 16)]
    qmodel = qpass.quantize(model, "awq", calib=calib)
    mean, worst = assets.mean_cosine(assets.embed(qmodel, tokenizer, texts), reference)
    print(f"all-MiniLM-L6-v2 awq: mean cosine {mean:.4f}, min {worst:.4f} over {len(texts)} sentences")
    assert mean >= 0.98
