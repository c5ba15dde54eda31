"""The ``qpass`` backend of ``torch.compile``: quantize inside the compiler, then Inductor.

    torch.compile(model, backend="qpass", options={"method": "awq", "mode": "reduce-overhead"})
    torch.compile(model, backend=qpass.backend("awq", group_size=64, mode="reduce-overhead"))

The first form needs no ``import qpass``: the package registers the backend through the
``torch_dynamo_backends`` entry point. ``torch.compile`` refuses ``mode`` and ``options``
together, so ``options`` may carry ``"mode"`` itself.

Options: ``method`` (default "awq"), ``mode`` (an Inductor mode: "reduce-overhead" turns
on CUDA graphs), ``skip`` and ``overrides`` as in ``qpass.quantize``, ``inductor`` (a dict
of extra Inductor config), ``free_float_weights`` (below), and every other key is an
option of the method (``group_size=64``). There is no calibration here: weights are
rounded to nearest.

In Dynamo's graph the parameters arrive as graph inputs. :func:`quantize_graph` turns
them into attributes of the graph module (constants for Inductor), gives each linear
back its ``nn.Linear`` at its module path, then runs the passes of ``qpass.quantize``
(plan, swap, load, finalise, lower) on it. Quantized stubs are cached per weight, so a
recompile (a new batch size or sequence length) does not quantize again.

A model that ``qpass.quantize`` quantized already (a Hugging Face model, which it keeps as
a module tree, calibrated or not) is not quantized again: Dynamo inlines its stubs into
calls of the ``torch.ops.qpass`` ops, and the backend runs only the lowering pass on them
(the folds of ``qpass.passes.lower``: activation, residual add, RMSNorm); the layers it
left in float (a skipped ``lm_head``) stay so.

Float weights. The compiled module holds the user's model (Dynamo re-reads it to guard
and to recompile), so by default its float weights stay allocated beside the quantized
ones: the eager model keeps working. With ``free_float_weights=True`` the backend frees
the storage of every float weight it has quantized and that nothing else in the graph
reads (shapes and dtypes stay, so guards and recompiles still work from the cached
stubs): what a server that drops the eager model wants. The eager model's quantized
linears then hold no data: do not run it, nor compile it again with other options, and
do not use this where another graph (past a graph break) reads the same tensor (a
tied embedding).
"""

import functools
import logging
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.weak import WeakIdKeyDictionary

from qpass.api import _load_group
from qpass.calib.base import Calibration
from qpass.layers.linear import QuantLinear
from qpass.methods.base import get_config
from qpass.passes.finalise import wait_for_weights
from qpass.passes.lower import lower, quantized_linear
from qpass.passes.plan import LinearGroup, check_site, find_sites, make_plan, resolve_overrides
from qpass.passes.swap import attach, build_stub, stub_groups

log = logging.getLogger("qpass")

# Keys of ``options`` that are the backend's own; the rest go to the method.
BACKEND_KEYS = ("method", "mode", "skip", "overrides", "inductor", "free_float_weights")

# First weight of a group -> (what the stub was built from, the stub).
_STUB_CACHE = WeakIdKeyDictionary()


def backend(method: str = "awq", **options: Any) -> Callable:
    """The qpass backend as a callable for ``torch.compile(model, backend=...)``, with the
    same options as ``options={...}`` (``mode="reduce-overhead"`` included)."""
    get_config(method, {k: v for k, v in options.items() if k not in BACKEND_KEYS})  # fail here, not mid-compile
    return functools.partial(qpass_backend, options={"method": method, **options})


