"""Swap: build a quantized stub for each planned group, then put the stubs in the model.

Stubs are built and loaded detached from the model (``build_stubs``); only ``attach``
changes it, and attach does nothing that can fail on user input. So an error anywhere
before it leaves the model exactly as it was.
"""

import operator
from typing import Dict, List, Optional, Tuple

import torch
from torch import fx, nn

from qpass.layers.linear import QuantLinear
from qpass.layers.quantize_base import UnquantizedLinearMethod
from qpass.passes.plan import LinearGroup, Plan


def build_stub(group: LinearGroup, device: Optional[torch.device] = None) -> QuantLinear:
    """An empty stub for a merged group, or for its one linear (on its weight's device
    unless ``device`` is given)."""
    first = group.sites[0]
    method = group.config.get_linear_method() if group.config is not None else UnquantizedLinearMethod()
    with torch.device(device or first.weight.device):
        return QuantLinear(
            first.in_features,
            [s.out_features for s in group.sites],
            bias=first.bias is not None,
            params_dtype=first.weight.dtype,
            quant_method=method,
            shard_names=[s.name for s in group.sites],
        )


def stub_groups(plan: Plan) -> List[LinearGroup]:
    """The groups as stubs will hold them: merged groups whole, others one linear each."""
    out = []
    for group in plan.groups:
        if group.merged:
            out.append(group)
        else:
            out.extend(LinearGroup([s], group.config, group.input_node) for s in group.sites)
    return out


def attach(model: nn.Module, plan: Plan, stubs: List[Tuple[LinearGroup, QuantLinear]]) -> nn.Module:
    """Put the stubs in the model: rewrite the graph, or swap modules in the tree."""
    if plan.rewrite_graph:
        for group, stub in stubs:
            _rewrite_group(plan.graph, group, stub)
        plan.graph.graph.eliminate_dead_code()
        plan.graph.delete_all_unused_submodules()
        plan.graph.graph.lint()
        plan.graph.recompile()
        return plan.graph
    for group, stub in stubs:
        site = group.sites[0]
        parent, _, leaf = site.name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, stub)
    return model


def _rewrite_group(gm: fx.GraphModule, group: LinearGroup, stub: QuantLinear) -> None:
    sites = group.sites
    path = group.name
    if len(sites) == 1 and sites[0].is_module:
        _set_submodule(gm, path, stub)  # every call of the module now calls the stub
        return
    graph = gm.graph
    for site in sites:
        if not site.is_module:
            _release_params(gm, graph, site)
    _set_submodule(gm, path, stub)
    first = min((n for s in sites for n in s.nodes), key=_position(graph))
    with graph.inserting_before(first):
        for site in sites if len(sites) == 1 else ():
            for node in site.nodes:
                node.replace_all_uses_with(graph.call_module(path, (node.args[0],)))
        if len(sites) > 1:
            out = graph.call_module(path, (group.input_node,))
            parts = graph.call_function(torch.split, (out, [s.out_features for s in sites]), {"dim": -1})
            for i, site in enumerate(sites):
                site.nodes[0].replace_all_uses_with(graph.call_function(operator.getitem, (parts, i)))
    for site in sites:
        for node in site.nodes:
            graph.erase_node(node)


def _position(graph: fx.Graph):
    order: Dict[fx.Node, int] = {n: i for i, n in enumerate(graph.nodes)}
    return order.__getitem__


def _set_submodule(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    if hasattr(owner, leaf) and not isinstance(getattr(owner, leaf), nn.Module):
        delattr(owner, leaf)
    setattr(owner, leaf, module)


def _release_params(gm: fx.GraphModule, graph: fx.Graph, site) -> None:
    """Drop an F.linear's weight and bias from the module once only its calls read them
    (the stub holds them now); a parameter read elsewhere too stays."""
    for path in filter(None, (site.weight_name, site.bias_name)):
        reads = [n for n in graph.nodes if n.op == "get_attr" and n.target == path]
        if any(user not in site.nodes for node in reads for user in node.users):
            continue
        for node in reads:
            for user in site.nodes:
                user.replace_input_with(node, None)
            graph.erase_node(node)
        parent, _, leaf = path.rpartition(".")
        delattr(gm.get_submodule(parent) if parent else gm, leaf)
