"""Block-by-block calibration, for any architecture.

The repeated blocks are the longest ``nn.ModuleList`` whose every module holds a linear of
the plan (a model without one is a single block). The inputs of block 0 (positional and
keyword: attention masks, position embeddings...) are captured from the calibration
batches; then, for each block, one pass collects the inputs of every linear group and
the algorithm chooses the block's weights, and a second pass runs the block with those
weights quantized-dequantized to give the next block its inputs. Only one block's
activations are held at a time, and nothing of the model is changed: linears are tapped
and their weights substituted on the fly by a ``TorchFunctionMode`` over ``F.linear``.
"""

import contextlib
import copy
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from qpass.passes.capture import split_example
from qpass.passes.plan import LinearGroup, Plan

log = logging.getLogger("qpass")

# quantize_block(block_index, groups, inputs) -> {site name: weight to simulate the block with}
# where inputs[i] is the float32 [tokens, in_features] input of groups[i].
QuantizeBlock = Callable[[int, List[LinearGroup], List[torch.Tensor]], Dict[str, torch.Tensor]]


class NonFiniteActivations(ValueError):
    """Calibration activations hold NaN/Inf: raised as is, naming the linear or block."""


class _BlockInputsCaptured(Exception):
    """Raised by the hook on block 0 to stop the forward once its inputs are captured."""


