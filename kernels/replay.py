"""Eager calls replay their kernel launches.

An eager call of an entry point (``w4a16.w4a16_linear``, ...) spends most of its host time deciding what to launch:
the pick of a kernel and its block shapes, the launch's arguments, and Triton's binding and specialization of them.
At one token that host time is the whole cost of a linear. It depends only on the call's *signature*: the inputs'
dtypes, shapes, strides, devices and alignments, and the other arguments' values.

``Replayed(entry)`` runs ``entry`` once for each signature while recording what it does: the buffers it allocates
(``new_empty``) and the kernels it launches (``launch``), with their grids, arguments and compiled
kernels. Later calls of that signature replay the record: fresh buffers, then each compiled kernel launched directly.

A record is kept only where replaying it is the call itself:

- every tensor a kernel gets, itself or as the base of a TMA descriptor (the Gluon kernels'), is an input of the call,
  one of its recorded buffers, recorded rows of either (``rows_of``, ``join_rows``) or a buffer kept between calls
  (``kept_zeros``: passed as it is), and the result is a recorded buffer; a replay passes the recorded descriptor on
  its own tensor (the signature fixes its shape and strides);
- no torch op ran but those allocations and views (a dispatch mode watches): nothing computed a tensor that a replay
  would skip, nor made a view of one that it would not make again.

Any other signature (the dequantized weight + cuBLAS for large M) runs ``entry`` at every call. Calls replay only
where the kernels would run for real (``wrap_triton`` switched off, as the ops' CUDA backend and qpass's eager path
do); under torch.compile or another tracer ``entry`` runs, and ``launch`` goes through ``torch.library.wrap_triton``
so that the tracer sees each kernel (a Gluon kernel, which only opaque ops launch, goes as it is).
"""

import dataclasses
import inspect
import threading
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import torch
from torch._library.triton import is_wrap_triton_enabled
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from triton import knobs

_ALLOCATIONS = (torch.ops.aten.empty.memory_format,)
_SCALARS = (int, float, bool, str, type(None))
MAX_SIGNATURES = 1024  # per entry point; past it the records start again (each prefill length is a signature)

_state = threading.local()  # .recording: the _Recording of the call being recorded on this thread, if any

# kept_zeros's buffers: (device, size) -> tensor, which a record passes to its launches as they are
_KEPT = {}


def _active_hook(hook):
    """A launch hook of Triton's knobs, None where it would do nothing: Triton's launcher then skips it, and the launch
    builds no metadata for it (newer Triton keeps its hooks in a chain, empty unless a profiler adds to it)."""
    return hook if getattr(hook, "calls", hook) else None


class _Buffer(NamedTuple):
    shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def allocate(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)


class _Rows(NamedTuple):
    """Rows ``start:stop`` of an input of the call or of one of its allocated buffers (``rows_of``, ``join_rows``),
    which a replay views again on its own tensors once it has allocated them all."""

    from_inputs: bool
    index: int
    start: int
    stop: int

    def allocate(self) -> None:
        return None  # (nothing: ``view`` makes it after the buffers)

    def view(self, inputs: list, buffers: list) -> torch.Tensor:
        return (inputs if self.from_inputs else buffers)[self.index][self.start:self.stop]


