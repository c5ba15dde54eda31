"""qpass: weight quantization as a graph pass for PyTorch."""

from qpass import ops  # noqa: F401  (registers torch.ops.qpass.*)
from qpass.api import quantize
from qpass.methods.base import QuantConfig, get_config, method_names, register_method

__all__ = ["quantize", "register_method", "get_config", "method_names", "QuantConfig"]
