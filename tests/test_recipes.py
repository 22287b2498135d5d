"""Recipe loading, overrides and validation: every mistake is a MixtralError naming the key and the fix."""

from __future__ import annotations

import pytest
import yaml

from mixtral.errors import MixtralError
from mixtral.recipes import RECIPES_DIR, Recipe, ScheduleSection, load_recipe, recipe_from_dict
from mixtral.train.optim import lr_factor


def test_cpu_tiny_loads_by_name_and_by_path():
    by_name = load_recipe("cpu-tiny")
    by_path = load_recipe(RECIPES_DIR / "cpu-tiny.yaml")
    assert by_name == by_path
    assert by_name.name == "cpu-tiny"
    assert str(by_name.output_dir) == "runs/cpu-tiny"
    assert str(by_name.checkpoint_dir) == "runs/cpu-tiny/checkpoints"
    config = by_name.model_config()
    assert 5e6 <= config.num_parameters <= 20e6
    assert config.vocab_size == 32000 and config.num_experts_per_tok == 2 and 4 <= config.num_local_experts <= 8
    assert config.head_dim == config.hidden_size // config.num_attention_heads  # re-derived after the override


def test_overrides_are_typed_and_applied():
    recipe = load_recipe(
        "cpu-tiny",
        [
            "optimizer.lr=1e-4",
            "train.steps=7",
            "optimizer.betas=[0.8, 0.9]",
            "eval.target_loss=2.5",
            "precision=bf16",
            "moe.z_loss_coeff=0.001",
            "model.num_hidden_layers=2",
            "train.output_dir=/tmp/x",
        ],
    )
    assert recipe.optimizer.lr == 1e-4 and isinstance(recipe.optimizer.lr, float)
    assert recipe.train.steps == 7
    assert recipe.optimizer.betas == (0.8, 0.9)
    assert recipe.eval.target_loss == 2.5
    assert recipe.precision == "bf16"
    assert recipe.moe.z_loss_coeff == 0.001
    assert recipe.model_config().num_hidden_layers == 2
    assert str(recipe.output_dir) == "/tmp/x"


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("optimizer:\n  lr: 3e-4\nmodel:\n  preset: tiny\n")  # PyYAML reads 3e-4 as a string
    assert load_recipe(path).optimizer.lr == 3e-4


