"""The trainer: parity with transformers + torch AdamW, NaN skipping, atomic checkpoints, CLI, plots."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from mixtral.backend import Backend, Capabilities
from mixtral.checkpoint.loading import load_model
from mixtral.cli import main
from mixtral.errors import MixtralError
from mixtral.recipes import Recipe, recipe_from_dict
from mixtral.train import checkpointing
from mixtral.train.metrics import read_metrics
from mixtral.train.optim import param_groups, set_lr
from mixtral.train.plot import plot_run
from mixtral.train.trainer import Trainer

from conftest import small_config

SEQ = 32
EAGER = {"attn_implementation": "eager", "experts_implementation": "eager"}


class RandomTokens:
    """n fixed random sequences of SEQ + 1 tokens: a SampleSource."""

    def __init__(self, n: int, vocab: int, seed: int) -> None:
        self.data = torch.randint(0, vocab, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def tiny_recipe(run_dir: Path, *overrides: str, **model) -> Recipe:
    """small_config's model, seq 32, 6 steps, eval and checkpoints every 3 steps, in run_dir."""
    data = {
        "name": "tiny",
        "model": dataclasses.asdict(small_config(**model)),
        "seq_len": SEQ,
        "backend": "cpu",
        "optimizer": {"lr": 1e-2},
        "schedule": {"name": "cosine", "warmup_steps": 2},
        "batch": {"micro_batch": 2, "global_batch": 4},
        "eval": {"interval": 3, "samples": 4},
        "checkpoint": {"interval": 3, "keep_last": 2},
        "train": {
            "steps": 6,
            "output_dir": str(run_dir),
            "tensorboard": False,
            "peak_flops": 1e12,
            "expert_load_interval": 2,
        },
    }
    return recipe_from_dict(data, list(overrides))


def tiny_trainer(run_dir: Path, *overrides: str, **model) -> Trainer:
    recipe = tiny_recipe(run_dir, *overrides, **model)
    vocab = recipe.model_config().vocab_size
    return Trainer(recipe, data=(RandomTokens(64, vocab, 1), RandomTokens(8, vocab, 2)))


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_one_step_matches_transformers_and_torch_adamw(tmp_path):
    # Adam's first step is g / (|g| + eps): with a tiny eps, float noise in near-zero gradients decides the sign of
    # a whole lr-sized update, so eps is large enough here that 1e-6 gradient agreement carries over to the weights.
    trainer = tiny_trainer(
        tmp_path,
        "batch.global_batch=2",
        "optimizer.weight_decay=0.1",
        "optimizer.grad_clip=0.5",
        "optimizer.betas=[0.8, 0.9]",
        "optimizer.eps=1e-4",
    )
    config, opt = trainer.config, trainer.recipe.optimizer
    trainer.model.init_weights(std=0.15)  # routing and attention far from uniform; updates small beside weights
    hf = transformers.MixtralForCausalLM._from_config(transformers.MixtralConfig(**config.to_hf_dict()), **EAGER)
    hf.load_state_dict({n if n == "lm_head.weight" else f"model.{n}": p for n, p in snapshot(trainer.model).items()})
    batch = torch.randint(0, config.vocab_size, (2, SEQ + 1))

    set_lr(trainer.optimizer, 3e-3)
    stats = trainer.train_step([batch])

    hf_opt = torch.optim.AdamW(
        param_groups(hf.named_parameters(), opt.weight_decay), lr=3e-3, betas=opt.betas, eps=opt.eps
    )
    out = hf(input_ids=batch[:, :-1], output_router_logits=True)
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, config.vocab_size), batch[:, 1:].reshape(-1))
    loss = ce + config.router_aux_loss_coef * out.aux_loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), opt.grad_clip)
    hf_opt.step()

    assert abs(stats.loss - loss.item()) <= 1e-5 * loss.item()
    assert abs(stats.aux_loss - out.aux_loss.item()) <= 1e-5 * out.aux_loss.item()
    assert abs(stats.grad_norm - norm.item()) <= 1e-5 * norm.item()
    assert norm.item() > opt.grad_clip  # clipping really acted
    hf_params = dict(hf.named_parameters())
    for name, param in trainer.model.named_parameters():
        assert rel(param.detach(), hf_params[name if name == "lm_head.weight" else f"model.{name}"].detach()) <= 1e-5, (
            name
        )


