"""What a calibration hands to the swap: weights to round, ready checkpoint tensors,
and edits to the model that are applied only once nothing can fail any more."""

from dataclasses import dataclass, field
from typing import Dict

import torch
from torch import nn


@dataclass
class Calibration:
    # linear name -> float weight [out, in] to round to nearest (AWQ: scaled and clipped)
    weights: Dict[str, torch.Tensor] = field(default_factory=dict)
    # linear name -> checkpoint tensors of its method (GPTQ: qweight, scales, ...)
    checkpoint: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)
    # parameter path -> its new value (AWQ: the producing norm's weight divided by the scales)
    folds: Dict[str, torch.Tensor] = field(default_factory=dict)
    # stub path -> per-input-channel factor its input is multiplied by (scales nothing absorbed)
    input_scales: Dict[str, torch.Tensor] = field(default_factory=dict)

    def apply_folds(self, model: nn.Module) -> None:
        with torch.no_grad():
            for path, value in self.folds.items():
                model.get_parameter(path).copy_(value)