def qpass_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: Optional[str] = None,
                  options: Optional[Dict[str, Any]] = None) -> Callable:
    """What Dynamo calls: quantize the graph's linears, compile the result with Inductor."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    options = dict(options or {})
    mode = options.pop("mode", mode)
    inductor_config = {**(list_mode_options(mode) if mode and mode != "default" else {}), **options.pop("inductor", {})}
    method = options.pop("method", "awq")
    quantized, kept = quantize_graph(gm, example_inputs, method, **options)
    compiled = compile_fx(quantized, [example_inputs[i] for i in kept], config_patches=inductor_config)
    return taking_inputs(compiled, kept)


def taking_inputs(fn: Callable, kept: List[int]) -> Callable:
    """``fn`` called with only the inputs at ``kept`` of what Dynamo passes (the float
    weights are constants of the rewritten graph now)."""

    def run(*args):
        return fn(*[args[i] for i in kept])

    return run


def quantize_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], method: str, *, skip: Sequence[str] = (),
                   overrides=None, free_float_weights: bool = False,
                   **method_options: Any) -> Tuple[fx.GraphModule, List[int]]:
    """A copy of Dynamo's ``gm`` rewritten as ``qpass.quantize`` rewrites a traced model, and
    the indices of the inputs it still takes. (Dynamo reads its own graph again after the
    backend returns: it must not change.)"""
    config = get_config(method, method_options)
    override_configs = resolve_overrides(overrides, method, method_options)
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    # The copy keeps Dynamo's meta but not its map of parameter sources, which the stubs'
    # parameters are not in: AOT autograd then takes every parameter as a static input
    # (never copied under CUDA graphs), which is what they all are.
    gm_copy = fx.GraphModule(gm, graph)
    gm_copy.meta = dict(gm.meta)
    gm = gm_copy
    kept = _lift_parameters(gm, example_inputs)
    if any(quantized_linear(gm, node) is not None for node in gm.graph.nodes):
        log.info("qpass backend: the model is quantized already (its graph calls torch.ops.qpass): lowering "
                 "it, quantizing nothing (method %r and its options unused)", method)
        return lower(gm), kept
    _linears_as_modules(gm)
    if not find_sites(gm, gm, rewrite_graph=True):
        return gm, kept  # a graph without linears (a piece between graph breaks) compiles as it is
    skip = [skip] if isinstance(skip, str) else list(skip)
    plan = make_plan(gm, gm, config, skip=skip, overrides=override_configs, rewrite_graph=True, check_weights=False)
    for site in plan.sites:
        if not is_freed(site.weight):  # a freed weight was checked when it was quantized
            check_site(site)
    groups = stub_groups(plan)
    stubs = [(group, _cached_stub(group)) for group in groups]
    wait_for_weights(stub for _, stub in stubs)
    attach(gm, plan, stubs)
    lower(gm)
    if free_float_weights:
        free_replaced_weights(gm, groups)
    return gm, kept


def cached_stubs() -> List[QuantLinear]:
    """The quantized layers the backend holds, one per group of live weights it compiled."""
    return [stub for _, stub in _STUB_CACHE.values()]


def free_replaced_weights(gm: fx.GraphModule, groups: List[LinearGroup]) -> None:
    """Free the storage of each float weight that a quantized stub of ``gm`` replaced and
    that ``gm`` no longer holds (a float stub or another op may share it)."""
    held = {id(p) for p in gm.parameters()}
    for group in groups:
        for site in group.sites if group.config is not None else ():
            if id(site.weight) not in held:
                site.weight.untyped_storage().resize_(0)


def is_freed(tensor: torch.Tensor) -> bool:
    """Whether ``free_replaced_weights`` freed ``tensor``'s storage."""
    return tensor.numel() > 0 and tensor.untyped_storage().nbytes() == 0


def _cached_stub(group: LinearGroup) -> QuantLinear:
    key = (group.config, tuple((id(s.weight), s.weight._version, id(s.bias)) for s in group.sites))
    hit = _STUB_CACHE.get(group.sites[0].weight)
    if hit is not None and hit[0] == key:
        hit[1].set_activation("none")  # the lowering of the graph at hand decides it again
        return hit[1]
    freed = [s.name for s in group.sites if is_freed(s.weight)]
    if freed:
        raise RuntimeError(
            f"qpass backend: the float weights of {freed} were freed (free_float_weights=True) after an "
            f"earlier compile, and this compile needs them quantized differently ({group.config}); compile "
            "a model whose float weights are intact"
        )
    stub = build_stub(group)
    _load_group(stub, group, Calibration())
    stub.finalise()
    _STUB_CACHE[group.sites[0].weight] = (key, stub)
    return stub