class _Launch(NamedTuple):
    """One recorded launch: ``values`` are the kernel's arguments in its signature's order, constexprs included (as
    Triton's compiled launcher takes them), with None where ``tensors`` puts a tensor: (position, from the inputs,
    index), and a TMA descriptor with no base where ``descriptors`` puts its base the same way."""

    kernel: Callable
    grid: Tuple[int, int, int]
    values: list
    tensors: List[Tuple[int, bool, int]]
    descriptors: List[Tuple[int, bool, int]]
    options: dict  # num_warps, num_stages, ...: for the interpreter's launch, which compiles nothing
    compiled: object  # Triton's CompiledKernel; None under the interpreter
    device_index: int

    def run(self, inputs: list, buffers: list):
        values = self.values.copy()
        for position, from_inputs, index in self.tensors:
            values[position] = inputs[index] if from_inputs else buffers[index]
        for position, from_inputs, index in self.descriptors:
            values[position] = _on_base(values[position], inputs[index] if from_inputs else buffers[index])
        compiled = self.compiled
        if compiled is None:
            self.kernel[self.grid](*values, **self.options)
            return
        # what Triton's JITFunction.run does once it has found the compiled kernel
        stream = torch._C._cuda_getCurrentRawStream(self.device_index)
        enter, leave = _active_hook(knobs.runtime.launch_enter_hook), _active_hook(knobs.runtime.launch_exit_hook)
        metadata = compiled.launch_metadata(self.grid, stream, *values) if enter is not None else None
        compiled.run(*self.grid, stream, compiled.function, compiled.packed_metadata, metadata, enter, leave, *values)


class _Record(NamedTuple):
    buffers: List[Union[_Buffer, _Rows]]
    views: List[int]  # the indices of the _Rows in buffers
    launches: List[_Launch]
    result: int  # the buffer returned

    def replay(self, inputs: list) -> torch.Tensor:
        buffers = [buffer.allocate() for buffer in self.buffers]
        for index in self.views:
            buffers[index] = self.buffers[index].view(inputs, buffers)
        for launch in self.launches:
            launch.run(inputs, buffers)
        return buffers[self.result]


class _Recording(TorchDispatchMode):
    """What one call does, as it does it. ``replayable`` turns False at the first thing a replay would not repeat."""

    def __init__(self, inputs: list):
        super().__init__()
        self.slots = {id(t): (True, i) for i, t in enumerate(inputs)}
        self.buffers: List[Union[_Buffer, _Rows]] = []
        self.alive: List[torch.Tensor] = []  # the buffers, so that their ids stay theirs while recording
        self.launches: List[_Launch] = []
        self.replayable = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in _ALLOCATIONS:
            self.replayable = False
        return func(*args, **(kwargs or {}))

    def buffer(self, t: torch.Tensor, buffer: Union[_Buffer, _Rows]):
        self.slots[id(t)] = (False, len(self.buffers))
        self.buffers.append(buffer)
        self.alive.append(t)

    def allocated(self, t: torch.Tensor) -> Optional[int]:
        """The index of ``t``'s buffer where the call allocated it (not an input, not a view)."""
        from_inputs, index = self.slots.get(id(t), (True, None))
        return None if from_inputs or not isinstance(self.buffers[index], _Buffer) else index

    def launch(self, kernel, grid, args: tuple, kwargs: dict, compiled):
        signature = inspect.signature(getattr(kernel, "fn", kernel))  # (the interpreter's kernels have no params)
        parameters = signature.parameters
        bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in parameters})
        bound.apply_defaults()
        values = list(bound.arguments.values())
        tensors, descriptors = [], []
        for position, value in enumerate(values):
            descriptor = _is_descriptor(value)
            if descriptor or isinstance(value, torch.Tensor):
                tensor = value.base if descriptor else value
                if any(tensor is kept for kept in _KEPT.values()):
                    continue
                slot = self.slots.get(id(tensor))
                if slot is None:  # computed by the entry point: a replay would not compute it
                    self.replayable = False
                    return
                (descriptors if descriptor else tensors).append((position, *slot))
                values[position] = _on_base(value, None) if descriptor else None  # (holding no tensor of this call)
            elif not isinstance(value, _SCALARS):
                self.replayable = False
                return
        grid = tuple(grid) + (1,) * (3 - len(grid))
        if not all(isinstance(g, int) for g in grid):
            self.replayable = False
            return
        if compiled is not None and not hasattr(compiled, "packed_metadata"):
            compiled = None  # (not a CompiledKernel: replay through the kernel's own launch)
        options = {k: v for k, v in kwargs.items() if k not in parameters}
        device_index = torch.cuda.current_device() if compiled is not None else -1
        self.launches.append(_Launch(kernel, grid, values, tensors, descriptors, options, compiled, device_index))

    def record(self, result) -> Optional[_Record]:
        slot = self.slots.get(id(result)) if isinstance(result, torch.Tensor) else None
        if not self.replayable or slot is None or slot[0]:
            return None
        views = [index for index, buffer in enumerate(self.buffers) if isinstance(buffer, _Rows)]
        return _Record(self.buffers, views, self.launches, slot[1])


