"""Calibration data: a text cut into token windows, as batches a language model takes."""

from typing import Dict, List

import torch


def text_windows(tokenizer, text: str, window: int, n: int, batch_size: int = 1) -> List[Dict[str, torch.Tensor]]:
    """The first ``n`` windows of ``window`` consecutive tokens of ``text`` (no special
    tokens), as batches ``{"input_ids", "attention_mask"}`` of ``batch_size`` windows,
    ready for ``qpass.quantize(..., calib=...)``."""
    if window < 1 or n < 1 or batch_size < 1:
        raise ValueError(f"text_windows: window, n and batch_size must be >= 1, got {window}, {n}, {batch_size}")
    ids = _token_ids(tokenizer, text[: 8 * window * n])  # 8 characters a token is plenty for prose
    if ids.numel() < window * n:
        ids = _token_ids(tokenizer, text)
    if ids.numel() < window * n:
        raise ValueError(f"text_windows: the text has {ids.numel()} tokens, fewer than {n} windows of {window}; "
                         "give a longer text or ask for fewer windows")
    windows = ids[: window * n].reshape(n, window)
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in windows.split(batch_size)]


def _token_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
