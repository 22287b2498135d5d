"""Expert parallelism (EP) and expert tensor parallelism (ETP) over the expert mesh (pp, edp, ep, etp).

Each ep rank keeps num_experts / ep whole experts; under etp each of them is further split along its
intermediate dimension (gate/up column-wise, down row-wise, the partial outputs summed over etp, as
Megatron's ETP does). Routing and the dispatcher stay global and run on the rank's own tokens;
`MoE.exchange` moves the dispatched rows to the ranks that hold their experts and the outputs back:

- alltoall: per-expert counts are exchanged first, then the rows with `all_to_all_single` and uneven
  splits; static [E, C, H] rows (padded capacity, capacity bins) split evenly along E;
- allgather: tokens and routing (dropless) or the static rows are all-gathered over ep, every rank
  runs its experts on all of them and the outputs are reduce-scattered back (Megatron's allgather
  dispatcher; Gaudi's ExTP is this with etp).
Every ep rank must dispatch micro-batches of the same shape (the static rows' capacity C and the
gathered token counts must agree; capacity bins agree on C through their group, set here).

Gradients: an expert shard's gradient sums the losses of every rank of its ep group, whose tokens it
served, where a dense gradient is one rank's; the exchange therefore scales the expert weights' gradient
by 1 / ep (not their inputs'), and then the expert shards, replicated over edp, are averaged over edp
(`apply_expert_data_parallel`) exactly as dense parameters are over dp x cp. That is the gradient of
the data ranks' mean loss, also when ep folds over tp ranks that hold the same tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # private, same in torch 2.9

from mixtral.config import EP_COMMS, ModelConfig, MoEConfig, divisors
from mixtral.errors import MixtralError
from mixtral.model import Mixtral
from mixtral.model.dispatch import Context, Dropless, Routing
from mixtral.model.moe import GroupedExperts, MoE
from mixtral.parallel.context_parallel import gather_dim
from mixtral.parallel.data_parallel import spread_over
from mixtral.parallel.dims import ParallelMeshes


def expert_modules(model: Mixtral) -> list[GroupedExperts]:
    """Every layer's experts: the modules whose parameters are sharded over ep and etp, replicated over edp."""
    return [layer.mlp.experts for layer in model.layers]


def expert_parameters(model: Mixtral) -> list[nn.Parameter]:
    """The parameters data parallelism must leave to `apply_expert_data_parallel` (reduced over edp, not dp x cp)."""
    return [p for experts in expert_modules(model) for p in experts.parameters()]


def local_expert_weight(full: torch.Tensor, name: str, ep_rank: int, ep: int, etp_rank: int, etp: int) -> torch.Tensor:
    """This rank's shard of a fused expert weight: experts split over ep, the intermediate dim over etp
    (gate_up_proj [E, 2F, H] keeps its gate and up halves' rows j of etp, down_proj [E, H, F] columns)."""
    mine = full.chunk(ep, dim=0)[ep_rank]
    if name == "down_proj":
        return mine.chunk(etp, dim=2)[etp_rank]
    gate, up = mine.chunk(2, dim=1)
    return torch.cat([gate.chunk(etp, dim=1)[etp_rank], up.chunk(etp, dim=1)[etp_rank]], dim=1)


def full_expert_weight(local: torch.Tensor, name: str, meshes: ParallelMeshes) -> torch.Tensor:
    """Inverse of local_expert_weight (every rank of the ep and etp groups calls it): the whole [E, ...] tensor."""
    pieces = gather_dim(local.detach(), meshes["etp"], 0).chunk(meshes["etp"].size(), dim=0)
    if name == "down_proj":
        merged = torch.cat(pieces, dim=2)
    else:
        halves = [piece.chunk(2, dim=1) for piece in pieces]
        merged = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=1)
    return gather_dim(merged, meshes["ep"], 0)


