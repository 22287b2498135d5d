"""`mixtral-run train` flags and what it logs: --backend, MFU against the backend's peak (never above 1)."""

from __future__ import annotations

import os

import pytest
import torch

from mixtral.backend import all_backends
from mixtral.cli import main
from mixtral.model import Mixtral
from mixtral.recipes import load_recipe
from mixtral.train.metrics import read_metrics

SHORT = [
    "train.steps=3",
    "train.tensorboard=false",
    "eval.interval=0",
    "checkpoint.interval=0",
    "batch.global_batch=4",
    "batch.micro_batch=4",
    "model.num_hidden_layers=1",
    "seq_len=64",
]


def registered(name: str):
    """A registered backend, usable here or not."""
    return next(b for b in all_backends() if b.name == name)


def test_backend_flag_overrides_the_recipe(tmp_path, capsys):
    assert main(["train", "--recipe", "cpu-tiny", "--backend", "cpu", *SHORT, f"train.output_dir={tmp_path}"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2, 3]
    if not registered("cuda").availability.ok:
        assert (
            main(
                ["train", "--recipe", "cpu-tiny", "--backend", "cuda", *SHORT, f"train.output_dir={tmp_path / 'cuda'}"]
            )
            == 2
        )
        assert "backend 'cuda' is not available here" in capsys.readouterr().err


def test_mfu_is_never_above_one(tmp_path, capsys):
    """A peak below what a step achieves (train.peak_flops far too low) is replaced, and the log says why."""
    assert main(["train", "--recipe", "cpu-tiny", *SHORT, "train.peak_flops=1000", f"train.output_dir={tmp_path}"]) == 0
    mfus = [r["mfu"] for r in read_metrics(tmp_path) if "mfu" in r]
    assert len(mfus) == 3 and all(0 < m <= 1 for m in mfus)
    out = capsys.readouterr().out
    assert "beats train.peak_flops 1e-09 (MFU would be" in out and "measured again" in out


@pytest.mark.parametrize(
    "name, dtype, tf32, tflops",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989),
        ("NVIDIA H100 PCIe", torch.bfloat16, False, 756),
        ("NVIDIA A100-SXM4-80GB", torch.float32, True, 156),
        ("NVIDIA A100-SXM4-80GB", torch.float32, False, 19.5),
        ("Some Future GPU", torch.bfloat16, False, None),
    ],
)
def test_cuda_peak_comes_from_the_device_name(monkeypatch, name, dtype, tf32, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high" if tf32 else "highest")
    peak = registered("cuda").peak_flops(torch.device("cuda", 0), dtype)
    assert peak == (None if tflops is None else tflops * 1e12)


def test_tpu_peak_comes_from_the_accelerator_type(monkeypatch):
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5p-128")
    assert registered("xla").peak_flops(torch.device("xla", 0), torch.bfloat16) == 459e12
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-16")
    assert registered("xla").peak_flops(torch.device("xla", 0), torch.bfloat16) == 197e12


def test_a_layout_that_cannot_fit_is_refused_before_anything_is_allocated(tmp_path, capsys):
    huge = [
        "model.hidden_size=16384",
        "model.intermediate_size=65536",
        "model.num_hidden_layers=64",
        "model.num_attention_heads=128",
        "model.num_key_value_heads=8",
    ]
    assert main(["train", "--recipe", "cpu-tiny", *huge, f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "recipe cpu-tiny does not fit on host CPU (gloo)" in err and "GiB per device" in err
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_step_one_logs_each_ranks_bytes_next_to_the_plan(tmp_path, monkeypatch, capsys):
    """bf16_master under dp2 ZeRO-3: bf16 weights, fp32 master weights, gradients and AdamW states exist for each
    rank's shard only, exactly as the planner's rows say."""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    assert (
        main(
            [
                "train",
                "--recipe",
                "cpu-tiny",
                "--nproc-per-node",
                "2",
                *SHORT,
                "parallel.dp=2",
                "parallel.zero=3",
                "batch.micro_batch=2",
                "precision=bf16_master",
                "train.steps=1",
                f"train.output_dir={tmp_path}",
            ]
        )
        == 0
    )
    first = read_metrics(tmp_path)[0]
    params = sum(p.numel() for p in Mixtral(load_recipe("cpu-tiny", SHORT).model_config()).parameters())
    for rank in range(2):
        held = [first[key][rank] for key in ("param_bytes", "grad_bytes", "optim_bytes")]
        assert held == [params // 2 * 2, params // 2 * 4, params // 2 * 12], (rank, held)  # bf16, fp32, m + v + master
        assert sum(held) == first["planned_bytes"][rank]
    assert "warning: rank" not in capsys.readouterr().out
