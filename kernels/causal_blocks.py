"""Causal prefill attention on the CPU in blocks of queries, so the flash kernel skips most of the masked half.

PyTorch's CPU flash attention walks the keys in blocks of 512 and skips only whole blocks above the diagonal, so at
512 keys or fewer it computes the whole square: causal and full attention both took 15 ms for 4 x 8 heads x 512
(bf16, 2-core Zen 4). QUERY_BLOCKS blocks of queries, each over the keys up to its last position under a mask, do
about 60% of the work. Inference only: the masked backward measured slower in bf16, so training keeps one call.
"""

from __future__ import annotations

import torch

from mixtral.kernels import fp32_compute

QUERY_BLOCKS = 4
KEY_BLOCK = 512  # the CPU flash kernel's key block: past it, it skips blocks itself


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """fp32_compute.attention (reference.attention's contract); causal attention of 128-512 positions without
    autograd runs block by block."""
    seq = q.shape[2]
    if not (
        causal
        and mask is None
        and k.shape[2] == seq
        and 32 * QUERY_BLOCKS <= seq <= KEY_BLOCK
        and not torch.is_grad_enabled()
    ):
        return fp32_compute.attention(q, k, v, mask=mask, causal=causal, scale=scale)
    bounds = [seq * i // QUERY_BLOCKS for i in range(QUERY_BLOCKS + 1)]
    positions = torch.arange(seq, device=q.device)
    return torch.cat(
        [
            fp32_compute.attention(
                q[:, :, start:end],
                k[:, :, :end],
                v[:, :, :end],
                scale=scale,
                mask=positions[:end] <= positions[start:end, None],
            )
            for start, end in zip(bounds, bounds[1:])
        ],
        dim=2,
    )
