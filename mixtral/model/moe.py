"""The sparse MoE block: a softmax top-k router and SwiGLU experts run as one grouped GEMM (dropless)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mixtral.backend import Ops
from mixtral.config import ModelConfig


@dataclass
class Routing:
    logits: torch.Tensor      # [T, E] router logits, in the activation dtype (aux loss input)
    weights: torch.Tensor     # [T, k] fp32, renormalised over the chosen experts
    expert_ids: torch.Tensor  # [T, k] int64


def route(logits: torch.Tensor, top_k: int) -> Routing:
    """Mixtral routing: softmax in fp32, top-k, kept weights renormalised to sum to 1."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    return Routing(logits, weights / weights.sum(dim=-1, keepdim=True), expert_ids)


class GroupedExperts(nn.Module):
    """All experts' SwiGLU weights as fused 3-D tensors (transformers 5's in-memory layout)."""

    def __init__(self, config: ModelConfig, ops: Ops) -> None:
        super().__init__()
        e, h, f = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, h))  # [w1; w3] per expert
        self.down_proj = nn.Parameter(torch.empty(e, h, f))          # w2 per expert
        self.grouped_mm, self.swiglu = ops.grouped_mm, ops.swiglu

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, H] grouped by expert with counts [E] -> expert outputs [N, H] in the same order."""
        offs = counts.cumsum(0).to(torch.int32)
        hidden = self.swiglu(self.grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs))
        return self.grouped_mm(hidden, self.down_proj.transpose(1, 2), offs)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.jitter = config.router_jitter_noise
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = GroupedExperts(config, ops)
        self.permute, self.unpermute = ops.permute, ops.unpermute

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing, torch.Tensor]:
        """x [B, S, H] -> (output [B, S, H], routing, tokens per expert [E])."""
        flat = x.reshape(-1, x.shape[-1])
        if self.training and self.jitter > 0:
            flat = flat * torch.empty_like(flat).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        routing = route(self.gate(flat), self.top_k)
        rows, order, counts = self.permute(flat, routing.expert_ids, self.num_experts)
        out = self.unpermute(self.experts(rows, counts), order, routing.weights)
        return out.view_as(x), routing, counts


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer aux loss over all layers' tokens at once, exactly as transformers computes it."""
    counts = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    prob_sum = torch.zeros_like(counts)
    rows = 0
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        counts = counts + torch.bincount(chosen.reshape(-1), minlength=num_experts).float()
        prob_sum = prob_sum + probs.sum(dim=0)
        rows += probs.shape[0]
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE z-loss: mean squared logsumexp of the router logits, averaged over layers."""
    return torch.stack([torch.logsumexp(l.float(), dim=-1).square().mean() for l in router_logits]).mean()
