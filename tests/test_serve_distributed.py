"""Generation on several ranks: rank 0 leads (sampling, scheduling), the others replay its model calls.

Greedy tokens, sampled tokens with a seed and scored logprobs on 2 gloo ranks equal one process (fp32),
under tensor parallelism and under expert parallelism with either exchange (Megatron-LM's server breaks
with EP: #1576).
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
import torch
import torch.distributed as dist

from mixtral.backend import Ops
from mixtral.checkpoint.hf import save_hf
from mixtral.cli import main
from mixtral.model import Mixtral
from mixtral.parallel import ParallelDims, apply_tensor_parallel
from mixtral.serve.distributed import Leader, follow
from mixtral.serve.engine import Generator
from mixtral.serve.scheduler import score

from conftest import serve_process, small_config
from dist_utils import laid_out_copy, run_ranks

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
        meshes = dims.build_meshes("cpu")
        model = laid_out_copy(make_model(), meshes, Ops.reference(), ep_comm=comm or "alltoall")
        apply_tensor_parallel(model, meshes["tp"], dims.sp)
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


# ---- the CLI: `mixtral-run generate --nproc-per-node 2` with expert or pipeline parallelism ----


def _cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mixtral.cli", "generate", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer model with Mixtral's vocabulary, 4 experts and an untied head (pipeline stages need one)."""
    torch.manual_seed(0)
    config = small_config(
        vocab_size=32000,
        hidden_size=32,
        intermediate_size=24,
        num_attention_heads=4,
        num_local_experts=4,
        num_hidden_layers=2,
        tie_word_embeddings=False,
    )
    model = Mixtral(config)
    model.init_weights(std=0.2)  # large weights: greedy text that depends on every layer
    path = tmp_path_factory.mktemp("tiny")
    save_hf(model, path)
    return path


@pytest.mark.parametrize("layout", [["--ep", "2"], ["--ep", "2", "--ep-comm", "allgather"], ["--pp", "2"]])
def test_cli_on_two_ranks_prints_what_one_process_prints(model_dir, layout):
    prompt = ["--model", str(model_dir), "--prompt", "The with statement", "--max-tokens", "10"]
    alone = _cli(*prompt)
    assert len(alone.strip()) > 10  # ten tokens of text
    assert _cli(*prompt, "--nproc-per-node", "2", *layout) == alone


def test_cli_parallel_flags_without_ranks_say_how_to_launch(model_dir, capsys):
    code = main(["generate", "--model", str(model_dir), "--prompt", "x", "--ep", "2"])
    assert code == 2
    assert "need several ranks; add --nproc-per-node N or launch with torchrun" in capsys.readouterr().err


def _serve_and_ask(model_dir, *layout: str) -> tuple[dict, dict]:
    """Start `mixtral-run serve` (with layout's ranks), ask /api and /v1/completions greedily, stop it."""
    with serve_process(model_dir, *layout) as (url, _):
        api = httpx.put(
            f"{url}/api",
            json={
                "prompts": ["The with statement", "Hello"],
                "tokens_to_generate": 8,
                "temperature": 0.0,
                "logprobs": True,
            },
            timeout=120,
        ).json()
        completion = httpx.post(
            f"{url}/v1/completions",
            json={"model": "tiny", "prompt": "import os", "max_tokens": 8, "temperature": 0.0},
            timeout=120,
        ).json()
        return api, completion


def test_server_on_two_expert_parallel_ranks_answers_as_one_process(model_dir):
    """Rank 0 serves HTTP, rank 1 follows (Megatron-LM's server breaks with EP: #1576)."""
    api, completion = _serve_and_ask(model_dir, "--nproc-per-node", "2", "--ep", "2")
    alone_api, alone_completion = _serve_and_ask(model_dir)
    assert api["text"] == alone_api["text"] and len(api["text"][0]) > len("The with statement")
    torch.testing.assert_close(
        torch.tensor(api["logprobs"][0]), torch.tensor(alone_api["logprobs"][0]), rtol=1e-5, atol=1e-5
    )
    assert completion["choices"][0]["text"] == alone_completion["choices"][0]["text"]
