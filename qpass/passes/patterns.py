"""Graph patterns the lowering pass folds into a quantized linear (``qpass.passes.lower``):
what reads a linear's output (SiLU * mul of its halves, GELU, a residual add) and what
produces its input (an RMSNorm). Each matcher returns the nodes of one match, or None."""

import operator
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

SILU_FUNCTIONS = (F.silu, torch.ops.aten.silu.default, torch.ops.aten.silu)
GELU_FUNCTIONS = (F.gelu, torch.ops.aten.gelu.default, torch.ops.aten.gelu)
GELU_ACTIVATIONS = {"none": "gelu", "tanh": "gelu_tanh"}  # approximate= -> the op's activation
MUL_FUNCTIONS = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor, torch.ops.aten.mul)
SPLIT_FUNCTIONS = (torch.split, torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default)
CHUNK_FUNCTIONS = (torch.chunk, torch.ops.aten.chunk.default)
META_KEYS = ("example_value", "val", "tensor_meta")  # what tracers record of a node's result
ADD_FUNCTIONS = (operator.add, torch.add, torch.ops.aten.add.Tensor)


def silu_mul_after(node: fx.Node, width: int) -> Optional[Tuple[fx.Node, ...]]:
    """(split, gate, up, silu, mul) where ``node``'s only reader splits it into halves
    ``gate, up`` read only by ``silu(gate) * up``; None otherwise."""
    if len(node.users) != 1:
        return None
    (split,) = node.users
    if not splits_in_halves(split, node, width):
        return None
    parts = {user.args[1]: user for user in split.users if user.target is operator.getitem}
    if len(parts) != 2 or len(split.users) != 2 or set(parts) != {0, 1}:
        return None
    gate, up = parts[0], parts[1]
    if len(gate.users) != 1 or len(up.users) != 1:
        return None
    (silu,) = gate.users
    (mul,) = up.users
    if not (is_silu(silu, gate) and len(silu.users) == 1 and next(iter(silu.users)) is mul):
        return None
    if not (is_mul(mul) and set(mul.args) == {silu, up} and not mul.kwargs):
        return None
    return split, gate, up, silu, mul


def gelu_after(node: fx.Node) -> Optional[Tuple[fx.Node, str]]:
    """(the GELU node, its op activation) where ``node``'s only reader is GELU of it; None
    otherwise (also for an ``approximate`` the ops do not compute)."""
    if len(node.users) != 1:
        return None
    (gelu,) = node.users
    if not gelu.args or gelu.args[0] is not node:
        return None
    if gelu.op == "call_module":
        module = gelu.graph.owning_module.get_submodule(gelu.target)
        if type(module) is not nn.GELU:
            return None
        approximate = module.approximate
    elif _is_call(gelu, GELU_FUNCTIONS, None):
        approximate = gelu.args[1] if len(gelu.args) > 1 else gelu.kwargs.get("approximate", "none")
    else:
        return None
    activation = GELU_ACTIVATIONS.get(approximate)
    return (gelu, activation) if activation is not None else None


def splits_in_halves(split: fx.Node, source: fx.Node, width: int) -> bool:
    """Whether ``split`` divides ``source`` (``width`` wide) in two equal halves along its last dim."""
    if not split.args or split.args[0] is not source or width % 2:
        return False
    is_chunk = _is_call(split, CHUNK_FUNCTIONS, "chunk")
    if not (is_chunk or _is_call(split, SPLIT_FUNCTIONS, "split")):
        return False
    size = split.args[1] if len(split.args) > 1 else next((v for k, v in split.kwargs.items() if k != "dim"), None)
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not is_last_dim(source, dim):
        return False
    if is_chunk:
        return size == 2
    return size == width // 2 or (isinstance(size, (list, tuple)) and list(size) == [width // 2] * 2)


