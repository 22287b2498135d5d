"""Each parallel layout trains 3 steps on real gloo ranks with the same loss and gradients as one process.

Equality that holds (fp32, 1e-5 relative): a layout with dp data ranks equals one process that
averages the losses of the same dp micro-batches (gradient accumulation), because every rank's loss
is its own micro-batch mean and gradients are averaged. Cross-entropy additionally equals the
concatenated batch's token mean, since every row has the same number of counted targets here; the
load-balancing loss is per micro-batch. Tensor/sequence parallel ranks see the whole micro-batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from mixtral.backend import Ops
from mixtral.model import IGNORE_INDEX, Mixtral
from mixtral.parallel import (
    ParallelDims,
    apply_data_parallel,
    apply_tensor_parallel,
    mean_over,
    microbatch_sync,
)
from mixtral.train.loss import TrainingLoss

from conftest import single_thread, small_config
from dist_utils import run_layouts

BATCH, SEQ, STEPS, LR = 4, 16, 3, 1.0
RTOL = 1e-5


@dataclass(frozen=True)
class Layout:
    world: int
    dims: dict
    zero: int = 0
    accumulate: int = 1  # micro-batches per rank per step
    tied: bool = False  # tie_word_embeddings: the embedding doubles as the lm head

    @property
    def micro_batches(self) -> int:
        """Micro-batches per step over all data ranks: what one process accumulates to match."""
        return self.dims.get("dp", 1) * self.accumulate


LAYOUTS = {
    "dp2": Layout(2, dict(dp=2)),
    "dp2_zero1_accumulate2": Layout(2, dict(dp=2), zero=1, accumulate=2),
    "tp2_sp": Layout(2, dict(tp=2, sp=True)),
    "tp2_sp_tied": Layout(2, dict(tp=2, sp=True), tied=True),
    "tp2_no_sp": Layout(2, dict(tp=2)),
    "fsdp4_zero3": Layout(4, dict(dp=4), zero=3),
    "dp2_tp2_sp": Layout(4, dict(dp=2, tp=2, sp=True), zero=2),
}


def make_model(tied: bool = False) -> Mixtral:
    torch.manual_seed(0)
    model = Mixtral(small_config(tie_word_embeddings=tied), Ops.reference())
    model.init_weights()
    return model


def make_batches() -> tuple[torch.Tensor, torch.Tensor]:
    """tokens and shifted targets [STEPS, BATCH, SEQ]; the last position of every row is ignored."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, small_config().vocab_size, (STEPS, BATCH, SEQ + 1), generator=gen)
    targets = tokens[..., 1:].clone()
    targets[..., -1] = IGNORE_INDEX
    return tokens[..., :-1], targets


def train(
    model: torch.nn.Module, micro_batches: int, mine: range, zero: int = 0, loss=None
) -> tuple[list, list, list[dict]]:
    """STEPS SGD steps, each accumulating this process's micro-batches `mine` out of `micro_batches`; loss is the
    model's TrainingLoss unless given (one over a group, or on a context parallel chunk).

    SGD keeps the comparison linear in the gradients: Adam's g / sqrt(v) would blow fp32 reduction-order
    noise in near-zero gradients up to a full learning-rate step.
    """
    loss_fn = loss or TrainingLoss(model.config, model.moe)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    tokens, targets = make_batches()
    per = BATCH // micro_batches
    losses, ce_losses, grads = [], [], []
    for step in range(STEPS):
        loss = ce = 0.0
        for m in mine:
            rows = slice(m * per, (m + 1) * per)
            out = loss_fn.of(model, tokens[step, rows], targets[step, rows])
            microbatch_sync(model, zero, last=m == mine[-1])
            (out.loss / len(mine)).backward()
            loss, ce = loss + out.loss.detach() / len(mine), ce + out.ce_loss.detach() / len(mine)
        losses.append(loss)
        ce_losses.append(ce)
        grads.append({name: _full(p.grad) for name, p in model.named_parameters()})
        opt.step()
        opt.zero_grad()
    return losses, ce_losses, grads


def _full(grad: torch.Tensor) -> torch.Tensor:
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad.detach().clone()


def _run_layouts(names: list[str]) -> dict[str, tuple]:
    """One rank's part: every named layout, one after the other, on the same process group."""
    results = {}
    for name in names:
        layout = LAYOUTS[name]
        dims = ParallelDims(world_size=dist.get_world_size(), **layout.dims)
        model = make_model(layout.tied)
        dims.validate_model(model.config, SEQ)
        meshes = dims.build_meshes("cpu")
        apply_tensor_parallel(model, meshes["tp"], dims.sp)
        if dims.dp > 1:
            apply_data_parallel(model, meshes.dp_cp, layout.zero, tp_enabled=dims.tp > 1)
        first = meshes["dp"].get_local_rank() * layout.accumulate
        losses, ce_losses, grads = train(
            model, layout.micro_batches, range(first, first + layout.accumulate), layout.zero
        )
        reduce = functools.partial(mean_over, mesh=meshes.dp_cp)
        results[name] = ([reduce(loss).item() for loss in losses], [reduce(c).item() for c in ce_losses], grads)
    return results


@pytest.fixture(scope="module")
def distributed() -> dict[str, tuple]:
    """Rank 0's results of every layout: one spawn per world size keeps process start-ups few."""
    return run_layouts(_run_layouts, LAYOUTS)


@functools.cache
def reference(micro_batches: int, tied: bool) -> tuple:
    """One process, no torch.distributed: the same micro-batches accumulated (one thread: tiny ops on a
    busy machine run many times slower with several)."""
    with single_thread():
        return train(make_model(tied), micro_batches, range(micro_batches))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= RTOL * max(scale, 1e-6), f"{what}: max error {err:.3g} vs max |value| {scale:.3g}"


def assert_matches(result: tuple, reference: tuple, name: str) -> None:
    """Losses, CE losses and every step's every gradient equal the reference's (1e-5 relative)."""
    losses, ce_losses, grads = result
    ref_losses, ref_ce, ref_grads = reference
    assert_close(torch.tensor(losses), torch.tensor(ref_losses), f"{name} loss")
    assert_close(torch.tensor(ce_losses), torch.tensor(ref_ce), f"{name} ce loss")
    for step in range(STEPS):
        assert grads[step].keys() == ref_grads[step].keys()
        for key, expected in ref_grads[step].items():
            assert grads[step][key].shape == expected.shape, key
            assert_close(grads[step][key], expected, f"{name} step {step} grad {key}")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_process(distributed, name: str) -> None:
    assert_matches(distributed[name], reference(LAYOUTS[name].micro_batches, LAYOUTS[name].tied), name)


def test_data_parallel_cross_entropy_is_the_concatenated_batch_mean(distributed) -> None:
    """The dp ranks' averaged CE is one forward's CE over the whole batch (equal counted targets per row)."""
    tokens, targets = make_batches()
    model = make_model()
    whole = TrainingLoss(model.config, model.moe).of(model, tokens[0], targets[0])
    for name in ("dp2", "fsdp4_zero3"):
        assert_close(torch.tensor(distributed[name][1][0]), whole.ce_loss.detach(), f"{name} step 0 ce")
