"""What this rank holds of the model and how, handed to Mixtral when it is built.

mixtral.parallel makes one from the device meshes (parallel.model_layout); the model only calls what it holds, so it
names no process group, and nothing outside the model reaches in to change it afterwards. The default is one process
that holds every expert and every position in floating point; generation may hold the large weights as int8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]  # a tensor combined over some ranks (a sum, a max, a gather)


@dataclass(frozen=True)
class ModelLayout:
    experts: int | None = None  # experts each rank holds (expert parallelism); None: all of them
    expert_ffn: int | None = None  # intermediate rows of each held expert (expert tensor parallelism)
    exchange: Callable | None = None  # the MoE's dispatched rows to the ranks holding their experts and back:
    # (moe, tokens, routing, batch) -> (output, dispatch context)
    agree_capacity: Reduce | None = None  # capacity bins: the largest expert count over the ranks sharing a shape
    context: tuple[int, int] = (0, 1)  # (this rank's chunk, chunks) of every sequence (context parallelism)
    gather_kv: Reduce | None = None  # a chunk's keys or values -> the whole sequence's
    attention: Callable | None = None  # replaces ops.attention (ring attention over the chunks)
    swiglu: Callable | None = None  # replaces ops.swiglu for the experts (SPMD's interleaved gate/up rows)
    int8: bool = False  # projections and experts held as int8 with per-output-channel scales (generation)
