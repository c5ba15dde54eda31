"""Inductor's code for qpass's kernels with their launch options: programmatic dependent launch (PDL) and the
register budget.

Eagerly the decode step's kernels (the W4A16 GEMV, the warp-level MMA kernel, the RMSNorm kernel and, where a
traced split of K zeroes its workspace, the zero kernel) are launched with Triton's ``launch_pdl``
(``kernels.common.dependent_launch``): each starts while the kernel before it finishes; and the linears with ``maxnreg``
(``kernels.common.register_budget``): ptxas issues a step's loads together. Inductor compiles a user kernel
with the options of the ``triton_meta`` it writes into its generated module, and drops both launch options.
For the kernels given here they come back:

- traced with a true ``PDL`` constexpr, the module's ``triton_meta`` gets ``'launch_pdl': True``, an option
  Inductor passes on to Triton (its own static launcher declines kernels with launch attributes and leaves
  them to Triton's, which launches them with PDL);
- traced with a ``MAXNREG`` constexpr above 0, ``triton_meta`` gets ``'maxnreg'``, which Inductor does not
  pass on: qpass's import has Inductor's compile options take it (``compile_with_launch_options``), and the
  module imports qpass, so that Inductor's compile workers, which run the module's text, do the same.
"""

import functools
import inspect
import warnings
from typing import Any, Callable, Iterable

from torch._inductor.codegen.wrapper import PythonWrapperCodegen
from torch._inductor.runtime.triton_heuristics import CachingAutotuner

_TRITON_META = "triton_meta={"
_USER_AUTOTUNE = "@triton_heuristics.user_autotune("


def _replaced_once(kernel_module: str, kernel_name: str, anchor: str, replacement: str, option: str) -> str:
    """``kernel_module`` with its one ``anchor`` replaced; unchanged, with a warning, if a torch's code has the
    anchor other than once."""
    if kernel_module.count(anchor) != 1:
        warnings.warn(f"qpass: Inductor's code for {kernel_name} has {kernel_module.count(anchor)} '{anchor}', "
                      f"not 1; the kernel runs without {option} (slower)")
        return kernel_module
    return kernel_module.replace(anchor, replacement)


def with_launch_options(kernel_module: str, kernel_name: str, options: dict) -> str:
    """``kernel_module``, Inductor's code that compiles one user kernel, with the launch ``options``
    (``launch_pdl``, ``maxnreg``) in its ``triton_meta``, and importing qpass where ``maxnreg`` is one."""
    written = "".join(f"{key!r}: {value!r}, " for key, value in options.items())
    kernel_module = _replaced_once(kernel_module, kernel_name, _TRITON_META, _TRITON_META + written,
                                   " and ".join(options))
    if "maxnreg" in options:  # (Inductor's compile workers run this text: qpass has their compile take maxnreg)
        kernel_module = _replaced_once(kernel_module, kernel_name, _USER_AUTOTUNE, "import qpass\n" + _USER_AUTOTUNE,
                                       "its register budget")
    return kernel_module


def _launch_options(kernel_kwargs: dict) -> dict:
    """The launch options of a kernel traced with ``kernel_kwargs``: ``launch_pdl`` for a true ``PDL``,
    ``maxnreg`` for a ``MAXNREG`` above 0."""
    pdl, maxnreg = kernel_kwargs.get("PDL", False), kernel_kwargs.get("MAXNREG", 0)
    options = {}
    if isinstance(pdl, (bool, int)) and pdl:
        options["launch_pdl"] = True
    if isinstance(maxnreg, int) and not isinstance(maxnreg, bool) and maxnreg > 0:
        options["maxnreg"] = maxnreg
    return options


def _with_kernel_launch_options(define_user_kernel: Callable, kernel_ids: set) -> Callable:
    """``define_user_kernel`` (Inductor's ``define_user_defined_triton_kernel``, which gets a user kernel's JIT
    function), writing the launch options into the code of the kernels in ``kernel_ids``."""
    signature = inspect.signature(define_user_kernel)

    @functools.wraps(define_user_kernel)
    def define_user_kernel_with_launch_options(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        options = _launch_options(arguments["kwargs"]) if id(arguments["kernel"]) in kernel_ids else {}
        if not options:
            return define_user_kernel(self, *args, **kwargs)
        own_define_kernel = vars(self).get("define_kernel")
        define_kernel = self.define_kernel

        def define_kernel_with_launch_options(name, kernel_module, *rest, **more):
            return define_kernel(name, with_launch_options(kernel_module, name, options), *rest, **more)

        self.define_kernel = define_kernel_with_launch_options
        try:
            return define_user_kernel(self, *args, **kwargs)
        finally:
            if own_define_kernel is None:
                del self.define_kernel
            else:
                self.define_kernel = own_define_kernel

    define_user_kernel_with_launch_options.qpass_kernel_ids = kernel_ids
    return define_user_kernel_with_launch_options


def _taking_maxnreg(create_compile_options: Callable) -> Callable:
    """``create_compile_options`` (``CachingAutotuner._create_compile_options``, Triton's options from a
    kernel's compile metadata, a copy of its ``triton_meta``) with ``maxnreg`` for CUDA where the metadata has
    it. Inductor's own kernels have none."""

    @functools.wraps(create_compile_options)
    def create_compile_options_with_maxnreg(self, cfg, compile_meta):
        options = create_compile_options(self, cfg, compile_meta)
        if compile_meta.get("maxnreg") and self.device_props.type == "cuda":
            options["maxnreg"] = compile_meta["maxnreg"]
        return options

    create_compile_options_with_maxnreg.qpass_takes_maxnreg = True
    return create_compile_options_with_maxnreg


def compile_with_launch_options(kernels: Iterable[Any]) -> None:
    """Make Inductor compile and launch ``kernels`` (Triton JIT functions with ``PDL`` and ``MAXNREG``
    constexprs) with PDL and their register budget where traced with them; other kernels as before."""
    create_compile_options = CachingAutotuner._create_compile_options
    if not getattr(create_compile_options, "qpass_takes_maxnreg", False):
        CachingAutotuner._create_compile_options = _taking_maxnreg(create_compile_options)
    define_user_kernel = PythonWrapperCodegen.define_user_defined_triton_kernel
    kernel_ids = getattr(define_user_kernel, "qpass_kernel_ids", None)
    if kernel_ids is not None:  # already wrapped
        kernel_ids.update(id(k) for k in kernels)
        return
    PythonWrapperCodegen.define_user_defined_triton_kernel = _with_kernel_launch_options(
        define_user_kernel, {id(k) for k in kernels})
