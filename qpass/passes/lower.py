"""Lower: fold the epilogue around a quantized matmul into its op, where the op can
compute it, so that it costs no kernel launch of its own.

Inductor calls a user Triton kernel but does not fuse pointwise work into it (see
ANCHORS.md), so ``silu(gate) * up`` after a gate/up stub would be one more kernel,
reading and writing the whole ``[M, 2 * hidden]`` output again. This pass finds, in a
rewritten graph,

    out = stub(x); gate, up = split(out, into two equal halves along the last dim)
    y = silu(gate) * up                      (either order of the product)

and makes the stub compute ``y`` itself (``QuantLinear.set_activation("silu_mul")``,
which its method's ``apply`` passes to the op); the split, silu and mul nodes go. The same
for ``y = gelu(stub(x))`` (F.gelu, aten.gelu or ``nn.GELU``; "gelu", or "gelu_tanh" for
``approximate="tanh"``). A stub whose method does not list the activation in
``fused_activations``, or that is called more than once, or whose output (or halves) has
other readers, is left as it is.

Two more folds take the kernels between the ops away where the methods can compute them
(``QuantLinear.residual_problem``, ``input_norm_problem``):

- ``r + stub(x)`` (either order, the stub's only reader; a stub without a bias) becomes
  ``stub(x, residual=r)``: the op adds r in its epilogue, as a bias shaped as its output.
- ``stub(rms_norm(h))``, where every reader of the norm is such a stub, becomes
  ``stub(h, norm_weight=w, norm_eps=eps)``: the op computes the norm as it reads h (the
  W4A16 GEMV reduces the row itself; larger M runs the norm as a pass Inductor fuses).
  The norm is ``nn.RMSNorm``, ``F.rms_norm``, or Llama's written out:
  ``w * (xf * rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)`` with
  ``xf = h.float()`` (or ``h.to(torch.float32)``, or h), the product in either order.

In a decode step this leaves four kernels a layer (qkv, o, gate_up, down) where Inductor's
add + RMSNorm kernels made six. Casts need nothing here: Inductor fuses them.
"""

import operator
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from qpass.layers.linear import QuantLinear

SILU_FUNCTIONS = (F.silu, torch.ops.aten.silu.default, torch.ops.aten.silu)
GELU_FUNCTIONS = (F.gelu, torch.ops.aten.gelu.default, torch.ops.aten.gelu)
GELU_ACTIVATIONS = {"none": "gelu", "tanh": "gelu_tanh"}  # approximate= -> the op's activation
MUL_FUNCTIONS = (operator.mul, torch.mul, torch.ops.aten.mul.Tensor, torch.ops.aten.mul)
SPLIT_FUNCTIONS = (torch.split, torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default)
CHUNK_FUNCTIONS = (torch.chunk, torch.ops.aten.chunk.default)
META_KEYS = ("example_value", "val", "tensor_meta")  # what tracers record of a node's result