def _is_descriptor(value) -> bool:
    """Whether ``value`` is a host-side TMA descriptor (Triton's or Gluon's ``TensorDescriptor``) of a tensor."""
    return dataclasses.is_dataclass(value) and isinstance(getattr(value, "base", None), torch.Tensor)


def _on_base(descriptor, base: Optional[torch.Tensor]):
    """``descriptor`` with ``base`` as its tensor: the same shape, strides, block and layout (a copy, not checked again:
    the call's signature fixes what its checks read). Its fields copied as they are: ``copy.copy``'s generic protocol
    took 4.1 us a descriptor on a 2-core host, this 0.5, in an eager call that passes up to six."""
    moved = object.__new__(type(descriptor))
    moved.__dict__.update(vars(descriptor))
    moved.base = base
    return moved


def _recording() -> Optional[_Recording]:
    return getattr(_state, "recording", None)


def _allocate(buffer: _Buffer) -> torch.Tensor:
    t = buffer.allocate()
    recording = _recording()
    if recording is not None:
        recording.buffer(t, buffer)
    return t


def new_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, recorded as a buffer that a replay allocates again."""
    return _allocate(_Buffer(tuple(shape), dtype, device))


def rows_of(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``t[start:stop]``, recorded as a view that a replay makes again of its own tensor: rows of an input of the call
    or of a buffer it allocated (of any other tensor the call is not replayed)."""
    recording = _recording()
    if recording is None:
        return t[start:stop]
    with _disable_current_modes():  # (a view that a replay makes itself)
        rows = t[start:stop]
    from_inputs, index = recording.slots.get(id(t), (False, None))
    if from_inputs or recording.allocated(t) is not None:
        recording.buffer(rows, _Rows(from_inputs, index, start, stop))
    else:
        recording.replayable = False
    return rows


