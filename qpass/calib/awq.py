"""AWQ calibration (activation-aware weight quantization), block by block.

For each group of linears that read the same input:

1. per-input-channel activation magnitudes ``mean|x|``;
2. a 20-point grid search of scales ``s = mean|x|**a`` (a = 0, 0.05 .. 0.95; a = 0 is
   plain round-to-nearest) minimising the error of the group's outputs when ``W * s`` is
   rounded and the input divided by ``s``;
3. ``1/s`` folded into the op that produces the input, found in the graph: a norm's
   weight (and bias), or the output rows of a preceding linear reached only through
   elementwise multiplications (SwiGLU's up_proj -> down_proj); each op on the way must
   feed nothing else. Where nothing can absorb it, ``1/s`` stays on the stub as an input
   scale;
4. per weight group, a search of the clipping range (the group's max shrunk by up to 50%)
   minimising the error of the group's partial outputs.

5. the scaled, clipped weights rounded onto that grid: by GPTQ (``rounding="gptq"``, the
   default: each column's rounding error spread over the columns not yet rounded, in
   act-order, the grid fixed beforehand; ``Calibration.checkpoint`` then holds the AWQ
   checkpoint tensors), or to nearest (``"nearest"``, AutoAWQ's; ``Calibration.weights``
   holds what the method rounds).
"""

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpass.calib.base import Calibration
from qpass.calib.blocks import run_blocks
from qpass.calib.gptq import gptq_quantize, hessian
from qpass.calib.rtn import quantize_groupwise
from qpass.methods.awq import AWQConfig, checkpoint_from_quantized
from qpass.methods.gptq import GPTQConfig
from qpass.passes.plan import LinearGroup, LinearSite, Plan

SCALE_GRID = 20
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
# Tokens the clipping search uses (evenly strided, so deterministic): enough for stable
# choices, few enough for minutes on a CPU. The scale search uses every token.
CLIP_SEARCH_TOKENS = 512
CLIP_ROWS_PER_STEP = 1024  # output channels per step of the clip search (bounds memory)
GPTQ_DEFAULTS = GPTQConfig()  # the damping and token-norm cap of rounding="gptq"

_MULS = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor, "mul")
_ADDS = (operator.add, torch.add, torch.ops.aten.add.Tensor, "add")
# Ops that pass channels through unchanged (dtype casts, copies, eval-mode dropout).
_PASS_THROUGH = (torch.ops.aten._to_copy.default, torch.ops.aten.clone.default, torch.ops.aten.contiguous.default,
                 torch.ops.aten.alias.default, torch.ops.aten.detach.default, torch.ops.aten.dropout.default,
                 F.dropout, "to", "contiguous", "float", "clone")


@dataclass
class Absorber:
    """Where a group's ``1/s`` goes: norm parameters, or a preceding linear's rows."""

    params: List[str] = field(default_factory=list)  # parameter paths divided by s
    linear: Optional[LinearSite] = None