def _lift_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> List[int]:
    """Make every parameter (and static buffer) input an attribute of ``gm``, named after
    its path in the model ("input_norm_weight"); the indices of the other inputs."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    kept = []
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        is_static = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type") is not None
        if not (isinstance(value, nn.Parameter) or (isinstance(value, torch.Tensor) and is_static)):
            kept.append(index)
            continue
        source = _source_name(node)
        name = (_path_of(source) or node.name).replace(".", "_")
        if hasattr(gm, name):
            name = node.name
        if isinstance(value, nn.Parameter):
            gm.register_parameter(name, value)
        else:
            gm.register_buffer(name, value)
        with graph.inserting_before(first_op):
            attribute = graph.get_attr(name)
        attribute.meta["qpass_source"] = source
        node.replace_all_uses_with(attribute)
        graph.erase_node(node)
    gm.recompile()
    return kept


def _linears_as_modules(gm: fx.GraphModule) -> None:
    """Each ``F.linear`` on lifted parameters becomes a call of an ``nn.Linear`` (sharing
    them) at the layer's own path ("attn.q_proj", from Dynamo's module stack, or from the
    weight's source for an ``F.linear`` in a custom forward), so that the plan, ``skip``
    patterns and stub names see the model's layer names, as ``qpass.quantize`` does."""
    graph = gm.graph
    for node in [n for n in graph.nodes if _is_linear(n)]:
        weight, bias = _weight_and_bias(node)
        if not (_is_parameter(gm, weight) and (bias is None or _is_parameter(gm, bias))):
            continue
        path = _layer_path(node, weight)
        module = _submodule(gm, path) if path is not None else None
        if getattr(module, "weight", None) is not gm.get_parameter(weight.target):
            if path is None or not _free(gm, path.split(".")):
                path = f"{weight.target}_linear"
            _set_submodule(gm, path, _linear_module(gm.get_parameter(weight.target), bias and gm.get_parameter(bias.target)))
        with graph.inserting_before(node):
            call = graph.call_module(path, (node.args[0],))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(node)  # read by linears only: the nn.Linear holds it now
        delattr(gm, node.target)
    gm.recompile()


def _layer_path(linear: fx.Node, weight: fx.Node) -> Optional[str]:
    stack = list(linear.meta.get("nn_module_stack", {}).values())
    if stack and isinstance(stack[-1][1], type) and issubclass(stack[-1][1], nn.Linear):
        return _path_of(stack[-1][0])
    path = _path_of(weight.meta.get("qpass_source", ""))
    return path[: -len(".weight")] if path and path.endswith(".weight") else path


def _is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (F.linear, torch.ops.aten.linear.default)


def _weight_and_bias(node: fx.Node):
    return node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def _is_parameter(gm: fx.GraphModule, node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr" and isinstance(getattr(gm, node.target, None), nn.Parameter)


def _linear_module(weight: nn.Parameter, bias: Optional[nn.Parameter]) -> nn.Linear:
    with torch.device("meta"):  # shares the parameters, allocates nothing
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = weight
    if bias is not None:
        linear.bias = bias
    return linear


def _source_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None:
        return ""
    name = source.name
    return name() if callable(name) else name  # a method before torch 2.12, a property after


_ACCESS = re.compile(r"\.(\w+)|\['([^']*)'\]|\[\"([^\"]*)\"\]|\[(\d+)\]")
_CONTAINERS = {"_modules", "_parameters", "_buffers"}


def _path_of(source: str) -> Optional[str]:
    """A module or parameter path from a Dynamo source or module-stack key:
    "L['self']._modules['attn']._parameters['weight']" and "L['self'].attn.weight" both
    give "attn.weight"; None where it names no attribute path."""
    parts = ["".join(groups) for groups in _ACCESS.findall(source)]
    parts = [p for p in parts if p not in _CONTAINERS]
    if source.startswith("L['self']") and parts[:1] == ["self"]:
        parts = parts[1:]
    if not parts or not all(p.isidentifier() or p.isdigit() for p in parts):
        return None
    return ".".join(parts)


def _submodule(gm: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


def _free(gm: nn.Module, parts: List[str]) -> bool:
    """Whether ``parts`` can become a new submodule: its parents are absent or plain
    holder modules, and the leaf is absent."""
    owner: Any = gm
    for part in parts[:-1]:
        owner = getattr(owner, part, None)
        if owner is None:
            return True
        if type(owner) is not nn.Module:
            return False
    return not hasattr(owner, parts[-1])


def _set_submodule(gm: nn.Module, path: str, module: nn.Module) -> None:
    owner = gm
    *parents, leaf = path.split(".")
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    owner.add_module(leaf, module)
