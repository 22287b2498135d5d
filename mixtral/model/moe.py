"""The sparse MoE block: an fp32 softmax top-k router, a dispatcher (mixtral.model.dispatch) and SwiGLU experts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mixtral.backend import Ops
from mixtral.config import ModelConfig, MoEConfig
from mixtral.errors import MixtralError
from mixtral.kernels import reference
from mixtral.model.capacity_bins import step_bins
from mixtral.model.dispatch import Capacity, CapacityBinned, Dropless, Routing
from mixtral.model.layout import ModelLayout, Reduce

EXPERT_SUFFIXES = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")  # stacks [experts, ...] by parameter name

__all__ = [
    "EXPERT_SUFFIXES",
    "MoE",
    "MoEStats",
    "Routing",
    "route",
    "router_totals",
    "routing_summary",
    "moe_metrics",
    "moe_step_end",
]


@torch.compiler.disable
def run_eagerly(fn: Callable, *args):
    """fn(*args) outside torch.compile: expert parallelism's exchange has data-dependent split sizes."""
    return fn(*args)


def route(
    logits: torch.Tensor,
    top_k: int,
    bias: torch.Tensor | None = None,
    router: Callable[..., tuple[torch.Tensor, torch.Tensor]] = reference.router,
) -> Routing:
    """Mixtral routing (the backend's `router` op): softmax in fp32, top-k, kept weights renormalised to sum to 1.

    bias (aux-loss-free balancing) shifts which experts are chosen, never their weights.
    """
    if bias is None:
        return Routing(logits, *router(logits, top_k))
    probs = torch.softmax(logits.float(), dim=-1)
    expert_ids = torch.topk(probs + bias, top_k, dim=-1).indices
    weights = probs.gather(1, expert_ids)
    return Routing(logits, weights / weights.sum(dim=-1, keepdim=True), expert_ids)


class GroupedExperts(nn.Module):
    """All experts' SwiGLU weights as fused 3-D tensors (transformers 5's in-memory layout)."""

    def __init__(self, config: ModelConfig, ops: Ops, layout: ModelLayout | None = None) -> None:
        """layout: the experts (and the intermediate rows of each) this rank holds, and a SwiGLU for their rows."""
        super().__init__()
        layout = layout or ModelLayout()
        e, h = layout.experts or config.num_local_experts, config.hidden_size
        f = layout.expert_ffn or config.intermediate_size
        self.int8 = layout.int8  # int8 weights, each output channel (row) with a scale: generation only
        dtype = torch.int8 if self.int8 else None
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, h, dtype=dtype), requires_grad=not self.int8)  # [w1; w3]
        self.down_proj = nn.Parameter(torch.empty(e, h, f, dtype=dtype), requires_grad=not self.int8)  # w2 per expert
        if self.int8:
            self.register_buffer("gate_up_proj_scale", torch.empty(e, 2 * f))
            self.register_buffer("down_proj_scale", torch.empty(e, h))
            self.int8_grouped_mm = ops.int8_grouped_mm
        self.grouped_mm, self.swiglu = ops.grouped_mm, layout.swiglu or ops.swiglu

    def forward(self, rows: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        """rows [N, H] grouped by expert with counts [E] (grouped GEMM), or static rows [E, C, H]
        with counts None (batched matmul) -> expert outputs in the same layout."""
        if counts is None:
            return torch.bmm(
                self.swiglu(torch.bmm(rows, self.gate_up_proj.transpose(1, 2))), self.down_proj.transpose(1, 2)
            )
        offs = counts.cumsum(0).to(torch.int32)
        if self.int8:
            hidden = self.swiglu(self.int8_grouped_mm(rows, self.gate_up_proj, self.gate_up_proj_scale, offs))
            return self.int8_grouped_mm(hidden, self.down_proj, self.down_proj_scale, offs)
        hidden = self.swiglu(self.grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs))
        return self.grouped_mm(hidden, self.down_proj.transpose(1, 2), offs)


@dataclass
class MoEStats:
    """One layer's routing outcome: the losses' input and the load metrics."""

    logits: torch.Tensor  # [T, E] fp32 router logits
    counts: torch.Tensor  # [E] pairs routed to each expert
    dropped: torch.Tensor | None = None  # 0-dim dropped pairs (capacity only)
    capacity: int | None = None  # rows per expert when padded
    bin: int | None = None  # capacity bin used (capacity_bins only)


def build_dispatcher(config: ModelConfig, moe: MoEConfig, ops: Ops, agree_capacity: Reduce | None = None) -> nn.Module:
    e, k = config.num_local_experts, config.num_experts_per_tok
    if moe.dispatcher == "capacity":
        return Capacity(e, k, ops, moe.capacity_factor, moe.capacity_per, moe.drop_policy, moe.pad_to_capacity)
    if moe.dispatcher == "capacity_bins":
        return CapacityBinned(e, k, moe.capacity_bins, agree_capacity)
    return Dropless(e, ops)


