"""Data parallelism: DDP-style `replicate` (ZeRO 0) or FSDP2 `fully_shard` as the distributed optimizer.

The recipe's `parallel.zero` maps to FSDP2 as closely as FSDP2 allows (it always keeps parameters
sharded between steps and gives the optimizer sharded state):
  0  replicate (DDP): everything whole on every rank, gradients all-reduced (mean) every backward.
  1  fully_shard(reshard_after_forward=False) and gradient sync only on the last micro-batch
     (`microbatch_sync`): full gradients accumulate locally, one reduce-scatter per step (ZeRO-1).
  2  fully_shard(reshard_after_forward=False): gradients reduce-scattered every micro-batch (ZeRO-2).
  3  fully_shard(reshard_after_forward=True): parameters also re-gathered for backward (ZeRO-3).
FSDP units, each gathered whole while it runs: every block's experts (most of a block), the rest of every block,
the embedding, the final norm with the lm head (as torchtitan wraps them), and the root for what is left. Small
units bound what one rank holds gathered: about one layer's experts, twice while FSDP copies a gather out.

Gradients are averaged over the data ranks, so each rank's loss must be the mean over its own
micro-batch: the result equals one process averaging the same micro-batches' losses (gradient
accumulation). With `Mixtral.loss_group` set (parallelize does) the losses are over the group's whole
batch instead: cross-entropy over its counted targets, the load-balancing loss over its router totals.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard

from mixtral.errors import MixtralError

ZERO_LEVELS = (0, 1, 2, 3)


def apply_data_parallel(model: nn.Module, dp_mesh: DeviceMesh, zero: int, tp_enabled: bool = False) -> nn.Module:
    """Wrap model for data parallelism over dp_mesh (1-D: dp, or dp and cp flattened) at a ZeRO level."""
    if zero not in ZERO_LEVELS:
        raise MixtralError(f"parallel.zero must be one of {ZERO_LEVELS}, got {zero!r}")
    if zero == 0:
        if tp_enabled:
            raise MixtralError(
                "parallel.zero=0 (DDP replicate) does not compose with tensor parallelism; "
                "set parallel.zero to 1, 2 or 3 (FSDP2) when parallel.tp > 1"
            )
        from torch.distributed._composable.replicate import replicate

        return replicate(model, device_mesh=dp_mesh)

    def shard(module: nn.Module | list[nn.Module]) -> nn.Module:
        return fully_shard(
            module, mesh=dp_mesh, reshard_after_forward=zero == 3, shard_placement_fn=spread_over(dp_mesh.size())
        )

    for block in model.layers:
        if not isinstance(block.mlp.experts, FSDPModule):  # expert parallelism shards them over edp already
            shard(block.mlp.experts)
        shard(block)
    tied = getattr(model, "lm_head", None) is None and getattr(model, "embed_tokens", None) is not None
    if getattr(model, "embed_tokens", None) is not None and not tied:  # tied: the head reads the embedding's weight
        shard(model.embed_tokens)
    if getattr(model, "lm_head", None) is not None:
        shard([model.norm, model.lm_head])
    return shard(model)


def spread_over(ranks: int) -> Callable[[nn.Parameter], Shard | None]:
    """FSDP2's placement for a parameter: dim 0, unless it has fewer rows than ranks (8 experts stacked over
    256 ranks would sit on 8 of them, whole), then its largest dim. Tensor-parallel DTensors keep dim 0."""

    def placement(param: nn.Parameter) -> Shard | None:
        if isinstance(param, DTensor) or param.dim() == 0 or param.shape[0] >= ranks:
            return None  # FSDP2's default, Shard(0)
        return Shard(max(range(param.dim()), key=lambda d: param.shape[d]))

    return placement


def microbatch_sync(model: nn.Module, zero: int, last: bool) -> None:
    """Call before each micro-batch's backward: ZeRO-1 reduces gradients only on the last one."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last or zero != 1)


def mean_over(value: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The mean of a detached scalar (a loss for logging) over the ranks of a 1-D mesh."""
    out = value.detach().clone()
    if mesh.size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=mesh.get_group())
        out /= mesh.size()
    return out