@pytest.mark.parametrize("mode", ["selective", "full", "moe"])
def test_activation_checkpointing_keeps_loss_grads_and_names(tmp_path, mode):
    plain = tiny_trainer(tmp_path / "a")
    torch.manual_seed(0)
    recomputed = tiny_trainer(tmp_path / "b", f"activation_checkpointing={mode}")
    assert [n for n, _ in plain.model.named_parameters()] == [n for n, _ in recomputed.model.named_parameters()]
    batch = torch.randint(0, plain.config.vocab_size, (2, SEQ + 1))
    for trainer in (plain, recomputed):
        trainer.loss.of(trainer.model, batch[:, :-1], batch[:, 1:]).loss.backward()
    for (name, a), b in zip(plain.model.named_parameters(), recomputed.model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("dispatcher", ["dropless", "capacity moe.capacity_factor=1.25"])
def test_compile_keeps_losses_gradients_and_names(tmp_path, dispatcher):
    """compile: true (inductor on the CPU) computes what eager does, fp32: every gradient of one forward and
    backward (1e-5 relative), then the losses of 2 AdamW steps. Dropless dispatch leaves the compiled
    block only for its grouped GEMM (fp32 has no traceable one); the capacity dispatcher compiles whole."""
    trainers = []
    for name, extra in (("eager", ()), ("compiled", ("compile=true",))):
        torch.manual_seed(0)
        trainers.append(tiny_trainer(tmp_path / name, *f"moe.dispatcher={dispatcher}".split(), *extra))
    eager, compiled = trainers
    assert [n for n, _ in eager.model.named_parameters()] == [n for n, _ in compiled.model.named_parameters()]
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers)
    batch = torch.randint(0, eager.config.vocab_size, (2, SEQ + 1))
    for trainer in (eager, compiled):
        trainer.loss.of(trainer.model, batch[:, :-1], batch[:, 1:]).loss.backward()
    for (name, a), b in zip(eager.model.named_parameters(), compiled.model.parameters()):
        assert torch.allclose(b.grad, a.grad, rtol=1e-5, atol=1e-7), name
    for trainer in (eager, compiled):
        trainer.optimizer.zero_grad(set_to_none=True)
    for _ in range(2):
        batches = [next(eager.loader), next(eager.loader)]
        a, b = eager.train_step(batches), compiled.train_step(batches)
        assert abs(a.loss - b.loss) <= 1e-5 * abs(a.loss)


def test_compile_refused_where_the_backend_has_no_compiler():
    backend = Backend(
        name="lazy", device_type="cpu", dist_backend="gloo", capabilities=Capabilities(compile_backend=None)
    )
    with pytest.raises(MixtralError, match="not supported by the lazy backend.*compile: false"):
        backend.compile(torch.nn.Linear(2, 2))


def test_spmd_backend_without_parallelize_is_named():
    backend = Backend(name="mesh", device_type="cpu", dist_backend="gloo", capabilities=Capabilities(spmd=True))
    with pytest.raises(MixtralError, match="mesh backend declares SPMD but does not implement parallelize"):
        backend.parallelize(torch.nn.Linear(2, 2), {"fsdp": 2})


def test_bf16_master_keeps_fp32_masters(tmp_path):
    trainer = tiny_trainer(tmp_path, "precision=bf16_master")
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
    assert all(m.dtype == torch.float32 for m in trainer.masters)
    before = [m.detach().clone() for m in trainer.masters]
    set_lr(trainer.optimizer, 1e-3)
    stats = trainer.train_step([next(trainer.loader), next(trainer.loader)])
    assert stats.finite
    for master, old, param in zip(trainer.masters, before, trainer.model.parameters()):
        assert not torch.equal(master, old)
        assert torch.equal(param, master.to(torch.bfloat16))


