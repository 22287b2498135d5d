"""Dispatchers: how token-expert pairs reach the experts and come back.

Interface (every dispatcher):

    rows, counts, ctx = dispatcher.dispatch(x, routing, batch)   # x [T, H] tokens, T = batch * seq
    expert_out = experts(rows, counts)
    y = dispatcher.combine(expert_out, ctx)                       # [T, H]

`rows` are the expert inputs grouped by (global) expert, in one of two layouts:
- variable: rows [N, H] with counts [E] rows per expert, consecutive segments (dropless, and
  capacity without padding); the experts run one grouped GEMM (ops.grouped_mm);
- static: rows [E, C, H] with counts None (capacity padded to C, capacity bins); the experts run
  a batched matmul; the shape depends only on C, which XLA and Gaudi graphs need.
Expert parallelism slots between dispatch and combine without touching either: all-to-all of
the variable rows split by counts summed per rank (or of the static rows split along E), or an
all-gather of them followed by a reduce-scatter of the outputs; it must hand `combine` outputs
in the layout `dispatch` produced. `ctx` stays on the rank and holds what combine needs.

Capacity (rows per expert, C), for `capacity` with factor cf, top_k k, E experts:
- capacity_per "batch": C = ceil(cf * T * k / E) over the micro-batch's T tokens;
- capacity_per "sequence": C = floor(cf * S * k / E) per sequence of S tokens (the MLPerf
  torch_xla reference's int()), each sequence filling its own C slots per expert;
then clamped to [1, tokens in the group] (a token sends at most one pair to an expert). A factor
>= E / k therefore never drops. Pairs past C are dropped: `position` keeps the first come
(GShard: every token's first choice before any second choice, then token order), `probs` keeps
the highest router weights. A dropped pair contributes nothing; its token still has the residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixtral.backend import Ops
from mixtral.config import CapacityBinsConfig
from mixtral.kernels import reference
from mixtral.model.capacity_bins import CapacityBins
from mixtral.model.layout import Reduce


@dataclass
class Routing:
    logits: torch.Tensor  # [T, E] fp32 router logits (aux and z-loss input)
    weights: torch.Tensor  # [T, k] fp32, renormalised over the chosen experts
    expert_ids: torch.Tensor  # [T, k] int64


@dataclass
class Context:
    """What combine needs, plus the layer's load numbers for metrics."""

    index: torch.Tensor  # dropless: pair order from permute; padded: slot of each pair
    weights: torch.Tensor  # [T, k] combine weights
    counts: torch.Tensor  # [E] pairs routed to each expert (before any drop)
    valid: torch.Tensor | None = None  # unpadded capacity: which sorted rows reached an expert
    dropped: torch.Tensor | None = None  # 0-dim count of dropped pairs; None where nothing can drop
    capacity: int | None = None  # rows per expert when padded
    bin: int | None = None  # capacity bin index (capacity_bins)


