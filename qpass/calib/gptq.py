"""GPTQ calibration: round the columns of each weight one at a time and spread each
column's rounding error over the columns not yet rounded, weighted by the inverse
Hessian of the layer's output error, ``H = 2 X^T X / n`` over the calibration inputs.

Linears that read the same input share ``H`` (and, with act-order, the column order),
so a group is quantized as one matrix. Blocks follow ``qpass.calib.blocks``: each block
sees the outputs of the blocks before it, already quantized.
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from qpass.calib.base import Calibration
from qpass.calib.blocks import run_blocks
from qpass.calib.rtn import quantize_groupwise
from qpass.passes.plan import LinearGroup, Plan

LAZY_BLOCK = 128  # columns per lazy batch update (rounded to whole groups)


HESSIAN_TOKENS_PER_STEP = 8192  # tokens scaled at a time: a copy of a chunk, not of all inputs


def hessian(x: torch.Tensor, token_norm_cap: float = 0.0, divisor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``2 X^T X / n`` of inputs ``x [n, K]`` (divided per channel by ``divisor [K]`` where
    given: AWQ's scaled inputs, without a copy of ``x``): summed in float32 (a float64 matmul
    is several times slower on a CPU), returned in float64 for a stable Cholesky.

    With ``token_norm_cap > 0``, a token whose norm exceeds that multiple of the median
    token norm counts with its norm cut to it. Otherwise the few tokens with massive
    activations (an attention sink) dominate ``H``, and GPTQ fits their outputs by large
    changes to weights that every other token then reads: on SmolLM2-135M, layer 28's
    down_proj alone cost +1.9 perplexity (rounding to nearest: +0.13; capped at 2: +0.05;
    tests/test_calib_real.py)."""
    def chunks():
        for chunk in x.split(HESSIAN_TOKENS_PER_STEP):
            chunk = chunk.float()
            yield chunk if divisor is None else chunk / divisor

    limit = None
    if token_norm_cap > 0:
        norms = torch.cat([chunk.norm(dim=1) for chunk in chunks()]).clamp(min=torch.finfo(torch.float32).tiny)
        limit = token_norm_cap * norms.median()
    h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    for chunk in chunks():
        if limit is not None:
            chunk = chunk * (limit / chunk.norm(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)).clamp(max=1)
        h.addmm_(chunk.t(), chunk)
    return (2 * h / x.shape[0]).double()


