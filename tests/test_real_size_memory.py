"""No rank ever holds the whole model: a ~1.4 GB Mixtral trains on 8 gloo ranks (FSDP2 ZeRO-3), generates from its
checkpoint on 2 ranks (pipeline and expert parallel) and converts to HF and Megatron, each process's peak resident
memory (the kernel's VmHWM, read as ru_maxrss of the finished processes) compared with the same command on a tiny
model, so that the runtime's own memory (torch, gloo, the tokenizer) cancels out.

The model has 8 layers (hidden 1024, intermediate 1408, 8 experts, vocabulary 32000: 363 M parameters, 1.45 GB in
fp32). FSDP2 holds a gathered unit twice while it copies the gather out, and keeps the last gather until the next,
so one rank briefly holds about three of its largest units (one layer's experts, 10% of this model; 1/32 of
Mixtral-8x7B): with 4 layers the same bound would measure the unit size rather than the layout.

glibc keeps freed blocks below its mmap threshold resident, and the threshold rises as large tensors are freed, so
the resident peak also counts FSDP's freed gathers: the processes run with MALLOC_MMAP_THRESHOLD_=1 MiB, which
makes resident memory follow what the ranks hold. With glibc's default the training figure reads 0.72-0.74 of the
model instead of 0.57 (the others move by a few percent).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
SIZES = dict(
    vocab_size=32000,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    num_local_experts=8,
    tie_word_embeddings=False,
)
MODELS = {
    "big": dict(SIZES, hidden_size=1024, intermediate_size=1408),
    "tiny": dict(SIZES, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
}
MODEL_BYTES = ModelConfig(**MODELS["big"]).num_parameters * 4
PEAK = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    "print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)\n"
)

pytestmark = pytest.mark.slow


def peak_bytes(*command: str) -> int:
    """The largest peak resident memory of any process the command ran (its workers included)."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        MALLOC_MMAP_THRESHOLD_=str(2**20),
    )
    done = subprocess.run(
        [sys.executable, "-c", PEAK, sys.executable, "-m", "mixtral.cli", *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    code, peak = done.stdout.split()
    assert code == "0", done.stderr
    return int(peak)


def overrides(name: str) -> list[str]:
    return [
        f"model.{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in MODELS[name].items()
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One ZeRO-3 training step of each model on 8 ranks; the run directories (checkpoints inside)."""
    root = tmp_path_factory.mktemp("real-size")
    peaks = {}
    for name in ("tiny", "big"):
        peaks[name] = peak_bytes(
            "train",
            "--recipe",
            "cpu-tiny",
            "--nproc-per-node",
            "8",
            "parallel.dp=8",
            "parallel.zero=3",
            "train.steps=1",
            "batch.micro_batch=1",
            "batch.global_batch=8",
            "seq_len=64",
            "eval.interval=0",
            "train.tensorboard=false",
            "train.peak_flops=1e12",
            f"train.output_dir={root / name}",
            *overrides(name),
        )
    return {"root": root, **{name: root / name for name in ("tiny", "big")}, "train_peaks": peaks}


def test_zero3_training_on_8_ranks_holds_a_fraction_of_the_model(runs):
    grown = runs["train_peaks"]["big"] - runs["train_peaks"]["tiny"]
    print(f"train dp8 zero3: {grown / 2**20:.0f} MiB above the tiny run, model {MODEL_BYTES / 2**20:.0f} MiB")
    assert grown <= 0.75 * MODEL_BYTES  # measured 0.57 (parameter, gradient and AdamW shards: 0.5)


@pytest.mark.parametrize("layout", [["--pp", "2"], ["--ep", "2"]], ids=["pp2", "ep2"])
def test_generation_on_2_ranks_loads_each_ranks_shard(runs, layout):
    peaks = {
        name: peak_bytes(
            "generate",
            "--model",
            str(runs[name]),
            "--prompt",
            "The with statement",
            "--max-tokens",
            "4",
            "--nproc-per-node",
            "2",
            *layout,
        )
        for name in ("tiny", "big")
    }
    grown = peaks["big"] - peaks["tiny"]
    print(f"generate {' '.join(layout)}: {grown / 2**20:.0f} MiB above the tiny run")
    assert grown <= 0.7 * MODEL_BYTES  # measured: pp2 0.50; ep2 0.61 (an ep rank holds all the dense weights: 0.62)


@pytest.mark.parametrize("to", ["hf", "megatron"])
def test_convert_streams_tensor_by_tensor(runs, to):
    peaks = {
        name: peak_bytes(
            "convert",
            "--input",
            str(runs[name] / "checkpoints" / "latest"),
            "--output",
            str(runs["root"] / f"{name}-{to}"),
            "--to",
            to,
        )
        for name in ("tiny", "big")
    }
    grown = peaks["big"] - peaks["tiny"]
    print(f"convert to {to}: {grown / 2**20:.0f} MiB above the tiny conversion")
    assert grown <= 0.5 * MODEL_BYTES  # measured 0.09
