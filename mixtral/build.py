"""The one way every command builds a Mixtral: on the meta device, laid out, then only this rank's shards made real.

1. build_on_meta: the whole model's structure, no memory.
2. the layout: expert and context parallelism when the model is built (mixtral.parallel.model_layout), then on
   meta mixtral.parallel.parallelize for training (TP/SP, the pipeline stage's blocks, FSDP2), the generation
   layout (mixtral.serve.distributed), or nothing on one process.
3. materialize: this rank's part allocated on its device (to_empty), buffers recomputed, then every parameter
   filled in place, one tensor (one expert) at a time: a layout-independent random init (mixtral.model.init) or a
   checkpoint read piece by piece (mixtral.checkpoint.loading).
`recipe validate --dry-run` runs build_for_training and stops before materialize, so what it reports is what the
run allocates. No rank ever holds a parameter it does not own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mixtral.backend import Backend, Ops, get_backend
from mixtral.checkpoint.loading import Source, load_parameters
from mixtral.config import ModelConfig, MoEConfig
from mixtral.model import Mixtral
from mixtral.model.init import init_parameters
from mixtral.model.layout import ModelLayout
from mixtral.parallel import ParallelDims, Parallelized, ParallelMeshes, ShardMap, model_layout, parallelize


def build_on_meta(
    config: ModelConfig,
    backend: Backend | Ops | str | None = None,
    moe: MoEConfig | None = None,
    dtype: torch.dtype = torch.float32,
    recompute: str = "none",
    layout: ModelLayout | None = None,
) -> Mixtral:
    """The model on the meta device, its parameters and buffers in dtype (recompute and layout: Mixtral's)."""
    backend = get_backend(backend) if isinstance(backend, str) else backend
    with torch.device("meta"):
        model = Mixtral(config, backend, moe, recompute, layout)
    return model.to(dtype=dtype)


def build_for_training(
    recipe,
    backend: Backend | Ops,
    dims: ParallelDims | None,
    meshes: ParallelMeshes | None,
    device: torch.device,
    pp_schedule: str | None = None,
    loss: Callable | None = None,
    layout: ModelLayout | None = None,
) -> tuple[Mixtral, Parallelized]:
    """A training run's model on meta: the whole model and this rank's laid-out part (and pipeline, whose last
    stage computes loss); pp_schedule overrides the recipe's (a forward-only dry run); layout is the model's when
    there are no meshes (an SPMD backend's)."""
    r, p = recipe, recipe.parallel
    dtype = torch.bfloat16 if r.precision == "bf16_master" else torch.float32
    if meshes is not None:
        layout = model_layout(r.model_config(), r.moe, meshes, ep_comm=r.moe.ep_comm, cp_algo=p.cp_algo)
    model = build_on_meta(r.model_config(), backend, r.moe, dtype, r.activation_checkpointing, layout)
    if r.compile and isinstance(backend, Backend):
        for layer in model.layers:  # before the layout, as torchtitan does; one graph serves every block
            backend.compile(layer)
    if meshes is None:
        return model, Parallelized(model, None)
    return model, parallelize(
        model,
        dims,
        meshes,
        zero=p.zero,
        pp_schedule=pp_schedule or p.pp_schedule,
        microbatches=r.grad_accum,
        device=device,
        loss=loss,
    )


def materialize(
    model: Mixtral,
    part: nn.Module,
    device: torch.device | str,
    meshes: ParallelMeshes | None = None,
    *,
    seed: int | None = None,
    init_from: str | Path | Source | None = None,
    std: float = 0.02,
) -> None:
    """Allocate part (this rank's share of model, laid out on meta) on device and fill it: from init_from (any
    checkpoint) or a random init of seed that every layout of the seed shares."""
    part.to_empty(device=device)
    model.init_buffers(device)
    shards = ShardMap(model.config, meshes)
    if init_from is not None:
        load_parameters(part, init_from, shards, shards.shapes)
    else:
        init_parameters(part, shards.shapes, int(torch.randint(2**62, ())) if seed is None else seed, std, shards)
