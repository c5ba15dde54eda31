"""examples/assets.py: the real texts load, and the helpers that cut them into data behave."""

import math
import shutil
from types import SimpleNamespace

import pytest
import torch

assets = pytest.importorskip("assets", reason="examples/assets.py")

needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="the Austen and Jargon texts come from Debian packages")


@needs_apt
def test_pride_and_prejudice_is_the_novel():
    text = assets.austen_text("Pride & Prejudice")
    assert text.startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged, that a single man in possession" in text
    assert 600_000 < len(text) < 800_000


@needs_apt
def test_all_of_austen_is_the_six_novels_in_publication_order():
    titles = ["Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma", "Northanger Abbey", "Persuasion"]
    novels = [assets.austen_text(title) for title in titles]
    for title, novel in zip(titles, novels):
        assert novel.upper().startswith(title.upper().replace("&", "AND"))
    assert assets.austen_text() == "\n\n\n".join(novels)
    assert len(assets.austen_text()) > 3_500_000


@needs_apt
def test_unknown_austen_title_names_the_known_ones():
    with pytest.raises(ValueError, match="Pride & Prejudice"):
        assets.austen_text("Pride and Prejudice")


@needs_apt
def test_jargon_file_is_the_jargon_file():
    text = assets.jargon_text()
    assert "The Jargon File" in text[:200]
    assert "hacker" in text and len(text) > 1_000_000


def test_python_docs_are_prose():
    text = assets.python_docs_text()
    assert "context manager" in text and len(text) > 300_000


def test_r_reader_reads_a_named_character_vector():
    # serialize(c(a = "x", b = NA), NULL, xdr = TRUE, version = 3), written out by hand
    def integer(value):
        return value.to_bytes(4, "big", signed=True)

    def charsxp(text):
        return integer(0x00040009) + integer(len(text)) + text.encode()

    names = integer(0x00000010) + integer(2) + charsxp("a") + charsxp("b")
    data = (
        b"X\n" + integer(3) + integer(0x040201) + integer(0x030500) + integer(5) + b"UTF-8"
        + integer(0x00000210) + integer(2) + charsxp("x") + integer(0x00000009) + integer(-1)
        + integer(0x00000402) + integer(0x00000001) + charsxp("names") + names + integer(0x000000FE)
    )  # fmt: skip
    assert assets.RReader(data).item() == {"a": "x", "b": None}


def test_sentences_are_deterministic_and_in_range():
    text = assets.python_docs_text()
    picked = assets.sentences(text, 50, min_words=5, max_words=40)
    assert len(picked) == 50 and len(set(picked)) == 50
    assert picked == assets.sentences(text, 50, min_words=5, max_words=40)
    for sentence in picked:
        assert 5 <= len(sentence.split()) <= 40
        assert sentence[-1] in ".!?\"'" and "\n" not in sentence


def test_sentences_too_many_asked():
    with pytest.raises(ValueError, match="only 1 sentences"):
        assets.sentences("A short text with one sentence in it.", 2)


class WordTokenizer:
    """Stands in for a Hugging Face tokenizer: one id per word."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [len(word) for word in text.split()]}


def test_token_windows_shape():
    text = assets.python_docs_text()
    windows = assets.token_windows(WordTokenizer(), text, window=512, max_tokens=4096)
    assert windows.shape == (8, 512) and windows.dtype == torch.long
    assert assets.token_windows(WordTokenizer(), text, window=100, max_tokens=450).shape == (4, 100)
    assert assets.token_windows(WordTokenizer(), " ".join(["word"] * 1000), window=300, max_tokens=4096).shape == (3, 300)
    with pytest.raises(ValueError, match="too few"):
        assets.token_windows(WordTokenizer(), "three words only", window=4)


class UniformLM(torch.nn.Module):
    """A causal LM that gives every one of `vocabulary` tokens the same probability."""

    def __init__(self, vocabulary):
        super().__init__()
        self.vocabulary = vocabulary
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return SimpleNamespace(logits=torch.zeros(*ids.shape, self.vocabulary) + self.anchor)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    windows = torch.randint(0, 37, (5, 16))
    assert math.isclose(assets.perplexity(UniformLM(37), windows, batch_size=2), 37, rel_tol=1e-5)


def test_mean_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    mean, worst = assets.mean_cosine(a, b)
    assert math.isclose(worst, 2**-0.5, rel_tol=1e-6)
    assert math.isclose(mean, (1 + 2**-0.5) / 2, rel_tol=1e-6)


@pytest.mark.slow  # ~12 s from the cache on 2 cores; ~15-50 s when it first converts the GGUF
def test_smollm2_loads_as_an_fp32_llama():
    model, tokenizer = assets.load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32 and getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    windows = assets.token_windows(tokenizer, assets.python_docs_text(), window=64, max_tokens=128)
    assert windows.shape == (2, 64)
    assert 3 < assets.perplexity(model, windows) < 100


def test_minilm_embeddings_are_unit_vectors_and_tell_sentences_apart():
    model, tokenizer = assets.load_minilm()
    texts = ["The cat sat on the mat.", "A cat was sitting on the mat.", "Quarterly tax filings are due in April."]
    embeddings = assets.embed(model, tokenizer, texts, batch_size=2)
    assert embeddings.shape == (3, 384)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert embeddings[0] @ embeddings[1] > embeddings[0] @ embeddings[2] + 0.3