def calibrate_awq(model: nn.Module, plan: Plan, calib, config, device=None) -> Calibration:
    groups = [g for g in plan.groups if isinstance(g.config, AWQConfig)]
    calibration = Calibration()
    site_of_node = {s.nodes[0]: s for s in plan.sites if len(s.nodes) == 1}
    group_of_site = {s.name: g for g in plan.groups for s in g.sites}
    params = dict(model.named_parameters(remove_duplicate=False))

    def quantize_block(index: int, block_groups: List[LinearGroup], inputs: List[torch.Tensor]):
        in_block = {s.name for g in block_groups for s in g.sites}
        scales = [search_scales(g, x) for g, x in zip(block_groups, inputs)]
        weights = {s.name: s.weight.detach().to(x.device, torch.float32) * sc
                   for g, x, sc in zip(block_groups, inputs, scales) for s in g.sites}
        row_scales: Dict[str, torch.Tensor] = {}
        for group, s in zip(block_groups, scales):
            absorber = find_absorber(plan, group, site_of_node, params)
            prev = absorber.linear if absorber is not None else None
            if prev is not None and prev.name in in_block and prev.name in weights:
                weights[prev.name] = weights[prev.name] / s.unsqueeze(1)
                row_scales[prev.name] = s
                _fold_bias(calibration, prev, s)
            elif prev is not None and group_of_site[prev.name].config is None:
                calibration.folds[prev.weight_name] = (prev.weight.detach().float() / s.cpu().unsqueeze(1)).to(prev.weight.dtype)
                _fold_bias(calibration, prev, s)
            elif absorber is not None and absorber.params:
                for path in absorber.params:
                    calibration.folds[path] = (params[path].detach().float() / s.to(params[path].device)).to(params[path].dtype)
            else:
                for name in _stub_paths(plan, group):
                    calibration.input_scales[name] = (1 / s).to(group.sites[0].weight.device)
        simulated = {}
        for group, x, s in zip(block_groups, inputs, scales):
            x_scaled = _strided(x, CLIP_SEARCH_TOKENS) / s
            clipped = {site.name: search_clipping(weights[site.name], x_scaled, group.config) for site in group.sites}
            if group.config.rounding == "gptq":
                rounded = round_gptq(clipped, hessian(x, GPTQ_DEFAULTS.token_norm_cap, divisor=s), group, calibration)
            else:
                rounded = {name: fake_quantize(w, group.config) for name, w in clipped.items()}
                for site in group.sites:
                    calibration.weights[site.name] = clipped[site.name].to(site.weight.device, site.weight.dtype)
            for site in group.sites:
                # The float weight this stub stands for, seen from the unscaled input and output.
                fake = rounded[site.name] / s
                if site.name in row_scales:
                    fake = fake * row_scales[site.name].unsqueeze(1)
                simulated[site.name] = fake.to(site.weight.dtype)
        return simulated

    run_blocks(model, plan, calib, groups, quantize_block, device=device, desc="awq calibration")
    return calibration


def _fold_bias(calibration: Calibration, site: LinearSite, s: torch.Tensor) -> None:
    if site.bias is not None:
        calibration.folds[site.bias_name] = (site.bias.detach().float() / s.to(site.bias.device)).to(site.bias.dtype)


def _stub_paths(plan: Plan, group: LinearGroup) -> List[str]:
    """The stubs that will read the group's input: the merged one, or one per linear."""
    return [group.name] if group.merged else [s.name for s in group.sites]


def _strided(x: torch.Tensor, count: int) -> torch.Tensor:
    """At most ``count`` rows of ``x``, evenly spaced."""
    if x.shape[0] <= count:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, count, device=x.device).round().long()]