class _LinearTap(TorchFunctionMode):
    """Sees every ``F.linear`` (nn.Linear calls it too): records the input of the tapped
    weights and computes with substituted weights, leaving the module untouched."""

    def __init__(self, name_of_weight: Dict[int, str], record=None, substitute=None):
        super().__init__()
        self.name_of_weight = name_of_weight
        self.record = record
        self.substitute = substitute or {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x, weight, *rest = args
        name = self.name_of_weight.get(id(weight))
        if name is None:
            return func(*args, **kwargs)
        if self.record is not None:
            self.record(name, x)
        return func(x, self.substitute.get(name, weight), *rest, **kwargs)


def find_blocks(model: nn.Module, plan: Plan) -> List[Tuple[str, nn.Module]]:
    """(path, module) of each repeated block, or ``[("", model)]`` where there are none."""
    linear_weights = {id(site.weight) for site in plan.sites}
    best: Tuple[str, Sequence[nn.Module]] = ("", [])
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or len(module) <= len(best[1]):
            continue
        if all(any(id(p) in linear_weights for p in child.parameters()) for child in module):
            best = (name, module)
    name, blocks = best
    if not blocks:
        return [("", model)]
    return [(f"{name}.{i}" if name else str(i), block) for i, block in enumerate(blocks)]


def run_blocks(
    model: nn.Module,
    plan: Plan,
    batches: Sequence[Any],
    groups: Sequence[LinearGroup],
    quantize_block: QuantizeBlock,
    *,
    device: Optional[torch.device] = None,
    desc: str = "calibration",
) -> None:
    """Calibrate ``groups`` block by block with ``quantize_block``; on ``device`` if given
    (a CPU model then moves to it one block at a time), else where the model is.
    Groups outside every block (a head, a pooler) come last, on what the whole model gives
    them with every block quantized."""
    if not batches:
        raise ValueError("calibration data is empty: calib= gave no batches")
    blocks = find_blocks(model, plan)
    model_device = _device_of(model)
    device = torch.device(device) if device is not None else model_device
    by_block = _groups_by_block(blocks, groups)
    in_blocks = {id(g) for block_groups in by_block for g in block_groups}
    outside = [g for g in groups if id(g) not in in_blocks]
    simulated_all: Dict[str, torch.Tensor] = {}  # kept only to calibrate the linears outside the blocks
    token_masks = [_token_mask(batch, device) for batch in batches]
    with torch.no_grad(), _eval_mode(model):
        inputs = _block_inputs(model, blocks, batches, model_device, device)
        for index, (path, block) in enumerate(_progress(blocks, desc)):
            block_groups = by_block[index]
            moved = {id(p): p.to(device) for p in list(block.parameters()) + list(block.buffers())}
            state = {name: moved[id(t)] for name, t in list(block.named_parameters()) + list(block.named_buffers())}
            weight_of = {s.name: moved[id(s.weight)] for g in block_groups for s in g.sites}
            name_of_weight = {id(w): name for name, w in weight_of.items()}

            def run_block(args, kwargs, tap, batch):
                return _call(lambda *a, **k: torch.func.functional_call(block, state, a, k), args, kwargs, tap,
                             f"calibration batch {batch}: block {path or type(block).__name__!r}")

            simulated = {}
            if block_groups:
                seen, collected = _collect_inputs(run_block, inputs, block_groups, name_of_weight, f"block {path!r}",
                                                  token_masks=token_masks)
                simulated = quantize_block(index, seen, collected)
                del collected
            if outside:
                simulated_all.update({name: w.to(model_device) for name, w in simulated.items()})
            if index < len(blocks) - 1:
                tap = _LinearTap(name_of_weight, substitute=simulated)
                inputs = [_next_inputs(args, kwargs, run_block(args, kwargs, tap, batch))
                          for batch, (args, kwargs) in enumerate(inputs)]
                _check_finite_outputs(inputs, path)
        del inputs
        if outside:
            _calibrate_outside(model, plan, batches, outside, simulated_all, quantize_block, len(blocks), model_device,
                               [_to(m, model_device) for m in token_masks])


def _calibrate_outside(model, plan, batches, outside, simulated, quantize_block, index, model_device, token_masks) -> None:
    """The linears outside the blocks (a head, a pooler), on the inputs the whole model
    gives them with every block's linears already quantized."""
    name_of_weight = {id(s.weight): s.name for s in plan.sites if s.name in simulated}
    name_of_weight.update({id(s.weight): s.name for g in outside for s in g.sites})
    batch_inputs = [_to(split_example(batch), model_device) for batch in batches]

    def run_model(args, kwargs, tap, batch):
        return _call(model, args, kwargs, tap, f"calibration batch {batch}: {type(model).__name__}")

    seen, collected = _collect_inputs(run_model, batch_inputs, outside, name_of_weight, "the model", simulated, token_masks)
    quantize_block(index, seen, collected)


def _progress(blocks, desc: str):
    """The blocks under a tqdm bar (time left) where tqdm is installed, else one log line per
    block: the library does not depend on tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        for index, block in enumerate(blocks):
            log.info("qpass: %s: block %d/%d", desc, index + 1, len(blocks))
            yield block
        return
    yield from tqdm(blocks, desc=desc, unit="block", disable=None)


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode (no dropout: deterministic) for the calibration only; the flags are restored."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _groups_by_block(blocks, groups) -> List[List[LinearGroup]]:
    by_block: List[List[LinearGroup]] = [[] for _ in blocks]
    params = [{id(p) for p in block.parameters()} for _, block in blocks]
    for group in groups:
        for index, block_params in enumerate(params):
            if all(id(s.weight) in block_params for s in group.sites):
                by_block[index].append(group)
                break
    return by_block


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _fresh(value: Any) -> Any:
    """A block's keyword input as it was when captured: objects other than tensors and
    plain values (a key/value cache, which a block fills in place) are copied per call."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_fresh(v) for v in value)
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    return copy.deepcopy(value)


def _block_inputs(model, blocks, batches, model_device, device) -> List[Tuple[tuple, dict]]:
    """(args, kwargs) of block 0 for each batch, on ``device``."""
    if blocks[0][0] == "":
        return [_to(split_example(batch), device) for batch in batches]
    path, first = blocks[0]
    captured: List[Tuple[tuple, dict]] = []

    def capture(module, args, kwargs):
        captured.append((_to(args, device), _to(_fresh(kwargs), device)))
        raise _BlockInputsCaptured

    hook = first.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for index, batch in enumerate(batches):
            args, kwargs = _to(split_example(batch), model_device)
            try:
                model(*args, **kwargs)
            except _BlockInputsCaptured:
                continue
            except Exception as err:
                raise ValueError(
                    f"calibration batch {index} ({_describe(batch)}): {type(model).__name__} rejected it: "
                    f"{type(err).__name__}: {err}"
                ) from err
            raise ValueError(f"calibration batch {index}: the forward of {type(model).__name__} never reached block {path!r}")
    finally:
        hook.remove()
    return captured


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)} {batch.dtype}"
    if isinstance(batch, dict):
        return "dict of " + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__} of " + ", ".join(_describe(v) for v in batch)
    return type(batch).__name__


