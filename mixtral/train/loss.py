"""What training optimises: cross-entropy plus the router's load-balancing and z losses, over a group of ranks.

The model returns logits and each block's routing (mixtral.model); the losses, the router statistics and every
collective they need are here, used alike by the trainer, the pipeline's last stage and the tests. With a group (the
data x context ranks) each rank's loss is its share of the group's whole batch: the token sum over the group's
counted targets, times the group size, so the mean of the ranks' losses, and of their gradients, is the loss of the
whole batch. Router statistics are additive ([2, E + 1] totals: mixtral.model.moe.router_totals), so the
load-balancing and z losses are exact under data, context and pipeline parallelism.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mixtral.config import ModelConfig, MoEConfig
from mixtral.kernels import reference
from mixtral.model import IGNORE_INDEX
from mixtral.model.moe import MoEStats, router_totals


@dataclass
class LossOutput:
    loss: torch.Tensor  # ce + aux coefficient * aux (+ z coefficient * z)
    ce_loss: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor | None  # None without a z-loss coefficient
    logits: torch.Tensor | None  # None when the loss's gradient was written over them
    routing: list[MoEStats]  # each block's

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        return torch.stack([r.counts for r in self.routing])


def router_losses(totals: torch.Tensor, group: dist.ProcessGroup | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Switch aux loss, z-loss) from router_totals, exactly as transformers computes the aux loss over
    all layers' tokens at once.

    With a group (the data x context ranks) the counts and row counts are summed over it while the
    differentiable probability sums stay local, scaled by the group size: the mean of the ranks'
    losses, and of their gradients, is then exactly the loss of the whole batch.
    """
    counts, rows = totals[0, :-1].detach(), totals[0, -1].detach()
    local, scale = totals[1], 1.0
    if group is not None and dist.get_world_size(group) > 1:
        counts_rows = totals[0].detach().clone()
        dist.all_reduce(counts_rows, op=dist.ReduceOp.SUM, group=group)
        counts, rows, scale = counts_rows[:-1], counts_rows[-1], float(dist.get_world_size(group))
    num_experts = counts.shape[0]
    aux = num_experts * torch.sum((counts / rows) * (local[:-1] * scale / rows))
    return aux, local[-1] * scale / rows


class TrainingLoss:
    """The loss of a Mixtral's outputs against targets, over `group` (None: this process's batch alone)."""

    def __init__(
        self,
        config: ModelConfig,
        moe: MoEConfig | None = None,
        group: dist.ProcessGroup | None = None,
        cross_entropy: Callable[..., torch.Tensor] = reference.cross_entropy,
    ) -> None:
        """cross_entropy: the backend's op (Ops.cross_entropy)."""
        moe = moe or MoEConfig()
        self.cross_entropy = cross_entropy
        self.aux_coeff = config.router_aux_loss_coef if moe.aux_loss_coeff is None else moe.aux_loss_coeff
        self.z_coeff = moe.z_loss_coeff
        self.num_experts, self.top_k = config.num_local_experts, config.num_experts_per_tok
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None

    def totals(self, routing: list[MoEStats]) -> torch.Tensor:
        """The additive router statistics of these blocks (a pipeline stage adds its own to the previous')."""
        return router_totals([r.logits for r in routing], self.num_experts, self.top_k)

    def __call__(
        self, logits: torch.Tensor, totals: torch.Tensor, targets: torch.Tensor, in_place: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(loss, ce, aux, z or None); in_place writes the cross-entropy's gradient over logits (2-D, not a view)."""
        logits, flat = logits.flatten(0, -2), targets.reshape(-1)  # 2-D logits stay themselves
        if self.group is None:
            ce = self.cross_entropy(logits, flat, in_place=in_place)
        else:
            counted = (flat != IGNORE_INDEX).sum().float()
            dist.all_reduce(counted, op=dist.ReduceOp.SUM, group=self.group)
            ce = self.cross_entropy(logits, flat, reduction="sum", in_place=in_place)
            ce = ce * dist.get_world_size(self.group) / counted
        aux, z = router_losses(totals, self.group)
        loss = ce + self.aux_coeff * aux
        if not self.z_coeff:
            return loss, ce, aux, None
        return loss + self.z_coeff * z, ce, aux, z

    def of(self, model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor, keep_logits: bool = True) -> LossOutput:
        """model(tokens)'s loss. keep_logits=False (the trainer's step) writes the loss's gradient over the logits
        instead of keeping them: one logits-sized tensor less per micro-batch."""
        out = model(tokens, flat=not keep_logits)
        in_place = not keep_logits and out.logits._base is None  # a tensor-parallel head hands back a view
        loss, ce, aux, z = self(out.logits, self.totals(out.routing), targets, in_place)
        return LossOutput(loss, ce, aux, z, out.logits if keep_logits else None, out.routing)