class MoE(nn.Module):
    def __init__(
        self, config: ModelConfig, ops: Ops, moe: MoEConfig | None = None, layout: ModelLayout | None = None
    ) -> None:
        super().__init__()
        moe, layout = moe or MoEConfig(), layout or ModelLayout()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.jitter = config.router_jitter_noise if moe.jitter is None else moe.jitter
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.router = ops.router
        if layout.int8 and moe.dispatcher != "dropless":
            raise MixtralError(
                f"int8 expert weights run with the dropless dispatcher, not moe.dispatcher={moe.dispatcher}: "
                f"use --dtype bf16 on this backend, or the dropless dispatcher"
            )
        self.experts = GroupedExperts(config, ops, layout)
        self.dispatcher = build_dispatcher(config, moe, ops, layout.agree_capacity)
        self.exchange = layout.exchange  # expert parallelism: (moe, x, routing, batch) -> (out, ctx)
        self.expert_bias_rate = moe.expert_bias_update_rate
        bias = torch.zeros(self.num_experts) if moe.expert_bias else None
        self.register_buffer("expert_bias", bias)  # saved with the model; None: plain top-k
        self.register_buffer("expert_load", None if bias is None else torch.zeros_like(bias), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        """x [B, S, H] -> (output [B, S, H], this layer's stats)."""
        flat = x.reshape(-1, x.shape[-1])
        if self.training and self.jitter > 0:  # as transformers: the experts see the jittered input too
            flat = flat * torch.empty_like(flat).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        routing = route(F.linear(flat.float(), self.gate.weight.float()), self.top_k, self.expert_bias, self.router)
        if self.exchange is None:  # static shapes outside the grouped GEMM's offsets: compiles whole
            out, ctx = self.expert_outputs(flat, routing, x.shape[0])
        else:
            out, ctx = run_eagerly(self.expert_outputs, flat, routing, x.shape[0])
        if self.expert_bias is not None and self.training:
            self.expert_load += ctx.counts
        return out.view_as(x), MoEStats(routing.logits, ctx.counts, ctx.dropped, ctx.capacity, ctx.bin)

    def expert_outputs(self, flat: torch.Tensor, routing: Routing, batch: int):
        """(combined expert output [T, H], dispatch context): this rank's experts, or expert parallel's exchange."""
        if self.exchange is not None:  # expert parallel (mixtral.parallel.expert_parallel): experts on other ranks too
            return self.exchange(self, flat, routing, batch)
        rows, counts, ctx = self.dispatcher.dispatch(flat, routing, batch)
        return self.dispatcher.combine(self.experts(rows, counts), ctx), ctx

    @torch.no_grad()
    def update_expert_bias(self, total: Reduce | None = None) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise under-loaded experts' bias, lower over-loaded ones, by the
        load since the last update summed by `total` over the data ranks (None: this process's)."""
        if self.expert_bias is None:
            return
        load = total(self.expert_load) if total is not None else self.expert_load
        self.expert_bias += self.expert_bias_rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()


def moe_step_end(moes: list[MoE], total: Reduce | None = None, first_layer: int = 0) -> bool:
    """What the trainer runs after each optimizer step: expert-bias updates and capacity-bin re-shaping (moes are
    consecutive layers from first_layer; total sums their statistics over the data ranks). Returns whether the bins
    changed."""
    for moe in moes:
        moe.update_expert_bias(total)
    return step_bins([m.dispatcher.bins for m in moes if isinstance(m.dispatcher, CapacityBinned)], total, first_layer)


def routing_summary(stats: list[MoEStats]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens per expert [L, E], dropped pairs [L], capacity bin [L] (-1: none)) of some blocks' routing."""
    counts = torch.stack([s.counts for s in stats])
    dropped = torch.stack(
        [s.dropped.to(counts.dtype) if s.dropped is not None else counts.new_zeros(()) for s in stats]
    )
    return counts, dropped, counts.new_tensor([-1 if s.bin is None else s.bin for s in stats])


def moe_metrics(stats: list[MoEStats]) -> dict[str, torch.Tensor]:
    """Per-layer load metrics, each a [L] tensor (tokens_per_expert is [L, E])."""
    counts = torch.stack([s.counts for s in stats])
    load = counts.float()
    pairs = load.sum(1).clamp_min(1)
    dropped = [s.dropped.float() if s.dropped is not None else load.new_zeros(()) for s in stats]
    return {
        "tokens_per_expert": counts,
        "max_load": load.max(1).values,
        "imbalance": load.max(1).values / (pairs / counts.shape[1]),
        "dropped_fraction": torch.stack(dropped) / pairs,
        "capacity": torch.tensor([s.capacity or 0 for s in stats], device=counts.device),
        "bin": torch.tensor([-1 if s.bin is None else s.bin for s in stats], device=counts.device),
    }


def router_totals(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Additive router statistics of some layers' tokens, [2, E + 1]: row 0 is the top-k counts per
    expert and the row count, row 1 the softmax probability sums per expert and the sum of squared
    logsumexps. Sums add over layers, pipeline stages and ranks; the losses are computed from them."""
    totals = torch.zeros(2, num_experts + 1, dtype=torch.float32, device=router_logits[0].device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        counts = reference.expert_counts(chosen, num_experts).float()
        rows = counts.new_tensor([probs.shape[0]])
        z = torch.logsumexp(logits.float(), dim=-1).square().sum().reshape(1)
        totals = totals + torch.stack([torch.cat([counts, rows]), torch.cat([probs.sum(dim=0), z])])
    return totals
