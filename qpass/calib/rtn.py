"""Round-to-nearest quantization of a float weight ``[N, K]``: the step every method ends
with, whether or not calibration chose the weights it rounds."""

from typing import Tuple

import torch


def quantize_groupwise(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight [N, K]`` in groups of ``group_size`` along K.

    Returns ``(q, scales, zeros)``: ``q`` int32 ``[N, K]`` in ``[0, 2**bits)``, float32
    ``scales`` and int32 ``zeros`` of shape ``[N, K // group_size]``, so that
    ``weight ~= (q - zeros) * scales`` group by group. Symmetric groups use the midpoint
    as zero (8 for 4 bits) and a scale of ``2 * amax / (2**bits - 1)``.
    """
    n, k = weight.shape
    qmax = 2**bits - 1
    w = weight.float().reshape(n, k // group_size, group_size)
    if symmetric:
        amax = w.abs().amax(dim=-1)
        scales = (2 * amax / qmax).clamp(min=1e-8)
        zeros = torch.full_like(scales, (qmax + 1) // 2, dtype=torch.int32)
    else:
        wmin = w.amin(dim=-1).clamp(max=0)
        wmax = w.amax(dim=-1).clamp(min=0)
        scales = ((wmax - wmin) / qmax).clamp(min=1e-8)
        zeros = torch.round(-wmin / scales).clamp(0, qmax).to(torch.int32)
    q = torch.round(w / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)
    q = q.clamp(0, qmax).to(torch.int32).reshape(n, k)
    return q, scales, zeros


def quantize_per_channel_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: ``(q int8 [N, K], scales float32 [N])``."""
    amax = weight.float().abs().amax(dim=1)
    scales = (amax / 127).clamp(min=1e-8)
    q = torch.round(weight.float() / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, scales
