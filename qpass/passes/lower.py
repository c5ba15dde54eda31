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

Residual adds, norms and casts need nothing here: Inductor fuses them into its own
pointwise/reduction kernels between the ops.
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
    """Fold ``silu(gate) * up`` and GELU into every stub that can compute them; returns ``gm``."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), QuantLinear)]
    for node in calls:
        stub = gm.get_submodule(node.target)
        if sum(n.target == node.target for n in calls) != 1:
            continue
        match = silu_mul_after(node, sum(stub.output_partition_sizes))
        if match is not None and stub.activation_problem("silu_mul") is None:
            split, gate, up, silu, mul = match
            fold(gm, node, stub, "silu_mul", mul, [mul, silu, up, gate, split])
            continue
        gelu = gelu_after(node)
        if gelu is not None and stub.activation_problem(gelu[1]) is None:
            fold(gm, node, stub, gelu[1], gelu[0], [gelu[0]])
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


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