def _call(function, args, kwargs, tap, where):
    try:
        with tap:
            return function(*args, **_fresh(kwargs))
    except NonFiniteActivations:
        raise
    except Exception as err:
        raise ValueError(f"{where} rejected its inputs: {type(err).__name__}: {err}") from err


def _token_mask(batch: Any, device: torch.device) -> Optional[torch.Tensor]:
    """The batch's ``attention_mask`` [batch, tokens] as booleans (False at padding), or
    None where it has none: padding tokens are left out of the statistics."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    return mask.to(device).bool()


def _collect_inputs(run, inputs, groups, name_of_weight, where, substitute=None, token_masks=None):
    """(groups, their float32 [tokens, in_features] inputs over all batches, less padding
    tokens), less the groups the forward never called (left to round to nearest)."""
    reader = {g.sites[0].name: i for i, g in enumerate(groups)}  # one site reads for its group
    parts: List[List[torch.Tensor]] = [[] for _ in groups]
    current_mask: List[Optional[torch.Tensor]] = [None]

    def record(name, x):
        index = reader.get(name)
        if index is None:
            return
        mask = current_mask[0]
        x = x.detach()
        x = (x[mask] if mask is not None and x.shape[:-1] == mask.shape else x.reshape(-1, x.shape[-1])).float()
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise NonFiniteActivations(f"calibration: the input {tuple(x.shape)} of linear {name!r} has {bad} NaN/Inf values")
        parts[index].append(x)

    tap = _LinearTap(name_of_weight, record=record, substitute=substitute)
    for batch, (args, kwargs) in enumerate(inputs):
        current_mask[0] = token_masks[batch] if token_masks else None
        run(args, kwargs, tap, batch)
    seen = [(g, torch.cat(p)) for g, p in zip(groups, parts) if p and sum(x.shape[0] for x in p)]
    if not seen:
        raise ValueError(f"calibration: no linear of {where} saw a token: are the batches empty?")
    unseen = [g.sites[0].name for g, p in zip(groups, parts) if not p]
    if unseen:
        log.info("qpass: calibration: %s never called %s; rounded to nearest", where, ", ".join(unseen))
    return [g for g, _ in seen], [x for _, x in seen]


def _next_inputs(args, kwargs, output) -> Tuple[tuple, dict]:
    """Block i+1 takes block i's output (or its first element) where block i took its
    hidden state: the first positional input, else the first floating keyword tensor."""
    hidden = output if isinstance(output, torch.Tensor) else output[0]
    if args:
        return (hidden, *args[1:]), kwargs
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return args, {**kwargs, key: hidden}
    raise ValueError("calibration: cannot tell which input of a block is its hidden state (no positional "
                     "input and no floating keyword tensor)")


def _check_finite_outputs(inputs, path) -> None:
    for args, kwargs in inputs:
        hidden = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        if not torch.isfinite(hidden).all():
            bad = int((~torch.isfinite(hidden)).sum())
            raise NonFiniteActivations(f"calibration: block {path!r} gave an output {tuple(hidden.shape)} with {bad} NaN/Inf values")
