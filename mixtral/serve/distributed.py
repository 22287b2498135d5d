"""Generating and serving on several ranks: rank 0 leads, the other ranks replay every model call it makes.

Under tensor or expert parallelism every rank must run each forward together (their collectives pair
up), but only rank 0 decides what to run: the HTTP server, the scheduler and the sampler live there.
The leader broadcasts each call (method and arguments) before making it; followers replay the calls
until the leader says stop. The logits are replicated over these layouts, so rank 0's are the model's.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixtral.config import EP_COMMS, ModelConfig
from mixtral.errors import MixtralError
from mixtral.model import Mixtral
from mixtral.serve.engine import inference_mode

STOP = "stop"
MIRRORED = ("forward", "setup_caches", "clear_caches")


def _to(value: Any, device: torch.device) -> Any:
    """Tensors and devices among a call's arguments moved to `device` (CPU to pickle them, the model's to run)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, torch.device):
        return device
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class Leader:
    """Rank 0's stand-in for the model: the same calls, each announced to the followers first."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        self._model, self._group = model, group

    def __getattr__(self, name: str) -> Any:  # config, layers, embed_tokens...: the model's own
        return getattr(self._model, name)

    def eval(self) -> Leader:
        self._model.eval()
        return self

    def _announce(self, method: str, args: tuple, kwargs: dict) -> None:
        message = [(method, _to(args, torch.device("cpu")), _to(kwargs, torch.device("cpu")))]
        dist.broadcast_object_list(
            message, src=dist.get_global_rank(self._group, 0) if self._group else 0, group=self._group
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._announce("forward", args, kwargs)
        return self._model(*args, **kwargs)

    def setup_caches(self, *args: Any, **kwargs: Any) -> None:
        self._announce("setup_caches", args, kwargs)
        self._model.setup_caches(*args, **kwargs)

    def clear_caches(self) -> None:
        self._announce("clear_caches", (), {})
        self._model.clear_caches()

    def stop(self) -> None:
        """Release the followers (their follow() returns)."""
        self._announce(STOP, (), {})


def follow(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Replay the leader's model calls until it stops; returns how many calls were replayed."""
    device = next(model.parameters()).device
    src = dist.get_global_rank(group, 0) if group else 0
    model.eval()
    replayed = 0
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=src, group=group)
        method, args, kwargs = message[0]
        if method == STOP:
            return replayed
        if method not in MIRRORED:
            raise RuntimeError(f"the leader sent an unknown call '{method}'")
        with inference_mode(device):
            getattr(model, method)(*_to(args, device), **_to(kwargs, device))
        replayed += 1


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several ranks (rank 0 prints or serves; under torchrun or --nproc-per-node)")
    group.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="start N workers on this host through torch.distributed.run",
    )
    group.add_argument("--tp", type=int, default=1, help="tensor parallel ranks")
    group.add_argument("--ep", type=int, default=1, help="expert parallel ranks (fold over the tp x data ranks)")
    group.add_argument("--pp", type=int, default=1, help="pipeline stages")
    group.add_argument("--ep-comm", choices=EP_COMMS, default="alltoall", help="expert parallel exchange")


def generation_meshes(config: ModelConfig, args: argparse.Namespace, device: torch.device) -> tuple[Any, Any]:
    """(ParallelDims, ParallelMeshes) of this job's ranks for generation: tensor, expert and pipeline parallel as
    asked; the ranks left over (world / (tp x pp)) are data ranks that hold replicas (and fold the experts)."""
    from mixtral.parallel import ParallelDims

    world = dist.get_world_size()
    if world % (args.tp * args.pp):
        raise MixtralError(
            f"--tp {args.tp} x --pp {args.pp} does not divide the {world} ranks; launch a multiple "
            f"of {args.tp * args.pp} ranks or change --tp/--pp"
        )
    dims = ParallelDims(world_size=world, dp=world // (args.tp * args.pp), tp=args.tp, pp=args.pp, ep=args.ep)
    dims.validate_model(config)
    return dims, dims.build_meshes(device.type)


def parallel_model(model: Mixtral, dims, meshes, device: torch.device) -> tuple[Any, nn.Module]:
    """model (on the meta device, built with the meshes' model_layout) laid out for generation: tensor parallel,
    and cut into pipeline stages. Returns (what generation calls, the part this rank holds): materialise the part,
    then call."""
    from mixtral.parallel import PipelinedModel, PipelineStageModel, apply_tensor_parallel
    from mixtral.parallel.pipeline_parallel import Pipeline

    if dims.tp > 1:
        apply_tensor_parallel(model, meshes["tp"])
    if dims.pp == 1:
        return model, model
    stage = PipelineStageModel(model, meshes["pp"].get_local_rank(), dims.pp)
    return PipelinedModel(Pipeline(stage, meshes["pp"], 1, "gpipe", device), model), stage


def lead_or_follow(model: Any, lead: Callable[[Any], int]) -> int:
    """Rank 0 returns lead(its Leader), and releases the others however lead ends; they replay its calls."""
    if dist.get_rank() != 0:
        follow(model)
        return 0
    leader = Leader(model)
    try:
        return lead(leader)
    finally:
        leader.stop()
