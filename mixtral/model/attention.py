"""Grouped-query attention with rotary embeddings, an optional sliding window and a KV cache."""

from __future__ import annotations

import torch
from torch import nn

from mixtral.backend import Ops
from mixtral.config import ModelConfig
from mixtral.model.kv_cache import KVCache
from mixtral.model.layout import ModelLayout
from mixtral.model.linear import projection


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops, layout: ModelLayout | None = None) -> None:
        """layout: under context parallelism how keys and values of this rank's chunk reach the whole sequence
        (gathered, or a ring attention in place of ops.attention)."""
        super().__init__()
        layout = layout or ModelLayout()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, q, kv = config.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = projection(h, q, ops, layout.int8)
        self.k_proj = projection(h, kv, ops, layout.int8)
        self.v_proj = projection(h, kv, ops, layout.int8)
        self.o_proj = projection(q, h, ops, layout.int8)
        self.attend, self.rope = layout.attention or ops.attention, ops.rope
        self.kv_cache: KVCache | None = None
        self.gather_kv = layout.gather_kv  # context parallel: K or V of this chunk -> the whole sequence's

    def forward(
        self,
        x: torch.Tensor,
        *,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        mask: torch.Tensor | None,
        causal: bool,
        last_only: bool = False,
    ) -> torch.Tensor:
        """last_only: keys and values for every position (the KV cache's), the output for the last query only."""
        batch, seq, _ = x.shape
        queries = x[:, -1:] if last_only else x
        # -1 heads: under tensor parallelism each rank holds n_heads / tp (and n_kv_heads / tp) of them
        q = self.q_proj(queries).view(batch, queries.shape[1], -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.rope(k, cos, sin)
        if last_only:  # the last query sees every key up to itself: the mask's last row, or none
            cos, sin = cos[..., -1:, :], sin[..., -1:, :]
            mask, causal = (None if mask is None else mask[..., -1:, :]), False
        q = self.rope(q, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(start, k, v)
        if self.gather_kv is not None:
            k, v = self.gather_kv(k), self.gather_kv(v)
        out = self.attend(q, k, v, mask=mask, causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(batch, queries.shape[1], -1))


def attention_mask(
    start: int | torch.Tensor,
    seq: int,
    kv_len: int,
    window: int | None,
    device: torch.device,
    pad: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """(mask, causal) for queries at start..start+seq over keys 0..kv_len: the cheapest exact form.

    pad [B] (left padding per row) masks each row's first pad[b] keys; a pad query sees only itself.
    start a device tensor (fixed shapes): always a mask, which also hides the cache's unwritten keys.
    """
    if pad is None and not isinstance(start, torch.Tensor) and (window is None or kv_len <= window):
        if start == 0 and seq == kv_len:
            return None, True
        if seq == 1:
            return None, False
    q_pos = (start + torch.arange(seq, device=device)).unsqueeze(1)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    if pad is not None:  # [B, 1, S, T]
        allowed = (allowed & (k_pos >= pad.view(-1, 1, 1)) | (k_pos == q_pos)).unsqueeze(1)
    return allowed, False
