"""Plain-torch references for every kernel: what each Triton kernel must compute.

Runtime layouts (what ``process_weights_after_loading`` produces and the ops take):

- W4A16: ``qweight`` int32 ``[K // 8, N]``, the int4 value of row ``k`` and column ``n`` in
  bits ``4 * (k % 8)`` to ``4 * (k % 8) + 3`` of ``qweight[k // 8, n]``, or the same words in column tiles
  (``tile_word_columns``: ``[K // 8, N // T, T]``, each tile's words one run in memory); ``scales`` and
  ``zeros`` ``[K // group_size, N]`` in the activation dtype, ``zeros`` holding the integer
  zero point (8 for symmetric). ``w[k, n] = (q[k, n] - zeros[g, n]) * scales[g, n]``.
- W8A16: ``qweight`` int8 ``[N, K]`` (nn.Linear's orientation), ``scales`` ``[N]``.
- FP8 W8A8: ``qweight`` float8_e4m3fn ``[N, K]``, ``weight_scale`` float32 ``[N]``;
  activations are quantized per token to float8_e4m3fn with scale ``amax / 448``.

A ``bias`` is ``[N]``, or shaped as the output (a residual added in the epilogue). The W4A16
and FP8 linears may take the RMSNorm before them (``norm_weight``, in x's dtype, and ``norm_eps``: ``rms_norm``).

Every linear takes ``activation``, an epilogue on the float32 result (after the bias,
before the cast): ``"none"``; ``"silu_mul"``, which reads the N output columns as
``[gate | up]`` and returns ``silu(gate) * up``, ``[M, N / 2]``; ``"gelu"`` (erf) or
``"gelu_tanh"`` (the tanh approximation). The W4A16 linear also takes its columns under "silu_mul" as gate
and up in alternating runs of ``up_run`` columns (``gate_up_runs``; 0, the default, is ``[gate | up]``): a
program of the GEMV then reads its gate and up columns as one contiguous run a row.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from .common import WORD_TILE, output_columns

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def check_up_run(up_run: int, activation: str, N: int) -> None:
    """``up_run`` (0, or the columns of each run of gate and of up under "silu_mul") must be 0 or a multiple of
    4 (the kernels read 16-byte vectors of 4 columns) that divides N / 2, and only under "silu_mul"."""
    if up_run and (activation != "silu_mul" or up_run < 0 or up_run % 4 or N % (2 * up_run)):
        raise ValueError(f"up_run {up_run} needs activation 'silu_mul' (got {activation!r}) and a positive multiple "
                         f"of 4 that divides N / 2 = {N / 2}")


def gate_up_runs(t: torch.Tensor, up_run: int) -> torch.Tensor:
    """A tensor whose last dim is ``[gate | up]`` with the two halves in alternating runs of ``up_run`` columns
    (gate 0..r-1, up 0..r-1, gate r..2r-1, ...); ``up_run`` 0 leaves it as it is."""
    if not up_run:
        return t
    *lead, n = t.shape
    halves = t.reshape(*lead, 2, n // (2 * up_run), up_run)
    return halves.transpose(-3, -2).reshape(*lead, n).contiguous()


def gate_up_halves(t: torch.Tensor, up_run: int) -> torch.Tensor:
    """The inverse of ``gate_up_runs``: ``[gate | up]`` again."""
    if not up_run:
        return t
    *lead, n = t.shape
    runs = t.reshape(*lead, n // (2 * up_run), 2, up_run)
    return runs.transpose(-3, -2).reshape(*lead, n).contiguous()


def apply_activation(out: torch.Tensor, activation: str, up_run: int = 0) -> torch.Tensor:
    """The epilogue ``activation`` on a linear's output ``[..., N]`` (under "silu_mul" gate and up in runs of
    ``up_run`` columns, or halves for 0)."""
    width = output_columns(activation, out.shape[-1])
    if activation == "silu_mul":
        out = gate_up_halves(out, up_run)
        return F.silu(out[..., :width]) * out[..., width:]
    if activation == "gelu":
        return F.gelu(out)
    if activation == "gelu_tanh":
        return F.gelu(out, approximate="tanh")
    return out


def epilogue(out: torch.Tensor, bias: Optional[torch.Tensor], activation: str, dtype: torch.dtype,
             up_run: int = 0) -> torch.Tensor:
    """A linear's float32 result ``out`` finished as the kernels' epilogue does: the bias added in
    float32, ``activation``, the cast to ``dtype``."""
    if bias is not None:
        out = out + bias.float()
    return apply_activation(out, activation, up_run).to(dtype)


def activation_after_gemm(out: torch.Tensor, activation: str, up_run: int = 0) -> torch.Tensor:
    """``apply_activation`` in float32 on a GEMM's output, back in its dtype: the epilogue cuBLAS
    has not, as one pointwise pass (Inductor fuses it under torch.compile)."""
    if activation == "none":
        return out
    return apply_activation(out.float(), activation, up_run).to(out.dtype)


def tile_word_columns(qweight: torch.Tensor, tile: int = WORD_TILE) -> torch.Tensor:
    """W4A16 words ``[K // 8, N]`` in column tiles: ``[K // 8, N // tile, tile]``, laid out in memory as
    ``[N // tile, K // 8, tile]``; words already in tiles, or whose N is not a multiple of ``tile``, stay as they
    are."""
    if qweight.dim() == 3 or qweight.shape[1] % tile:
        return qweight
    k8, n = qweight.shape
    # (a copy into new memory, not .contiguous(): with one tile that would keep the stride of 1 tile the reshape
    # gave, which the TMA kernels' checks rightly refuse as K // 8 * tile)
    tiles = qweight.new_empty((n // tile, k8, tile))
    tiles.copy_(qweight.reshape(k8, n // tile, tile).transpose(0, 1))
    return tiles.transpose(0, 1)


def word_rows(qweight: torch.Tensor) -> torch.Tensor:
    """W4A16 words (or any ``[rows, N]`` tensor) as ``[K // 8, N]``, from column tiles too."""
    return qweight.reshape(qweight.shape[0], -1)


def unpack_int4_rows(qweight: torch.Tensor) -> torch.Tensor:
    """int32 ``[K // 8, N]`` -> uint8 ``[K, N]`` of values 0..15 (row k in nibble k % 8)."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)
    nibbles = (qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF
    return nibbles.reshape(-1, qweight.shape[1]).to(torch.uint8)


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """uint8/int ``[K, N]`` of values 0..15 -> int32 ``[K // 8, N]``; inverse of unpack."""
    k, n = q.shape
    q = q.to(torch.int32).reshape(k // 8, 8, n)
    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int32).view(1, 8, 1)
    return (q << shifts).sum(dim=1, dtype=torch.int32)


def dequantize_w4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The float weight ``[K, N]`` (in ``scales.dtype``) of the W4A16 runtime layout."""
    q = unpack_int4_rows(word_rows(qweight)).to(scales.dtype)
    s = scales.repeat_interleave(group_size, dim=0)
    z = zeros.repeat_interleave(group_size, dim=0)
    return (q - z) * s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, as Llama's: reduced in float32, rounded to x's dtype, times
    the weight (in the dtype the two promote to)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    norm_weight: Optional[torch.Tensor] = None,
    norm_eps: float = 0.0,
    up_run: int = 0,
) -> torch.Tensor:
    check_up_run(up_run, activation, scales.shape[1])
    if norm_weight is not None:
        x = rms_norm(x, norm_weight.to(x.dtype), norm_eps)
    w = dequantize_w4(qweight, scales.float(), zeros.float(), group_size)
    out = x.float() @ w
    return epilogue(out, bias, activation, x.dtype, up_run)


def w8a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
) -> torch.Tensor:
    out = (x.float() @ qweight.float().t()) * scales.float()
    return epilogue(out, bias, activation, x.dtype)


def quantize_fp8_per_token(x: torch.Tensor):
    """float ``[M, K]`` -> (float8_e4m3fn ``[M, K]``, float32 scale ``[M, 1]``)."""
    amax = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    scale = amax / FP8_MAX
    xq = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq, scale


def fp8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: str = "none",
    norm_weight: Optional[torch.Tensor] = None,
    norm_eps: float = 0.0,
) -> torch.Tensor:
    if norm_weight is not None:
        x = rms_norm(x, norm_weight.to(x.dtype), norm_eps)
    xq, x_scale = quantize_fp8_per_token(x.reshape(-1, x.shape[-1]))
    out = (xq.float() @ qweight.float().t()) * x_scale * weight_scale.float()
    return epilogue(out, bias, activation, x.dtype).reshape(*x.shape[:-1], -1)
