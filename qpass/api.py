"""``qpass.quantize``: the passes in order, capture -> plan -> calibrate -> swap -> load ->
finalise -> lower (graph modules only). The model is only changed by the last steps
(attach, lower), so a failure anywhere before leaves it as it was."""

import copy
import logging
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from qpass.calib.base import Calibration
from qpass.layers.linear import QuantLinear
from qpass.methods.base import get_config
from qpass.passes.capture import exported_graph, symbolic_graph
from qpass.passes.finalise import wait_for_weights
from qpass.passes.load import install_state_dict_hooks, load_float_shard, load_shard
from qpass.passes.lower import lower
from qpass.passes.plan import LinearGroup, Plan, make_plan, resolve_overrides
from qpass.passes.swap import attach, build_stub, stub_groups

log = logging.getLogger("qpass")


def quantize(
    model: nn.Module,
    method: str,
    *,
    calib: Optional[Iterable[Any]] = None,
    skip: Sequence[str] = (),
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
    merge: bool = True,
    inplace: bool = False,
    calib_device: Optional[Any] = None,
    **options: Any,
) -> nn.Module:
    """Quantize every linear of ``model`` with ``method`` ("awq", "int8", ...).

    - ``options``: the method's options, e.g. ``group_size=64``.
    - ``skip``: fnmatch patterns of layer paths kept in float ("lm_head", "*.down_proj").
    - ``overrides``: pattern -> options for matching layers, e.g.
      ``{"*.down_proj": {"method": "int8"}}``; the first matching pattern wins.
    - ``calib``: calibration batches (tensors, tuples or dicts of keyword tensors) for
      methods that calibrate.
    - ``calib_device``: run the calibration there ("cuda"), one block at a time, whatever
      device the model is on.
    - ``merge``: where the model symbolically traces, return a GraphModule in which
      linears that read the same input are one merged stub. Models that do not trace,
      and ``merge=False``, keep their class and get one stub per linear.
    - ``inplace``: rewrite ``model`` itself (one stub per linear) instead of a copy.
    """
    calib_batches = list(calib) if calib is not None else None
    target, plan, config = _plan(model, method, options, skip, overrides, merge, inplace,
                                 example=calib_batches[0] if calib_batches else None, check_weights=True)
    calibration = config.calibrate(target, plan, calib_batches, calib_device) or Calibration()
    stubs = []
    for group in stub_groups(plan):
        stub = build_stub(group)
        _load_group(stub, group, calibration)
        stub.finalise()
        stubs.append((group, stub))
    wait_for_weights(stub for _, stub in stubs)
    calibration.apply_folds(target)
    result = lower_graph(_attach(target, plan, stubs))
    quantized = sum(len(g.sites) for g, _ in stubs if g.config is not None)
    log.info("qpass: %s: %d of %d linears quantized with %s (%d stubs)", type(model).__name__,
             quantized, len(plan.sites), method, len(stubs))
    return result


def skeleton(
    model: nn.Module,
    method: str,
    *,
    skip: Sequence[str] = (),
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
    merge: bool = True,
    device: Optional[torch.device] = None,
    **options: Any,
) -> nn.Module:
    """The model rewritten as ``quantize`` would, with empty stubs (on ``device``) left
    for a checkpoint to fill through their weight loaders; ``model`` may be on the meta
    device. The caller loads the tensors and then runs ``qpass.passes.finalise`` and
    ``lower_graph`` (after any tensor-parallel change of stubs: a row-parallel stub cannot
    compute an activation)."""
    target, plan, _ = _plan(model, method, options, skip, overrides, merge, inplace=False,
                            example=None, check_weights=False, keep_weights=False)
    stubs = [(group, build_stub(group, device)) for group in stub_groups(plan)]
    return _attach(target, plan, stubs)


def _plan(model, method, options, skip, overrides, merge, inplace, example, check_weights,
          keep_weights=True) -> Tuple[nn.Module, Plan, Any]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize takes an nn.Module, got {type(model).__name__}")
    config = get_config(method, options)
    override_configs = resolve_overrides(overrides, method, options)
    skip = [skip] if isinstance(skip, str) else list(skip)
    target = model if inplace else copy.deepcopy(model, memo=None if keep_weights else _meta_parameters(model))
    graph = symbolic_graph(target) if merge and not inplace else None
    analysis_graph = graph if graph is not None or example is None else exported_graph(target, example)
    plan = make_plan(target, analysis_graph, config, skip=skip, overrides=override_configs,
                     rewrite_graph=graph is not None, check_weights=check_weights)
    return target, plan, config


def _meta_parameters(model: nn.Module) -> dict:
    """A deepcopy memo giving every parameter a meta copy: a skeleton's parameters all come
    from the checkpoint, so copying the float ones would only cost memory."""
    return {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}


def _load_group(stub: QuantLinear, group: LinearGroup, calibration: Calibration) -> None:
    for shard, site in enumerate(group.sites):
        bias = calibration.folds.get(site.bias_name, site.bias)  # AWQ may fold scales into it
        if group.config is None:
            stub.weight = site.weight  # shared, not copied: tied weights stay tied
            if site.bias is not None:
                stub.bias = site.bias
        elif site.name in calibration.checkpoint:
            load_shard(stub, shard, calibration.checkpoint[site.name], bias)
        else:
            load_float_shard(stub, shard, calibration.weights.get(site.name, site.weight), bias)
    if group.name in calibration.input_scales:
        stub.set_input_scale(calibration.input_scales[group.name])


def _attach(target: nn.Module, plan: Plan, stubs: List[Tuple[LinearGroup, QuantLinear]]) -> nn.Module:
    result = attach(target, plan, stubs)
    install_state_dict_hooks(result, [group.name for group, _ in stubs])
    return result


def lower_graph(model: nn.Module) -> nn.Module:
    """The lowering pass where the result is a graph (a module tree has no graph to fold)."""
    return lower(model) if isinstance(model, fx.GraphModule) else model
