"""Triton kernels for the MoE token path: permute, unpermute with the routing weights fused, and the router.

Each matches its namesake in mixtral.kernels.reference (the router: mixtral.model.moe.route).
Program t owns token t and its k copies, so every write has one owner: no atomics, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_H = 1024


def _block(size: int, cap: int = MAX_BLOCK_H) -> int:
    return min(triton.next_power_of_2(size), cap)


@triton.jit
def _scatter_rows_kernel(x_ptr, inv_ptr, out_ptr, H, K: tl.constexpr, BLOCK: tl.constexpr):
    """out[inv[t*K + j]] = x[t] for every j < K (permute forward)."""
    t = tl.program_id(0).to(tl.int64)
    for h0 in range(0, H, BLOCK):
        cols = h0 + tl.arange(0, BLOCK)
        keep = cols < H
        row = tl.load(x_ptr + t * H + cols, mask=keep)
        for j in tl.static_range(K):
            dst = tl.load(inv_ptr + t * K + j).to(tl.int64)
            tl.store(out_ptr + dst * H + cols, row, mask=keep)


@triton.jit
def _gather_sum_kernel(
    rows_ptr, inv_ptr, w_ptr, out_ptr, H, K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr
):
    """out[t] = sum_j w[t, j] * rows[inv[t*K + j]] in fp32 (w = 1 unless WEIGHTED): unpermute forward,
    permute backward."""
    t = tl.program_id(0).to(tl.int64)
    for h0 in range(0, H, BLOCK):
        cols = h0 + tl.arange(0, BLOCK)
        keep = cols < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            src = tl.load(inv_ptr + t * K + j).to(tl.int64)
            row = tl.load(rows_ptr + src * H + cols, mask=keep).to(tl.float32)
            if WEIGHTED:
                row = row * tl.load(w_ptr + t * K + j).to(tl.float32)
            acc += row
        tl.store(out_ptr + t * H + cols, acc.to(out_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _unpermute_backward_kernel(
    grad_ptr, rows_ptr, inv_ptr, w_ptr, grad_rows_ptr, grad_w_ptr, H, K: tl.constexpr, BLOCK: tl.constexpr
):
    """grad_rows[inv[t*K+j]] = w[t, j] * grad[t] and grad_w[t, j] = <grad[t], rows[inv[t*K+j]]> (fp32)."""
    t = tl.program_id(0).to(tl.int64)
    for j in tl.static_range(K):
        src = tl.load(inv_ptr + t * K + j).to(tl.int64)
        w = tl.load(w_ptr + t * K + j).to(tl.float32)
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        for h0 in range(0, H, BLOCK):
            cols = h0 + tl.arange(0, BLOCK)
            keep = cols < H
            g = tl.load(grad_ptr + t * H + cols, mask=keep, other=0.0).to(tl.float32)
            row = tl.load(rows_ptr + src * H + cols, mask=keep, other=0.0).to(tl.float32)
            dot += g * row
            tl.store(grad_rows_ptr + src * H + cols, (g * w).to(grad_rows_ptr.dtype.element_ty), mask=keep)
        tl.store(grad_w_ptr + t * K + j, tl.sum(dot, axis=0).to(grad_w_ptr.dtype.element_ty))


@triton.jit
def _router_kernel(
    logits_ptr,
    w_ptr,
    ids_ptr,
    T,
    E,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Softmax over E experts in fp32, top-K by repeated argmax, kept weights renormalised to sum to 1."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    x = tl.load(
        logits_ptr + rows[:, None] * E + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < E), other=float("-inf")
    ).to(tl.float32)
    x = tl.where(row_ok[:, None], x, 0.0)  # rows past T: finite, never stored
    p = tl.exp(x - tl.max(x, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    weights = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(p, axis=1)
        idx = tl.argmax(p, axis=1)
        weights = tl.where(kcols[None, :] == j, best[:, None], weights)
        ids = tl.where(kcols[None, :] == j, idx[:, None].to(tl.int64), ids)
        p = tl.where(cols[None, :] == idx[:, None], -1.0, p)
    weights = weights / tl.sum(weights, axis=1)[:, None]
    out = rows[:, None] * K + kcols[None, :]
    keep = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(w_ptr + out, weights, mask=keep)
    tl.store(ids_ptr + out, ids, mask=keep)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """inv[order[p]] = p: where each flattened (token, slot) pair sits in expert-sorted order."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def _gather_sum(
    rows: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor | None, tokens: int, k: int, dtype: torch.dtype
) -> torch.Tensor:
    out = rows.new_empty(tokens, rows.shape[1], dtype=dtype)
    if tokens:
        _gather_sum_kernel[(tokens,)](
            rows,
            inv,
            weights if weights is not None else inv,
            out,
            rows.shape[1],
            K=k,
            WEIGHTED=weights is not None,
            BLOCK=_block(rows.shape[1]),
        )
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
        x = x.contiguous()
        tokens, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts)
        inv = _inverse(order)
        rows = x.new_empty(tokens * k, x.shape[1])
        if tokens:
            _scatter_rows_kernel[(tokens,)](x, inv, rows, x.shape[1], K=k, BLOCK=_block(x.shape[1]))
        ctx.save_for_backward(inv)
        ctx.k = k
        ctx.mark_non_differentiable(order, counts)
        return rows, order, counts

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor, _order, _counts):
        (inv,) = ctx.saved_tensors
        grad_rows = grad_rows.contiguous()
        return _gather_sum(grad_rows, inv, None, inv.numel() // ctx.k, ctx.k, grad_rows.dtype), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor):
        rows, weights = rows.contiguous(), weights.contiguous()
        tokens, k = weights.shape
        inv = _inverse(order)
        ctx.save_for_backward(rows, inv, weights)
        return _gather_sum(rows, inv, weights, tokens, k, rows.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, inv, weights = ctx.saved_tensors
        tokens, k = weights.shape
        grad = grad.contiguous()
        grad_rows = torch.empty_like(rows)
        grad_w = torch.empty_like(weights)
        if tokens:
            _unpermute_backward_kernel[(tokens,)](
                grad, rows, inv, weights, grad_rows, grad_w, rows.shape[1], K=k, BLOCK=_block(rows.shape[1])
            )
        return grad_rows, None, grad_w


class _Router(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, top_k: int):
        logits = logits.contiguous()
        tokens, experts = logits.shape
        weights = torch.empty(tokens, top_k, device=logits.device, dtype=torch.float32)
        ids = torch.empty(tokens, top_k, device=logits.device, dtype=torch.int64)
        block_t = 32
        if tokens:
            _router_kernel[(triton.cdiv(tokens, block_t),)](
                logits,
                weights,
                ids,
                tokens,
                experts,
                K=top_k,
                BLOCK_T=block_t,
                BLOCK_E=triton.next_power_of_2(experts),
                BLOCK_K=triton.next_power_of_2(top_k),
            )
        ctx.save_for_backward(weights, ids)
        ctx.experts, ctx.dtype = experts, logits.dtype
        ctx.mark_non_differentiable(ids)
        return weights, ids

    @staticmethod
    def backward(ctx, grad_w: torch.Tensor, _ids):
        # The renormalised top-k of a softmax is the softmax of the chosen logits: its Jacobian is w (g - <w, g>).
        weights, ids = ctx.saved_tensors
        local = weights * (grad_w - (weights * grad_w).sum(dim=-1, keepdim=True))
        grad = torch.zeros(weights.shape[0], ctx.experts, device=weights.device, dtype=torch.float32)
        return grad.scatter_(1, ids, local).to(ctx.dtype), None


def permute(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference.permute: rows grouped by expert (stable), order, counts [E] int64."""
    return _Permute.apply(x, expert_ids, num_experts)


def unpermute(rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """reference.unpermute: each token's k expert rows, weighted and summed in fp32, in one pass."""
    return _Unpermute.apply(rows, order, weights)


def router(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mixtral.model.moe.route's (weights [T, k] fp32, expert_ids [T, k] int64) from logits [T, E] in one kernel."""
    return _Router.apply(logits, top_k)
