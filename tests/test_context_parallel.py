"""Context parallel layouts train 3 steps on real gloo ranks with the same loss and every gradient as one process.

Each rank runs one contiguous chunk of every sequence; the losses cover the context ranks' whole batch
(TrainingLoss over the data x context ranks), so the reference is one process on the whole batch, no accumulation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from test_expert_parallel import gather_expert_grads
from test_parallel_equivalence import assert_matches, train
from torch import nn

from mixtral.backend import Ops
from mixtral.errors import MixtralError
from mixtral.model import Mixtral
from mixtral.parallel import (
    ParallelDims,
    apply_data_parallel,
    apply_expert_data_parallel,
    context_layout,
    mean_over,
    shard_sequence,
)
from mixtral.train.loss import TrainingLoss

from conftest import single_thread, small_config
from dist_utils import laid_out_copy, run_layouts


@dataclass(frozen=True)
class Layout:
    dims: dict
    world: int = 2
    zero: int = 0
    window: int | None = None  # sliding_window: masks that reach back into other chunks only partly
    algo: str = "allgather"


LAYOUTS = {
    "cp2": Layout(dict(cp=2)),
    "cp2_sliding_window": Layout(dict(cp=2), window=5),
    "cp2_ring": Layout(dict(cp=2), algo="ring"),
    "cp2_ring_sliding_window": Layout(dict(cp=2), window=5, algo="ring"),
    "cp2_ep2": Layout(dict(cp=2, ep=2), zero=0),
    "cp4_ring": Layout(dict(cp=4), world=4, algo="ring"),  # three shifts, blocks merged in ring order
}


def make_model(window: int | None) -> Mixtral:
    torch.manual_seed(0)
    model = Mixtral(small_config(num_local_experts=4, sliding_window=window), Ops.reference())
    model.init_weights()
    return model


class SequenceChunkLoss:
    """The loss over the data x context ranks of this rank's chunk of every sequence, as a context parallel data
    loader feeds it."""

    def __init__(self, loss: TrainingLoss, cp_mesh) -> None:
        self.loss, self.cp_mesh = loss, cp_mesh

    def of(self, model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor):
        return self.loss.of(model, shard_sequence(tokens, self.cp_mesh), shard_sequence(targets, self.cp_mesh))


def _run_layouts(names: list[str]) -> dict:
    """One rank's part: every named layout on the same process group, gradients keyed as the bare model's."""
    results = {}
    for name in names:
        layout = LAYOUTS[name]
        dims = ParallelDims(world_size=dist.get_world_size(), **layout.dims)
        meshes = dims.build_meshes("cpu")
        model = laid_out_copy(make_model(layout.window), meshes, Ops.reference(), cp_algo=layout.algo)
        if dims.ep > 1:
            apply_expert_data_parallel(model, meshes, layout.zero)
        apply_data_parallel(model, meshes.dp_cp, layout.zero)
        loss = SequenceChunkLoss(TrainingLoss(model.config, model.moe, meshes.dp_cp.get_group()), meshes["cp"])
        losses, ce_losses, grads = train(model, 1, range(1), layout.zero, loss)
        if dims.ep > 1:
            gather_expert_grads(model, grads, meshes)
        reduce = functools.partial(mean_over, mesh=meshes.dp_cp)
        results[name] = ([reduce(loss).item() for loss in losses], [reduce(c).item() for c in ce_losses], grads)
    if dist.get_world_size() == 2:
        results["rejections"] = _rejections(meshes["cp"])
    return results


def _rejections(cp_mesh) -> list[str]:
    messages = []
    for reject in (lambda: context_layout(cp_mesh, "ulysses"), lambda: shard_sequence(torch.zeros(1, 7), cp_mesh)):
        try:
            reject()
        except MixtralError as error:
            messages.append(str(error))
    return messages


@pytest.fixture(scope="module")
def distributed() -> dict:
    """Rank 0's results of every layout: one spawn per world size."""
    return run_layouts(_run_layouts, LAYOUTS)


@functools.cache
def reference(window: int | None) -> tuple:
    with single_thread():
        return train(make_model(window), 1, range(1))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_context_layout_matches_one_process(distributed, name: str) -> None:
    assert_matches(distributed[name], reference(LAYOUTS[name].window), name)


def test_unsupported_algo_and_uneven_sequence_are_rejected(distributed) -> None:
    assert distributed["rejections"] == [
        "parallel.cp_algo 'ulysses' is unknown; choose one of: allgather, ring",
        "sequence length 7 is not divisible by parallel.cp = 2; use a sequence length that is a multiple of 2",
    ]
