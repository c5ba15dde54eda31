"""torch.compile's analysis of which tensors a Triton kernel writes, done once per kernel
specialization instead of once per launch site.

The ops are ``torch.library.triton_op``s, so under torch.compile every launch in their bodies
becomes a ``triton_kernel_wrapper_*`` node, and torch asks of each node, several times
(functionalization in AOTAutograd, then Inductor's lowering and its kernel IR), which of the
kernel's arguments it writes: ``torch._higher_order_ops.triton_kernel_wrap`` generates the
kernel's Triton IR and walks it every time, about 0.14 s an ask for the GEMV kernel. A
model's many linears share a few specializations (16 Llama layers: 64 launch sites, 256 asks,
4 specializations), so without a cache this analysis was most of the first call's compile
time: 35 of 42 s on an H200 (bench/NOTES-e2e.md, "First call").

The answer depends only on the kernel and what its Triton IR is generated from: the dtypes
of the tensor arguments (generated from stand-ins of those dtypes) and the values of the
others (symbolic sizes become a fixed number there), which is the cache key. torch hands each
launch's kernel over in a fresh ``Autotuner`` of one config (to carry ``num_warps``), so the
kernel is known by its JIT function and that config's constexprs.

The analysis cannot read inline asm with side effects and then takes every tensor argument for
written (functionalization copies them all; CUDA graphs are skipped). The GEMV's programmatic
dependent launch (``PDL``) adds such asm, its wait and trigger, which touch no memory, and the
warp-level MMA kernel's pulls of its words into L2 (``PREFETCH_GROUPS``) another, which writes none: the
analysis sees the kernels without them.
"""

import copy
import functools
from typing import Any, Callable, Dict, Hashable, Iterable, Optional

import sympy
import torch
from torch._higher_order_ops import triton_kernel_wrap
from triton.runtime.autotuner import Autotuner

# The analysis' name across torch versions; Inductor looks it up on the module at each use.
_ANALYSIS_NAMES = ("identify_accessed_tensors", "identify_mutated_tensors")
_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)
# Constexprs that only change how a kernel is launched or compiled, not what it reads or writes, and the values
# the analysis reads it with: PDL orders launches (griddepcontrol), MAXNREG is ptxas's register budget,
# PREFETCH_GROUPS pulls words into L2 ahead of their loads.
_LAUNCH_ONLY = {"PDL": False, "MAXNREG": 0, "PREFETCH_GROUPS": 0}


def _argument_key(value: Any) -> Optional[Hashable]:
    """What the Triton IR sees of one argument; None where that is unknown (no caching)."""
    if isinstance(value, _SYMBOLIC):
        return "symbolic"
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    if hasattr(value, "get_dtype"):  # Inductor's TensorBox and buffers
        return ("tensor", value.get_dtype())
    try:
        hash(value)
    except TypeError:
        return None
    return (type(value), value)  # the type too: True and 1 are equal keys otherwise


def _jit_function(kernel) -> Any:
    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def _analysis_key(kernel, kwargs: Dict[str, Any], rest: tuple) -> Optional[Hashable]:
    if any(rest):  # TMA descriptors: not used by qpass's kernels, left to torch
        return None
    # the Triton IR is generated with the first config's constexprs (torch's generate_ttir)
    configs = kernel.configs if isinstance(kernel, Autotuner) else []
    constexprs = configs[0].kwargs if configs else {}
    arguments = tuple(sorted((name, _argument_key(value)) for name, value in {**kwargs, **constexprs}.items()))
    if any(key is None for _, key in arguments):
        return None
    return (id(_jit_function(kernel)), arguments)


def cache_kernel_analysis(kernels: Iterable[Any]) -> None:
    """Make torch's per-launch analysis of ``kernels`` (Triton JIT functions) answer from a
    cache; other kernels go to torch's analysis as before."""
    name = next((n for n in _ANALYSIS_NAMES if hasattr(triton_kernel_wrap, n)), None)
    if name is None:  # a torch without it: nothing to cache
        return
    analyze = getattr(triton_kernel_wrap, name)
    cached_ids = getattr(analyze, "qpass_kernel_ids", None)
    if cached_ids is not None:  # already wrapped
        cached_ids.update(id(k) for k in kernels)
        return
    setattr(triton_kernel_wrap, name, _cached(analyze, {id(k) for k in kernels}))


def _cached(analyze: Callable, kernel_ids: set) -> Callable:
    answers: Dict[Hashable, Any] = {}

    @functools.wraps(analyze)
    def cached_analysis(kernel, kwargs, *rest):
        if id(_jit_function(kernel)) not in kernel_ids:
            return analyze(kernel, kwargs, *rest)
        kwargs = {**kwargs, **{k: v for k, v in _LAUNCH_ONLY.items() if k in kwargs}}
        key = _analysis_key(kernel, kwargs, rest)
        if key is None:
            return analyze(kernel, kwargs, *rest)
        if key not in answers:
            answers[key] = analyze(kernel, kwargs, *rest)
        return copy.deepcopy(answers[key])  # callers own what they get

    cached_analysis.qpass_kernel_ids = kernel_ids
    return cached_analysis
