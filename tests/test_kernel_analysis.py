"""torch.compile's per-launch analysis of qpass's Triton kernels answers from a cache, keyed by
what the kernel's Triton IR depends on (``qpass.kernel_analysis``)."""

import torch
import triton
from torch._higher_order_ops import triton_kernel_wrap

from qpass.kernel_analysis import _cached
from qpass.kernels import w4a16


def _launch(kernel, num_warps=4):
    """The kernel as torch hands a launch of it to the analysis: a fresh one-config Autotuner."""
    return triton.autotune(configs=[triton.Config({}, num_warps=num_warps)], key=[])(kernel)


def _counting_analysis():
    calls = []

    def analyze(kernel, kwargs, tma_descriptor_metadata):
        calls.append(kwargs)
        return ["out_ptr"]

    return analyze, calls


def _arguments(x_dtype=torch.bfloat16, rows=4, BLOCK_N=16):
    return {"x_ptr": torch.empty(rows, 8, dtype=x_dtype), "out_ptr": torch.empty(rows, 8), "M": rows,
            "BLOCK_N": BLOCK_N, "EVEN_N": True}


def test_one_analysis_per_specialization():
    kernel = w4a16.w4a16_gemv_kernel
    analyze, calls = _counting_analysis()
    cached = _cached(analyze, {id(kernel)})
    first = cached(_launch(kernel), {**_arguments(), "MAXNREG": 0}, {})
    again = cached(_launch(kernel, num_warps=8), {**_arguments(), "MAXNREG": 0}, {})  # another launch site
    budgeted = cached(_launch(kernel), {**_arguments(), "MAXNREG": 80}, {})  # a register budget: the same code
    assert len(calls) == 1 and first == again == budgeted == ["out_ptr"] and first is not again
    cached(_launch(kernel), _arguments(BLOCK_N=32), {})  # a constexpr
    cached(_launch(kernel), _arguments(x_dtype=torch.float16), {})  # a tensor's dtype
    cached(_launch(kernel), _arguments(rows=1), {})  # an integer's value
    cached(_launch(kernel), {**_arguments(), "EVEN_N": 1}, {})  # 1 is not True
    assert len(calls) == 5


def test_other_kernels_and_tma_go_to_torch():
    kernel = w4a16.w4a16_gemv_kernel
    analyze, calls = _counting_analysis()
    cached = _cached(analyze, {id(kernel)})
    for _ in range(2):
        cached(_launch(w4a16._w4a16_mma_kernel), _arguments(), {})
        cached(_launch(kernel), _arguments(), {"x_ptr": ("stable", ([16, 16],))})
    assert len(calls) == 4


def test_import_wraps_torchs_analysis_of_the_ops_kernels():
    name = next(n for n in ("identify_accessed_tensors", "identify_mutated_tensors") if hasattr(triton_kernel_wrap, n))
    assert id(w4a16.w4a16_gemv_kernel) in getattr(triton_kernel_wrap, name).qpass_kernel_ids
