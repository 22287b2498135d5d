"""Recipe loading, overrides and validation: every mistake is a MixtralError naming the key and the fix."""

from __future__ import annotations

import pytest
import yaml

from mixtral.errors import MixtralError
from mixtral.recipes import RECIPES_DIR, Recipe, load_recipe, recipe_from_dict


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
    recipe = load_recipe("cpu-tiny", ["optimizer.lr=1e-4", "train.steps=7", "optimizer.betas=[0.8, 0.9]",
                                      "eval.target_loss=2.5", "precision=bf16", "moe.z_loss_coeff=0.001",
                                      "model.num_hidden_layers=2", "train.output_dir=/tmp/x"])
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


@pytest.mark.parametrize("override, words", [
    ("optimizer.lrr=1", ["optimizer.lrr", "did you mean 'lr'", "allowed keys in optimizer", "weight_decay"]),
    ("trian.steps=3", ["trian", "allowed keys in the recipe", "train"]),
    ("train.steps=many", ["train.steps", "expects int", "'many'"]),
    ("train.steps=2.5", ["train.steps", "expects int"]),
    ("optimizer.lr=fast", ["optimizer.lr", "expects float"]),
    ("schedule.name=exponential", ["schedule.name", "one of cosine, linear, constant, warmup_hold"]),
    ("precision=fp16", ["precision", "one of fp32, bf16, bf16_master"]),
    ("activation_checkpointing=some", ["activation_checkpointing", "none, selective, full"]),
    ("parallel.sp=1", ["parallel.sp", "expects bool"]),
    ("parallel.zero=4", ["parallel.zero", "one of 1, 2, 3"]),
    ("optimizer.betas=[0.9]", ["optimizer.betas", "a list of 2 float"]),
    ("seq_len.x=1", ["seq_len", "not a section"]),
    ("moe.dispatcher=magic", ["moe.dispatcher", "magic"]),
    ("model.hidden_size=-4", ["hidden_size", "positive"]),
    ("train.steps", ["not key=value"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(MixtralError) as err:
        load_recipe("cpu-tiny", [override]).model_config()
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_batch_must_divide_into_micro_batches():
    with pytest.raises(MixtralError, match=r"batch.global_batch \(12\) must be a multiple of batch.micro_batch "
                                           r"\(8\) x parallel.dp \(1\) = 8"):
        load_recipe("cpu-tiny", ["batch.micro_batch=8", "batch.global_batch=12"])
    recipe = load_recipe("cpu-tiny", ["batch.micro_batch=2", "batch.global_batch=12"])
    assert recipe.grad_accum == 6
    with pytest.raises(MixtralError, match=r"parallel.dp \(4\) = 8"):
        load_recipe("cpu-tiny", ["batch.micro_batch=2", "batch.global_batch=12", "parallel.dp=4"])
    assert load_recipe("cpu-tiny", ["batch.micro_batch=2", "batch.global_batch=16", "parallel.dp=4"]).grad_accum == 2


@pytest.mark.parametrize("data, message", [
    ({"optimizer": {"lr": 0}}, "'optimizer.lr' must be positive"),
    ({"schedule": {"warmup_fraction": 1.5}}, "'schedule.warmup_fraction' must be between 0 and 1"),
    ({"checkpoint": {"keep_last": -1}}, "'checkpoint.keep_last' must be >= 0"),
    ({"model": {"preset": "tiny", "config": "x.json"}}, "sets preset and config; set only one"),
    ({"optimizer": 3}, "section 'optimizer' must be a mapping"),
    ({"data": {"corpus": "web"}}, "data.corpus is 'web'"),
    ({"model": {"preset": "huge"}}, "unknown model preset 'huge'"),
])
def test_invalid_recipes(data, message):
    with pytest.raises(MixtralError, match=message):
        recipe_from_dict(data).model_config()


def test_unknown_recipe_name_lists_known_ones():
    with pytest.raises(MixtralError, match="recipe 'nope' not found.*known recipes: .*cpu-tiny"):
        load_recipe("nope")


def test_defaults_form_a_valid_recipe():
    recipe = Recipe()
    recipe.validate()
    assert recipe.grad_accum == 1 and recipe.parallel.world_size == 1
