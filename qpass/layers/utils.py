"""Helpers shared by layers and quantization methods."""

from typing import Any, Dict, Optional

import torch


def set_weight_attrs(weight: torch.Tensor, weight_attrs: Optional[Dict[str, Any]]) -> None:
    """Attach loading metadata (``weight_loader``, ``input_dim``, ``packed_dim``...) to a tensor.

    An attribute is set once: setting it again is almost always a bug in a method's
    ``create_weights``, so it raises instead of silently overwriting.
    """
    if weight_attrs is None:
        return
    for key, value in weight_attrs.items():
        if hasattr(weight, key):
            raise AttributeError(f"overwriting existing tensor attribute {key!r}")
        setattr(weight, key, value)
