"""Hugging Face model IDs as checkpoints: resolved through a Hub cache the test fills itself (no network)."""

from __future__ import annotations

import shutil

import pytest
import torch

from mixtral.checkpoint.hf import save_hf
from mixtral.checkpoint.loading import checkpoint_config, load_model
from mixtral.cli import main
from mixtral.data.tokenizer import default_tokenizer_path
from mixtral.model import Mixtral
from mixtral.recipes import load_recipe

from conftest import small_config

MODEL_ID = "acme/tiny-mixtral"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache holding MODEL_ID's snapshot as huggingface_hub lays it out; offline mode on."""
    model = Mixtral(small_config(vocab_size=32000))
    model.init_weights(seed=3)
    repo = tmp_path / "hub" / f"models--{MODEL_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    save_hf(model, snapshot)
    shutil.copyfile(default_tokenizer_path(), snapshot / "tokenizer.model")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return model, snapshot


def test_an_id_loads_from_the_cache(hub_cache):
    model, snapshot = hub_cache
    assert checkpoint_config(MODEL_ID) == model.config
    loaded = load_model(MODEL_ID)
    for name, param in model.named_parameters():
        assert torch.equal(dict(loaded.named_parameters())[name], param), name


def test_generate_convert_and_init_from_take_an_id(hub_cache, tmp_path, capsys):
    model, snapshot = hub_cache
    prompt = ["--prompt", "The with statement", "--max-tokens", "6"]
    assert main(["generate", "--model", MODEL_ID, *prompt]) == 0
    by_id = capsys.readouterr().out
    assert main(["generate", "--model", str(snapshot), *prompt]) == 0
    assert capsys.readouterr().out == by_id
    assert main(["convert", "--input", MODEL_ID, "--output", str(tmp_path / "native"), "--to", "native"]) == 0
    assert checkpoint_config(tmp_path / "native") == model.config
    recipe = load_recipe(
        "cpu-tiny",
        [
            "model.preset=null",
            f"model.init_from={MODEL_ID}",
            "model.hidden_size=null",
            "model.intermediate_size=null",
            "model.num_hidden_layers=null",
            "model.num_attention_heads=null",
            "model.num_key_value_heads=null",
            "model.num_local_experts=null",
            "model.max_position_embeddings=null",
        ],
    )
    assert recipe.model_config() == model.config


def test_an_id_missing_from_the_cache_offline_says_where_and_how(hub_cache, tmp_path, capsys):
    assert main(["generate", "--model", "acme/not-cached", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"acme/not-cached: not in the Hugging Face cache {tmp_path / 'hub'}" in err
    assert "unset HF_HUB_OFFLINE" in err and "hf download acme/not-cached" in err


def test_a_local_directory_of_that_name_wins(hub_cache, tmp_path, monkeypatch):
    model, snapshot = hub_cache
    local = tmp_path / "here"
    shutil.copytree(snapshot, local / MODEL_ID)
    monkeypatch.chdir(local)
    assert checkpoint_config(MODEL_ID) == model.config
    shutil.rmtree(snapshot)  # the cache no longer has it: only the local directory can answer
    assert checkpoint_config(MODEL_ID) == model.config
