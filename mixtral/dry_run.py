"""`recipe validate NAME --dry-run`: build rank shards of the real-size model on the meta device, compare with the plan.

A spawned process joins a fake process group (torch's FakeStore and "fake" backend: collectives are
no-ops) of the recipe's world size and runs training's own build path (mixtral.build.build_for_training:
the Mixtral on the meta device, laid out by tensor/sequence, expert, pipeline and data parallelism (FSDP2)),
stopped before it materialises anything. What it checks, for the first rank of every pipeline stage:
  shapes  every parameter this rank holds, with ZeRO's sharding undone, has the shape
          mixtral.planner.shard_shapes gives (names, tp / ep / etp splits, the stage's layers);
  bytes   its weights, gradients and optimizer states, from the local FSDP2 shards at the ZeRO levels
          that shard each row, are within 1% of the planner's memory rows.
The ranks of a stage hold shards of equal shape (tp, ep and etp split evenly) except where ZeRO's dim-0
split is uneven, where the first rank holds the most: checking it covers the stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from mixtral.backend import Ops
from mixtral.build import build_for_training
from mixtral.errors import MixtralError
from mixtral.parallel import ParallelDims
from mixtral.planner import (
    GiB,
    Workload,
    parameter_rows,
    recipe_device,
    shard_shapes,
    stage_memory,
)
from mixtral.train.memory import BuiltParameter, built_parameters

TOLERANCE = 0.01  # bytes: FSDP2 pads an uneven dim-0 split, the first rank holding the most


def build_rank(recipe, rank: int) -> dict[str, BuiltParameter]:
    """This rank's parameters as training builds them (mixtral.build.build_for_training), on the meta device under a
    fake process group: the run's own build path, stopped before materialising."""
    p = recipe.parallel
    dist.init_process_group("fake", rank=rank, world_size=p.world_size, store=FakeStore())
    try:
        dims = ParallelDims(dp=p.dp, tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep, etp=p.etp, sp=p.sp, world_size=p.world_size)
        meshes = dims.build_meshes("cpu")
        schedule = p.pp_schedule if recipe.mode == "train" else "gpipe"  # generation: forward only, 1 micro-batch
        _, parts = build_for_training(recipe, Ops.reference(), dims, meshes, torch.device("cpu"), schedule)
        return built_parameters(parts.model)
    finally:
        dist.destroy_process_group()


def _build_ranks(recipe, ranks: list[int]) -> list[dict[str, BuiltParameter]]:
    return [build_rank(recipe, rank) for rank in ranks]


def build_ranks(recipe, ranks: list[int]) -> list[dict[str, BuiltParameter]]:
    """build_rank for each of ranks, in a spawned process (the fake process group stays out of this one)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_build_ranks, recipe, ranks).result()


def built_rows(w: Workload, built: dict[str, BuiltParameter]) -> dict[str, float]:
    """The planner's parameter rows (weights, gradients, optimizer states) of one rank's built parameters: the
    local FSDP2 shard where the ZeRO level shards the row, the model-parallel tensor where it does not."""
    return {
        row: per_param
        * sum(b.local_numel if level is not None and w.zero >= level else math.prod(b.shape) for b in built.values())
        for row, level, per_param in parameter_rows(w)
    }


def compare(config, w: Workload, stage: int, built: dict[str, BuiltParameter], device) -> tuple[list[str], list[str]]:
    """(table lines, mismatches) of one rank's built parameters against the planner's shapes and memory rows."""
    expected = shard_shapes(config, w, stage)
    problems = [
        f"{name}: built, but the plan has no such parameter on stage {stage}" for name in built if name not in expected
    ]
    problems += [
        f"{name}: missing on stage {stage} (the plan expects {shape})"
        for name, shape in expected.items()
        if name not in built
    ]
    problems += [
        f"{name}: shape {built[name].shape}, the plan expects {shape}"
        for name, shape in expected.items()
        if name in built and built[name].shape != shape
    ]
    lines = [
        f"  stage {stage}: {len(built)} parameters, "
        f"{sum(math.prod(b.shape) for b in built.values()) / 1e9:.3f} B before ZeRO "
        f"(plan {sum(math.prod(s) for s in expected.values()) / 1e9:.3f} B)"
    ]
    planned = dict(stage_memory(config, w, device, stage).rows)
    for row, have in built_rows(w, built).items():
        want = planned[row]
        ok = abs(have - want) <= TOLERANCE * want
        lines.append(
            f"    {row:<18} built {have / GiB:9.3f} GiB   plan {want / GiB:9.3f} GiB   {'ok' if ok else 'MISMATCH'}"
        )
        if not ok:
            problems.append(f"stage {stage} {row}: built {have / GiB:.3f} GiB vs plan {want / GiB:.3f} GiB")
    return lines, problems


def dry_run(recipe, device_type: str | None = None, out: Callable[[str], Any] = print) -> None:
    """Build the first rank of every pipeline stage in a spawned process; MixtralError listing every mismatch."""
    config, w = recipe.model_config(), Workload.from_recipe(recipe)
    device = recipe_device(recipe, device_type)
    stage_size = w.world_size // w.pp
    ranks = [stage * stage_size for stage in range(w.pp)]
    out(
        f"dry run: {w.layout} on a fake process group of {w.world_size} ranks, meta device; building ranks "
        f"{ranks} (the first of each pipeline stage)"
    )
    built = build_ranks(recipe, ranks)
    problems = []
    for stage, params in enumerate(built):
        lines, found = compare(config, w, stage, params, device)
        for line in lines:
            out(line)
        problems += found
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise MixtralError(
            f"dry run of recipe {recipe.name}: the built shards differ from the plan in "
            f"{len(problems)} places: {shown}. Either mixtral.parallel lays this layout out "
            f"differently from mixtral.planner's rules, or the planner's rule is wrong; fix the one "
            f"that is off before launching"
        )
    out("  ok  every stage's parameter shapes and bytes match the plan")
