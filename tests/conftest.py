import os
import sys
from pathlib import Path

import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# examples/assets.py loads the real models and texts for the tests and the examples.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
