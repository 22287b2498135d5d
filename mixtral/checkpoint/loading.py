"""Any checkpoint in, a model out: HF directories, native (DCP) checkpoints and Megatron torch_dist saves.

generate, serve, convert and a recipe's `model.init_from` all read through here, so each takes every format,
and also a checkpoints root (its `latest`) or a training run directory (its `checkpoints/latest`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # private, same in torch 2.9

from mixtral.backend import Backend, Ops
from mixtral.checkpoint import hf
from mixtral.config import ModelConfig, MoEConfig
from mixtral.errors import MixtralError
from mixtral.model import Mixtral

LATEST = "latest"  # native.LATEST; native imports torch.distributed.checkpoint (seconds), so it loads lazily
RUN_CHECKPOINTS = "checkpoints"
EXPERT_SUFFIXES = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")  # [experts, ...]: readable expert by expert


class Source(Protocol):
    """Our parameters of one checkpoint, read on demand."""

    config: ModelConfig
    dtype: torch.dtype
    shapes: dict[str, torch.Size]  # our parameter names and shapes

    def read(self, name: str, expert: int | None = None) -> torch.Tensor:
        """Parameter `name`, or its expert slice [1, ...] when expert is given."""


def detect_format(path: str | Path) -> str:
    """hf (config.json + safetensors), native (manifest.json or a `latest` link) or megatron (metadata.json)."""
    from mixtral.checkpoint import megatron, native

    path = Path(path)
    if not path.is_dir():
        raise MixtralError(f"{path}: no such checkpoint directory")
    if megatron.is_megatron(path):
        return "megatron"
    if (path / native.MANIFEST).is_file() or (path / native.LATEST).exists():
        return "native"
    if (path / hf.CONFIG).is_file():
        return "hf"
    raise MixtralError(f"{path}: not a checkpoint mixtral-run knows: an HF directory holds config.json and "
                       f"*.safetensors, a native checkpoint {native.MANIFEST}, a Megatron torch_dist one "
                       f"{megatron.METADATA}")


def open_source(path: str | Path, config: str | None = None) -> tuple[str, Source]:
    """The format of path and a source reading our parameters from it."""
    from mixtral.checkpoint import megatron, native

    fmt = detect_format(path)
    if fmt == "hf":
        return fmt, hf.HFSource(path)
    if fmt == "native":
        return fmt, native.NativeSource(path)
    model_config = None
    if config is not None:
        model_config = ModelConfig.from_json(config) if Path(config).exists() else ModelConfig.preset(config)
    return fmt, megatron.MegatronSource(path, model_config)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory path means: the step `latest` names in a checkpoints root or in a run
    directory's checkpoints/, else path itself (resolved once, so a save moving `latest` cannot mix steps)."""
    path = Path(path)
    if not path.is_dir():
        raise MixtralError(f"{path}: model directory not found; pass an HF Mixtral directory, a native checkpoint, "
                           f"a checkpoints root or a training run directory")
    for latest in (path / LATEST, path / RUN_CHECKPOINTS / LATEST):
        if latest.is_dir():
            return latest.resolve()
    return path


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The model config of any checkpoint (headers and manifests only, no tensor data)."""
    return open_source(resolve_checkpoint(path))[1].config


def load_model(path: str | Path, backend: Backend | Ops | str | None = None, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", moe: MoEConfig | None = None) -> Mixtral:
    """A ready Mixtral (eval mode) from any checkpoint, read one tensor at a time into dtype on device."""
    source = open_source(resolve_checkpoint(path))[1]
    state = {name: source.read(name).to(dtype=dtype, device=device) for name in source.shapes}
    return hf.assemble_model(source.config, state, backend, device, moe)


def load_parameters(model: nn.Module, path: str | Path) -> None:
    """Copy every parameter of model from any checkpoint (fine-tuning's init_from); buffers keep their values.

    A sharded parameter (DTensor) receives only its local shard, and expert stacks are read only for the
    experts the shard holds, so memory stays about the shard plus one other tensor.
    """
    source = open_source(resolve_checkpoint(path))[1]
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = source.shapes.get(name)
            if shape != param.shape:
                held = f"has shape {list(shape)}" if shape is not None else "is missing"
                raise MixtralError(f"{path}: parameter '{name}' {held} there but the model's is {list(param.shape)}; "
                                   f"fine-tune with the checkpoint's sizes (drop model.* size overrides)")
            if isinstance(param, DTensor):
                _copy_local_shard(source, name, param)
            else:
                param.copy_(source.read(name))


def _copy_local_shard(source: Source, name: str, param: DTensor) -> None:
    """Fill this rank's shard of param from parameter `name`; expert stacks one held expert at a time."""
    sizes, offsets = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    box = tuple(slice(offset, offset + size) for offset, size in zip(offsets, sizes))
    local = param.to_local()
    if name.endswith(EXPERT_SUFFIXES):
        for i, expert in enumerate(range(box[0].start, box[0].stop)):
            local[i].copy_(source.read(name, expert)[0][box[1:]])
    else:
        local.copy_(source.read(name)[box])
