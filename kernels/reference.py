"""Plain-torch reference of every backend op: the definition all backends are checked against.

Shapes follow one convention everywhere: attention tensors are [batch, heads, seq, head_dim];
token tensors for the experts are flat [tokens, hidden].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target not counted by cross_entropy


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention with grouped KV heads.

    q [B, Hq, S, D]; k, v [B, Hkv, T, D] with Hq a multiple of Hkv; mask: bool, True where a query
    may attend, broadcastable to [B, Hq, S, T]; causal=True only when S == T (aligned at 0).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        s, t = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(s, t, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w [N, K].T: the dense projections (attention, lm head)."""
    return F.linear(x, w)


def router(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing of logits [T, E]: softmax in fp32, top-k, kept weights renormalised to sum to 1.
    -> (weights [T, k] fp32, expert_ids [T, k] int64)."""
    weights, expert_ids = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), expert_ids


@torch.compiler.disable  # its loop reads the offsets on the host: under torch.compile it runs eagerly
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Row-segment g of x (rows offs[g-1]:offs[g]) times w[g]. x [N, K], w [G, K, M], offs [G] int32."""
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w[g]
        start = end
    return out


def permute(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort token-expert pairs by expert (stable, so token order is kept within an expert).

    x [T, H], expert_ids [T, k] -> (rows [T*k, H] grouped by expert, order [T*k] indices into the
    flattened pairs, counts [E] int64 tokens per expert).
    """
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return x[order // expert_ids.shape[1]], order, expert_counts(flat, num_experts)


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 pairs per expert: bincount with a static output shape, so torch.compile traces it."""
    flat = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def unpermute(rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Inverse of permute, summing each token's k expert outputs weighted by weights [T, k] (fp32 sum)."""
    tokens, k = weights.shape
    unsorted = torch.empty_like(rows).index_copy_(0, order, rows)
    combined = (unsorted.view(tokens, k, -1).float() * weights.float().unsqueeze(-1)).sum(dim=1)
    return combined.to(rows.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back before the weight, as transformers does."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half layout (HF checkpoints). x [B, H, S, D]; cos, sin [S, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, where gate is the first half of the last dimension and up the second."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", in_place: bool = False
) -> torch.Tensor:
    """Cross-entropy of logits [N, V] (computed in fp32 or wider) against targets [N]; rows whose target is
    IGNORE_INDEX are not counted; reduction "mean" (over counted rows) or "sum". in_place allows an implementation to
    write the gradient over the logits, whose values are then gone after the call; this one keeps them."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(wide, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int8, symmetric per output channel: w [..., N, K] (each row an output channel) -> (q int8
    [..., N, K], scale [..., N] in scale_dtype) with w ~ q * scale and |q| <= 127. The scale is rounded to its dtype
    before q is computed, so q is the best int8 for the scale it is used with."""
    amax = w.detach().float().abs().amax(dim=-1)
    scale = (amax / 127).clamp_min(torch.finfo(scale_dtype).tiny).to(scale_dtype)
    q = (w.detach().float() / scale.float().unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """F.linear with an int8 weight [N, K] and per-output-channel scale [N]: x [..., K] times the int8 values,
    accumulated in fp32, each output channel times its scale, rounded once to x's dtype."""
    return ((x.float() @ weight.float().t()) * scale.float()).to(x.dtype)


def int8_grouped_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """grouped_mm with int8 experts as stored ([E, N, K], each row an output channel; scale [E, N]): x [R, K] grouped
    by expert at offs (cumulative row ends) -> [R, N], each group by int8_linear with its expert."""
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for expert, end in enumerate(offs.tolist()):
        out[start:end] = int8_linear(x[start:end], weight[expert], scale[expert])
        start = end
    return out
