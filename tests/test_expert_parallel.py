"""Expert parallel layouts train 3 steps on real gloo ranks with the same loss and every gradient as one process.

EP folds over tp ranks (same tokens) or dp ranks (different tokens); ETP splits each expert's intermediate
dim over tp. Forced routing (an expert-selection bias, which moves choices but never weights) gives
zero-token experts, an ep rank that receives nothing and very uneven splits. The reference accumulates
the dp ranks' micro-batches in one process, as tests/test_parallel_equivalence.py explains.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
from test_parallel_equivalence import assert_matches, train

from mixtral.backend import Ops
from mixtral.config import MoEConfig
from mixtral.errors import MixtralError
from mixtral.model import Mixtral
from mixtral.parallel import (
    ParallelDims,
    apply_data_parallel,
    apply_expert_data_parallel,
    apply_tensor_parallel,
    expert_parameters,
    full_expert_weight,
    mean_over,
    model_layout,
)

from conftest import single_thread, small_config
from dist_utils import laid_out_copy, run_layouts

EXPERTS = 4
NO_RANK1 = (0.0, 0.0, -1e4, -1e4)  # experts 2 and 3 (ep rank 1's) never chosen: rank 1 receives nothing
SKEWED = (1.0, -1e4, 0.0, 0.0)  # expert 0 takes every token, expert 1 none: uneven splits
CAPACITY = dict(dispatcher="capacity", capacity_factor=1.0)  # drops pairs (skewed: many)
BINS = dict(dispatcher="capacity_bins", capacity_bins=dict(num_bins=2, alignment=4))  # bins for 32-token batches


@dataclass(frozen=True)
class Layout:
    world: int
    dims: dict
    comm: str = "alltoall"
    moe: dict = field(default_factory=dict)
    bias: tuple | None = None
    experts: int = EXPERTS

    @property
    def micro_batches(self) -> int:
        return self.dims.get("dp", 1)


LAYOUTS = {
    "ep2_alltoall": Layout(2, dict(tp=2, sp=True, ep=2)),
    "ep2_allgather": Layout(2, dict(tp=2, sp=True, ep=2), "allgather"),
    "tp2_sp_etp2": Layout(2, dict(tp=2, sp=True, etp=2)),  # every expert on both ranks, split by etp
    "dp2_ep2_alltoall": Layout(2, dict(dp=2, ep=2)),
    "dp2_ep2_allgather": Layout(2, dict(dp=2, ep=2), "allgather"),
    "dp2_ep2_alltoall_rank1_idle": Layout(2, dict(dp=2, ep=2), bias=NO_RANK1),
    "dp2_ep2_allgather_rank1_idle": Layout(2, dict(dp=2, ep=2), "allgather", bias=NO_RANK1),
    "dp2_ep2_alltoall_capacity_skewed": Layout(2, dict(dp=2, ep=2), moe=CAPACITY, bias=SKEWED),
    "dp2_ep2_allgather_capacity_skewed": Layout(2, dict(dp=2, ep=2), "allgather", moe=CAPACITY, bias=SKEWED),
    "dp2_ep2_alltoall_packed_skewed": Layout(
        2, dict(dp=2, ep=2), moe=dict(CAPACITY, pad_to_capacity=False), bias=SKEWED
    ),
    "dp2_ep2_alltoall_capacity_bins": Layout(2, dict(dp=2, ep=2), moe=BINS),
    "dp2_tp2_sp_ep2_etp2_allgather": Layout(4, dict(dp=2, tp=2, sp=True, ep=2, etp=2), "allgather"),
    "dp2_tp2_sp_ep2_etp2_alltoall": Layout(4, dict(dp=2, tp=2, sp=True, ep=2, etp=2)),
    "dp2_tp2_sp_ep2_alltoall_edp2": Layout(4, dict(dp=2, tp=2, sp=True, ep=2)),
    # one expert per ep rank, two edp ranks: FSDP2 shards the stacks along dim 1, not the single expert
    "dp4_ep2_one_local_expert_edp2": Layout(4, dict(dp=4, ep=2), experts=2),
}


def make_model(layout: Layout) -> Mixtral:
    torch.manual_seed(0)
    moe = MoEConfig(expert_bias=layout.bias is not None, **layout.moe)
    model = Mixtral(small_config(num_local_experts=layout.experts), Ops.reference(), moe)
    model.init_weights()
    for layer in model.layers:
        if layout.bias is not None:
            layer.mlp.expert_bias.copy_(torch.tensor(layout.bias))
    return model


def gather_expert_grads(model: Mixtral, grads: list[dict], meshes, prefix: str = "") -> None:
    """Replace each step's expert gradients (this rank's ep / etp shard) by the whole tensors."""
    experts = {id(p) for p in expert_parameters(model)}
    for step_grads in grads:
        for name, param in model.named_parameters():
            if id(param) in experts:
                key = prefix + name
                step_grads[key] = full_expert_weight(step_grads[key], name.rsplit(".", 1)[1], meshes)


def _run_layouts(names: list[str]) -> dict[str, tuple]:
    """One rank's part: every named layout on the same process group; expert grads gathered to full."""
    results = {}
    for name in names:
        layout = LAYOUTS[name]
        dims = ParallelDims(world_size=dist.get_world_size(), **layout.dims)
        meshes = dims.build_meshes("cpu")
        model = laid_out_copy(make_model(layout), meshes, Ops.reference(), ep_comm=layout.comm)
        apply_tensor_parallel(model, meshes["tp"], dims.sp)
        apply_expert_data_parallel(model, meshes, zero=2)
        if dims.dp > 1:
            apply_data_parallel(model, meshes.dp_cp, 2, tp_enabled=dims.tp > 1)
        first = meshes["dp"].get_local_rank()
        losses, ce_losses, grads = train(model, layout.micro_batches, range(first, first + 1), zero=2)
        gather_expert_grads(model, grads, meshes)
        reduce = functools.partial(mean_over, mesh=meshes.dp_cp)
        results[name] = ([reduce(loss).item() for loss in losses], [reduce(c).item() for c in ce_losses], grads)
        placements = {str(p.placements) for p in expert_parameters(model)}
        results[name + "/placements"] = sorted(placements)
    if dist.get_world_size() == 2:
        results["rejections"] = _rejections()
    return results


