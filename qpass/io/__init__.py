"""Checkpoints: ``save`` writes safetensors + config.json that peers read, ``load`` fills a
quantized model from one (qpass, AutoAWQ, GPTQ, compressed-tensors, or float)."""

from qpass.io.formats import CheckpointError
from qpass.io.load import load
from qpass.io.save import save

__all__ = ["save", "load", "CheckpointError"]
