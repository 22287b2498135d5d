"""Any checkpoint in, a model out: HF directories, native (DCP) checkpoints and Megatron torch_dist saves.

generate, serve, convert and a recipe's `model.init_from` all read through here, so each takes every format,
and also a checkpoints root (its `latest`) or a training run directory (its `checkpoints/latest`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from mixtral.backend import Backend, Ops
from mixtral.checkpoint import hf, hub
from mixtral.config import ModelConfig, MoEConfig
from mixtral.errors import MixtralError
from mixtral.kernels import reference
from mixtral.model import Mixtral
from mixtral.model.init import Pieces, blocks, held_pieces, local_tensor
from mixtral.model.linear import int8_scale_name

LATEST = "latest"  # native.LATEST; native imports torch.distributed.checkpoint (seconds), so it loads lazily
RUN_CHECKPOINTS = "checkpoints"


class Source(Protocol):
    """Our parameters of one checkpoint, read on demand."""

    config: ModelConfig
    dtype: torch.dtype
    shapes: dict[str, torch.Size]  # our parameter names and shapes

    def read(self, name: str, expert: int | None = None) -> torch.Tensor:
        """Parameter `name`, or its expert slice [1, ...] when expert is given."""

    def read_box(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        """The box (one slice per dim) of parameter `name`, reading no more of the file than it needs."""


class ModuleSource:
    """A model in memory as a checkpoint source: a laid-out copy of it reads its own pieces from here."""

    def __init__(self, model: nn.Module) -> None:
        self.config = model.config
        self.state = {name: p.detach() for name, p in model.named_parameters()}
        self.shapes = {name: t.shape for name, t in self.state.items()}
        self.dtype = self.state["embed_tokens.weight"].dtype

    def read(self, name: str, expert: int | None = None) -> torch.Tensor:
        return self.state[name] if expert is None else self.state[name][expert : expert + 1]

    def read_box(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        return self.state[name][box]


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
    raise MixtralError(
        f"{path}: not a checkpoint mixtral-run knows: an HF directory holds config.json and "
        f"*.safetensors, a native checkpoint {native.MANIFEST}, a Megatron torch_dist one "
        f"{megatron.METADATA}"
    )


def local_checkpoint(path: str | Path) -> Path:
    """path as a local directory: itself, or a Hugging Face model ID's snapshot in the Hub cache."""
    return hub.snapshot(path) if hub.is_model_id(path) else Path(path)


def open_source(path: str | Path, config: str | None = None) -> tuple[str, Source]:
    """The format of path (a directory or a Hub model ID) and a source reading our parameters from it."""
    from mixtral.checkpoint import megatron, native

    path = local_checkpoint(path)
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
    directory's checkpoints/, else path itself (resolved once, so a save moving `latest` cannot mix steps); a Hub
    model ID is its cached snapshot."""
    path = local_checkpoint(path)
    if not path.is_dir():
        raise MixtralError(
            f"{path}: model directory not found; pass an HF Mixtral directory, a native checkpoint, "
            f"a checkpoints root or a training run directory"
        )
    for latest in (path / LATEST, path / RUN_CHECKPOINTS / LATEST):
        if latest.is_dir():
            return latest.resolve()
    return path


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The model config of any checkpoint (headers and manifests only, no tensor data)."""
    return open_source(resolve_checkpoint(path))[1].config


def load_model(
    path: str | Path,
    backend: Backend | Ops | str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    moe: MoEConfig | None = None,
) -> Mixtral:
    """A ready Mixtral (eval mode) from any checkpoint: built on the meta device, materialised on device in dtype,
    then filled one tensor at a time (the weights exist once)."""
    from mixtral.build import build_on_meta, materialize

    path = resolve_checkpoint(path)
    model = build_on_meta(checkpoint_config(path), backend, moe, dtype)
    materialize(model, model, device, init_from=path)
    return model.eval()


def load_parameters(
    module: nn.Module,
    path: str | Path | Source,
    pieces: Pieces = held_pieces,
    shapes: dict[str, torch.Size] | None = None,
) -> None:
    """Copy every parameter of module from any checkpoint (fine-tuning's init_from); buffers keep their values, but
    for the scales of int8 weights, which come with them.

    shapes are the model's global shapes (default: the parameters' own), pieces where this rank's tensors lie in
    them (mixtral.parallel.ShardMap): each rank reads only what it holds, expert stacks one expert at a time, so
    memory stays about the rank's shards plus one tensor. Float weights are quantized as they are read into int8
    parameters; a checkpoint stored in int8 (with its scales) fills int8 parameters as it is, float ones dequantized.
    """
    source = open_source(resolve_checkpoint(path))[1] if isinstance(path, (str, Path)) else path
    buffers = dict(module.named_buffers())
    with torch.no_grad():
        for name, param in module.named_parameters():
            shape, want = source.shapes.get(name), (shapes or {}).get(name, param.shape)
            if shape != want:
                held = f"has shape {list(shape)}" if shape is not None else "is missing"
                raise MixtralError(
                    f"{path}: parameter '{name}' {held} there but the model's is {list(want)}; "
                    f"fine-tune with the checkpoint's sizes (drop model.* size overrides)"
                )
            local = local_tensor(param)
            scale = local_tensor(buffers[int8_scale_name(name)]) if param.dtype == torch.int8 else None
            for piece in pieces(name, param):
                for block in blocks(piece):
                    if scale is not None and block.box[-1] != slice(0, want[-1]):
                        raise MixtralError(
                            f"int8 weights need whole rows on each rank, but '{name}' is split along its "
                            f"columns here (tensor parallelism): drop --tp, or use --dtype bf16"
                        )
                    value, scales = read_int8_aware(source, name, block.box, scale)
                    local[block.local].copy_(value)
                    if scale is not None:
                        scale[block.local[:-1]].copy_(scales)


def read_int8_aware(
    source: Source, name: str, box: tuple[slice, ...], scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values, scales) of parameter name inside box, for an int8 parameter (scale: its scale buffer) or a float one
    (scale None): stored int8 read as it is or dequantized, float quantized or read as it is."""
    value = source.read_box(name, box)
    if int8_scale_name(name) not in source.shapes:
        return reference.quantize_int8(value, scale.dtype) if scale is not None else (value, None)
    scales = source.read_box(int8_scale_name(name), box[:-1])
    if scale is not None:
        return value, scales
    return value.float() * scales.float().unsqueeze(-1), None
