"""`mixtral-run train` with backend=xla: 10 steps on the XLA device (SPMD, 4 CPU virtual devices) against the CPU.

Each run is its own process (the CLI), so torch_xla's per-process device setup never leaks between tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch_xla", reason="torch_xla is not installed: the XLA tests run in ci/xla.sh's venv")

# cpu-tiny, shrunk so that the XLA compile of one step stays a few seconds; the capacity dispatcher (MLPerf's 1.25)
SMALL = ["moe.dispatcher=capacity", "moe.capacity_factor=1.25", "train.steps=10", "eval.interval=0",
         "train.peak_flops=1e12", "batch.micro_batch=2", "batch.global_batch=2", "seq_len=32",
         "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128", "checkpoint.interval=0"]


def train(backend: str, out) -> list[dict]:
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4", TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, "-m", "mixtral.cli", "train", "--recipe", "cpu-tiny", *SMALL, f"backend={backend}",
           f"train.output_dir={out}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained cpu-tiny to step 10" in done.stdout
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ten_training_steps_on_xla_equal_cpu(tmp_path):
    xla = train("xla", tmp_path / "xla")
    cpu = train("cpu", tmp_path / "cpu")
    assert [m["step"] for m in xla] == list(range(1, 11))
    for a, b in zip(xla, cpu):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        # the CPU's fp32 norm of the 2M-entry embedding gradient is itself ~3e-5 off (XLA's: 1e-8, vs float64)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert xla[-1]["loss"] < xla[0]["loss"]
    assert (tmp_path / "xla" / "checkpoints" / "latest").exists()
