"""Plan: find every linear, check it, choose its method, group the linears that read the
same input, and decide which groups become one merged stub.

Nothing here changes the model: every error a user can cause is raised before the swap.
"""

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpass.methods.base import SUPPORTED_DTYPES, QuantConfig, get_config

log = logging.getLogger("qpass")


@dataclass
class LinearSite:
    """One linear of the original model: an ``nn.Linear`` or ``F.linear`` on its own parameters."""

    name: str  # module path, or the weight's path less ".weight" for F.linear
    weight_name: str  # key of the weight in the model's state dict
    bias_name: Optional[str]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    nodes: List[fx.Node] = field(default_factory=list)  # its calls in the captured graph
    is_module: bool = True

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


@dataclass
class LinearGroup:
    """Linears that read the same input with the same method: one stub when ``merged``."""

    sites: List[LinearSite]
    config: Optional[QuantConfig]  # None: kept in float (UnquantizedLinearMethod)
    input_node: Optional[fx.Node]
    merged: bool = False

    @property
    def name(self) -> str:
        if len(self.sites) == 1:
            return self.sites[0].name
        parent, _, _ = self.sites[0].name.rpartition(".")
        leaf = "_".join(s.name.rpartition(".")[2] for s in self.sites)
        return f"{parent}.{leaf}" if parent else leaf

    def site_rows(self) -> List[Tuple[LinearSite, slice]]:
        """Each linear and its rows of the group's weights concatenated along the outputs."""
        result, start = [], 0
        for site in self.sites:
            result.append((site, slice(start, start + site.out_features)))
            start += site.out_features
        return result


@dataclass
class Plan:
    groups: List[LinearGroup]
    graph: Optional[fx.GraphModule]  # the graph the groups' nodes live in
    rewrite_graph: bool  # the swap rewrites ``graph`` (else it swaps modules in the tree)
    messages: List[str] = field(default_factory=list)

    @property
    def sites(self) -> List[LinearSite]:
        return [s for g in self.groups for s in g.sites]


def matches(name: str, patterns: Sequence[str]) -> bool:
    """fnmatch patterns against a layer's path; a pattern also matches the path's tail,
    so "lm_head" or "*.q_proj" match "model.lm_head" and "layers.0.attn.q_proj"."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def resolve_overrides(overrides: Optional[Mapping[str, Mapping]], method: str, options: Mapping) -> Dict[str, QuantConfig]:
    """Validate per-pattern overrides up front: pattern -> its config."""
    resolved = {}
    for pattern, override in (overrides or {}).items():
        if not isinstance(override, Mapping):
            raise TypeError(f"override for {pattern!r} must be a dict of options, got {type(override).__name__}")
        override = dict(override)
        override_method = override.pop("method", method)
        base = dict(options) if override_method == method else {}
        resolved[pattern] = get_config(override_method, {**base, **override})
    return resolved


def find_sites(model: nn.Module, graph: Optional[fx.GraphModule], rewrite_graph: bool) -> List[LinearSite]:
    """Every linear the swap can replace, with its calls in ``graph``.

    Rewriting the graph, that is every ``nn.Linear`` call and every ``F.linear`` on the
    model's own parameters, in graph order. Keeping the module tree, it is every
    ``nn.Linear`` in module order (an ``F.linear`` inside a method cannot be swapped);
    the graph, if any, only tells which of them read the same input. Graph nodes are
    matched to modules by weight tensor, so tied weights (an exported graph names a tied
    head after the embedding) still find their module.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules(remove_duplicate=False))
    linear_of_weight = {id(m.weight): name for name, m in modules.items() if type(m) is nn.Linear}
    sites: Dict[str, LinearSite] = {}
    if not rewrite_graph:
        sites = {name: _module_site(name, m) for name, m in modules.items() if type(m) is nn.Linear}
    for node in graph.graph.nodes if graph is not None else ():
        site = _site_of_node(node, modules, params, linear_of_weight, rewrite_graph)
        if site is not None:
            sites.setdefault(site.name, site).nodes.append(node)
    return list(sites.values())


