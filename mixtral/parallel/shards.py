"""Where this rank's parameter tensors lie in the model's global parameters, under any torch.distributed layout.

Two mechanisms shard a parameter: DTensor placements (tensor parallelism, FSDP2, which describe themselves) and
expert parallelism, which keeps a plain local stack of this rank's experts under the global name (and, under
expert tensor parallelism, its rows j of the gate and of the up halves, or its columns j of down_proj). Each
dim of a local tensor is a list of segments of the global dim; a DTensor shard is a window on them; the
pieces are their products. Initialisation and checkpoint loading fill those pieces (mixtral.model.init).
"""

from __future__ import annotations

import itertools

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # private, same in torch 2.9

from mixtral.config import ModelConfig
from mixtral.model.init import Piece
from mixtral.model.moe import EXPERT_SUFFIXES
from mixtral.model.transformer import parameter_shapes
from mixtral.parallel.dims import ParallelMeshes

Segments = list[tuple[int, int]]  # (global start, length) pieces of one dim, in local order


def expert_segments(name: str, config: ModelConfig, meshes: ParallelMeshes) -> list[Segments]:
    """Per dim, where an expert parallel rank's stack of parameter `name` lies in the global stack."""
    experts, hidden, ffn = config.num_local_experts, config.hidden_size, config.intermediate_size
    local = experts // meshes["ep"].size()
    held = [(meshes["ep"].get_local_rank() * local, local)]
    part = ffn // meshes["etp"].size()
    first = meshes["etp"].get_local_rank() * part
    if name.endswith("down_proj"):  # [E, H, F]: columns j of etp
        return [held, [(0, hidden)], [(first, part)]]
    return [held, [(first, part), (ffn + first, part)], [(0, hidden)]]  # [E, 2F, H]: rows j of gate and of up


def window(segments: Segments, start: int, size: int) -> list[tuple[int, int, int]]:
    """The (local start within the window, global start, length) runs of local positions [start, start + size)."""
    runs, position = [], 0
    for first, length in segments:
        lo, hi = max(position, start), min(position + length, start + size)
        if lo < hi:
            runs.append((lo - start, first + lo - position, hi - lo))
        position += length
    return runs


class ShardMap:
    """The pieces of each of this rank's parameters (mixtral.model.init.Pieces) and the model's global shapes."""

    def __init__(self, config: ModelConfig, meshes: ParallelMeshes | None = None) -> None:
        self.config, self.meshes = config, meshes
        self.shapes = parameter_shapes(config)

    def is_expert_shard(self, name: str) -> bool:
        return self.meshes is not None and self.meshes.expert is not None and name.endswith(EXPERT_SUFFIXES)

    def __call__(self, name: str, param: torch.Tensor) -> list[Piece]:
        shape = tuple(param.shape)  # a DTensor's global shape: the expert parallel stack's, or the model's
        if self.is_expert_shard(name):
            segments = expert_segments(name, self.config, self.meshes)
        else:
            segments = [[(0, n)] for n in shape]
        sizes, offsets = shape, (0,) * len(shape)
        if isinstance(param, DTensor):
            sizes, offsets = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        runs = [window(seg, offset, size) for seg, offset, size in zip(segments, offsets, sizes)]
        return [
            Piece(
                tuple(slice(local, local + n) for local, _, n in combo),
                tuple(slice(first, first + n) for _, first, n in combo),
            )
            for combo in itertools.product(*runs)
        ]