def join_rows(parts: List[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``. Recorded, where each part is a buffer the call allocated, a replay allocates the whole and
    makes each part its rows: the parts' launches write them there, and nothing is copied."""
    recording = _recording()
    if recording is None:
        return torch.cat(parts)
    whole = new_empty((sum(part.shape[0] for part in parts), *parts[0].shape[1:]), parts[0].dtype, parts[0].device)
    whole_index, start = recording.allocated(whole), 0
    for part in parts:
        stop = start + part.shape[0]
        with _disable_current_modes():  # (this call's copy; a replay's parts are the rows themselves)
            whole[start:stop].copy_(part)
        index = recording.allocated(part)
        # (rows that start off 16 bytes could not take what the kernels' TMA stores into a fresh buffer)
        aligned = start * whole.stride(0) * whole.element_size() % 16 == 0
        if index is None or not aligned or part.dtype != whole.dtype or part.shape[1:] != whole.shape[1:] or any(
                isinstance(other, _Rows) and not other.from_inputs and other.index == index
                for other in recording.buffers):  # (rows of it viewed: it stays a buffer, the views' source)
            recording.replayable = False
        else:
            recording.buffers[index] = _Rows(False, whole_index, start, stop)
        start = stop
    return whole


def kept_zeros(size: int, device: torch.device) -> torch.Tensor:
    """float32 zeros, at least ``size``, kept for the process: one a device and power-of-two size, made (zeroed) at
    its first call, which a replay passes to its launches as it is. For the kernels that leave it at zero when they
    finish (the split-K workspace, ``common.split_k_workspace``): a CUDA graph replays the address it captured, so
    two launches on one device that use it must not overlap (streams that run concurrently would share it). One
    made during a CUDA graph's capture (no call before it) is the graph's own, zeroed in the graph, and not kept."""
    key = (device, 1 << max(size - 1, 0).bit_length())
    kept = _KEPT.get(key)
    if kept is not None:
        return kept
    with _disable_current_modes():  # (made outside a recording's watch: a later replay need not make it)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.zeros(key[1], device=device, dtype=torch.float32)
        kept = _zeros_outside_graph_pools(key[1], device)
    _KEPT[key] = kept
    return kept


def _zeros_outside_graph_pools(size: int, device: torch.device) -> torch.Tensor:
    """float32 zeros made on a thread of their own where ``device`` is a GPU: while torch.compile's CUDA graphs warm
    a graph up they send this thread's allocations to the graph's memory pool, where a tensor that outlives the call
    is one they do not track (and refuse to record)."""
    if device.type != "cuda":
        return torch.zeros(size, device=device, dtype=torch.float32)
    made = []

    def make():
        try:
            made.append(torch.zeros(size, device=device, dtype=torch.float32))
        except BaseException as error:  # (raised on this thread below)
            made.append(error)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    torch.cuda.synchronize(device)  # (zeroed on the other thread's stream)
    return made[0]


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` through ``torch.library.wrap_triton`` (a tracer sees the kernel), recorded
    where a ``Replayed`` entry point is recording. A Gluon kernel, which ``wrap_triton`` does not take (only opaque ops
    run them: ``qpass.ops``), is launched as it is."""
    recording = _recording()
    if recording is None:
        gluon = getattr(kernel, "is_gluon", lambda: False)()
        (kernel if gluon else torch.library.wrap_triton(kernel))[grid](*args, **kwargs)
        return
    with _disable_current_modes():  # (the interpreter copies tensors by torch ops: the launch's own)
        compiled = kernel[grid](*args, **kwargs)
    recording.launch(kernel, grid, args, kwargs, compiled)


def _current_device() -> int:
    """The CUDA device that Triton would launch on (its current one); -1 where CUDA has not started."""
    return torch.cuda.current_device() if torch.cuda.is_initialized() else -1


def _signature(args: tuple, kwargs: dict) -> Tuple[tuple, list]:
    """The call's signature (everything a launch decision may depend on) and its tensors, in order."""
    key, inputs = [_current_device()], []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            inputs.append(value)
            key.append((value.dtype, value.shape, value.stride(), value.device, value.data_ptr() & 15,
                        value.storage_offset() & 15))
        else:
            key.append((type(value), value))  # (1, 1.0 and True are equal keys, not equal arguments)
    key.extend(kwargs)
    return tuple(key), inputs


_NOT_REPLAYABLE = object()


class Replayed:
    """``entry`` (tensors and scalars -> one tensor), its launches recorded per signature and replayed
    (module docstring)."""

    def __init__(self, entry: Callable[..., torch.Tensor]):
        self.entry = entry
        self.records = {}

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if is_wrap_triton_enabled() or _recording() is not None:
            return self.entry(*args, **kwargs)
        key, inputs = _signature(args, kwargs)
        try:
            record = self.records.get(key)
        except TypeError:  # an unhashable argument
            return self.entry(*args, **kwargs)
        if record is None:
            return self._record(key, inputs, args, kwargs)
        if record is _NOT_REPLAYABLE:
            return self.entry(*args, **kwargs)
        return record.replay(inputs)

    def _record(self, key, inputs: list, args: tuple, kwargs: dict) -> torch.Tensor:
        if len({id(t) for t in inputs}) < len(inputs):
            # one tensor in two places: the record could not tell which of them a launch takes (a replay of a
            # record of distinct tensors is right for such a call: it passes each where the entry point would)
            return self.entry(*args, **kwargs)
        recording = _Recording(inputs)
        _state.recording = recording
        try:
            with recording:
                result = self.entry(*args, **kwargs)
        finally:
            _state.recording = None
        if len(self.records) >= MAX_SIGNATURES:
            self.records.clear()
        record = recording.record(result)
        self.records[key] = _NOT_REPLAYABLE if record is None else record
        return result
