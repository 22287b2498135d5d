"""`mixtral-run train --nproc-per-node 2` (and plain torchrun) on the cpu-tiny recipe: the same losses as one process.

Every data rank's loss is its share of the whole batch (mixtral.train.loss), so dp2 with 8 sequences per rank
equals one process with the 16 in one micro-batch; the pipeline's 4 micro-batches equal one process
accumulating the same 4.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral.cli import main
from mixtral.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
RTOL = 1e-5
NORM_RTOL = 2e-4
# optimizer.eps=1: AdamW's first step is lr * g / (|g| + eps), which flips a full lr step with the sign of a
# near-zero gradient that another layout sums in another order; with eps well above |g| it is linear in g, and
# fp32 reduction-order noise stays at its own size in the second step's losses.
SHORT = [
    "train.steps=2",
    "train.peak_flops=1e12",
    "train.tensorboard=false",
    "train.expert_load_interval=1",
    "eval.interval=2",
    "eval.samples=8",
    "checkpoint.interval=0",
    "schedule.warmup_steps=1",
    "batch.global_batch=16",
    "model.num_hidden_layers=2",
    "optimizer.eps=1.0",
]


@pytest.fixture(autouse=True)
def _workers_import_this_checkout(monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def train(run_dir: Path, *overrides: str, nproc: int = 1) -> list[dict]:
    """cpu-tiny cut to 2 steps in run_dir, through mixtral-run (--nproc-per-node when nproc > 1); its metrics."""
    launch = ["--nproc-per-node", str(nproc)] if nproc > 1 else []
    assert main(["train", "--recipe", "cpu-tiny", *launch, *SHORT, f"train.output_dir={run_dir}", *overrides]) == 0
    return read_metrics(run_dir)


def assert_same_run(actual: list[dict], expected: list[dict]) -> None:
    """The same metrics lines (one per step and evaluation: rank 0 alone writes), losses within RTOL."""
    assert [sorted(r) for r in actual] == [sorted(r) for r in expected]
    for ours, ref in zip(actual, expected):
        for key in ("loss", "ce_loss", "aux_loss", "eval_loss"):
            if key in ref:
                assert abs(ours[key] - ref[key]) <= RTOL * abs(ref[key]), (key, ours, ref)
        if "grad_norm" in ref:  # torch's fp32 norm of the 4 M-entry embedding gradient is itself off by ~5e-5,
            assert abs(ours["grad_norm"] - ref["grad_norm"]) <= NORM_RTOL * ref["grad_norm"]  # by shard differently
        if "expert_load" in ref:  # tokens per expert summed over the data ranks and the stages' layers
            assert ours["expert_load"] == ref["expert_load"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[dict]:
    return train(tmp_path_factory.mktemp("one"), "batch.micro_batch=16")


@pytest.mark.parametrize("layout", [["parallel.dp=2"], ["parallel.dp=2", "parallel.ep=2"]], ids=["dp2", "dp2_ep2"])
def test_data_parallel_cli_matches_one_process(tmp_path, one_process, layout: list[str]) -> None:
    runs = train(tmp_path, *layout, "batch.micro_batch=8", nproc=2)
    assert [r["step"] for r in runs if "loss" in r] == [1, 2]
    assert_same_run(runs, one_process)


def test_tensor_parallel_under_torchrun_matches_one_process(tmp_path, one_process) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "mixtral.cli",
        "train",
        "--recipe",
        "cpu-tiny",
        *SHORT,
        f"train.output_dir={tmp_path}",
        "batch.micro_batch=16",
        "parallel.tp=2",
        "parallel.sp=true",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("trained cpu-tiny to step 2") == 1  # rank 0 alone prints
    assert_same_run(read_metrics(tmp_path), one_process)


def test_pipeline_cli_matches_one_process(tmp_path) -> None:
    untied = ["batch.micro_batch=4", "model.tie_word_embeddings=false"]
    expected = train(tmp_path / "one", *untied)
    assert_same_run(train(tmp_path / "pp2", *untied, "parallel.pp=2", nproc=2), expected)


def test_a_failing_worker_fails_the_launch(tmp_path, capsys) -> None:
    """A layout only the workers can refuse (kv heads by tp, checked against the model): every worker stops, and
    the launch says which failed. A layout whose ranks differ from --nproc-per-node fails before launching."""
    assert (
        main(
            [
                "train",
                "--recipe",
                "cpu-tiny",
                "--nproc-per-node",
                "2",
                *SHORT,
                f"train.output_dir={tmp_path}",
                "parallel.tp=2",
                "model.num_key_value_heads=1",
            ]
        )
        == 1
    )
    assert re.search(r"rank [01] failed first \(exit code 1\)", capsys.readouterr().out)
    assert main(["train", "--recipe", "cpu-tiny", "--nproc-per-node", "2", *SHORT, "parallel.tp=4"]) == 2
    assert (
        "the recipe's layout has 4 ranks (parallel.dp x tp x pp x cp) but --nproc-per-node is 2"
        in capsys.readouterr().err
    )


@pytest.fixture(scope="module")
def hf_start(tmp_path_factory) -> tuple[Path, dict[int, list[dict]]]:
    """An HF checkpoint of cpu-tiny's untied 2-layer model, and one process's first step fine-tuned from it, by
    micro-batch size (the pipeline's two micro-batches are one process accumulating the same two)."""
    from mixtral.checkpoint.hf import save_hf
    from mixtral.model import Mixtral
    from mixtral.recipes import load_recipe

    root = tmp_path_factory.mktemp("init-from")
    model = Mixtral(
        load_recipe(
            "cpu-tiny", ["model.num_hidden_layers=2", "model.tie_word_embeddings=false", "model.num_local_experts=4"]
        ).model_config()
    )
    model.init_weights(seed=5, std=0.05)
    save_hf(model, root / "hf")
    return root / "hf", {
        size: train(root / f"one{size}", *FROM_HF(root / "hf"), f"batch.micro_batch={size}") for size in (16, 8)
    }


def FROM_HF(path: Path) -> list[str]:
    return [
        "model.preset=null",
        f"model.init_from={path}",
        "model.hidden_size=null",
        "model.intermediate_size=null",
        "model.num_hidden_layers=null",
        "model.num_attention_heads=null",
        "model.num_key_value_heads=null",
        "model.num_local_experts=null",
        "model.num_experts_per_tok=null",
        "model.max_position_embeddings=null",
        "train.steps=1",
    ]


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.dp=2", "parallel.zero=3", "batch.micro_batch=8"],
        ["parallel.tp=2", "parallel.sp=true", "batch.micro_batch=16"],
        ["parallel.dp=2", "parallel.ep=2", "batch.micro_batch=8"],
        ["parallel.pp=2", "batch.micro_batch=8"],
    ],
    ids=["dp2_zero3", "tp2", "ep2", "pp2"],
)
def test_init_from_hf_under_a_layout_gives_one_process_loss(tmp_path, hf_start, layout) -> None:
    """Each rank reads only its shards of the HF checkpoint after the layout: the first step's loss is one process's."""
    path, expected = hf_start
    runs = train(tmp_path, *FROM_HF(path), *layout, nproc=2)
    reference = expected[8 if "parallel.pp=2" in layout else 16]
    ours, ref = [r for r in runs if "loss" in r][0], [r for r in reference if "loss" in r][0]
    for key in ("loss", "ce_loss", "aux_loss"):
        assert abs(ours[key] - ref[key]) <= RTOL * abs(ref[key]), (key, ours[key], ref[key])
