import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# examples/assets.py loads the real models and texts for the tests and the examples.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import qpass  # noqa: E402  (after TRITON_INTERPRET is chosen)


CALIBRATION_NOVEL = "Emma"  # what calibration reads; every evaluation reads Austen's other five novels


# Real models and their float results, loaded once per session: the real-model tests of the
# core (round to nearest) and of calibration evaluate on the same text.
@pytest.fixture(scope="session")
def assets():
    return pytest.importorskip("assets", reason="examples/assets.py")


@pytest.fixture(scope="session")
def calibration_text(assets):
    return assets.austen_text(CALIBRATION_NOVEL)


def evaluation_text(assets) -> str:
    return "\n\n\n".join(assets.austen_text(book) for book in assets.AUSTEN_BOOKS.values() if book != CALIBRATION_NOVEL)


@pytest.fixture(scope="session")
def minilm(assets):
    """(model, tokenizer, 256 sentences of the evaluation novels, their float embeddings)."""
    model, tokenizer = assets.load_minilm()
    texts = assets.sentences(evaluation_text(assets), 256)
    return model, tokenizer, texts, assets.embed(model, tokenizer, texts)


@pytest.fixture(scope="session")
def smollm2(assets):
    """(model, tokenizer, the first 4096 tokens of the evaluation novels in windows of 512, float perplexity)."""
    model, tokenizer = assets.load_smollm2()
    windows = assets.token_windows(tokenizer, evaluation_text(assets), window=512, max_tokens=4096)
    return model, tokenizer, windows, assets.perplexity(model, windows)


@pytest.fixture(scope="session")
def smollm2_awq_rtn_perplexity(assets, smollm2):
    """Perplexity of SmolLM2 with awq rounded to nearest (lm_head kept): what calibration must beat."""
    model, _, windows, _ = smollm2
    return assets.perplexity(qpass.quantize(model, "awq", skip=["lm_head"]), windows)