def _rejections() -> list[str]:
    """The messages of an unknown exchange and of allgather over packed (variable) capacity rows."""
    meshes = ParallelDims(dp=2, ep=2, world_size=2).build_meshes("cpu")
    packed = Layout(2, dict(dp=2, ep=2), "allgather", moe=dict(CAPACITY, pad_to_capacity=False))
    messages = []
    for comm in ("ring", "allgather"):
        try:
            model = make_model(packed)
            model_layout(model.config, model.moe, meshes, ep_comm=comm)
        except MixtralError as error:
            messages.append(str(error))
    return messages


@pytest.fixture(scope="module")
def distributed() -> dict[str, tuple]:
    """Rank 0's results of every layout: one spawn per world size."""
    return run_layouts(_run_layouts, LAYOUTS)


@functools.cache
def reference(name: str) -> tuple:
    """One process: the same micro-batches accumulated, with the layout's dispatcher and routing bias."""
    layout = LAYOUTS[name]
    with single_thread():
        return train(make_model(layout), layout.micro_batches, range(layout.micro_batches))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_expert_layout_matches_one_process(distributed, name: str) -> None:
    assert_matches(distributed[name], reference(name), name)


def test_expert_stacks_shard_over_edp_along_a_dimension_every_rank_has(distributed) -> None:
    assert distributed["dp2_tp2_sp_ep2_alltoall_edp2/placements"] == ["(Shard(dim=0),)"]  # 2 experts, 2 ranks
    assert distributed["dp4_ep2_one_local_expert_edp2/placements"] == ["(Shard(dim=1),)"]  # 1 expert, 2 ranks


def test_idle_rank_experts_get_zero_gradients(distributed) -> None:
    """The forced routing really left ep rank 1's experts (2 and 3) without a token, under both exchanges."""
    for name in ("dp2_ep2_alltoall_rank1_idle", "dp2_ep2_allgather_rank1_idle"):
        grad = distributed[name][2][0]["layers.0.mlp.experts.down_proj"]
        assert grad[2:].abs().max() == 0 and grad[:2].abs().max() > 0


def test_bad_exchanges_are_rejected(distributed) -> None:
    assert distributed["rejections"] == [
        "moe.ep_comm 'ring' is unknown; choose one of: alltoall, allgather",
        "moe.ep_comm=allgather needs static expert rows: set moe.pad_to_capacity true, or use "
        "moe.ep_comm=alltoall with unpadded capacity",
    ]