def is_last_dim(node: fx.Node, dim) -> bool:
    """``dim`` is -1, or the last dim of ``node``'s recorded result."""
    if dim == -1:
        return True
    value = recorded(node)
    return isinstance(dim, int) and isinstance(value, torch.Tensor) and dim == value.dim() - 1


def is_silu(node: fx.Node, arg: fx.Node) -> bool:
    """``node`` is SiLU of ``arg`` (F.silu, aten.silu or an ``nn.SiLU`` module)."""
    if not node.args or node.args[0] is not arg:
        return False
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)) is nn.SiLU
    return _is_call(node, SILU_FUNCTIONS, None)


def recorded(node: fx.Node):
    """What the tracer recorded of ``node``'s result (a tensor, fake or real), or None."""
    return next((node.meta[k] for k in META_KEYS if k in node.meta), None)


def is_mul(node: fx.Node) -> bool:
    return _is_call(node, MUL_FUNCTIONS, "mul")


def _is_call(node: fx.Node, functions, method: Optional[str]) -> bool:
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target == method


def residual_add_after(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(the add, the residual) where ``node``'s only reader adds it to another node: ``r + node``
    or ``node + r`` (no ``alpha``); None otherwise."""
    if len(node.users) != 1:
        return None
    (add,) = node.users
    if not _is_call(add, ADD_FUNCTIONS, "add") or len(add.args) != 2 or add.kwargs:
        return None
    residual = add.args[1] if add.args[0] is node else add.args[0]
    if not isinstance(residual, fx.Node) or residual is node:
        return None
    return add, residual


RMS_NORM_FUNCTIONS = tuple(f for f in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None),
                                       getattr(torch.ops.aten, "rms_norm", None)) if f is not None)
POW_FUNCTIONS = (torch.pow, operator.pow, torch.ops.aten.pow.Tensor_Scalar)
MEAN_FUNCTIONS = (torch.mean, torch.ops.aten.mean.dim)
RSQRT_FUNCTIONS = (torch.rsqrt, torch.ops.aten.rsqrt.default)


def rms_norm_of(gm: fx.GraphModule, node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node, float, List[fx.Node]]]:
    """(its input, its weight node, eps, its nodes, readers first) where ``node`` is an RMSNorm
    over the last dim with a weight (see the module's docstring); None otherwise. For an
    ``nn.RMSNorm`` module the weight node is the module's call (its weight is read from it)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) is not getattr(nn, "RMSNorm", None) or module.weight is None or module.eps is None:
            return None
        if len(node.args) != 1 or node.kwargs or len(module.normalized_shape) != 1:
            return None
        return node.args[0], node, float(module.eps), [node]
    if _is_call(node, RMS_NORM_FUNCTIONS, None):
        args = list(node.args) + [None] * (4 - len(node.args))
        source, shape, weight, eps = args[:4]
        weight, eps = node.kwargs.get("weight", weight), node.kwargs.get("eps", eps)
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and isinstance(eps, (int, float))):
            return None
        if not (isinstance(shape, (list, tuple)) and len(shape) == 1):
            return None
        return source, weight, float(eps), [node]
    return _written_out_rms_norm(node)


def _written_out_rms_norm(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node, float, List[fx.Node]]]:
    """Llama's RMSNorm written out (``rms_norm_of``)."""
    if not is_mul(node) or len(node.args) != 2 or node.kwargs:
        return None
    for weight, scaled in (node.args, node.args[::-1]):
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and isinstance(scaled, fx.Node)):
            continue
        cast = scaled if _is_cast(scaled) else None
        match = _normalized(scaled.args[0] if cast is not None else scaled)
        if match is None:
            continue
        source, eps, nodes = match
        if cast is None:
            return source, weight, eps, [node] + nodes
        if _casts_to_dtype_of(cast, source):
            return source, weight, eps, [node, cast] + nodes
    return None