def test_bf16_master_gradients_start_afresh_each_step(tmp_path):
    """The fp32 master gradients' buffers are reused across steps: each step's gradient is its own micro-batches'
    sum, never added to the last step's (with lr 0 the parameters stay, so two steps see the same gradient)."""
    trainer = tiny_trainer(tmp_path, "precision=bf16_master")
    set_lr(trainer.optimizer, 0.0)
    batches = [next(trainer.loader), next(trainer.loader)]
    first = trainer.train_step(batches)
    grads = [m.grad.clone() for m in trainer.masters]
    buffers = [m.grad.data_ptr() for m in trainer.masters]
    second = trainer.train_step(batches)
    assert second.grad_norm == pytest.approx(first.grad_norm, rel=1e-6)
    assert [m.grad.data_ptr() for m in trainer.masters] == buffers
    for master, grad in zip(trainer.masters, grads):
        assert torch.equal(master.grad, grad)


def test_bf16_autocast_step(tmp_path):
    trainer = tiny_trainer(tmp_path, "precision=bf16")
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert trainer.train_step([next(trainer.loader)]).finite


def poison(trainer: Trainer, bad: Callable[[int], bool]) -> None:
    """Make the loss NaN on the steps bad() picks (by the number of steps done), as a bad batch would."""
    forward = trainer.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if bad(trainer.step):
            out.logits = out.logits * float("nan")
        return out

    trainer.model.forward = poisoned


def test_nan_steps_are_skipped_then_stop_the_run_with_checkpoint_intact(tmp_path):
    trainer = tiny_trainer(tmp_path, "train.steps=10", "train.max_bad_steps=3")
    poison(trainer, lambda done: done >= 3)
    with pytest.raises(MixtralError, match=r"3 consecutive steps had a NaN/Inf loss .*step 6.*step_00000003 is intact"):
        trainer.fit()
    assert trainer.skipped == 3
    latest = tmp_path / "checkpoints" / "latest"
    assert latest.resolve().name == "step_00000003"
    saved = load_model(latest)  # loadable, and no bad step changed the weights after it
    for name, param in saved.named_parameters():
        assert torch.equal(param, dict(trainer.model.named_parameters())[name].detach()), name
    lines = read_metrics(tmp_path)
    assert [r["step"] for r in lines if r.get("skipped")] == [4, 5, 6]
    assert lines[-1]["skipped_steps"] == 3


def test_a_single_nan_step_is_skipped_and_counted(tmp_path):
    trainer = tiny_trainer(tmp_path, "train.steps=4", "checkpoint.interval=0")
    poison(trainer, lambda done: done == 1)
    entering = []
    train_step = trainer.train_step
    trainer.train_step = lambda batches: (entering.append(snapshot(trainer.model)), train_step(batches))[1]
    trainer.fit()
    assert trainer.step == 4 and trainer.skipped == 1
    for name, param in entering[2].items():  # weights entering step 3 = weights after step 1 (step 2 skipped)
        assert torch.equal(param, entering[1][name]), name
    assert [r["step"] for r in read_metrics(tmp_path) if r.get("skipped")] == [2]


def test_eval_target_loss_stops_the_run(tmp_path):
    trainer = tiny_trainer(tmp_path, "train.steps=30", "eval.interval=2", "eval.target_loss=100.0")
    summary = trainer.fit()
    assert summary["step"] == 2 and summary["eval_loss"] <= 100.0
    assert checkpointing.latest_step_dir(tmp_path / "checkpoints").name == "step_00000002"


def test_eval_interval_in_tokens(tmp_path):
    # 4 sequences x 32 tokens = 128 tokens per step: an eval every 300 tokens falls after steps 3 and 5, and 6 (last)
    tiny_trainer(tmp_path, "eval.unit=tokens", "eval.interval=300").fit()
    assert [r["step"] for r in read_metrics(tmp_path) if "eval_loss" in r] == [3, 5, 6]


