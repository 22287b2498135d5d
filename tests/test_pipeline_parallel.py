"""Pipeline parallel layouts (through `parallelize`) train 3 SGD steps with one process's loss and gradients.

The pipeline's micro-batches are the one process's accumulated micro-batches: each has its own mean loss
(aux loss from the router totals the stages carry) and the schedule averages their gradients.
"""

from __future__ import annotations

import pytest
import test_serve_distributed as serving
import torch
import torch.distributed as dist
from test_parallel_equivalence import LR, SEQ, STEPS, _full, assert_close, make_batches, make_model, reference

from mixtral.backend import Ops
from mixtral.errors import MixtralError
from mixtral.parallel import ParallelDims, PipelinedModel, PipelineStageModel, mean_over, parallelize
from mixtral.parallel.context_parallel import shard_sequence
from mixtral.serve.distributed import Leader, follow
from mixtral.train.loss import TrainingLoss

from dist_utils import laid_out_copy, run_ranks

MICROBATCHES = 4
LAYOUTS = {  # name: (world size, dims, schedule)
    "pp2_1f1b": (2, dict(pp=2), "1f1b"),
    "pp2_gpipe": (2, dict(pp=2), "gpipe"),
    "tp2_sp_pp2_cp2": (8, dict(tp=2, pp=2, cp=2, sp=True), "1f1b"),  # the Ascend layout scaled down
}


def _train_layouts(names: list[str]) -> dict[str, tuple]:
    """One rank's part: each layout's per-step (loss, ce loss) and this rank's stage gradients. Under context
    parallelism each rank runs its sequence chunk and its loss is its share of the whole (mean over dp x cp)."""
    results = {}
    for name in names:
        _, layout, schedule = LAYOUTS[name]
        dims = ParallelDims(world_size=dist.get_world_size(), **layout)
        reference_model = make_model()
        dims.validate_model(reference_model.config, SEQ)
        meshes = dims.build_meshes("cpu")
        if dims.cp > 1:  # a model built without the context layout would train silently wrong
            with pytest.raises(MixtralError, match="build it with Mixtral\\(..., layout=model_layout"):
                parallelize(reference_model, dims, meshes)
        model = laid_out_copy(reference_model, meshes, Ops.reference())
        loss = TrainingLoss(model.config, model.moe, meshes.dp_cp.get_group())  # over the data x context ranks
        parts = parallelize(model, dims, meshes, pp_schedule=schedule, microbatches=MICROBATCHES, loss=loss)
        opt = torch.optim.SGD(parts.model.parameters(), lr=LR, momentum=0.9)
        tokens, targets = make_batches()
        losses, ce_losses, grads = [], [], []
        for step in range(STEPS):
            chunk = [shard_sequence(t[step], meshes["cp"]) for t in (tokens, targets)]
            per_microbatch = mean_over(parts.pipeline.step(*chunk)[0].mean(0), meshes.dp_cp)
            losses.append(per_microbatch[0].item())
            ce_losses.append(per_microbatch[1].item())
            grads.append({n: _full(p.grad) for n, p in parts.model.named_parameters()})
            opt.step()
            opt.zero_grad()
        results[name] = (losses, ce_losses, grads)
    if dist.get_world_size() == 2:
        results["generation"] = _generate()
    return results


def _generate() -> tuple | int:
    """test_serve_distributed's workload under pp2: rank 0 leads, rank 1 replays its model calls."""
    model = serving.make_model()
    dims = ParallelDims(pp=2, world_size=2)
    meshes = dims.build_meshes("cpu")
    stages = PipelinedModel(parallelize(model, dims, meshes, pp_schedule="gpipe").pipeline, model)
    if dist.get_rank() != 0:
        return follow(stages)
    leader = Leader(stages)
    try:
        return serving.workload(leader)
    finally:
        leader.stop()


@pytest.fixture(scope="module")
def distributed() -> dict[str, list]:
    """Every rank's results of every layout, one spawn per world size."""
    results: dict[str, list] = {}
    for world in sorted({world for world, _, _ in LAYOUTS.values()}):
        names = [name for name, (w, _, _) in LAYOUTS.items() if w == world]
        by_rank = run_ranks(_train_layouts, world, names, timeout_s=240.0)
        for name in names + (["generation"] if world == 2 else []):
            results[name] = [ranked[name] for ranked in by_rank]
    return results


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pipeline_matches_one_process(distributed, name: str) -> None:
    ref_losses, ref_ce, ref_grads = reference(MICROBATCHES, False)
    ranks = distributed[name]
    for losses, ce_losses, _ in ranks:  # every stage reports the last stage's losses
        assert_close(torch.tensor(losses), torch.tensor(ref_losses), f"{name} loss")
        assert_close(torch.tensor(ce_losses), torch.tensor(ref_ce), f"{name} ce loss")
    for step in range(STEPS):
        stage_grads: dict[str, torch.Tensor] = {}
        for _, _, grads in ranks:  # stages hold disjoint parameters under their whole-model names
            for key, grad in grads[step].items():
                if key in stage_grads:  # a tensor or context parallel peer: the same full gradient
                    assert_close(grad, stage_grads[key], f"{name} step {step} {key} on tp peers")
                stage_grads[key] = grad
        assert stage_grads.keys() == ref_grads[step].keys()
        for key, expected in ref_grads[step].items():
            assert stage_grads[key].shape == expected.shape, key
            assert_close(stage_grads[key], expected, f"{name} step {step} grad {key}")


def test_generation_under_pipeline_parallel_equals_one_process(distributed) -> None:
    """Greedy and seeded sampled tokens, and scored logprobs, as one process; every stage made every call."""
    greedy, sampled, scores = serving.workload(serving.make_model())
    (got_greedy, got_sampled, got_scores), replayed = distributed["generation"]
    assert got_greedy == greedy and got_sampled == sampled
    for got, expected in zip(got_scores, scores):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert replayed == 3 * serving.NEW + 2 + 2  # as under tensor parallelism (test_serve_distributed)


def test_stage_split_names_and_errors() -> None:
    model = make_model()
    first = PipelineStageModel(make_model(), 0, 2)
    last = PipelineStageModel(model, 1, 2)
    names = {n for n, _ in first.named_parameters()} | {n for n, _ in last.named_parameters()}
    assert names == {n for n, _ in make_model().named_parameters()}
    assert first.embed_tokens is not None and first.lm_head is None and list(first.layers.keys()) == ["0"]
    assert last.embed_tokens is None and last.lm_head is not None and list(last.layers.keys()) == ["1"]
    assert model.embed_tokens.weight.is_meta and model.layers[0].self_attn.q_proj.weight.is_meta
    with pytest.raises(MixtralError, match="2 layers do not split evenly into 3 stages"):
        PipelineStageModel(make_model(), 0, 3)
    with pytest.raises(MixtralError, match="untied lm head.*tie_word_embeddings=false"):
        PipelineStageModel(make_model(tied=True), 0, 2)
