"""Capture: a graph of the model, so that the plan can see which linears read what.

``symbolic_trace`` gives a graph the swap can rewrite (the result is then a GraphModule).
Models that do not trace (Hugging Face models, data-dependent control flow) keep their
module tree; given an example input, ``torch.export`` still gives the plan a graph to
read, without rewriting it.
"""

import logging
from typing import Any, Optional

import torch
from torch import fx, nn

log = logging.getLogger("qpass")


def symbolic_graph(model: nn.Module) -> Optional[fx.GraphModule]:
    """The model as a GraphModule, or None where it does not symbolically trace."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # tracing fails in many ways; any failure means "no graph"
        log.info("qpass: %s does not symbolically trace (%s: %s); keeping its module tree",
                 type(model).__name__, type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return None


def exported_graph(model: nn.Module, example: Any) -> Optional[fx.GraphModule]:
    """A read-only graph of the model run on ``example`` (a tensor, a tuple of positional
    inputs or a dict of keyword inputs) through ``torch.export``; its linears are
    ``aten.linear`` nodes whose weights are placeholders named after the parameters."""
    args, kwargs = split_example(example)
    try:
        program = torch.export.export(_TensorOutputs(model), args, kwargs, strict=False)
    except Exception as err:
        log.info("qpass: torch.export of %s failed (%s); planning without a graph", type(model).__name__, err)
        return None
    graph_module = program.graph_module
    names = program.graph_signature.inputs_to_parameters
    for node in graph_module.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            node.meta["qpass_parameter"] = names[node.name].removeprefix("model.")
    return graph_module


class _TensorOutputs(nn.Module):
    """The model returning only the tensors of its output: torch.export refuses outputs
    holding other objects (a Hugging Face model returns its key/value cache)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return _tensors_of(self.model(*args, **kwargs))


def _tensors_of(value: Any) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_of(v)]
    return []


def split_example(example: Any):
    """(args, kwargs) of one batch as the model takes it."""
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}
