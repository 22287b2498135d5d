"""bf16 / fp16 GEMMs (and attention) computed in fp32, for CPUs without low-precision GEMM instructions.

PyTorch multiplies bf16 on the CPU through oneDNN only where the CPU has the instructions for it (AVX-512,
AMX, Arm BF16); elsewhere (AVX2) its fallback GEMM runs 7-9x slower than fp32, and so does its CPU flash
attention. Products of two bf16 numbers are exact in fp32 and both paths accumulate in fp32, so computing in
fp32 and rounding the result once gives the bf16 GEMM's numbers, only faster. Weights stay in bf16 (half the
memory); each GEMM converts its operand in blocks of at most BLOCK_ELEMENTS along its longer side. Below
MIN_ROWS rows converting the weight costs more than the native kernel's slowness (measured on a 2-core AVX2
EPYC: the crossover is between 8 and 16 rows for 512-wide weights), so decoding keeps the native GEMMs; its
attention still runs in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from mixtral.kernels import native, row_products

BLOCK_ELEMENTS = 1 << 20
MIN_ROWS = 16


# The dtypes whose CPU GEMM is PyTorch's slow fallback here (no oneDNN support on this CPU).
SLOW_DTYPES = frozenset(
    dtype
    for dtype, fast in (
        (torch.bfloat16, torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        (torch.float16, torch.ops.mkldnn._is_mkldnn_fp16_supported()),
    )
    if not fast
)


def needed(dtype: torch.dtype) -> bool:
    """Whether this dtype's GEMMs should run in fp32 here."""
    return dtype in SLOW_DTYPES


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] in fp32 (fp32 result), converting b in blocks along its longer side when it is large:
    column blocks side by side, or row blocks (with a's matching columns) summed."""
    a = a.float()
    k, n = b.shape
    if k * n <= BLOCK_ELEMENTS:
        return a @ b.float()
    if n >= k:
        return torch.cat([a @ part.float() for part in b.split(max(64, BLOCK_ELEMENTS // k), dim=1)], dim=1)
    rows = max(64, BLOCK_ELEMENTS // n)
    out = a[:, :rows] @ b[:rows].float()
    for start in range(rows, k, rows):
        out.addmm_(a[:, start : start + rows], b[start : start + rows].float())
    return out


def _no_autocast() -> torch.autocast:
    return torch.autocast("cpu", enabled=False)


class Linear(torch.autograd.Function):
    """x [M, K] @ w[N, K].T in fp32, rounded to x's dtype; saves the low-precision operands, not fp32 copies."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        with _no_autocast():
            return mm(x, w.t()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, w = ctx.saved_tensors
        with _no_autocast():
            grad_x = mm(grad, w).to(x.dtype) if ctx.needs_input_grad[0] else None
            grad_w = mm(grad.t(), x).to(w.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """native.attention, on fp32 copies where `needed` (PyTorch's CPU flash attention multiplies bf16 with the same
    slow GEMM). Decode steps too: converting the cache once is 2-5x faster than the bf16 kernel reading it (1 and 8
    queries over 64-2048 keys, measured)."""
    if not _slow_here(q, q.dtype):
        return native.attention(q, k, v, mask=mask, causal=causal, scale=scale)
    return native.attention(q.float(), k.float(), v.float(), mask=mask, causal=causal, scale=scale).to(q.dtype)


def _slow_here(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """x is a CPU tensor (not a DTensor) and its product is in a `needed` dtype."""
    return x.device.type == "cpu" and not isinstance(x, DTensor) and needed(dtype)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w), in fp32 where `needed` (under CPU autocast, after its cast to the autocast dtype); one row
    in a compiled inference graph as a fused multiply-sum (row_products)."""
    if row_products.applies(x):
        return row_products.linear(x, w)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if x.numel() < MIN_ROWS * x.shape[-1] or not _slow_here(x, dtype):
        return F.linear(x, w)
    out = Linear.apply(x.reshape(-1, x.shape[-1]).to(dtype), w.to(dtype))
    return out.view(*x.shape[:-1], w.shape[0])


def _segments(offs: torch.Tensor) -> list[tuple[int, int, int]]:
    """(group, start, end) of each non-empty row segment."""
    bounds = [0] + offs.tolist()
    return [(g, bounds[g], bounds[g + 1]) for g in range(len(bounds) - 1) if bounds[g + 1] > bounds[g]]


def _segment_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One segment's GEMM, in fp32 from MIN_ROWS rows, natively below (rounded to a's dtype)."""
    return mm(a, b).to(a.dtype) if a.shape[0] >= MIN_ROWS else a @ b


class GroupedMM(torch.autograd.Function):
    """Row segment g of x times w[g] (x [N, K], w [G, K, M], offs [G]), each segment as `_segment_mm`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offs)
        out = x.new_zeros(x.shape[0], w.shape[-1])
        with _no_autocast():
            for g, start, end in _segments(offs):
                out[start:end] = _segment_mm(x[start:end], w[g])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w, offs = ctx.saved_tensors
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        with _no_autocast():
            for g, start, end in _segments(offs):
                if grad_x is not None:
                    grad_x[start:end] = _segment_mm(grad[start:end], w[g].t())
                if grad_w is not None:
                    grad_w[g] = mm(x[start:end].t(), grad[start:end]).to(w.dtype)
        return grad_x, grad_w, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """native.grouped_mm, with each large segment in fp32 where `needed`."""
    if x.shape[0] < MIN_ROWS or not _slow_here(x, x.dtype):
        return native.grouped_mm(x, w, offs)
    return _grouped_mm_in_fp32(x, w, offs)


@torch.compiler.disable  # loops over the segments on the host: under torch.compile it runs eagerly
def _grouped_mm_in_fp32(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return GroupedMM.apply(x, w, offs)