def _casts_to_dtype_of(cast: fx.Node, source: fx.Node) -> bool:
    """Whether ``cast`` rounds to ``source``'s dtype: ``.to(source.dtype)``, ``.type_as(source)``,
    or ``.to(dtype)`` with the dtype recorded for ``source``."""
    target = cast.args[1]
    if cast.target == "type_as":
        return target is source
    if isinstance(target, fx.Node):
        return target.op == "call_function" and target.target is getattr and target.args == (source, "dtype")
    return isinstance(target, torch.dtype) and target == getattr(recorded(source), "dtype", None)


def _normalized(node: fx.Node) -> Optional[Tuple[fx.Node, float, List[fx.Node]]]:
    """(x, eps, nodes) where ``node`` is ``xf * rsqrt(mean(xf ** 2, -1, keepdim=True) + eps)``."""
    if not isinstance(node, fx.Node) or not is_mul(node) or len(node.args) != 2:
        return None
    for xf, rsqrt in (node.args, node.args[::-1]):
        if not (isinstance(rsqrt, fx.Node) and _is_call(rsqrt, RSQRT_FUNCTIONS, "rsqrt") and len(rsqrt.args) == 1):
            continue
        add = rsqrt.args[0]
        if not (isinstance(add, fx.Node) and _is_call(add, ADD_FUNCTIONS, "add") and len(add.args) == 2):
            continue
        mean, eps = add.args if isinstance(add.args[1], (int, float)) else add.args[::-1]
        if not (isinstance(eps, (int, float)) and isinstance(mean, fx.Node) and _is_last_dim_mean(mean)):
            continue
        square = mean.args[0]
        if not (isinstance(square, fx.Node) and _is_square(square)):
            continue
        source, upcasts = _upcast_source(xf)
        if source is None or _upcast_source(square.args[0])[0] is not source:
            continue
        nodes = [node, rsqrt, add, mean, square] + upcasts + _upcast_source(square.args[0])[1]
        return source, float(eps), list(dict.fromkeys(nodes))
    return None


def _is_last_dim_mean(node: fx.Node) -> bool:
    if not _is_call(node, MEAN_FUNCTIONS, "mean") or not node.args:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    return keepdim is True and is_last_dim(node.args[0], dim)


def _is_square(node: fx.Node) -> bool:
    if _is_call(node, POW_FUNCTIONS, "pow"):
        return len(node.args) == 2 and node.args[1] == 2
    return is_mul(node) and len(node.args) == 2 and node.args[0] is node.args[1]


def _is_cast(node: fx.Node) -> bool:
    """``t.to(dtype)`` (or ``t.to(other.dtype)``, ``t.type_as(other)``)."""
    return node.op == "call_method" and node.target in ("to", "type_as") and len(node.args) == 2 and not node.kwargs


def _upcast_source(node) -> Tuple[Optional[fx.Node], List[fx.Node]]:
    """(t, [the cast]) where ``node`` is ``t.float()`` or ``t.to(torch.float32)``; (node, []) otherwise."""
    if not isinstance(node, fx.Node):
        return None, []
    if node.op == "call_method" and node.target == "float" and len(node.args) == 1:
        return node.args[0], [node]
    if node.op == "call_method" and node.target == "to" and node.args[1:] == (torch.float32,) and not node.kwargs:
        return node.args[0], [node]
    return node, []


SIZE_FUNCTIONS = (torch.ops.aten.sym_size.int, torch.ops.aten.size.default)


def asks_shape(node: fx.Node, tensor: fx.Node) -> bool:
    """``node`` is ``tensor.shape``, ``tensor.size(...)`` or aten's size of it."""
    if node.op == "call_function" and node.target is getattr:
        return node.args == (tensor, "shape")
    if node.op == "call_method" and node.target == "size":
        return node.args[0] is tensor
    return node.op == "call_function" and node.target in SIZE_FUNCTIONS and node.args[0] is tensor


def attribute(gm: fx.GraphModule, target: str):
    """The tensor (or module) at the dotted path ``target`` of ``gm``; None where there is none."""
    value = gm
    for name in target.split("."):
        value = getattr(value, name, None)
    return value
