"""What a rank's parameters, gradients and optimizer states take, measured on the tensors themselves.

Two views. `held_bytes`: the storage between steps (FSDP2 keeps every level sharded then), which the dry run's
meta build must predict exactly. `step_bytes`: the planner's view during a step (mixtral.planner's memory rows):
a row that the recipe's ZeRO level does not shard counts the model-parallel tensor (FSDP2 gathers it), so the
trainer can log each rank's real numbers next to the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

ZERO_MESHES = ("dp_cp", "edp")  # mesh dimensions FSDP2 shards over: undone to get the model-parallel shape
ROWS = ("weights", "gradients", "optimizer states")  # mixtral.planner's rows, each sharded from ZeRO 3, 2, 1
ZERO_LEVEL = {"weights": 3, "gradients": 2, "optimizer states": 1}


@dataclass(frozen=True)
class BuiltParameter:
    shape: tuple[int, ...]  # model-parallel shape: after tp / ep / etp / pp, before ZeRO
    local_numel: int  # what this rank stores at rest (its FSDP2 shard)


def model_parallel_shape(param: Any) -> tuple[int, ...]:
    """The parameter's shape on this rank with ZeRO's sharding undone (a DTensor's other shard dims applied)."""
    if not isinstance(param, DTensor):
        return tuple(param.shape)
    shape = list(param.shape)
    names = param.device_mesh.mesh_dim_names or ()
    for mesh_dim, placement in enumerate(param.placements):
        if placement.is_shard() and names[mesh_dim] not in ZERO_MESHES:
            shape[placement.dim] //= param.device_mesh.size(mesh_dim)
    return tuple(shape)


def local_numel(tensor: torch.Tensor) -> int:
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).numel()


def built_parameters(module: torch.nn.Module) -> dict[str, BuiltParameter]:
    """Every parameter of module: its model-parallel shape and the elements this rank stores."""
    return {name: BuiltParameter(model_parallel_shape(p), local_numel(p)) for name, p in module.named_parameters()}


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """Bytes of each parameter's optimizer state tensors (AdamW's m and v), by id of the parameter."""
    return {
        id(param): sum(
            local_numel(v) * v.element_size() for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0
        )
        for param, state in optimizer.state.items()
    }


def held_bytes(
    params: list[torch.Tensor], masters: list[torch.Tensor], optimizer: torch.optim.Optimizer
) -> dict[str, int]:
    """Storage this rank holds: weights (and fp32 masters with the optimizer states), gradients, optimizer states."""
    states = optimizer_bytes(optimizer)
    updated = masters or params
    return {
        "weights": sum(local_numel(p) * p.element_size() for p in params),
        "gradients": sum(local_numel(p.grad) * p.grad.element_size() for p in updated if p.grad is not None),
        "optimizer states": sum(states.get(id(p), 0) for p in updated)
        + sum(local_numel(m) * m.element_size() for m in masters),
    }


def step_bytes(
    params: list[torch.Tensor], masters: list[torch.Tensor], optimizer: torch.optim.Optimizer, zero: int
) -> dict[str, int]:
    """The planner's rows from the real tensors: a row below its ZeRO level counts the model-parallel tensor."""

    def numel(param: torch.Tensor, row: str) -> int:
        return local_numel(param) if zero >= ZERO_LEVEL[row] else math.prod(model_parallel_shape(param))

    states = optimizer_bytes(optimizer)
    updated = masters or params
    per_element = {
        "weights": [p.element_size() for p in params],
        "gradients": [p.grad.element_size() if p.grad is not None else 0 for p in updated],
        "optimizer states": [
            (states.get(id(u), 0) + (local_numel(u) * u.element_size() if masters else 0)) / max(1, local_numel(u))
            for u in updated
        ],
    }
    return {row: round(sum(numel(p, row) * size for p, size in zip(params, per_element[row]))) for row in ROWS}