def _module_site(name: str, module: nn.Linear) -> LinearSite:
    bias_name = f"{name}.bias" if module.bias is not None else None
    return LinearSite(name, f"{name}.weight", bias_name, module.weight, module.bias)


def _param_of(node, params) -> Optional[str]:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr" and node.target in params:
        return node.target
    return node.meta.get("qpass_parameter")  # exported graphs: parameter placeholders


def _site_of_node(node: fx.Node, modules, params, linear_of_weight, rewrite_graph) -> Optional[LinearSite]:
    if node.op == "call_module" and type(modules.get(node.target)) is nn.Linear:
        return _module_site(node.target, modules[node.target])
    is_linear = node.op == "call_function" and (
        node.target is F.linear or node.target is torch.ops.aten.linear.default
    )
    if not is_linear:
        return None
    weight_name = _param_of(node.args[1], params)
    bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    bias_name = _param_of(bias_arg, params)
    if weight_name is None or (bias_arg is not None and bias_name is None):
        return None  # a computed weight or bias: not a layer of the model's own
    if not rewrite_graph:
        module_name = linear_of_weight.get(id(params[weight_name]))
        return _module_site(module_name, modules[module_name]) if module_name is not None else None
    # Named after the weight ("proj" for "proj.weight"), unless that names a module already.
    owner, _, leaf = weight_name.rpartition(".")
    name = owner if leaf == "weight" and owner and owner not in modules else weight_name
    return LinearSite(name, weight_name, bias_name, params[weight_name],
                      params[bias_name] if bias_name else None, is_module=False)


def check_site(site: LinearSite) -> None:
    """Reject a linear the methods cannot quantize, naming it and what is wrong."""
    w = site.weight
    if w.device.type == "meta":
        raise ValueError(f"linear {site.name!r}: weight is on the meta device; load real weights before quantizing")
    if w.dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"linear {site.name!r}: weight dtype {w.dtype} is not supported; use one of {supported}")
    for tensor, what in ((w, "weight"), (site.bias, "bias")):
        if tensor is not None and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"linear {site.name!r}: {what} {tuple(tensor.shape)} has {bad} NaN/Inf values")


def config_for(site: LinearSite, config: QuantConfig, skip, overrides, messages) -> Optional[QuantConfig]:
    if matches(site.name, skip):
        return None
    for pattern, override in overrides.items():
        if matches(site.name, [pattern]):
            config = override
            break
    layer_config, message = config.for_layer(site.name, site.in_features, site.out_features)
    if message:
        messages.append(message)
    return layer_config


def make_plan(
    model: nn.Module,
    graph: Optional[fx.GraphModule],
    config: QuantConfig,
    *,
    skip: Sequence[str] = (),
    overrides: Optional[Dict[str, QuantConfig]] = None,
    rewrite_graph: bool,
    check_weights: bool = True,
) -> Plan:
    """``check_weights=False`` plans from shapes alone (a meta model whose weights come
    from a checkpoint)."""
    sites = find_sites(model, graph, rewrite_graph)
    if not sites:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or F.linear on its own parameters to quantize")
    for site in sites if check_weights else ():
        check_site(site)
    messages: List[str] = []
    groups: Dict[tuple, LinearGroup] = {}
    for site in sites:
        site_config = config_for(site, config, skip, overrides or {}, messages)
        input_node = site.nodes[0].args[0] if len(site.nodes) == 1 else None
        # Siblings merge only when one stub can hold them all: same input, method, options,
        # dtype and device, bias on all or none, and each called once.
        key = (input_node, site_config, site.weight.dtype, site.weight.device, site.bias is None) if input_node is not None else (site.name,)
        group = groups.get(key)
        if group is None:
            groups[key] = LinearGroup([site], site_config, input_node)
        else:
            group.sites.append(site)
    for group in groups.values():
        group.merged = rewrite_graph and group.config is not None and len(group.sites) > 1
    for message in messages:
        log.info("qpass: %s", message)
    return Plan(list(groups.values()), graph, rewrite_graph, messages)

