"""Training checkpoints: native (DCP) checkpoints with the trainer's state, published by save_native_step.

`<dir>/step_XXXXXXXX/` holds the model and the optimizer state as DCP keys (`model.*`, `optimizer.*`, so a
sharded run saves its shards and any layout loads them), `manifest.json` whose `extra.trainer` holds the
loop's counters and data position, `rng/rank_NNNNN.pt` (each rank's RNG states) and `tokenizer.model`.
Everything is written before the directory is renamed into place and `latest` moves (checkpoint.native),
so a crash at any point leaves `latest` loadable; `mixtral-run generate --model <dir>/latest` reads it.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from mixtral.checkpoint.hf import TOKENIZER
from mixtral.checkpoint.native import LATEST, Manifest, load_native, remove_stale_temporaries, save_native_step
from mixtral.checkpoint.native import published as latest_step_dir
from mixtral.config import ModelConfig
from mixtral.errors import MixtralError
from mixtral.parallel.expert_parallel import ExpertCheckpointViews

TRAINER_KEY = "trainer"  # manifest extra: step, tokens, skipped, loader, world_size
RNG_DIR = "rng"
__all__ = [
    "LATEST",
    "latest_step_dir",
    "load_training_checkpoint",
    "optimized_module",
    "remove_stale_temporaries",
    "save_training_checkpoint",
]  # the trainer's whole interface; publishing itself is checkpoint.native's


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rng_file(step_dir: Path, rank: int) -> Path:
    return step_dir / RNG_DIR / f"rank_{rank:05d}.pt"


def rng_state(device_type: str) -> dict[str, Any]:
    """Every RNG a training step may draw from (router jitter, init), to resume bit-identically."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    module = getattr(torch, device_type, None)
    if device_type != "cpu" and hasattr(module, "get_rng_state_all"):
        state["device"] = module.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device_type: str) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "device" in state:
        getattr(torch, device_type).set_rng_state_all(state["device"])


def optimized_module(model: nn.Module, masters: list[torch.Tensor]) -> nn.Module:
    """The module whose parameters the optimizer steps: the model, or (fp32 masters of bf16 parameters) a
    module with the model's names and buffers holding the masters, so DCP keys both alike."""
    if not masters:
        return model
    holder = nn.Module()
    holder.config = model.config
    tensors = model.state_dict(keep_vars=True)
    tensors.update(zip((name for name, _ in model.named_parameters()), masters))
    for name, tensor in tensors.items():
        path, _, leaf = name.rpartition(".")
        owner = holder
        for part in path.split(".") if path else ():
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if isinstance(tensor, nn.Parameter):
            owner.register_parameter(leaf, tensor)
        else:
            owner.register_buffer(leaf, tensor)
    return holder


def _fsync(file: Path) -> None:
    """On disk before the directory is published (DCP and the manifest sync their own files)."""
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())


def _save_fsynced(obj: Any, file: Path) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, file)
    _fsync(file)


def save_training_checkpoint(
    ckpt_dir: Path,
    step: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: ModelConfig,
    trainer_state: dict[str, Any],
    keep_last: int,
    layout: dict[str, int] | None = None,
    tokenizer_path: str | Path | None = None,
    device_type: str = "cpu",
    views: ExpertCheckpointViews | None = None,
) -> Path:
    """Publish step's checkpoint (collective on many ranks): model and optimizer shards, trainer state, RNG.
    views: the state dicts as DCP should see them (expert_parallel.expert_checkpoint_views)."""
    rng = rng_state(device_type)

    def add_files(tmp: Path) -> None:
        _save_fsynced(rng, rng_file(tmp, _rank()))
        if _rank() == 0 and tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
            _fsync(tmp / TOKENIZER)

    extra = {TRAINER_KEY: {**trainer_state, "world_size": _world_size()}}
    model_state, optimizer_state = get_model_state_dict(module), get_optimizer_state_dict(module, optimizer)
    if views is not None:
        model_state, optimizer_state = views(model_state), views(optimizer_state)
        views.gathered.clear()  # what a load would restore into: nothing to restore after a save
    return save_native_step(
        ckpt_dir,
        step,
        model_state,
        optimizer_state,
        config=config,
        layout=layout,
        manifest_extra=extra,
        keep_last=keep_last,
        add_files=add_files,
    )


def load_training_checkpoint(
    step_dir: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    device_type: str = "cpu",
    views: ExpertCheckpointViews | None = None,
) -> dict[str, Any]:
    """Load model and optimizer (resharded to module's layout) and this rank's RNG; returns the trainer state.

    The RNG states are restored only when the world size matches the saving run's (each rank has its own);
    on another layout the run continues with the RNG it was started with, so it is not bit-identical.
    """
    manifest: Manifest = load_native(step_dir, module, optimizer, views)
    state = manifest.extra.get(TRAINER_KEY)
    if not isinstance(state, dict):
        raise MixtralError(
            f"{step_dir}: holds no trainer state (a converted or weights-only checkpoint); --resume "
            f"needs a checkpoint written by training: start a fresh run with model.init_from={step_dir}"
        )
    if state.get("world_size") == _world_size():
        file = rng_file(step_dir, _rank())
        try:
            set_rng_state(torch.load(file, map_location="cpu", weights_only=True), device_type)
        except (OSError, RuntimeError, EOFError, KeyError) as exc:
            raise MixtralError(
                f"{file}: unreadable RNG state ({type(exc).__name__}: {exc}); resume from an older "
                f"checkpoint by pointing {LATEST} at it"
            ) from None
    else:
        warnings.warn(
            f"{step_dir} was saved by {state.get('world_size')} ranks, this run has {_world_size()}: "
            f"weights, optimizer and data position resume, the random streams restart from train.seed",
            stacklevel=2,
        )
    return state
