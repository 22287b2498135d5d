"""--resume continues bit-identically on the CPU: 3 steps, a crash, 3 resumed steps == 6 uninterrupted steps."""

from __future__ import annotations

import pytest
from test_train import tiny_trainer

from mixtral.errors import MixtralError
from mixtral.train.metrics import read_metrics

# Router jitter draws from the RNG every step, so restoring the RNG state is part of what is checked.
OVERRIDES = ("model.router_jitter_noise=0.1",)


def losses(run_dir) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("aux_loss"), r.get("grad_norm"), r.get("lr"), r.get("eval_loss"))
            for r in read_metrics(run_dir)]


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
