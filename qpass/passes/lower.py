"""Lower: fold the work around a quantized matmul into its op, where the op can compute
it, so that it costs no kernel launch of its own.

Inductor calls a user Triton kernel but does not fuse pointwise work into it (see
ANCHORS.md), so ``silu(gate) * up`` after a gate/up linear would be one more kernel,
reading and writing the whole ``[M, 2 * hidden]`` output again. This pass finds
(``qpass.passes.patterns``), around each quantized linear of a graph,

    out = linear(x); gate, up = split(out, into two equal halves along the last dim)
    y = silu(gate) * up                      (either order of the product)

and makes the linear compute ``y`` itself (activation "silu_mul"); the split, silu and mul
nodes go. The same for ``y = gelu(linear(x))`` (F.gelu, aten.gelu or ``nn.GELU``; "gelu",
or "gelu_tanh" for ``approximate="tanh"``). Two more folds take the kernels between the
ops away:

- ``r + linear(x)`` (either order, the linear's only reader; a linear without a bias nor
  an activation) becomes ``linear(x, residual=r)``: the op adds r in its epilogue, as a
  bias shaped as its output.
- ``linear(rms_norm(h))``, where every reader of the norm is such a linear (or asks its
  shape), becomes ``linear(h, norm_weight=w, norm_eps=eps)``: the op computes the norm as
  it reads h (the W4A16 GEMV reduces the row itself; larger M runs the norm as a pass
  Inductor fuses). The norm is ``nn.RMSNorm``, ``F.rms_norm``, or Llama's written out.

In a decode step this leaves four kernels a layer (qkv, o, gate_up, down) where Inductor's
add + RMSNorm kernels made six. Casts need nothing here: Inductor fuses them.

A quantized linear is either a stub's call (``QuantLinear``, in the graphs ``qpass.quantize``
and the ``qpass`` backend write: the fold is its activation, or its call's ``residual``,
``norm_weight`` and ``norm_eps``, where ``QuantLinear.activation_problem``,
``residual_problem`` and ``input_norm_problem`` allow it; a stub called more than once is
left as it is), or a call of a ``torch.ops.qpass`` op itself (in Dynamo's graph of a model
whose stubs it inlined: a Hugging Face model that ``qpass.quantize`` kept as a module tree,
compiled with ``backend="qpass"``; the fold is the op's own arguments, where the shapes and
dtypes Dynamo recorded show it computes the same).
"""

import operator
from typing import List, Optional

import torch
from torch import fx

from qpass.kernels.common import ACTIVATIONS
from qpass.layers.linear import QuantLinear
from qpass.passes.patterns import (META_KEYS, asks_shape, attribute, gelu_after, recorded, residual_add_after,
                                   rms_norm_of, silu_mul_after)

# The ops and their argument names, in their schemas' order (qpass.ops).
OP_ARGUMENTS = {
    "w4a16_linear": ("x", "qweight", "scales", "zeros", "group_size", "bias", "activation", "norm_weight", "norm_eps",
                     "up_run"),
    "w8a16_linear": ("x", "qweight", "scales", "bias", "activation"),
    "fp8_linear": ("x", "qweight", "weight_scale", "bias", "activation"),
}
OP_DEFAULTS = {"bias": None, "activation": "none", "norm_weight": None, "norm_eps": 0.0, "up_run": 0}