def fake_quantize(weight: torch.Tensor, config) -> torch.Tensor:
    """``weight`` rounded to the method's int4 grid and back to float32: the arithmetic of
    ``quantize_groupwise``, kept in float for speed (the searches call it hundreds of times)."""
    n, k = weight.shape
    qmax = 2**config.bits - 1
    w = weight.float().reshape(n, k // config.group_size, config.group_size)
    wmin, wmax = torch.aminmax(w, dim=-1, keepdim=True)
    if config.zero_point:
        wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
        scales = ((wmax - wmin) / qmax).clamp(min=1e-8)
        zeros = torch.round(-wmin / scales).clamp(0, qmax)
    else:
        scales = (2 * torch.maximum(wmax, -wmin) / qmax).clamp(min=1e-8)
        zeros = torch.full_like(scales, (qmax + 1) // 2)
    q = (torch.round(w / scales) + zeros).clamp(0, qmax)
    return ((q - zeros) * scales).reshape(n, k)


def round_gptq(clipped: Dict[str, torch.Tensor], h: torch.Tensor, group: LinearGroup,
               calibration: Calibration) -> Dict[str, torch.Tensor]:
    """The group's scaled, clipped weights rounded by GPTQ in act-order, on the grid that
    rounding to nearest gives them; their AWQ checkpoint tensors go into ``calibration``, and
    the float32 weights they stand for are returned. The grid is fixed before GPTQ moves any
    weight, so the clipping search's choice holds and the groups stay AWQ's (no ``g_idx``).
    GPTQ's rows are independent: the group's linears share one pass over the columns."""
    config = group.config
    sym = not config.zero_point
    weight = torch.cat([clipped[site.name] for site in group.sites])
    _, scales, zeros = quantize_groupwise(weight, config.bits, config.group_size, symmetric=sym)
    q, scales, zeros, _, dequantized = gptq_quantize(weight, h, config.group_size, sym, True, GPTQ_DEFAULTS.damp_percent,
                                                     name=group.name, grid=(scales, zeros))
    result = {}
    for site, rows in group.site_rows():
        tensors = checkpoint_from_quantized(q[rows], scales[rows], zeros[rows], site.weight.dtype)
        calibration.checkpoint[site.name] = {k: v.to(site.weight.device) for k, v in tensors.items()}
        result[site.name] = dequantized[rows]
    return result


def search_scales(group: LinearGroup, x: torch.Tensor) -> torch.Tensor:
    """The per-input-channel scales ``s`` (float32 [K]) minimising the mean squared error of
    the group's outputs over every calibration token, ``tr(dW X^T X dW^T)``."""
    magnitude = x.abs().mean(dim=0)
    weight = torch.cat([s.weight.detach().to(x.device, torch.float32) for s in group.sites])
    gram = x.t() @ x
    best_error, best = float("inf"), None
    for step in range(SCALE_GRID):
        s = magnitude.pow(step / SCALE_GRID).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        delta = fake_quantize(weight * s, group.config) / s - weight
        error = ((delta @ gram) * delta).sum().item()
        if error < best_error:
            best_error, best = error, s
    return best


def search_clipping(weight: torch.Tensor, x: torch.Tensor, config) -> torch.Tensor:
    """``weight`` [N, K] clipped, per group of ``group_size`` inputs, to the fraction of its
    max (1, 0.95 .. 0.55) whose rounding least changes the group's partial outputs on ``x``.

    A group's change of output over the tokens is ``d G d^T`` for a change ``d`` of its
    weights, with ``G`` the group's Gram matrix of ``x``: ``group_size`` multiply-adds a
    weight and candidate instead of one a token (4-8x fewer than the outputs themselves)."""
    n, k = weight.shape
    g = config.group_size
    xg = x.reshape(-1, k // g, g).transpose(0, 1)  # [groups, tokens, g]
    gram = torch.bmm(xg.transpose(1, 2), xg)  # [groups, g, g]
    result = torch.empty_like(weight)
    for start in range(0, n, CLIP_ROWS_PER_STEP):
        w = weight[start:start + CLIP_ROWS_PER_STEP]
        wg = w.reshape(w.shape[0], k // g, g)
        amax = wg.abs().amax(dim=-1, keepdim=True)
        best_error = torch.full((k // g, w.shape[0]), float("inf"), device=w.device)
        best_max = amax.clone()
        for step in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
            limit = amax * (1 - step / CLIP_GRID)
            candidate = fake_quantize(torch.maximum(torch.minimum(wg, limit), -limit).reshape_as(w), config)
            change = (candidate.reshape_as(wg) - wg).transpose(0, 1)  # [groups, rows, g]
            error = (torch.bmm(change, gram) * change).sum(dim=-1)  # [groups, rows]
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_max = torch.where(better.t().unsqueeze(-1), limit, best_max)
        result[start:start + CLIP_ROWS_PER_STEP] = torch.maximum(torch.minimum(wg, best_max), -best_max).reshape_as(w)
    return result


# --- where the scales fold: read from the graph -------------------------------------------

def find_absorber(plan: Plan, group: LinearGroup, site_of_node, params) -> Optional[Absorber]:
    """The op that can absorb ``1/s`` of the group's input, or None. Provably safe only:
    every node from that op to the group's linears feeds nothing else."""
    node = group.input_node
    consumers = {n for s in group.sites for n in s.nodes}
    if plan.graph is None or not isinstance(node, fx.Node) or set(_value_users(node)) - consumers:
        return None
    while _is(node, _PASS_THROUGH) and _single_user_arg(node, 0):
        node = node.args[0]
    channels = group.sites[0].in_features
    norm = _norm_params(plan.graph, node, channels, params)
    if norm:
        return Absorber(params=norm)
    linear = _linear_through_muls(node, site_of_node, channels)
    return Absorber(linear=linear) if linear is not None else None


def _value_users(node: fx.Node) -> List[fx.Node]:
    """Users that read the values of ``node`` (not only its shape, dtype or device)."""
    return [u for u in node.users
            if not (u.op == "call_function" and u.target is getattr and u.args[1] in ("shape", "dtype", "device"))
            and not (u.op == "call_method" and u.target in ("size", "dim"))
            and not (u.op == "call_function" and u.target in (torch.ops.aten.sym_size.int,))]


def _is(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and node.target in targets


def _single_user_arg(node: fx.Node, index: int) -> bool:
    arg = node.args[index] if len(node.args) > index else None
    return isinstance(arg, fx.Node) and len(arg.users) == 1


def _param_path(graph: fx.GraphModule, node, params, channels) -> Optional[str]:
    """The path of a 1-D parameter of ``channels`` read by ``node`` and nothing else."""
    if not isinstance(node, fx.Node) or len(node.users) != 1:
        return None
    if node.op == "get_attr":
        path = node.target
        reads = sum(1 for n in graph.graph.nodes if n.op == "get_attr" and n.target == path)
        if reads != 1:
            return None
    else:
        path = node.meta.get("qpass_parameter")
    if path not in params or params[path].shape != (channels,):
        return None
    return path


def _norm_params(graph, node, channels, params) -> List[str]:
    """The weight (and bias) paths of the norm or affine op producing ``node``."""
    if node.op == "call_module":
        module = graph.get_submodule(node.target)
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
            prefix = _module_path_of(params, module.weight)
            if prefix is None:
                return []
            paths = [prefix + "weight"] + ([prefix + "bias"] if getattr(module, "bias", None) is not None else [])
            return paths if all(params[p].shape == (channels,) for p in paths) else []
        return []
    if node.target in (F.layer_norm, torch.ops.aten.layer_norm.default, F.rms_norm, torch.ops.aten.rms_norm.default):
        is_layer_norm = node.target in (F.layer_norm, torch.ops.aten.layer_norm.default)
        args = list(node.args) + [None] * 4
        weight = args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        bias = (args[3] if len(node.args) > 3 else node.kwargs.get("bias")) if is_layer_norm else None
        paths = [_param_path(graph, n, params, channels) for n in (weight, bias) if n is not None]
        return paths if paths and all(paths) else []
    if _is(node, _ADDS) and len(node.args) == 2:  # x * w + b
        for product, bias in (node.args, node.args[::-1]):
            bias_path = _param_path(graph, bias, params, channels)
            if bias_path and _is(product, _MULS) and len(product.users) == 1:
                weight_path = _scale_param(graph, product, params, channels)
                if weight_path:
                    return [weight_path, bias_path]
        return []
    if _is(node, _MULS):
        path = _scale_param(graph, node, params, channels)
        return [path] if path else []
    return []


def _scale_param(graph, node, params, channels) -> Optional[str]:
    """The 1-D parameter a mul node multiplies its other operand by, if any."""
    if len(node.args) != 2:
        return None
    for arg in node.args:
        path = _param_path(graph, arg, params, channels)
        if path:
            return path
    return None


def _module_path_of(params, tensor) -> Optional[str]:
    for path, p in params.items():
        if p is tensor:
            return path[: -len("weight")]
    return None


def _linear_through_muls(node, site_of_node, channels) -> Optional[LinearSite]:
    """A linear whose output reaches ``node`` only through elementwise multiplications by
    tensors that do not depend on it (scaling its rows then scales ``node``'s channels)."""
    while True:
        site = site_of_node.get(node)
        if site is not None:
            return site if site.out_features == channels else None
        if not (_is(node, _MULS) and len(node.args) == 2):
            return None
        candidates = [a for a in node.args if isinstance(a, fx.Node) and len(a.users) == 1 and _reaches_linear(a, site_of_node)]
        if len(candidates) != 1:
            return None
        other = node.args[1] if candidates[0] is node.args[0] else node.args[0]
        if isinstance(other, fx.Node) and candidates[0] in _ancestors(other):
            return None
        node = candidates[0]
        while _is(node, _PASS_THROUGH) and _single_user_arg(node, 0):
            node = node.args[0]


def _reaches_linear(node, site_of_node) -> bool:
    while _is(node, _PASS_THROUGH):
        node = node.args[0]
    return node in site_of_node or _is(node, _MULS)


def _ancestors(node: fx.Node) -> set:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        for arg in current.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                stack.append(arg)
    return seen