def all_reduce_max(value: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """value's largest over the group (capacity bins: every ep rank pads its experts to one capacity)."""
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return value


def _sum_scatter(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """The sum of every rank's x, this rank's dim-0 chunk of it (reduce-scatter); backward all-gathers."""
    return DTensor.from_local(x, mesh, (Partial(),), run_check=False).redistribute(placements=(Shard(0),)).to_local()


class _GradScale(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _by_expert(rows: torch.Tensor) -> torch.Tensor:
    """[sources, local experts, C, H] static rows -> [local experts, sources * C, H]: one batch per expert."""
    sources, local, cap, hidden = rows.shape
    return rows.transpose(0, 1).reshape(local, sources * cap, hidden)


def _by_source(out: torch.Tensor, sources: int) -> torch.Tensor:
    """Inverse of _by_expert: [local experts, sources * C, H] -> [sources, local experts, C, H]."""
    local, rows, hidden = out.shape
    return out.view(local, sources, rows // sources, hidden).transpose(0, 1)


@dataclass
class ExpertExchange:
    """MoE.exchange under expert parallelism: dispatch and combine here, the experts on their owner ranks."""

    comm: str
    ep_mesh: DeviceMesh
    ep: int
    first: int  # this rank's first global expert
    local: int  # experts per ep rank
    etp_mesh: DeviceMesh | None  # None without expert tensor parallelism

    def __call__(self, moe: MoE, flat: torch.Tensor, routing: Routing, batch: int) -> tuple[torch.Tensor, Context]:
        if self.comm == "allgather" and isinstance(moe.dispatcher, Dropless):
            return self._allgather_tokens(moe, flat, routing)
        rows, counts, ctx = moe.dispatcher.dispatch(flat, routing, batch)
        if counts is not None:
            out = self._alltoall_rows(moe.experts, rows, counts)
        elif self.comm == "alltoall":
            out = self._alltoall_static(moe.experts, rows)
        else:
            out = self._allgather_static(moe.experts, rows)
        return moe.dispatcher.combine(out, ctx), ctx

    def _experts(self, experts: GroupedExperts, rows: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        """The local experts, their weights' gradient scaled by 1 / ep (module docstring); under etp the
        input's gradient and the output are summed over the etp ranks."""
        rows = _GradScale.apply(rows, float(self.ep))
        if self.etp_mesh is not None:
            rows = DTensor.from_local(rows, self.etp_mesh, (Replicate(),), run_check=False).to_local(
                grad_placements=(Partial(),)
            )
        out = experts(rows, counts)
        if self.etp_mesh is not None:
            partial = DTensor.from_local(out, self.etp_mesh, (Partial(),), run_check=False)
            out = partial.redistribute(placements=(Replicate(),)).to_local()
        return _GradScale.apply(out, 1.0 / self.ep)

    def _alltoall_rows(self, experts: GroupedExperts, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Variable rows [N, H] grouped by expert (counts [E]; rows past their sum reach no expert)."""
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.ep_mesh.get_group())  # my experts' counts by source
        received = received.view(self.ep, self.local)
        send = counts.view(self.ep, self.local).sum(1).tolist()
        recv = received.sum(1).tolist()
        got = funcol.all_to_all_single_autograd(rows[: sum(send)].contiguous(), recv, send, self.ep_mesh)
        local_ids = torch.arange(self.local, device=rows.device).repeat(self.ep)
        expert_of_row = local_ids.repeat_interleave(received.flatten())
        order = torch.argsort(expert_of_row, stable=True)  # rows come source-major: regroup them by expert
        out = self._experts(experts, got[order], received.sum(0))[torch.argsort(order)]
        back = funcol.all_to_all_single_autograd(out, send, recv, self.ep_mesh)
        return F.pad(back, (0, 0, 0, rows.shape[0] - back.shape[0]))

    def _alltoall_static(self, experts: GroupedExperts, rows: torch.Tensor) -> torch.Tensor:
        """Static rows [E, C, H]: ep even splits along E, each holding the destination's experts."""
        got = funcol.all_to_all_single_autograd(rows.contiguous(), None, None, self.ep_mesh)
        out = self._experts(experts, _by_expert(got.view(self.ep, self.local, *rows.shape[1:])), None)
        back = funcol.all_to_all_single_autograd(_by_source(out, self.ep).reshape(rows.shape), None, None, self.ep_mesh)
        return back.view(rows.shape)

    def _allgather_static(self, experts: GroupedExperts, rows: torch.Tensor) -> torch.Tensor:
        """Static rows [E, C, H]: gather every rank's, run my experts' slices, reduce-scatter the outputs."""
        experts_total, cap, hidden = rows.shape
        gathered = gather_dim(rows, self.ep_mesh, 0)
        mine = gathered.view(self.ep, experts_total, cap, hidden)[:, self.first : self.first + self.local]
        out = _by_source(self._experts(experts, _by_expert(mine), None), self.ep)
        full = F.pad(out, (0, 0, 0, 0, self.first, experts_total - self.first - self.local))
        return _sum_scatter(full.reshape(self.ep * experts_total, cap, hidden), self.ep_mesh)

    def _allgather_tokens(self, moe: MoE, flat: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, Context]:
        """Dropless: gather tokens and routing, run my experts' pairs, reduce-scatter the weighted outputs."""
        tokens, weights = gather_dim(flat, self.ep_mesh, 0), gather_dim(routing.weights, self.ep_mesh, 0)
        ids = gather_dim(routing.expert_ids, self.ep_mesh, 0) - self.first
        bucket = torch.where((ids >= 0) & (ids < self.local), ids, self.local)  # other ranks' pairs sort last
        rows, order, counts = moe.dispatcher.permute(tokens, bucket, self.local + 1)
        served = int(counts[: self.local].sum())
        out = self._experts(moe.experts, rows[:served], counts[: self.local])
        out = moe.dispatcher.unpermute(F.pad(out, (0, 0, 0, rows.shape[0] - served)), order, weights)
        counts = torch.bincount(routing.expert_ids.reshape(-1), minlength=moe.num_experts)
        ctx = Context(order, routing.weights, counts)
        return _sum_scatter(out, self.ep_mesh), ctx


def expert_layout(
    config: ModelConfig, moe: MoEConfig, meshes: ParallelMeshes, comm: str = "alltoall"
) -> dict[str, Any]:
    """The ModelLayout fields of expert (and expert tensor) parallelism: the experts and intermediate rows this rank
    holds, the exchange that routes rows to their experts' ranks, and one capacity for every ep rank."""
    if comm not in EP_COMMS:
        raise MixtralError(f"moe.ep_comm '{comm}' is unknown; choose one of: {', '.join(EP_COMMS)}")
    if meshes.expert is None:
        return {}
    ep_mesh, etp_mesh = meshes["ep"], meshes["etp"]
    ep, etp = ep_mesh.size(), etp_mesh.size()
    total = config.num_local_experts
    if total % ep:
        raise MixtralError(
            f"parallel.ep={ep}: the model's num_local_experts ({total}) is not divisible by ep; "
            f"choose ep from {divisors(total)}"
        )
    if comm == "allgather" and moe.dispatcher == "capacity" and not moe.pad_to_capacity:
        raise MixtralError(
            "moe.ep_comm=allgather needs static expert rows: set moe.pad_to_capacity true, "
            "or use moe.ep_comm=alltoall with unpadded capacity"
        )
    local = total // ep
    exchange = ExpertExchange(comm, ep_mesh, ep, ep_mesh.get_local_rank() * local, local, etp_mesh if etp > 1 else None)
    agree = functools.partial(all_reduce_max, group=ep_mesh.get_group()) if moe.dispatcher == "capacity_bins" else None
    return dict(experts=local, expert_ffn=config.intermediate_size // etp, exchange=exchange, agree_capacity=agree)


def apply_expert_data_parallel(model: Mixtral, meshes: ParallelMeshes, zero: int) -> None:
    """FSDP2 for the expert shards over edp (gradients averaged there, module docstring). Call before
    apply_data_parallel, whose fully_shard then leaves the experts alone."""
    placement = spread_over(meshes["edp"].size())  # fewer local experts than edp ranks: not all on the first
    for experts in expert_modules(model):
        fully_shard(experts, mesh=meshes["edp"], reshard_after_forward=zero == 3, shard_placement_fn=placement)


class ExpertCheckpointViews:
    """State dicts as DCP must see them under expert parallelism: every expert stack (and its optimizer states)
    as the global [num_experts, ...] tensor.

    An ep rank's expert parameters hold its experts only, under the global names, so DCP would keep one rank's
    experts as if they were all of them (Megatron-Bridge #1716). With etp 1 each stack becomes a global DTensor
    view (ep outer, the edp FSDP shard inner) sharing the shard's storage: each rank writes and reads only its
    own experts, and any layout reshards. With etp > 1 an etp shard of the fused gate_up weight is two blocks
    ([gate_j; up_j]), which a DTensor cannot describe: the stacks are gathered whole instead (memory: one full
    stack at a time per rank) and, after a load, each rank's shard is cut back out (restore).
    Collective: build it, and call it, on every rank in the same order.
    """

    def __init__(self, meshes: ParallelMeshes) -> None:
        self.meshes = meshes
        self.ep = meshes["ep"].size()
        self.mesh: DeviceMesh | None = None
        if meshes["etp"].size() == 1:
            ranks = meshes.expert.mesh.permute(0, 2, 1, 3)  # (pp, edp, ep, etp) -> (pp, ep, edp, etp)
            names = ("pp", "ep", "edp", "etp")
            self.mesh = DeviceMesh(meshes.expert.device_type, ranks, mesh_dim_names=names)["ep", "edp"]
        self.gathered: list[tuple[torch.Tensor, torch.Tensor, str]] = []  # (shard, whole, weight name)

    def __call__(self, state: dict, path: str = "") -> dict:
        out: dict[str, Any] = {}
        for key, value in state.items():
            name = f"{path}.{key}" if path else str(key)
            if isinstance(value, dict):
                out[key] = self(value, name)
            elif isinstance(value, torch.Tensor) and value.dim() == 3 and ".mlp.experts." in f".{name}":
                weight = name.split(".mlp.experts.")[1].split(".")[0]  # gate_up_proj or down_proj
                out[key] = self._view(value) if self.mesh is not None else self._whole(value, weight)
            else:
                out[key] = value
        return out

    def _view(self, tensor: torch.Tensor) -> DTensor:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        inner = tensor.placements[0] if isinstance(tensor, DTensor) else Replicate()  # FSDP2's, over edp
        shape = torch.Size([tensor.shape[0] * self.ep, *tensor.shape[1:]])
        return DTensor.from_local(
            local,
            self.mesh,
            (Shard(0), inner),
            run_check=False,
            shape=shape,
            stride=torch.empty(shape, device="meta").stride(),
        )

    def _whole(self, tensor: torch.Tensor, weight: str) -> torch.Tensor:
        whole = full_expert_weight(tensor.full_tensor() if isinstance(tensor, DTensor) else tensor, weight, self.meshes)
        self.gathered.append((tensor, whole, weight))
        return whole

    def restore(self) -> None:
        """After a load into gathered stacks (etp > 1): each rank's shards copied back out of them."""
        meshes = self.meshes
        with torch.no_grad():
            for shard, whole, weight in self.gathered:
                mine = local_expert_weight(
                    whole,
                    weight,
                    meshes["ep"].get_local_rank(),
                    self.ep,
                    meshes["etp"].get_local_rank(),
                    meshes["etp"].size(),
                )
                if isinstance(shard, DTensor):  # FSDP2's edp shard of it
                    sizes, offsets = compute_local_shape_and_global_offset(
                        mine.shape, shard.device_mesh, shard.placements
                    )
                    mine = mine[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]
                    shard = shard.to_local()
                shard.copy_(mine)
        self.gathered.clear()


def expert_checkpoint_views(meshes: ParallelMeshes) -> ExpertCheckpointViews | None:
    """The state-dict views checkpoints need under expert parallelism (None without it)."""
    return ExpertCheckpointViews(meshes) if meshes.expert is not None else None
