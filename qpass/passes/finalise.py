"""Finalise: ``process_weights_after_loading`` once per load on every stub, then lint and
recompile the graph where the model is a GraphModule, and wait for the weights' writes."""

from typing import Iterable

import torch
from torch import fx, nn

from qpass.layers.linear import QuantLinear


def finalise(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.finalise()
    wait_for_weights([model])
    if isinstance(model, fx.GraphModule):
        model.graph.lint()
        model.recompile()
    return model


def wait_for_weights(modules: Iterable[nn.Module]) -> None:
    """Let the kernels that wrote the weights finish. A kernel launched with programmatic dependent launch
    (``kernels.common.dependent_launch``) reads its first weights while the kernel before it on the stream may
    still run: that one must not be writing them. (Once a model: callers that finalise stubs one by one call
    ``QuantLinear.finalise`` and then this.)"""
    tensors = [t for module in modules for t in (*module.parameters(), *module.buffers())]
    for device in {t.device for t in tensors if t.is_cuda}:
        torch.cuda.synchronize(device)