def lower(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold the activation after, the residual add after and the RMSNorm before every
    quantized linear of ``gm`` that can compute them; returns ``gm``."""
    linears = [linear for node in gm.graph.nodes if (linear := quantized_linear(gm, node)) is not None]
    for linear in linears:
        match = silu_mul_after(linear.node, linear.width())
        if match is not None and linear.activation_problem("silu_mul") is None:
            split, gate, up, silu, mul = match
            fold_activation(linear, "silu_mul", mul, [mul, silu, up, gate, split])
        else:
            gelu = gelu_after(linear.node)
            if gelu is not None and linear.activation_problem(gelu[1]) is None:
                fold_activation(linear, gelu[1], gelu[0], [gelu[0]])
        add = residual_add_after(linear.node)
        if add is not None and linear.residual_problem(add[1]) is None:
            fold_residual(linear, *add)
    by_input = {}
    for linear in linears:
        if isinstance(linear.input, fx.Node):
            by_input.setdefault(linear.input, []).append(linear)
    for norm in by_input:
        fold_rms_norm(gm, norm, {linear.node: linear for linear in linears})
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


class StubCall:
    """A ``QuantLinear`` stub's call in the graph."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, stub: QuantLinear):
        self.gm, self.node, self.stub = gm, node, stub

    @property
    def input(self):
        return self.node.args[0] if self.node.args else None

    def width(self) -> int:
        return sum(self.stub.output_partition_sizes)

    def activation_problem(self, activation: str) -> Optional[str]:
        calls = sum(n.op == "call_module" and n.target == self.node.target for n in self.gm.graph.nodes)
        if calls != 1:
            return "the stub is called more than once: its activation is its own, not its call's"
        return self.stub.activation_problem(activation)

    def set_activation(self, activation: str) -> None:
        self.stub.set_activation(activation)

    def residual_problem(self, residual: fx.Node) -> Optional[str]:
        # (shapes and dtypes need no check: the stub adds what does not match after its op)
        if "residual" in self.node.kwargs:
            return "the call has a residual already"
        return self.stub.residual_problem()

    def set_residual(self, residual: fx.Node) -> None:
        self.node.kwargs = {**self.node.kwargs, "residual": residual}

    def input_norm_problem(self, norm_weight: torch.Tensor) -> Optional[str]:
        if len(self.node.args) != 1 or "norm_weight" in self.node.kwargs:
            return "the call is not the stub's of one input"
        if norm_weight.shape != (self.stub.input_size_per_partition,):
            return f"norm weight {tuple(norm_weight.shape)} against {self.stub.input_size_per_partition} inputs"
        return self.stub.input_norm_problem()

    def set_input_norm(self, source: fx.Node, weight: fx.Node, eps: float) -> None:
        self.node.args = (source,)
        self.node.kwargs = {**self.node.kwargs, "norm_weight": weight, "norm_eps": eps}


class OpCall:
    """A call of one of the ``torch.ops.qpass`` ops, its arguments by name."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, name: str):
        self.gm, self.node, self.names = gm, node, OP_ARGUMENTS[name]

    @property
    def arguments(self) -> dict:
        """The call's arguments by name, as the graph has them now (other folds rewire them)."""
        arguments = {n: OP_DEFAULTS.get(n) for n in self.names}
        arguments.update(zip(self.names, self.node.args))
        arguments.update(self.node.kwargs)
        return arguments

    @property
    def input(self):
        return self.arguments["x"]

    def _set(self, **changes) -> None:
        arguments = {**self.arguments, **changes}
        self.node.args = tuple(arguments[n] for n in self.names)
        self.node.kwargs = {}

    def width(self) -> int:
        value = recorded(self.node)
        return value.shape[-1] if value is not None else 1  # (an odd width matches no split in halves)

    def activation_problem(self, activation: str) -> Optional[str]:
        if self.arguments["activation"] != "none":
            return f"the op computes {self.arguments['activation']!r} already"
        return None if activation in ACTIVATIONS else f"the ops compute no {activation!r}"

    def set_activation(self, activation: str) -> None:
        self._set(activation=activation)

    def residual_problem(self, residual: fx.Node) -> Optional[str]:
        if self.arguments["bias"] is not None or self.arguments["activation"] != "none":
            return "the op has a bias or an activation: the residual would not be the last thing added"
        out, value = recorded(self.node), recorded(residual)
        if out is None or value is None or (value.shape, value.dtype) != (out.shape, out.dtype):
            return "the residual is not recorded with the op's output shape and dtype"
        return None

    def set_residual(self, residual: fx.Node) -> None:
        self._set(bias=residual)

    def input_norm_problem(self, norm_weight: torch.Tensor) -> Optional[str]:
        if "norm_weight" not in self.names or self.arguments["norm_weight"] is not None:
            return "the op computes no norm, or one already"
        x = recorded(self.arguments["x"]) if isinstance(self.arguments["x"], fx.Node) else None
        if x is None or norm_weight.dtype != x.dtype or norm_weight.shape != (x.shape[-1],):
            return "the norm weight is not recorded with the input's dtype and width"
        return None

    def set_input_norm(self, source: fx.Node, weight: fx.Node, eps: float) -> None:
        self._set(x=source, norm_weight=weight, norm_eps=eps)


def quantized_linear(gm: fx.GraphModule, node: fx.Node):
    """``node`` as a ``StubCall`` or an ``OpCall``; None where it is neither."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), QuantLinear):
        return StubCall(gm, node, gm.get_submodule(node.target))
    if node.op == "call_function":
        name = _qpass_op_name(node.target)
        if name in OP_ARGUMENTS:
            return OpCall(gm, node, name)
    return None


def _qpass_op_name(target) -> Optional[str]:
    """"w4a16_linear" for ``torch.ops.qpass.w4a16_linear`` (or its ``.default``)."""
    packet = getattr(target, "overloadpacket", target)
    return packet.__name__ if getattr(packet, "_qualified_op_name", "").startswith("qpass::") else None


def fold_activation(linear, activation: str, result: fx.Node, dead: List[fx.Node]) -> None:
    """The linear computes ``activation``: its call takes the place of ``result``, and the
    nodes ``dead`` (readers first) go."""
    linear.set_activation(activation)
    node = linear.node
    for key in META_KEYS:
        if key in result.meta:
            node.meta[key] = result.meta[key]
    result.replace_all_uses_with(node)
    for unused in dead:
        node.graph.erase_node(unused)


def fold_residual(linear, add: fx.Node, residual: fx.Node) -> None:
    """The linear's call takes ``residual`` and the place of ``add``."""
    node = linear.node
    for key in META_KEYS:
        if key in add.meta:
            node.meta[key] = add.meta[key]
    add.replace_all_uses_with(node)
    node.graph.erase_node(add)
    if _comes_before(node, residual):  # the residual must exist when the linear runs
        residual.append(node)
    linear.set_residual(residual)


def _comes_before(a: fx.Node, b: fx.Node) -> bool:
    for n in a.graph.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False


def fold_rms_norm(gm: fx.GraphModule, norm: fx.Node, linears: dict) -> None:
    """Where ``norm`` is an RMSNorm read only by quantized linears (``linears``: node -> linear),
    as their input, that can each compute it, and by queries of its shape, the linears read
    its input and compute it, the queries ask the input (a norm keeps the shape); its nodes go."""
    shape_queries = [n for n in norm.users if asks_shape(n, norm)]
    readers = [linears.get(n) for n in norm.users if n not in shape_queries]
    if not readers or any(r is None or r.input is not norm for r in readers):
        return
    match = rms_norm_of(gm, norm)
    if match is None:
        return
    source, weight, eps, nodes = match
    target = f"{norm.target}.weight" if weight.op == "call_module" else weight.target
    tensor = attribute(gm, target)
    if not isinstance(tensor, torch.Tensor) or any(r.input_norm_problem(tensor) is not None for r in readers):
        return
    if weight.op == "call_module":  # nn.RMSNorm: its weight read as an attribute
        with gm.graph.inserting_before(norm):
            weight = gm.graph.get_attr(target)
    for reader in readers:
        reader.set_input_norm(source, weight, eps)
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
