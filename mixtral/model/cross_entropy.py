"""Cross-entropy over the vocabulary, computed a block of rows at a time.

F.cross_entropy on [tokens, vocab] logits makes three full-size fp32 tensors (the upcast, its log-softmax and,
backward, a zero-filled gradient) plus a fourth for the gradient's cast back: for config A's 2048 x 32000 that is
1 GB written per step, and on the CPU every fresh tensor over malloc's mmap threshold is page-faulted in again. Here
each block of rows is upcast, reduced to its log-sum-exp and dropped; backward rebuilds softmax minus one-hot block
by block straight into the gradient, in the logits' dtype. Same fp32 math as F.cross_entropy (log-sum-exp minus the
target logit), so the loss and gradient agree to fp32 rounding.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
BLOCK_ELEMENTS = 1 << 22  # fp32 block of 16 MB: below glibc's largest mmap threshold, so malloc reuses it


def _row_blocks(logits: torch.Tensor) -> list[slice]:
    rows = max(1, BLOCK_ELEMENTS // logits.shape[-1])
    return [slice(start, start + rows) for start in range(0, logits.shape[0], rows)]


class _SummedCrossEntropy(torch.autograd.Function):
    """Sum over counted rows of logsumexp(logits[i]) - logits[i, targets[i]]; logits [N, V], targets [N]."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        counted = targets != IGNORE_INDEX
        safe_targets = torch.where(counted, targets, 0)
        lse = torch.cat([torch.logsumexp(logits[rows].float(), dim=-1) for rows in _row_blocks(logits)])
        target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, safe_targets, counted, lse)
        return torch.where(counted, lse - target_logits, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_sum: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, safe_targets, counted, lse = ctx.saved_tensors
        row_scale = counted * grad_sum  # ignored rows get no gradient
        grad = torch.empty_like(logits)
        for rows in _row_blocks(logits):
            block = (logits[rows].float() - lse[rows, None]).exp_()  # softmax (a new tensor: fp32 logits stay intact)
            block.scatter_add_(1, safe_targets[rows, None], torch.full_like(lse[rows, None], -1.0))
            grad[rows] = block.mul_(row_scale[rows, None])
        return grad, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction=...) for logits [N, V] in any
    float dtype, without fp32 copies of the whole logits; reduction "mean" (over counted rows) or "sum"."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    total = _SummedCrossEntropy.apply(logits, targets)
    return total if reduction == "sum" else total / (targets != IGNORE_INDEX).sum()
