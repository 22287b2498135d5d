"""Generation on several ranks: rank 0 leads (sampling, scheduling), the others replay its model calls.

Greedy tokens, sampled tokens with a seed and scored logprobs on 2 gloo ranks equal one process (fp32),
under tensor parallelism and under expert parallelism with either exchange (Megatron-LM's server breaks
with EP: #1576).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import small_config
from dist_utils import run_ranks

from mixtral.backend import Ops
from mixtral.model import Mixtral
from mixtral.parallel import ParallelDims, apply_expert_parallel, apply_tensor_parallel
from mixtral.serve.distributed import Leader, follow
from mixtral.serve.engine import Generator
from mixtral.serve.scheduler import score

PROMPTS = [[5, 17, 3, 44, 9, 12], [8, 2], [30, 31, 32]]  # different lengths: the left-padded path
NEW = 12


def make_model() -> Mixtral:
    torch.manual_seed(0)
    model = Mixtral(small_config(num_local_experts=4), Ops.reference())
    model.init_weights()
    return model


def workload(model) -> tuple[list, list, list]:
    """What the server does with a model: greedy and seeded sampled batches, a scoring pass, greedy again."""
    generator = Generator(model)
    greedy = generator.generate(PROMPTS, NEW, stop_at_eos=False)
    sampled = generator.generate(PROMPTS, NEW, temperature=0.8, top_k=20, seed=[1, 2, 3], stop_at_eos=False)
    scores = score(generator.model, [p + g for p, g in zip(PROMPTS, greedy)])
    again = generator.generate(PROMPTS[:1], NEW, stop_at_eos=False)
    return greedy + again, sampled, scores


LAYOUTS = {
    "tp2": (dict(tp=2), None),
    "ep2_alltoall": (dict(dp=2, ep=2), "alltoall"),
    "ep2_allgather": (dict(dp=2, ep=2), "allgather"),
}


def _ranks() -> dict[str, tuple | int]:
    """Every layout in turn on the same ranks: rank 0's outputs, the follower's count of replayed calls."""
    results = {}
    for name, (layout, comm) in LAYOUTS.items():
        dims = ParallelDims(world_size=dist.get_world_size(), **layout)
        model = make_model()
        meshes = dims.build_meshes("cpu")
        apply_tensor_parallel(model, meshes["tp"], dims.sp)
        if comm is not None:
            apply_expert_parallel(model, meshes, comm)
        if dist.get_rank() != 0:
            results[name] = follow(model)
            continue
        leader = Leader(model)
        try:
            results[name] = workload(leader)
        finally:
            leader.stop()
    return results


@pytest.fixture(scope="module")
def distributed() -> list[dict]:
    return run_ranks(_ranks, 2, timeout_s=300.0)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_generation_on_two_ranks_equals_one_process(distributed, name):
    greedy, sampled, scores = workload(make_model())
    got_greedy, got_sampled, got_scores = distributed[0][name]
    assert got_greedy == greedy
    assert got_sampled == sampled
    for got, expected in zip(got_scores, scores):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # the follower replayed every model call: 3 generate rounds of (1 prefill + NEW - 1 decodes), the
    # cache setups (first round, and again after scoring dropped the caches) and the scoring pass
    assert distributed[1][name] == 3 * NEW + 2 + 2
