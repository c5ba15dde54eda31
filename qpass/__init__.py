"""qpass: a weight-quantization pass for PyTorch models built of nn.Linear."""

from qpass import ops  # noqa: F401  (registers torch.ops.qpass.*)
from qpass.api import quantize
from qpass.backend import backend  # the function shadows the module name: import from qpass.backend
from qpass.io import CheckpointError, load, save
from qpass.methods.base import QuantConfig, get_config, method_names, register_method

__all__ = [
    "quantize", "backend", "save", "load", "CheckpointError",
    "register_method", "get_config", "method_names", "QuantConfig",
]
