"""Finalise: ``process_weights_after_loading`` once per load on every stub, then lint and
recompile the graph where the model is a GraphModule."""

import torch
from torch import fx, nn

from qpass.layers.linear import QuantLinear


def finalise(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.finalise()
    _wait_for_weights(model)
    if isinstance(model, fx.GraphModule):
        model.graph.lint()
        model.recompile()
    return model


def _wait_for_weights(model: nn.Module) -> None:
    """Let the kernels that wrote the weights finish. A kernel launched with programmatic dependent launch
    (``kernels.common.dependent_launch``) reads its first weights while the kernel before it on the stream may
    still run: that one must not be writing them."""
    tensors = [*model.parameters(), *model.buffers()]
    for device in {t.device for t in tensors if t.is_cuda}:
        torch.cuda.synchronize(device)
