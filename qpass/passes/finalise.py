"""Finalise: ``process_weights_after_loading`` once per load on every stub, then lint and
recompile the graph where the model is a GraphModule."""

from torch import fx, nn

from qpass.layers.linear import QuantLinear


def finalise(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.finalise()
    if isinstance(model, fx.GraphModule):
        model.graph.lint()
        model.recompile()
    return model
