"""Weights filled in place, piece by piece, the same whatever the layout: random initialisation and checkpoints.

A rank holds parts of the model's parameters (a tensor-parallel slice, an FSDP shard, some experts); a `Piece`
says where one rectangle of its local tensor lies in the global parameter. Filling the pieces one at a time
(one expert at a time for expert stacks) means no rank ever builds a whole parameter it does not hold.

Random initialisation is a function of (seed, parameter name, position): the last two dims of a parameter are
cut into TILE x TILE tiles, each drawn from its own generator seeded from (seed, name, leading index, tile), on
the CPU. A shard draws just the tiles that overlap it, so one process and every layout of the same seed hold
bit-identical global weights, on every backend.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

TILE = 256
BLOCK_ELEMENTS = 1 << 22  # a piece is filled in blocks of rows up to this size (16 MiB in fp32), whole tiles tall
NORM_SUFFIXES = ("layernorm.weight", "norm.weight")  # RMSNorm gains: ones, not random


@dataclass(frozen=True)
class Piece:
    """One rectangle of a rank's local tensor (`local`) and the same rectangle in the global parameter (`box`)."""

    local: tuple[slice, ...]
    box: tuple[slice, ...]


Pieces = Callable[[str, torch.Tensor], list[Piece]]  # (parameter name, parameter as held) -> its pieces


def whole(shape: tuple[int, ...]) -> list[Piece]:
    """The pieces of a tensor held whole: one, covering it."""
    every = tuple(slice(0, n) for n in shape)
    return [Piece(every, every)]


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """What this rank stores of param: a DTensor's local shard, else the tensor itself."""
    return param.to_local() if hasattr(param, "to_local") else param


def held_pieces(name: str, param: torch.Tensor) -> list[Piece]:
    """Pieces of a parameter held whole (one process, or an SPMD program's global tensors)."""
    return whole(tuple(param.shape))


def blocks(piece: Piece) -> Iterator[Piece]:
    """piece cut into blocks filled one at a time: one leading index (one expert) at a time, and rows in runs of
    whole tiles up to BLOCK_ELEMENTS, so a fill never holds more than a block besides the tensor it fills."""
    lead_local, lead_box = piece.local[:-2], piece.box[:-2]
    for offsets in itertools.product(*(range(s.stop - s.start) for s in lead_box)):
        local = tuple(slice(s.start + o, s.start + o + 1) for s, o in zip(lead_local, offsets))
        box = tuple(slice(s.start + o, s.start + o + 1) for s, o in zip(lead_box, offsets))
        if len(piece.box) < 2:
            yield piece
            continue
        (rows_local, cols_local), (rows, cols) = piece.local[-2:], piece.box[-2:]
        step = max(1, BLOCK_ELEMENTS // max(1, (cols.stop - cols.start) * TILE)) * TILE
        start, shift = rows.start, rows_local.start - rows.start
        while start < rows.stop:
            stop = min(rows.stop, (start // TILE) * TILE + step)  # blocks end on tile edges
            yield Piece(local + (slice(start + shift, stop + shift), cols_local), box + (slice(start, stop), cols))
            start = stop


def tile_seed(seed: int, name: str, lead: tuple[int, ...], row: int, col: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{lead}/{row}/{col}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def normal_values(seed: int, name: str, shape: tuple[int, ...], box: tuple[slice, ...], std: float) -> torch.Tensor:
    """normal(0, std) values of parameter `name` (global shape) inside box, fp32 on the CPU, drawn tile by tile."""
    shape2 = (1,) * (2 - len(shape)) + tuple(shape)  # 1-D: one row
    box2 = (slice(0, 1),) * (2 - len(box)) + tuple(box)
    rows_total, cols_total = shape2[-2:]
    rows, cols = box2[-2:]
    out = torch.empty([s.stop - s.start for s in box2])
    for lead in itertools.product(*(range(s.start, s.stop) for s in box2[:-2])):
        target = out[tuple(i - s.start for i, s in zip(lead, box2[:-2]))]
        for i in range(rows.start // TILE, math.ceil(rows.stop / TILE)):
            for j in range(cols.start // TILE, math.ceil(cols.stop / TILE)):
                r0, c0 = i * TILE, j * TILE
                tile = torch.empty(min(TILE, rows_total - r0), min(TILE, cols_total - c0))
                tile.normal_(0.0, std, generator=torch.Generator().manual_seed(tile_seed(seed, name, lead, i, j)))
                r1, c1 = max(rows.start, r0), max(cols.start, c0)
                r2, c2 = min(rows.stop, r0 + tile.shape[0]), min(cols.stop, c0 + tile.shape[1])
                target[r1 - rows.start : r2 - rows.start, c1 - cols.start : c2 - cols.start] = tile[
                    r1 - r0 : r2 - r0, c1 - c0 : c2 - c0
                ]
    return out.view([s.stop - s.start for s in box])


@torch.no_grad()
def init_parameters(
    module: nn.Module, shapes: dict[str, torch.Size], seed: int, std: float = 0.02, pieces: Pieces = held_pieces
) -> None:
    """Fresh training init of every parameter of module (named as in Mixtral): normal(0, std) matrices, unit
    norms; shapes are the global shapes by name, pieces where this rank's tensors lie in them."""
    for name, param in module.named_parameters():
        local = local_tensor(param)
        if name.endswith(NORM_SUFFIXES):
            local.fill_(1.0)
            continue
        for piece in pieces(name, param):
            for block in blocks(piece):
                local[block.local].copy_(normal_values(seed, name, tuple(shapes[name]), block.box, std))