def lower(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold ``silu(gate) * up`` and GELU, the residual add after and the RMSNorm before,
    into every stub that can compute them; returns ``gm``."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuantLinear)]
    for node in calls:
        stub = gm.get_submodule(node.target)
        if sum(n.target == node.target for n in calls) != 1:
            continue
        match = silu_mul_after(node, sum(stub.output_partition_sizes))
        if match is not None and stub.activation_problem("silu_mul") is None:
            split, gate, up, silu, mul = match
            fold(gm, node, stub, "silu_mul", mul, [mul, silu, up, gate, split])
        else:
            gelu = gelu_after(node)
            if gelu is not None and stub.activation_problem(gelu[1]) is None:
                fold(gm, node, stub, gelu[1], gelu[0], [gelu[0]])
        add = residual_add_after(node)
        if add is not None and stub.residual_problem() is None:
            fold_residual(node, *add)
    for norm in dict.fromkeys(n.args[0] for n in calls if n.args and isinstance(n.args[0], fx.Node)):
        fold_rms_norm(gm, norm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


ADD_FUNCTIONS = (operator.add, torch.add, torch.ops.aten.add.Tensor)


def residual_add_after(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """(the add, the residual) where ``node``'s only reader adds it to another node: ``r + node``
    or ``node + r`` (no ``alpha``); None otherwise."""
    if len(node.users) != 1 or "residual" in node.kwargs:
        return None
    (add,) = node.users
    if not _is_call(add, ADD_FUNCTIONS, "add") or len(add.args) != 2 or add.kwargs:
        return None
    residual = add.args[1] if add.args[0] is node else add.args[0]
    if not isinstance(residual, fx.Node) or residual is node:
        return None
    return add, residual


def fold_residual(node: fx.Node, add: fx.Node, residual: fx.Node) -> None:
    """The stub call ``node`` takes ``residual`` and the place of ``add``. (The stub adds it
    in the op where the shapes and dtypes match, else after: ``QuantLinear.forward``.)"""
    for key in META_KEYS:
        if key in add.meta:
            node.meta[key] = add.meta[key]
    add.replace_all_uses_with(node)
    node.graph.erase_node(add)
    if _comes_before(node, residual):  # the residual must exist when the stub runs
        residual.append(node)
    node.kwargs = {**node.kwargs, "residual": residual}


def _comes_before(a: fx.Node, b: fx.Node) -> bool:
    for n in a.graph.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False


def fold_rms_norm(gm: fx.GraphModule, norm: fx.Node) -> None:
    """Where ``norm`` is an RMSNorm read only by stubs (as their input) that can each compute it
    (``QuantLinear.input_norm_problem``), and by queries of its shape, the stubs read its input
    and compute it, the queries ask the input (a norm keeps the shape); its nodes go."""
    shape_queries = [n for n in norm.users if _asks_shape(n, norm)]
    readers = [n for n in norm.users if n not in shape_queries]
    stubs = [gm.get_submodule(n.target) for n in readers if n.op == "call_module"]
    if not readers or len(stubs) != len(readers) or not all(isinstance(s, QuantLinear) for s in stubs):
        return
    if any(r.args[1:] or r.args[0] is not norm or "norm_weight" in r.kwargs for r in readers):
        return
    match = rms_norm_of(gm, norm)
    if match is None or any(s.input_norm_problem() is not None for s in stubs):
        return
    source, weight, eps, nodes = match
    target = f"{norm.target}.weight" if weight.op == "call_module" else weight.target
    tensor = _attribute(gm, target)
    if not isinstance(tensor, torch.Tensor) or any(tensor.shape != (s.input_size_per_partition,) for s in stubs):
        return
    if weight.op == "call_module":  # nn.RMSNorm: its weight read as an attribute
        with gm.graph.inserting_before(norm):
            weight = gm.graph.get_attr(target)
    for reader in readers:
        reader.args = (source,)
        reader.kwargs = {**reader.kwargs, "norm_weight": weight, "norm_eps": eps}
    for query in shape_queries:
        query.replace_input_with(norm, source)
    for dead in nodes:
        if not dead.users:
            _erase_with_shape_queries(dead)


def _erase_with_shape_queries(node: fx.Node) -> None:
    """Erase ``node``, and then each of its inputs left unread that only asks about a tensor
    (``t.dtype``, ``t.shape[0]``: what a traced norm reads to build its arguments)."""
    inputs = node.all_input_nodes
    node.graph.erase_node(node)
    for arg in inputs:
        asks = arg.op == "call_function" and arg.target in (getattr, operator.getitem)
        if asks and not arg.users:
            _erase_with_shape_queries(arg)


SIZE_FUNCTIONS = (torch.ops.aten.sym_size.int, torch.ops.aten.size.default)


def _asks_shape(node: fx.Node, tensor: fx.Node) -> bool:
    """``node`` is ``tensor.shape``, ``tensor.size(...)`` or aten's size of it."""
    if node.op == "call_function" and node.target is getattr:
        return node.args == (tensor, "shape")
    if node.op == "call_method" and node.target == "size":
        return node.args[0] is tensor
    return node.op == "call_function" and node.target in SIZE_FUNCTIONS and node.args[0] is tensor


def _attribute(gm: fx.GraphModule, target: str):
    value = gm
    for name in target.split("."):
        value = getattr(value, name, None)
    return value


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
    value = next((source.meta[k] for k in META_KEYS if k in source.meta), None)
    dtype = getattr(value, "dtype", None)
    return isinstance(target, torch.dtype) and target == dtype


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
    value = next((node.meta[k] for k in META_KEYS if k in node.meta), None)
    return isinstance(dim, int) and isinstance(value, torch.Tensor) and dim == value.dim() - 1


def is_silu(node: fx.Node, arg: fx.Node) -> bool:
    """``node`` is SiLU of ``arg`` (F.silu, aten.silu or an ``nn.SiLU`` module)."""
    if not node.args or node.args[0] is not arg:
        return False
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)) is nn.SiLU
    return _is_call(node, SILU_FUNCTIONS, None)


def is_mul(node: fx.Node) -> bool:
    return _is_call(node, MUL_FUNCTIONS, "mul")


def _is_call(node: fx.Node, functions, method: Optional[str]) -> bool:
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target == method


def fold(gm: fx.GraphModule, node: fx.Node, stub: QuantLinear, activation: str, result: fx.Node,
         dead: List[fx.Node]) -> None:
    """The stub computes ``activation``: its call takes the place of ``result``, and the
    nodes ``dead`` (readers first) go."""
    stub.set_activation(activation)
    for key in META_KEYS:
        if key in result.meta:
            node.meta[key] = result.meta[key]
    result.replace_all_uses_with(node)
    for unused in dead:
        gm.graph.erase_node(unused)
