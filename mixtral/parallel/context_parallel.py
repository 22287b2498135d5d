"""Context parallelism: every sequence split into cp equal contiguous chunks, one per rank.

Attention sees the K and V of all chunks and masks causally with the chunk's offset (Mixtral.layer_inputs
builds the mask over the whole sequence). Two exact algorithms:
- allgather: K and V all-gathered (the backward reduce-scatters their gradients);
- ring: K and V blocks passed round the cp ranks, one shift per step, each block folded into an online
  softmax (log-sum-exp merge). The backward runs through autograd (each shift's backward is the reverse
  shift), which keeps every block's activations as allgather does: exact, but not yet the memory-saving
  ring with a recomputing backward; its plain-torch block math stands in for the backend's attention op.
Everything else is per-token and runs on the local chunk. The model is built with the chunk and the attention
(context_layout, into ModelLayout); the losses must cover the data x context ranks' whole batch
(mixtral.train.loss.TrainingLoss over ParallelMeshes.dp_cp), and dense gradients are averaged over them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from mixtral.config import CP_ALGOS
from mixtral.errors import MixtralError

MASKED = -1e30  # a masked score: exp underflows to exactly 0, and a row with nothing allowed stays finite


def gather_dim(x: torch.Tensor, mesh: DeviceMesh, dim: int) -> torch.Tensor:
    """Every rank's x concatenated along dim over a 1-D mesh. The ranks use the result differently, so
    its gradient is partial: the backward sums the ranks' gradients and hands each its own chunk."""
    sharded = DTensor.from_local(x, mesh, (Shard(dim),), run_check=False)
    return sharded.redistribute(placements=(Replicate(),)).to_local(grad_placements=(Partial(),))


def shard_sequence(tensor: torch.Tensor, cp_mesh: DeviceMesh) -> torch.Tensor:
    """This rank's contiguous chunk of tensor [B, S, ...] along the sequence (dim 1)."""
    chunks, seq = cp_mesh.size(), tensor.shape[1]
    if seq % chunks:
        raise MixtralError(
            f"sequence length {seq} is not divisible by parallel.cp = {chunks}; "
            f"use a sequence length that is a multiple of {chunks}"
        )
    return tensor.chunk(chunks, dim=1)[cp_mesh.get_local_rank()]


def ring_shift(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """x of the previous rank on the ring (this rank's goes to the next): an all_to_all_single whose only
    non-empty splits are those two, so that autograd sends the gradient back the other way."""
    size, rank = mesh.size(), mesh.get_local_rank()
    rows = x.shape[0]
    send = [rows if r == (rank + 1) % size else 0 for r in range(size)]
    recv = [rows if r == (rank - 1) % size else 0 for r in range(size)]
    return funcol.all_to_all_single_autograd(x.contiguous(), recv, send, mesh)


@dataclass
class RingAttention:
    """The attention op under cp_algo=ring: ops.attention's arguments, with k and v this rank's chunk and
    the mask over the whole sequence (chunk j's keys are its columns j * S .. (j + 1) * S); layer_inputs
    always builds that mask under context parallelism, so causal is never set."""

    mesh: DeviceMesh

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        scale: float | None = None,
    ) -> torch.Tensor:
        size, rank, seq = self.mesh.size(), self.mesh.get_local_rank(), k.shape[2]
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        groups = q.shape[1] // k.shape[1]
        kv = torch.stack([k, v])
        out = lse = None
        for step in range(size):  # step 0 is this rank's own chunk: every query sees at least itself there
            source = (rank - step) % size
            block_k, block_v = kv.repeat_interleave(groups, dim=2).float().unbind(0)
            scores = torch.matmul(q.float(), block_k.transpose(-1, -2)) * scale
            if mask is not None:  # a block no query may see still runs: each rank's backward needs every shift
                scores = scores.masked_fill(~mask[..., source * seq : (source + 1) * seq], MASKED)
            block_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            block_out = torch.matmul(torch.exp(scores - block_lse), block_v)
            if out is None:
                out, lse = block_out, block_lse
            else:
                merged = torch.logaddexp(lse, block_lse)
                out = out * torch.exp(lse - merged) + block_out * torch.exp(block_lse - merged)
                lse = merged
            if step < size - 1:
                kv = ring_shift(kv.transpose(0, 1), self.mesh).transpose(0, 1)  # batch first for the splits
        return out.to(q.dtype)


def context_layout(cp_mesh: DeviceMesh, algo: str = "allgather") -> dict[str, Any]:
    """The ModelLayout fields of context parallelism: this rank's chunk of every sequence, and how its attention
    reaches the whole sequence's keys and values (gathered, or passed round a ring)."""
    if algo not in CP_ALGOS:
        raise MixtralError(f"parallel.cp_algo '{algo}' is unknown; choose one of: {', '.join(CP_ALGOS)}")
    if cp_mesh.size() == 1:
        return {}
    context = (cp_mesh.get_local_rank(), cp_mesh.size())
    if algo == "ring":
        return dict(context=context, attention=RingAttention(cp_mesh))
    return dict(context=context, gather_kv=functools.partial(gather_dim, mesh=cp_mesh, dim=2))  # K, V [B, h, S, D]
