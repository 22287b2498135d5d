"""The one place that lays a Mixtral out over the ranks: EP/ETP and CP when it is built, then TP(+SP) -> PP -> DP/FSDP2.

Expert and context parallelism change what the model holds and computes (its experts, its chunk of every sequence),
so the model is built with them (model_layout -> ModelLayout). Then the order matters: tensor parallelism shards
the blocks' weights in place (DTensor), the pipeline cut takes the prepared blocks, and FSDP2 shards last, over
whatever this rank still holds (its stage), as torchtitan does. The loss over the data x context ranks is the
trainer's (mixtral.train.loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from mixtral.config import ModelConfig, MoEConfig
from mixtral.errors import MixtralError
from mixtral.model import Mixtral
from mixtral.model.layout import ModelLayout
from mixtral.parallel.context_parallel import context_layout
from mixtral.parallel.data_parallel import apply_data_parallel
from mixtral.parallel.dims import ParallelDims, ParallelMeshes
from mixtral.parallel.expert_parallel import apply_expert_data_parallel, expert_layout
from mixtral.parallel.pipeline_parallel import Pipeline, PipelineSchedule, PipelineStageModel
from mixtral.parallel.tensor_parallel import apply_tensor_parallel


@dataclass
class Parallelized:
    model: nn.Module  # what holds this rank's parameters: the whole model, or its pipeline stage
    pipeline: Pipeline | None  # set when parallel.pp > 1: run steps through it, not through model(...)


def model_layout(
    config: ModelConfig,
    moe: MoEConfig | None,
    meshes: ParallelMeshes,
    *,
    ep_comm: str = "alltoall",
    cp_algo: str = "allgather",
) -> ModelLayout:
    """What expert and context parallelism change inside the model, for Mixtral(..., layout=) to build it with:
    this rank's experts and their exchange, its chunk of every sequence and how attention reaches the rest."""
    return ModelLayout(
        **expert_layout(config, moe or MoEConfig(), meshes, ep_comm), **context_layout(meshes["cp"], cp_algo)
    )


def check_layout(model: Mixtral, meshes: ParallelMeshes) -> None:
    """A model built for another expert or context layout would train silently wrong: refuse it."""
    built = (model.layout.experts, model.layout.expert_ffn, model.layout.context[1])
    wanted = model_layout(model.config, model.moe, meshes)
    if built != (wanted.experts, wanted.expert_ffn, wanted.context[1]):
        raise MixtralError(
            f"the model was built for (experts, expert rows, context chunks) {built} per rank but the "
            f"meshes hold {(wanted.experts, wanted.expert_ffn, wanted.context[1])}: build it with "
            f"Mixtral(..., layout=model_layout(config, moe, meshes))"
        )


def parallelize(
    model: Mixtral,
    dims: ParallelDims,
    meshes: ParallelMeshes,
    *,
    zero: int = 1,
    pp_schedule: PipelineSchedule = "1f1b",
    microbatches: int = 1,
    device: torch.device | None = None,
    loss: Callable | None = None,
) -> Parallelized:
    """Lay model (built with model_layout's ModelLayout) out over the ranks in place: tensor and sequence
    parallelism, the pipeline stage, FSDP2; microbatches is the pipeline's per step, loss what its last stage
    computes (mixtral.train.loss.TrainingLoss)."""
    check_layout(model, meshes)
    if dims.tp > 1:
        apply_tensor_parallel(model, meshes["tp"], dims.sp)
    part: nn.Module = model
    if dims.pp > 1:
        part = PipelineStageModel(model, meshes["pp"].get_local_rank(), dims.pp, dims.tp if dims.sp else 1)
    if meshes.expert is not None:  # expert shards first: reduced over edp, then left alone by apply_data_parallel
        apply_expert_data_parallel(part, meshes, zero)
    if meshes.dp_cp.size() > 1:
        part = apply_data_parallel(part, meshes.dp_cp, zero, tp_enabled=dims.tp > 1)
    pipeline = None
    if dims.pp > 1:
        pipeline = Pipeline(part, meshes["pp"], microbatches, pp_schedule, device or torch.device("cpu"), loss)
    return Parallelized(part, pipeline)


def clip_grad_norm_(
    dense: list[torch.Tensor], experts: list[torch.Tensor], max_norm: float, meshes: ParallelMeshes | None = None
) -> torch.Tensor:
    """Clip every rank's gradients to one global norm, returned (before clipping).

    DTensor norms reduce over their own meshes (tp, FSDP's dp x cp, the experts' edp); the expert shards'
    squares are then summed over ep and etp (each of those ranks holds other experts), and every parameter's
    over the pipeline stages.
    """
    device = (dense + experts)[0].device
    squares = _squared_norm(dense, device, meshes, ()) + _squared_norm(experts, device, meshes, ("ep", "etp"))
    if meshes is not None and meshes["pp"].size() > 1:
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=meshes["pp"].get_group())
    norm = squares.sqrt()
    by_mesh: dict[object, list[torch.Tensor]] = {}  # foreach kernels take plain tensors or DTensors of one mesh
    for param in dense + experts:
        by_mesh.setdefault(getattr(param.grad, "device_mesh", None), []).append(param)
    for params in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def _squared_norm(
    params: list[torch.Tensor], device: torch.device, meshes: ParallelMeshes | None, sum_over: tuple[str, ...]
) -> torch.Tensor:
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    squares = (
        torch.stack([(n.full_tensor() if isinstance(n, DTensor) else n).square() for n in norms]).sum()
        if norms
        else torch.zeros((), device=device)
    )
    for name in sum_over if meshes is not None and meshes.expert is not None else ():
        if meshes[name].size() > 1:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=meshes[name].get_group())
    return squares