def test_multi_rank_recipe_in_one_process_says_how_to_launch(tmp_path):
    with pytest.raises(MixtralError, match=r"needs 2 ranks .*--nproc-per-node 2` or torchrun"):
        tiny_trainer(tmp_path, "parallel.tp=2", "parallel.ep=2")


def test_cli_train_on_builtin_corpus_then_plot(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = [
        "train",
        "--recipe",
        "cpu-tiny",
        "model.hidden_size=32",
        "model.intermediate_size=32",
        "model.num_hidden_layers=2",
        "model.num_attention_heads=4",
        "model.num_local_experts=4",
        "seq_len=32",
        "batch.micro_batch=2",
        "batch.global_batch=4",
        "train.steps=4",
        "eval.interval=2",
        "eval.samples=4",
        "checkpoint.interval=2",
        "train.expert_load_interval=2",
        "train.peak_flops=1e11",
        f"train.output_dir={run_dir}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    assert main(argv) == 0
    assert "trained cpu-tiny to step 4" in capsys.readouterr().out
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for record in train:
        assert {"step", "loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= record.keys()
        assert record["tokens_per_s"] > 0 and record["mfu"] > 0
    assert [(r["step"], r["eval_loss"] > 0) for r in lines if "eval_loss" in r] == [(0, True), (2, True), (4, True)]
    loads = [r for r in train if "expert_load" in r]
    assert len(loads) == 2 and len(loads[0]["expert_load"]) == 2
    assert all(abs(sum(row) - 1) < 1e-3 for row in loads[0]["expert_load"])
    assert all(x >= 1.0 for x in loads[0]["expert_imbalance"])
    assert "hidden_size: 32" in (run_dir / "recipe.yaml").read_text()
    latest = run_dir / "checkpoints" / "latest"
    assert (latest / "tokenizer.model").is_file() and load_model(latest).config.hidden_size == 32

    assert main(["plot", str(run_dir)]) == 0
    for name in ("loss.png", "expert_load.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_recipe_errors(capsys):
    assert main(["train", "--recipe", "cpu-tiny", "optimizer.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe key 'optimizer.lrr'" in err and "Traceback" not in err


def test_plot_needs_training_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "eval_loss": 3.0}\n')
    with pytest.raises(MixtralError, match="no training lines"):
        plot_run(tmp_path)


def test_init_from_a_run_directory(tmp_path):
    tiny_trainer(tmp_path / "base", "train.steps=3").fit()
    tuned = tiny_trainer(tmp_path / "tuned", f"model.init_from={tmp_path / 'base'}")
    base = load_model(tmp_path / "base" / "checkpoints" / "latest")
    for name, param in base.named_parameters():
        assert torch.equal(param, dict(tuned.model.named_parameters())[name].detach()), name


@pytest.mark.parametrize(
    "moe, bins",
    [
        (("moe.dispatcher=capacity", "moe.capacity_factor=0.5"), False),
        (("moe.dispatcher=capacity_bins", "moe.capacity_bins={num_bins: 2, alignment: 4}"), True),
    ],
)
def test_routing_metrics_are_logged_and_plotted(tmp_path, moe, bins):
    """Per layer: dropped fraction (capacity 0.5 must drop about half the pairs, bins never drop) and the bin used."""
    from mixtral.train.metrics import read_metrics
    from mixtral.train.plot import plot_run

    trainer = tiny_trainer(tmp_path, *moe)
    trainer.fit()
    loads = [r for r in read_metrics(tmp_path) if "expert_load" in r]
    layers = trainer.config.num_hidden_layers
    assert loads and all(len(r["dropped_fraction"]) == len(r["capacity_bin"]) == layers for r in loads)
    if bins:
        assert all(f == 0 for r in loads for f in r["dropped_fraction"])
        assert all(0 <= b < 2 for r in loads for b in r["capacity_bin"])
    else:
        assert all(0.3 < f < 0.7 for r in loads for f in r["dropped_fraction"])
        assert all(b == -1 for r in loads for b in r["capacity_bin"])
    assert [p.name for p in plot_run(tmp_path)] == ["loss.png", "expert_load.png"] + (["routing.png"] if bins else [])
