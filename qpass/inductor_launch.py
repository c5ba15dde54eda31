"""Inductor's code for qpass's kernels launched with programmatic dependent launch (PDL).

Eagerly the W4A16 GEMV is launched with Triton's ``launch_pdl`` (``kernels.common.dependent_launch``):
it starts while the kernel before it finishes. Inductor compiles a user kernel with the options of
the ``triton_meta`` it writes into its generated module, and a launch's ``launch_pdl`` is not among
them. For the kernels given here, traced with a true ``PDL`` constexpr, it now is: the kernel is
compiled, and launched by Triton's launcher, with PDL (Inductor's own static launcher declines
kernels with launch attributes and leaves them to Triton's).

The generated module is text, run in Inductor's compile workers too, so the option goes into that
text, where Inductor writes ``triton_meta={...}``.
"""

import functools
import inspect
import warnings
from typing import Any, Callable, Iterable

from torch._inductor.codegen.wrapper import PythonWrapperCodegen

_TRITON_META = "triton_meta={"


def with_launch_pdl(kernel_module: str, kernel_name: str) -> str:
    """``kernel_module``, Inductor's code that compiles one user kernel, with ``launch_pdl`` in its
    ``triton_meta``."""
    if kernel_module.count(_TRITON_META) != 1:
        warnings.warn(f"qpass: Inductor's code for {kernel_name} has {kernel_module.count(_TRITON_META)} "
                      f"'{_TRITON_META}', not 1; the kernel runs without programmatic dependent launch (slower)")
        return kernel_module
    return kernel_module.replace(_TRITON_META, _TRITON_META + "'launch_pdl': True, ")


def _traced_with_pdl(kernel_kwargs: dict) -> bool:
    pdl = kernel_kwargs.get("PDL", False)
    return isinstance(pdl, (bool, int)) and bool(pdl)


def _launching_with_pdl(define_user_kernel: Callable, kernel_ids: set) -> Callable:
    """``define_user_kernel`` (Inductor's ``define_user_defined_triton_kernel``, which gets a user kernel's JIT
    function), writing ``launch_pdl`` into the code of the kernels in ``kernel_ids`` traced with a true ``PDL``."""
    signature = inspect.signature(define_user_kernel)

    @functools.wraps(define_user_kernel)
    def define_user_kernel_with_launch_pdl(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        if id(arguments["kernel"]) not in kernel_ids or not _traced_with_pdl(arguments["kwargs"]):
            return define_user_kernel(self, *args, **kwargs)
        own_define_kernel = vars(self).get("define_kernel")
        define_kernel = self.define_kernel

        def define_kernel_with_launch_pdl(name, kernel_module, *rest, **options):
            return define_kernel(name, with_launch_pdl(kernel_module, name), *rest, **options)

        self.define_kernel = define_kernel_with_launch_pdl
        try:
            return define_user_kernel(self, *args, **kwargs)
        finally:
            if own_define_kernel is None:
                del self.define_kernel
            else:
                self.define_kernel = own_define_kernel

    define_user_kernel_with_launch_pdl.qpass_kernel_ids = kernel_ids
    return define_user_kernel_with_launch_pdl


def launch_with_pdl_when_compiled(kernels: Iterable[Any]) -> None:
    """Make Inductor launch ``kernels`` (Triton JIT functions with a ``PDL`` constexpr) with PDL where they
    are traced with ``PDL`` true; other kernels' code as before."""
    define_user_kernel = PythonWrapperCodegen.define_user_defined_triton_kernel
    kernel_ids = getattr(define_user_kernel, "qpass_kernel_ids", None)
    if kernel_ids is not None:  # already wrapped
        kernel_ids.update(id(k) for k in kernels)
        return
    PythonWrapperCodegen.define_user_defined_triton_kernel = _launching_with_pdl(
        define_user_kernel, {id(k) for k in kernels})
