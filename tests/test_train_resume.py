"""--resume continues bit-identically on the CPU (3 steps, a crash, 3 resumed steps == 6 uninterrupted steps), and the
trainer's native checkpoints: layout, keep_last, failed and killed saves, generate and init_from reading them."""

from __future__ import annotations

import pytest
import torch
from test_train import tiny_trainer

from mixtral.checkpoint.loading import load_model
from mixtral.checkpoint.native import read_dcp_metadata, read_manifest, temporary_sibling
from mixtral.cli import main
from mixtral.data.tokenizer import Tokenizer
from mixtral.errors import MixtralError
from mixtral.serve.engine import Generator
from mixtral.train import checkpointing
from mixtral.train.metrics import read_metrics

# Router jitter draws from the RNG every step, so restoring the RNG state is part of what is checked.
OVERRIDES = ("model.router_jitter_noise=0.1",)


def losses(run_dir) -> list[tuple]:
    return [
        (r["step"], r.get("loss"), r.get("aux_loss"), r.get("grad_norm"), r.get("lr"), r.get("eval_loss"))
        for r in read_metrics(run_dir)
    ]


@pytest.mark.parametrize("precision", ["fp32", "bf16_master"])
def test_resume_is_bit_identical(tmp_path, precision):
    whole = tiny_trainer(tmp_path / "whole", *OVERRIDES, f"precision={precision}")
    whole.fit()

    crashed = tiny_trainer(tmp_path / "split", *OVERRIDES, f"precision={precision}")
    train_step = crashed.train_step

    def crash_at_step_5(batches):
        if crashed.step == 4:
            raise KeyboardInterrupt  # killed mid-run, after the step-3 checkpoint and step 4's metrics line
        return train_step(batches)

    crashed.train_step = crash_at_step_5
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    assert max(r["step"] for r in read_metrics(tmp_path / "split")) == 4

    resumed = tiny_trainer(tmp_path / "split", *OVERRIDES, f"precision={precision}")
    resumed.fit(resume=True)
    assert resumed.step == 6
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")  # exact, the step-4 tail replaced
    for (name, a), b in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert a.detach().equal(b.detach()), name


def test_resume_without_checkpoint_says_so(tmp_path):
    with pytest.raises(MixtralError, match="--resume: no complete checkpoint .*start the run without --resume"):
        tiny_trainer(tmp_path).fit(resume=True)


def test_resume_with_another_seed_is_refused(tmp_path):
    tiny_trainer(tmp_path, "train.steps=3").fit()
    with pytest.raises(MixtralError, match="resume with the recipe's original train.seed"):
        tiny_trainer(tmp_path, "train.seed=7").fit(resume=True)


# --- the checkpoints themselves: native DCP directories published behind `latest` ---------------------------------


def test_checkpoint_layout_keep_last_and_generate_from_the_run(tmp_path, capsys):
    """keep_last 2 of 6 steps; each step dir is a native checkpoint with trainer state, RNG and tokenizer that
    `mixtral-run generate --model <run dir>` reads (README's main command)."""
    trainer = tiny_trainer(tmp_path, "checkpoint.interval=1", "checkpoint.keep_last=2", vocab_size=32000)
    trainer.fit()
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step_00000005", "step_00000006"]
    assert (ckpt_dir / "latest").is_symlink() and str((ckpt_dir / "latest").readlink()) == "step_00000006"
    step_dir = ckpt_dir / "step_00000006"
    assert {p.name for p in step_dir.iterdir()} == {
        ".metadata",
        "__0_0.distcp",
        "manifest.json",
        "rng",
        "tokenizer.model",
    }
    manifest = read_manifest(step_dir)
    assert manifest.step == 6 and manifest.config == trainer.config and manifest.dtype == "float32"
    assert manifest.extra["trainer"] == {**trainer.state_dict(), "world_size": 1}
    stored = read_dcp_metadata(step_dir).state_dict_metadata
    assert "optimizer.state.layers.0.mlp.experts.gate_up_proj.exp_avg_sq" in stored

    model = load_model(tmp_path)  # a run directory means its checkpoints/latest
    for name, param in trainer.model.named_parameters():
        assert torch.equal(dict(model.named_parameters())[name], param.detach()), name
    tokenizer = Tokenizer(step_dir)
    expected = tokenizer.decode(Generator(model, tokenizer).generate([tokenizer.encode("The with")], 5)[0])
    capsys.readouterr()  # the training's own lines
    assert main(["generate", "--model", str(ckpt_dir / "latest"), "--prompt", "The with", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_bf16_master_checkpoint_holds_the_fp32_masters(tmp_path):
    trainer = tiny_trainer(tmp_path, "precision=bf16_master", "train.steps=3")
    trainer.fit()
    latest = tmp_path / "checkpoints" / "latest"
    assert read_manifest(latest).dtype == "float32"
    saved = dict(load_model(latest).named_parameters())
    for (name, param), master in zip(trainer.model.named_parameters(), trainer.masters):
        assert param.dtype == torch.bfloat16 and torch.equal(saved[name], master.detach()), name


def test_failed_save_leaves_latest_loadable(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path)
    real_save = checkpointing._save_fsynced
    calls = []

    def failing_save(obj, file):
        calls.append(file)
        real_save(obj, file)
        if len(calls) == 2:  # the step-6 checkpoint, its RNG file written, its tensors not yet
            raise OSError("disk full")

    monkeypatch.setattr(checkpointing, "_save_fsynced", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step_00000003"]  # no partial step_6, no temp
    assert load_model(ckpt_dir / "latest").config == trainer.config
    assert read_manifest(ckpt_dir / "latest").extra["trainer"]["step"] == 3


def test_killed_save_leftovers_are_ignored_and_removed(tmp_path):
    tiny_trainer(tmp_path, "train.steps=3").fit()
    ckpt_dir = tmp_path / "checkpoints"
    leftover = temporary_sibling(ckpt_dir / "step_00000006")  # what a SIGKILL during a save leaves
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(b"partial")
    assert checkpointing.latest_step_dir(ckpt_dir).name == "step_00000003"
    trainer = tiny_trainer(tmp_path, "train.steps=4", "checkpoint.interval=0")
    trainer.fit(resume=True)
    assert trainer.step == 4 and not leftover.exists()
    assert checkpointing.latest_step_dir(ckpt_dir).name == "step_00000004"


def test_resume_and_init_from_refuse_what_does_not_fit(tmp_path):
    tiny_trainer(tmp_path / "base", "train.steps=3").fit()
    latest = tmp_path / "base" / "checkpoints" / "latest"
    with pytest.raises(
        MixtralError,
        match=r"parameter 'embed_tokens.weight' has shape \[101, 48\] there but the "
        r"model's is \[101, 64\]; fine-tune with the checkpoint's sizes",
    ):
        tiny_trainer(tmp_path / "tuned", f"model.init_from={latest}", "model.hidden_size=64")
    converted = tmp_path / "converted" / "checkpoints"
    assert (
        main(["convert", "--input", str(latest), "--output", str(converted / "step_00000003"), "--to", "native"]) == 0
    )
    (converted / "latest").symlink_to("step_00000003")
    with pytest.raises(MixtralError, match="holds no optimizer state .* start a fresh run from it"):
        tiny_trainer(tmp_path / "converted").fit(resume=True)
    tuned = tiny_trainer(tmp_path / "tuned", f"model.init_from={converted}")  # a converted checkpoint fine-tunes
    for name, param in load_model(latest).named_parameters():
        assert torch.equal(param, dict(tuned.model.named_parameters())[name].detach()), name