def test_resolved_recipe_round_trips():
    recipe = load_recipe("cpu-tiny", ["schedule.name=warmup_hold", "schedule.warmup_fraction=0.25"])
    again = recipe_from_dict(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe


@pytest.mark.parametrize(
    "override, words",
    [
        ("optimizer.lrr=1", ["optimizer.lrr", "did you mean 'lr'", "allowed keys in optimizer", "weight_decay"]),
        ("trian.steps=3", ["trian", "allowed keys in the recipe", "train"]),
        ("train.steps=many", ["train.steps", "expects int", "'many'"]),
        ("train.steps=2.5", ["train.steps", "expects int"]),
        ("optimizer.lr=fast", ["optimizer.lr", "expects float"]),
        ("schedule.name=exponential", ["schedule.name", "one of cosine, linear, constant, warmup_hold"]),
        ("precision=fp16", ["precision", "one of fp32, bf16, bf16_master"]),
        ("activation_checkpointing=some", ["activation_checkpointing", "none, selective, moe, full"]),
        ("parallel.sp=1", ["parallel.sp", "expects bool"]),
        ("parallel.zero=4", ["parallel.zero", "one of 0, 1, 2, 3"]),
        ("parallel.cp_algo=ulysses", ["parallel.cp_algo", "one of allgather, ring"]),
        ("mode=serve", ["'mode'", "one of train, inference"]),
        ("hardware.device=a100", ["hardware.device", "one of h100, v5p, gaudi2, 910b, cpu"]),
        ("hardware.devcies=8", ["hardware.devcies", "did you mean 'devices'", "allowed keys in hardware"]),
        ("hardware.nodes=0", ["'hardware.nodes' must be positive"]),
        ("backend_options=3", ["backend_options", "a mapping of names to values"]),
        ("schedule.decay_steps=10", ["schedule.decay_steps", "larger than the warmup (20 steps)"]),
        ("optimizer.betas=[0.9]", ["optimizer.betas", "a list of 2 float"]),
        ("seq_len.x=1", ["seq_len", "not a section"]),
        ("moe.dispatcher=magic", ["moe.dispatcher", "magic"]),
        ("model.hidden_size=-4", ["hidden_size", "positive"]),
        ("train.steps", ["not key=value"]),
    ],
)
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(MixtralError) as err:
        load_recipe("cpu-tiny", [override]).model_config()
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_batch_must_divide_into_micro_batches():
    with pytest.raises(
        MixtralError,
        match=r"batch.global_batch \(12\) must be a multiple of batch.micro_batch "
        r"\(8\) x parallel.dp \(1\) = 8",
    ):
        load_recipe("cpu-tiny", ["batch.micro_batch=8", "batch.global_batch=12"])
    recipe = load_recipe("cpu-tiny", ["batch.micro_batch=2", "batch.global_batch=12"])
    assert recipe.grad_accum == 6
    with pytest.raises(MixtralError, match=r"parallel.dp \(4\) = 8"):
        load_recipe("cpu-tiny", ["batch.micro_batch=2", "batch.global_batch=12", "parallel.dp=4"])
    assert load_recipe("cpu-tiny", ["batch.micro_batch=2", "batch.global_batch=16", "parallel.dp=4"]).grad_accum == 2


@pytest.mark.parametrize(
    "data, message",
    [
        ({"optimizer": {"lr": 0}}, "'optimizer.lr' must be positive"),
        ({"schedule": {"warmup_fraction": 1.5}}, "'schedule.warmup_fraction' must be between 0 and 1"),
        ({"checkpoint": {"keep_last": -1}}, "'checkpoint.keep_last' must be >= 0"),
        ({"model": {"preset": "tiny", "config": "x.json"}}, "sets preset and config; set only one"),
        ({"optimizer": 3}, "section 'optimizer' must be a mapping"),
        ({"data": {"corpus": "web"}}, "data.corpus is 'web'"),
        ({"model": {"preset": "huge"}}, "unknown model preset 'huge'"),
        (
            {"schedule": {"name": "warmup_hold", "decay_steps": 5}},
            "'schedule.decay_steps' applies to the cosine and linear schedules, not 'warmup_hold'",
        ),
    ],
)
def test_invalid_recipes(data, message):
    with pytest.raises(MixtralError, match=message):
        recipe_from_dict(data).model_config()


def test_unknown_recipe_name_lists_known_ones():
    with pytest.raises(MixtralError, match="recipe 'nope' not found.*known recipes: .*cpu-tiny"):
        load_recipe("nope")


def test_new_sections_load_and_round_trip():
    recipe = load_recipe(
        "cpu-tiny",
        [
            "mode=inference",
            "hardware.device=cpu",
            "hardware.devices=1",
            "parallel.zero=0",
            "parallel.cp_algo=ring",
            "activation_checkpointing=moe",
            "schedule.decay_steps=200",
            "backend_options={fused_sdpa_recompute: false}",
        ],
    )
    assert (recipe.mode, recipe.hardware.device, recipe.hardware.devices, recipe.hardware.nodes) == (
        "inference",
        "cpu",
        1,
        None,
    )
    assert (recipe.parallel.zero, recipe.parallel.cp_algo, recipe.activation_checkpointing) == (0, "ring", "moe")
    assert recipe.schedule.decay_steps == 200 and recipe.backend_options == {"fused_sdpa_recompute": False}
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def test_defaults_form_a_valid_recipe():
    recipe = Recipe()
    recipe.validate()
    assert recipe.grad_accum == 1 and recipe.parallel.world_size == 1


@pytest.mark.parametrize("name, halfway", [("cosine", 0.55), ("linear", 0.55)])
def test_decay_steps_end_the_decay_then_min_lr(name, halfway):
    """Megatron's --lr-decay-iters: warmup 10, decay over steps 10..110, then lr x min_lr_ratio to the end."""
    schedule = ScheduleSection(name=name, warmup_steps=10, min_lr_ratio=0.1, decay_steps=110)
    factors = [lr_factor(schedule, step, 200) for step in range(200)]
    assert factors[4] == pytest.approx(0.5) and factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(halfway)  # halfway through the decay: 0.1 + 0.9 x 0.5
    assert factors[110:] == pytest.approx([0.1] * 90)  # decay over, min lr held until train.steps
    assert factors[10:111] == sorted(factors[10:111], reverse=True)
    to_the_end = ScheduleSection(name=name, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(to_the_end, 60, 200) > factors[60] and lr_factor(to_the_end, 199, 200) > 0.1
    assert lr_factor(ScheduleSection(name=name, min_lr_ratio=0.1, decay_steps=400), 199, 200) > 0.5  # cut short


def test_backend_options_reach_the_backend(monkeypatch):
    """The Gaudi recipe's backend_options.fused_sdpa_recompute becomes FusedSDPA's recompute flag (simulated
    kernels)."""
    import sys
    import types

    from mixtral.backend import registry
    from tests import vendor_sim as sim

    kernels = types.ModuleType("habana_frameworks.torch.hpex.kernels")
    kernels.FusedSDPA, kernels.RotaryPosEmbeddingHelperV1 = sim.FusedSDPA, sim.RotaryPosEmbeddingHelperV1
    normalization = types.ModuleType("habana_frameworks.torch.hpex.normalization")
    normalization.FusedRMSNorm = sim.FusedRMSNorm
    monkeypatch.setitem(sys.modules, kernels.__name__, kernels)
    monkeypatch.setitem(sys.modules, normalization.__name__, normalization)
    recipe = load_recipe("gaudi2-8x7b-32hpu-capacity-bins", ["backend_options.fused_sdpa_recompute=false"])
    hpu = registry().backends["hpu"]
    configured = hpu.configure(recipe.backend_options)
    assert configured is not hpu and hpu.options == {} and configured.options == {"fused_sdpa_recompute": False}
    assert configured.ops.attention.keywords["recompute"] is False
    assert (
        hpu.configure({}) is hpu
        and type(hpu)(hpu.name, hpu.device_type, hpu.dist_backend).build_ops().attention.keywords["recompute"] is True
    )