class Dropless(nn.Module):
    """Sort pairs by expert, one grouped GEMM, unsort: variable shapes, nothing dropped."""

    def __init__(self, num_experts: int, ops: Ops) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.permute, self.unpermute = ops.permute, ops.unpermute

    def dispatch(self, x: torch.Tensor, routing: Routing, batch: int = 1):
        rows, order, counts = self.permute(x, routing.expert_ids, self.num_experts)
        return rows, counts, Context(order, routing.weights, counts)

    def combine(self, out: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.unpermute(out, ctx.index, ctx.weights)


def slot_positions(
    expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int, groups: int, by_probs: bool
) -> torch.Tensor:
    """Each pair's arrival position at its expert within its group, in [T*k] token-major order."""
    tokens, k = expert_ids.shape
    pairs = tokens // groups * k
    ids = expert_ids.reshape(groups, pairs)
    if by_probs:
        order = torch.argsort(weights.reshape(groups, pairs), dim=1, descending=True, stable=True)
    else:  # every first choice, then every second choice, each in token order
        order = torch.arange(pairs, device=ids.device).view(-1, k).t().reshape(1, pairs).expand(groups, pairs)
    arrived = ids.gather(1, order)
    onehot = F.one_hot(arrived, num_experts)
    position = (onehot.cumsum(1) * onehot).sum(-1) - 1
    return torch.empty_like(position).scatter_(1, order, position).reshape(-1)


def pad_rows(x: torch.Tensor, slots: torch.Tensor, k: int, num_slots: int) -> torch.Tensor:
    """Token rows into num_slots static slots (empty slots zero); pairs with slot >= num_slots left out."""
    source = torch.full((num_slots + 1,), x.shape[0], dtype=torch.int64, device=x.device)
    source.scatter_(0, slots.clamp(max=num_slots), torch.arange(slots.numel(), device=x.device) // k)
    return torch.cat([x, x.new_zeros(1, x.shape[1])])[source[:num_slots]]


def unpad_rows(out: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's weighted sum of its pairs' slot outputs (a dropped pair reads a zero row)."""
    tokens, k = weights.shape
    flat = out.reshape(-1, out.shape[-1])
    pairs = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])[slots.clamp(max=flat.shape[0])]
    return (pairs.view(tokens, k, -1).float() * weights.float().unsqueeze(-1)).sum(dim=1).to(out.dtype)


class Capacity(nn.Module):
    """At most C rows per expert (see the module docstring); padded to [E, C, H] or dropped and packed."""

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        ops: Ops,
        factor: float,
        per: str = "batch",
        policy: str = "position",
        pad: bool = True,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.factor = num_experts, top_k, factor
        self.per_sequence, self.by_probs, self.pad = per == "sequence", policy == "probs", pad
        self.permute, self.unpermute = ops.permute, ops.unpermute

    def capacity(self, tokens: int) -> int:
        """Rows per expert for a group of `tokens` tokens (rounding: module docstring)."""
        exact = self.factor * tokens * self.top_k / self.num_experts
        rows = math.floor(exact + 1e-9) if self.per_sequence else math.ceil(exact - 1e-9)
        return min(max(rows, 1), tokens)

    def dispatch(self, x: torch.Tensor, routing: Routing, batch: int = 1):
        ids = routing.expert_ids
        groups = batch if self.per_sequence else 1
        cap = self.capacity(x.shape[0] // groups)
        position = slot_positions(ids, routing.weights, self.num_experts, groups, self.by_probs)
        keep = position < cap
        counts = reference.expert_counts(ids, self.num_experts)
        dropped = (~keep).sum()
        if self.pad:
            group = torch.arange(ids.numel(), device=x.device) // (ids.numel() // groups)
            slots = (ids.reshape(-1) * groups + group) * cap + position
            slots = torch.where(keep, slots, self.num_experts * groups * cap)
            rows = pad_rows(x, slots, self.top_k, self.num_experts * groups * cap)
            ctx = Context(slots, routing.weights, counts, dropped=dropped, capacity=groups * cap)
            return rows.view(self.num_experts, groups * cap, -1), None, ctx
        bucket = torch.where(keep, ids.reshape(-1), self.num_experts).view_as(ids)  # dropped pairs sort last
        rows, order, kept = self.permute(x, bucket, self.num_experts + 1)
        valid = (torch.arange(rows.shape[0], device=x.device) < keep.sum()).unsqueeze(-1)
        rows = torch.where(valid, rows, 0)  # the trailing rows never reach an expert
        return rows, kept[: self.num_experts], Context(order, routing.weights, counts, valid, dropped)

    def combine(self, out: torch.Tensor, ctx: Context) -> torch.Tensor:
        if ctx.valid is None:
            return unpad_rows(out, ctx.index, ctx.weights)
        return self.unpermute(torch.where(ctx.valid, out, 0), ctx.index, ctx.weights)


class CapacityBinned(nn.Module):
    """Gaudi's capacity bins: padded to the bin edge above the largest expert load; nothing dropped."""

    def __init__(self, num_experts: int, top_k: int, config: CapacityBinsConfig, agree: Reduce | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.bins = CapacityBins(config, num_experts, top_k, agree)

    def dispatch(self, x: torch.Tensor, routing: Routing, batch: int = 1):
        ids = routing.expert_ids
        counts = reference.expert_counts(ids, self.num_experts)
        cap, index = self.bins.capacity(counts, x.shape[0])
        position = slot_positions(ids, routing.weights, self.num_experts, 1, False)
        slots = ids.reshape(-1) * cap + position
        rows = pad_rows(x, slots, self.top_k, self.num_experts * cap)
        ctx = Context(slots, routing.weights, counts, capacity=cap, bin=index)
        return rows.view(self.num_experts, cap, -1), None, ctx

    def combine(self, out: torch.Tensor, ctx: Context) -> torch.Tensor:
        return unpad_rows(out, ctx.index, ctx.weights)