def gptq_quantize(
    weight: torch.Tensor, h: torch.Tensor, group_size: int, sym: bool, desc_act: bool, damp_percent: float,
    name: str = "weight", grid: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of ``weight [N, K]`` with Hessian ``h [K, K]``.

    Returns ``(q, scales, zeros, g_idx, dequantized)``: ``q`` int32 ``[N, K]`` (0..15, in the
    original column order), ``scales``/``zeros`` ``[N, K / group_size]`` indexed by
    group, ``g_idx`` ``[K]`` the group of each column (``k // group_size`` unless
    ``desc_act``), and the float32 weight they stand for.

    ``grid``: fixed ``(scales, zeros)`` ``[N, K / group_size]`` of the natural groups
    (``g_idx`` is then ``k // group_size`` even with ``desc_act``): the rounding of a
    format without ``g_idx`` (AWQ's), on a grid chosen beforehand (AWQ's clipping)."""
    n, k = weight.shape
    w = weight.detach().double().clone()
    h = h.clone()
    dead = torch.diagonal(h) == 0  # inputs never active: any value will do
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if desc_act else torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp_percent * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    try:
        h_inv = _upper_cholesky_of_inverse(h)
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"gptq: the Hessian [{k}, {k}] of {name!r} is not positive definite even with "
                         f"damp_percent={damp_percent}; raise damp_percent") from err
    groups = k // group_size
    # The columns as rows ([k, n], as are q and the dequantized weight until the end): each step
    # reads and writes contiguous rows, not a column strided across n rows. Same arithmetic, same
    # result bit for bit; 1.5-1.9x faster on a CPU (SmolLM2's shapes).
    wt = w.t().contiguous()
    q = torch.zeros(k, n, dtype=torch.int32, device=w.device)
    if grid is None:  # each group's grid is chosen when GPTQ reaches it, in the quantization order
        scales = torch.zeros(groups, n, dtype=torch.float64, device=w.device)
        zeros = torch.zeros(groups, n, dtype=torch.int32, device=w.device)
        group_of = torch.arange(k, device=w.device) // group_size
    else:
        scales = grid[0].double().t().contiguous().to(w.device)
        zeros = grid[1].t().contiguous().to(w.device, torch.int32)
        group_of = perm // group_size
    group_list = group_of.tolist()  # read once per column: no device sync in the loop
    dequantized = torch.zeros_like(wt)
    block = group_size * max(1, LAZY_BLOCK // group_size)  # whole groups per block
    for start in range(0, k, block):
        end = min(start + block, k)
        w_block = wt[start:end].clone()
        errors = torch.empty_like(w_block)
        h_inv_block = h_inv[start:end, start:end]
        pivots = torch.diagonal(h_inv_block).tolist()
        for i in range(end - start):
            column = start + i
            group = group_list[column]
            if grid is None and column % group_size == 0:  # this group's grid, from its weights as updated so far
                scales[group], zeros[group] = _group_grid(w_block[i:i + group_size].t(), sym)
            s, z = scales[group], zeros[group]
            # In place and into their rows: the loop runs once a column and its cost is
            # the number of ops, not their size.
            q_col = torch.round(w_block[i] / s).add_(z).clamp_(0, 15)
            q[column] = q_col
            deq = torch.mul(q_col.sub_(z), s, out=dequantized[column])
            error = torch.sub(w_block[i], deq, out=errors[i]).div_(pivots[i])
            w_block[i + 1:].addr_(h_inv_block[i, i + 1:], error, alpha=-1)
        wt[end:] -= (errors.t().contiguous() @ h_inv[start:end, end:]).t()
    inverse = torch.argsort(perm)
    g_idx = group_of[inverse]
    return (q.t()[:, inverse], scales.t().float(), zeros.t(), g_idx.to(torch.int32),
            dequantized.t()[:, inverse].float())


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``h^-1`` (``U^T U = h^-1``) without forming ``h^-1``:
    with ``J`` the order reversal and ``J h J = L L^T``, ``U = J L^-1 J``. One factorisation
    and one triangular solve, against two factorisations and an inverse (1.6x faster at
    K = 1536 on a CPU; equal to within 5e-16)."""
    lower = torch.linalg.cholesky(h.flip(0, 1))
    identity = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(lower, identity, upper=False).flip(0, 1)


def _group_grid(w: torch.Tensor, sym: bool):
    """Scale and zero point [N] of a group of columns (asymmetric zeros kept in 1..15, the
    range the v1 checkpoint stores)."""
    _, scales, zeros = quantize_groupwise(w, 4, w.shape[1], symmetric=sym)
    return scales[:, 0].double(), zeros[:, 0].clamp(min=0 if sym else 1)


def calibrate_gptq(model: nn.Module, plan: Plan, calib, config, device=None) -> Calibration:
    from qpass.methods.gptq import GPTQConfig, checkpoint_from_quantized

    groups = [g for g in plan.groups if isinstance(g.config, GPTQConfig)]
    calibration = Calibration()

    def quantize_block(index: int, block_groups: List[LinearGroup], inputs: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        simulated = {}
        for group, x in zip(block_groups, inputs):
            cfg = group.config
            weight = torch.cat([s.weight.detach().to(x.device) for s in group.sites])
            q, scales, zeros, g_idx, dequantized = gptq_quantize(
                weight, hessian(x, cfg.token_norm_cap), cfg.groups_of(weight.shape[1]), cfg.sym, cfg.desc_act, cfg.damp_percent,
                name=group.name)
            for site, rows in group.site_rows():
                tensors = checkpoint_from_quantized(q[rows], scales[rows], zeros[rows], g_idx, site.weight.dtype)
                calibration.checkpoint[site.name] = {k: v.to(site.weight.device) for k, v in tensors.items()}
                simulated[site.name] = dequantized[rows].to(site.weight.dtype)
        return simulated

    run_blocks(model, plan, calib, groups, quantize_block, device=device, desc="gptq calibration")
    return calibration
