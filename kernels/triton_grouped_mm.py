"""A Triton grouped GEMM (reference.grouped_mm) for GPUs or dtypes where torch._grouped_mm does not run.

No host sync: the grid covers an upper bound of row tiles (ceil(N / BM) + G) and each program finds
its group by walking offs; programs past the last tile do nothing. Rows past offs[-1] are not written.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton's interpreter (3.9) multiplies bf16 storage bits in tl.dot, so interpreted runs upcast operands first.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _grouped_mm_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    offs_ptr,
    G,
    K,
    M,
    sxn,
    sxk,
    swg,
    swk,
    swm,
    son,
    som,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[rows of group g] = x[rows of group g] @ w[g], one BM x BN tile per program."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = -1
    row_lo = 0
    row_hi = 0
    first_tile = 0
    prev = 0
    for g in range(0, G):
        end = tl.load(offs_ptr + g)
        tiles = tl.cdiv(end - prev, BM)
        hit = (pid_m >= first_tile) & (pid_m < first_tile + tiles)
        group = tl.where(hit, g, group)
        row_lo = tl.where(hit, prev + (pid_m - first_tile) * BM, row_lo)
        row_hi = tl.where(hit, end, row_hi)
        first_tile += tiles
        prev = end
    if group >= 0:
        rm = row_lo + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * sxn
        w_cols = w_ptr + group.to(tl.int64) * swg + rn[None, :] * swm
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + rk
            a = tl.load(x_rows + ks[None, :] * sxk, mask=(rm[:, None] < row_hi) & (ks[None, :] < K), other=0.0)
            b = tl.load(w_cols + ks[:, None] * swk, mask=(ks[:, None] < K) & (rn[None, :] < M), other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        out = out_ptr + rm.to(tl.int64)[:, None] * son + rn[None, :] * som
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < row_hi) & (rn[None, :] < M))


@triton.jit
def _grouped_mm_wgrad_kernel(
    x_ptr,
    dy_ptr,
    dw_ptr,
    offs_ptr,
    K,
    M,
    sxn,
    sxk,
    syn,
    sym,
    swg,
    swk,
    swm,
    BK: tl.constexpr,
    BN: tl.constexpr,
    BR: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """dw[g] = x[rows of g]^T @ dy[rows of g]; zeros for an empty group."""
    g = tl.program_id(2)
    rk = tl.program_id(0) * BK + tl.arange(0, BK)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    lo = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
    hi = tl.load(offs_ptr + g)
    acc = tl.zeros([BK, BN], dtype=tl.float32)
    for r0 in range(lo, hi, BR):
        rr = r0 + tl.arange(0, BR)
        rows_ok = rr < hi
        xt = tl.load(
            x_ptr + rr.to(tl.int64)[None, :] * sxn + rk[:, None] * sxk,
            mask=rows_ok[None, :] & (rk[:, None] < K),
            other=0.0,
        )
        dy = tl.load(
            dy_ptr + rr.to(tl.int64)[:, None] * syn + rn[None, :] * sym,
            mask=rows_ok[:, None] & (rn[None, :] < M),
            other=0.0,
        )
        if UPCAST:
            xt, dy = xt.to(tl.float32), dy.to(tl.float32)
        acc = tl.dot(xt, dy, acc, input_precision=PRECISION)
    dw = dw_ptr + g.to(tl.int64) * swg + rk[:, None] * swk + rn[None, :] * swm
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=(rk[:, None] < K) & (rn[None, :] < M))


def _precision(dtype: torch.dtype) -> str:
    """fp32 operands use TF32 only when torch would (torch.backends.cuda.matmul.allow_tf32)."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _tile(size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(size)))


def _forward(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    n, k = x.shape
    groups, _, m = w.shape
    out = x.new_empty(n, m)
    bm, bn, bk = _tile(n, 128), _tile(m, 128), _tile(k, 64)
    grid = (triton.cdiv(n, bm) + groups, triton.cdiv(m, bn))
    if n and m:
        _grouped_mm_kernel[grid](
            x,
            w,
            out,
            offs,
            groups,
            k,
            m,
            *x.stride(),
            *w.stride(),
            *out.stride(),
            BM=bm,
            BN=bn,
            BK=bk,
            PRECISION=_precision(x.dtype),
            UPCAST=INTERPRETED,
            num_warps=8 if bm * bn >= 128 * 128 else 4,
            num_stages=3,
        )
    return out


def _weight_grad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    groups, k, m = w.shape
    dw = torch.empty(groups, k, m, device=w.device, dtype=w.dtype)
    bk, bn = _tile(k, 128), _tile(m, 128)
    grid = (triton.cdiv(k, bk), triton.cdiv(m, bn), groups)
    if groups and k and m:
        _grouped_mm_wgrad_kernel[grid](
            x,
            dy,
            dw,
            offs,
            k,
            m,
            *x.stride(),
            *dy.stride(),
            *dw.stride(),
            BK=bk,
            BN=bn,
            BR=_tile(x.shape[0], 64),
            PRECISION=_precision(x.dtype),
            UPCAST=INTERPRETED,
            num_warps=8 if bk * bn >= 128 * 128 else 4,
            num_stages=3,
        )
    return dw


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offs)
        return _forward(x, w, offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        dx = _forward(dy, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
        dw = _weight_grad(x, dy, offs, w) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """reference.grouped_mm: x [N, K], w [G, K, M] (any strides), offs [G] int32 cumulative row ends."""
    return _GroupedMM.apply(x, w, offs)
