"""Cross-entropy over the vocabulary, computed a block of rows at a time, its gradient with it.

F.cross_entropy on [tokens, vocab] logits makes three full-size fp32 tensors (the upcast, its log-softmax and,
backward, a zero-filled gradient) plus a fourth for the gradient's cast back: for config A's 2048 x 32000 that is
1 GB written per step, and on the CPU every fresh tensor over malloc's mmap threshold is page-faulted in again. Here
each block of rows is upcast into a buffer that stays in the CPU's L2 cache, reduced to its log-sum-exp, and, when a
gradient is wanted, turned into softmax minus one-hot right away (as Liger's and Megatron's fused cross-entropies
do): the exponentials are computed once, and backward only scales the saved gradient by the incoming one. Same fp32
math as F.cross_entropy, so the loss agrees to fp32 rounding; a bf16 gradient is rounded once, and once more where
the incoming gradient is not a power of two. The block size is the backend's (the CPU's fits its L2 cache).
"""

from __future__ import annotations

import torch

from mixtral.kernels.reference import IGNORE_INDEX

BLOCK_ELEMENTS = 1 << 24  # fp32 elements a block when the backend gives no size: 64 MB, few blocks on an accelerator


def _row_blocks(logits: torch.Tensor, block_elements: int) -> list[slice]:
    rows = max(1, block_elements // logits.shape[-1])
    return [slice(start, start + rows) for start in range(0, logits.shape[0], rows)]


class _CrossEntropy(torch.autograd.Function):
    """Sum over counted rows of (logsumexp(logits[i]) - logits[i, targets[i]]) * row_scale[i]; logits [N, V],
    targets [N], row_scale [N] fp32 (0 for ignored rows). With keep_grad the gradient is built in forward: in a
    new tensor, or, in_place, in the logits themselves (returned as the second output, marked dirty)."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        targets: torch.Tensor,
        row_scale: torch.Tensor,
        keep_grad: bool,
        in_place: bool,
        block_elements: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        counted = targets != IGNORE_INDEX
        safe_targets = torch.where(counted, targets, 0)
        target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1).float()
        lse = logits.new_empty(logits.shape[0], dtype=torch.float32)
        grad = (logits if in_place else torch.empty_like(logits)) if keep_grad else None
        for rows in _row_blocks(logits, block_elements):
            block = logits[rows].to(torch.float32, copy=True)
            top = block.amax(dim=-1, keepdim=True)
            sums = block.sub_(top).exp_().sum(dim=-1, keepdim=True)
            lse[rows] = (top + sums.log()).squeeze(1)
            if grad is not None:  # (softmax - one-hot) * row scale, rounded once into the logits' dtype
                block.mul_(row_scale[rows, None] / sums)
                block.scatter_add_(1, safe_targets[rows, None], -row_scale[rows, None])
                grad[rows] = block
        if in_place:
            ctx.mark_dirty(logits)
        ctx.set_materialize_grads(False)  # the logits output has no gradient: not a logits-sized zero tensor
        ctx.save_for_backward(grad)  # scaled in place by backward: autograd refuses a second backward through it
        return (torch.where(counted, lse - target_logits, 0.0) * row_scale).sum(), logits

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, _: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output), None, None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    in_place: bool = False,
    block_elements: int | None = None,
) -> torch.Tensor:
    """F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction=...) for logits [N, V] in any
    float dtype, without fp32 copies of the whole logits; reduction "mean" (over counted rows) or "sum".

    in_place writes the gradient over the logits (training that reads only the loss: no second logits-sized tensor,
    on the CPU no fresh memory to fault in); the logits' values are gone after the call. block_elements: fp32
    elements per block (default BLOCK_ELEMENTS)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if in_place and logits._base is not None:
        raise ValueError(
            "cross_entropy(in_place=True) needs logits that are not a view of another tensor (autograd "
            "cannot rewrite a view in place here): compute them 2-D, [tokens, vocab]"
        )
    counted = (targets != IGNORE_INDEX).float()
    row_scale = counted / counted.sum() if reduction == "mean" else counted
    keep_grad = torch.is_grad_enabled() and logits.requires_grad
    return _CrossEntropy.apply(
        logits, targets, row_scale, keep_grad, in_place and keep_grad, block_elements or BLOCK_ELEMENTS
    )[0]
