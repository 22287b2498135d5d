"""HF checkpoint directories: round trips in both tensor layouts, each bad input by message, atomic saves."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mixtral.checkpoint import hf
from mixtral.checkpoint.hf import (
    hf_layout,
    load_hf_model,
    load_hf_state_dict,
    read_hf_config,
    save_hf,
)
from mixtral.config import ModelConfig, MoEConfig
from mixtral.errors import MixtralError
from mixtral.model import Mixtral

from conftest import small_config

SHARD_BYTES = 30_000  # small enough that the tiny model needs several shards


def random_model(config: ModelConfig, moe: MoEConfig | None = None) -> Mixtral:
    model = Mixtral(config, moe=moe)
    model.init_weights(std=0.1)
    with torch.no_grad():
        for layer in model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    return model


def hf_tensor_names(model: Mixtral) -> list[str]:
    return [hf_name for name, p in model.named_parameters() for hf_name, _ in hf_layout(name, p.shape)]


def assert_same_weights(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard_bytes", [2 * 1024**3, SHARD_BYTES])
def test_round_trip(tmp_path, tied, shard_bytes):
    config = small_config(tie_word_embeddings=tied, sliding_window=7, rope_theta=500.0)
    model = random_model(config)
    save_hf(model, tmp_path / "out", max_shard_bytes=shard_bytes)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    if shard_bytes == SHARD_BYTES:
        index = json.loads((tmp_path / "out" / hf.INDEX).read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and files == sorted([hf.CONFIG, hf.INDEX, *shards])
        assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    else:
        assert files == [hf.CONFIG, hf.SINGLE]
        with safe_open(tmp_path / "out" / hf.SINGLE, framework="pt") as f:
            names = set(f.keys())
        assert "model.layers.1.block_sparse_moe.experts.4.w2.weight" in names
        assert "model.layers.0.block_sparse_moe.gate.weight" in names
        assert ("lm_head.weight" in names) != tied
    assert json.loads((tmp_path / "out" / hf.CONFIG).read_text())["torch_dtype"] == "float32"

    loaded = load_hf_model(tmp_path / "out")
    assert loaded.config == config and not loaded.training
    assert_same_weights(loaded.state_dict(), model.state_dict())
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_loads_fused_names_from_shards(tmp_path):
    """transformers 5's in-memory names (mlp.experts.gate_up_proj / down_proj), split over two shards."""
    config = small_config()
    model = random_model(config)
    state = {("" if name == "lm_head.weight" else "model.") + name: t for name, t in model.state_dict().items()}
    names = list(state)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (tmp_path / hf.INDEX).write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / hf.CONFIG).write_text(json.dumps(config.to_hf_dict()))
    assert "model.layers.0.mlp.experts.gate_up_proj" in weight_map
    assert_same_weights(load_hf_state_dict(tmp_path, read_hf_config(tmp_path)), model.state_dict())


def test_bf16_save_and_tokenizer_copy(tmp_path):
    model = random_model(small_config())
    tokenizer = tmp_path / "my.model"
    tokenizer.write_bytes(b"sentencepiece bytes")
    save_hf(model, tmp_path / "out", dtype=torch.bfloat16, tokenizer_path=tokenizer)
    assert (tmp_path / "out" / hf.TOKENIZER).read_bytes() == b"sentencepiece bytes"
    assert json.loads((tmp_path / "out" / hf.CONFIG).read_text())["torch_dtype"] == "bfloat16"
    expected = {name: t.to(torch.bfloat16) for name, t in model.state_dict().items()}
    config = read_hf_config(tmp_path / "out")
    assert_same_weights(load_hf_state_dict(tmp_path / "out", config), expected)
    loaded = load_hf_model(tmp_path / "out", dtype=torch.float32)
    assert_same_weights(loaded.state_dict(), {name: t.float() for name, t in expected.items()})


def test_routing_state_is_not_saved_and_starts_at_zero(tmp_path):
    """Capacity bins and expert bias are training state the HF format has no place for."""
    moe = MoEConfig(dispatcher="capacity_bins", expert_bias=True)
    model = random_model(small_config(), moe)
    with torch.no_grad():
        model.layers[0].mlp.expert_bias.fill_(0.5)
    save_hf(model, tmp_path)
    with safe_open(tmp_path / hf.SINGLE, framework="pt") as f:
        assert len(list(f.keys())) == len(hf_tensor_names(model))
    loaded = load_hf_model(tmp_path, moe=moe)
    assert_same_weights(dict(loaded.named_parameters()), dict(model.named_parameters()))
    buffers = dict(loaded.named_buffers())
    assert "layers.1.mlp.dispatcher.bins.edges" in buffers and "layers.0.mlp.expert_bias" in buffers
    for name, buffer in buffers.items():
        assert buffer.device.type == "cpu", name
        if not name.startswith("rope_"):
            assert (buffer == 0).all(), name
    assert torch.equal(loaded.rope_cos, model.rope_cos) and torch.equal(loaded.rope_sin, model.rope_sin)


@pytest.fixture
def saved(tmp_path):
    """A saved single-file checkpoint directory."""
    save_hf(random_model(small_config()), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def load_error(path) -> str:
    with pytest.raises(MixtralError) as err:
        load_hf_model(path)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_directory(tmp_path):
    message = load_error(tmp_path / "nope")
    assert str(tmp_path / "nope") in message and "model directory not found" in message


def test_not_mixtral_config(saved):
    data = json.loads((saved / hf.CONFIG).read_text()) | {"model_type": "llama"}
    (saved / hf.CONFIG).write_text(json.dumps(data))
    message = load_error(saved)
    assert str(saved / hf.CONFIG) in message and "model_type is 'llama', not 'mixtral'" in message


def test_missing_config(saved):
    (saved / hf.CONFIG).unlink()
    assert "no config.json" in load_error(saved)


def test_wrong_shape(saved):
    file = saved / hf.SINGLE
    tensors = load_file(file)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(17, 48)
    save_file(tensors, file)
    message = load_error(saved)
    assert str(file) in message and "'model.layers.1.self_attn.k_proj.weight'" in message
    assert "[17, 48]" in message and "[16, 48]" in message


def test_missing_tensor(saved):
    file = saved / hf.SINGLE
    tensors = load_file(file)
    del tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, file)
    message = load_error(saved)
    assert "'model.layers.0.block_sparse_moe.experts.3.w2.weight' is missing" in message


def test_tensor_beyond_config(saved):
    data = json.loads((saved / hf.CONFIG).read_text()) | {"num_hidden_layers": 1}
    (saved / hf.CONFIG).write_text(json.dumps(data))
    assert "unexpected tensor 'model.layers.1." in load_error(saved)


def test_truncated_file(saved):
    file = saved / hf.SINGLE
    file.write_bytes(file.read_bytes()[:-1000])
    message = load_error(saved)
    assert str(file) in message and "truncated or corrupt" in message


def test_missing_shard(tmp_path):
    save_hf(random_model(small_config()), tmp_path, max_shard_bytes=SHARD_BYTES)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    message = load_error(tmp_path)
    assert str(tmp_path / hf.INDEX) in message and f"shard '{shard.name}' is missing" in message


def test_no_weights(saved):
    (saved / hf.SINGLE).unlink()
    assert "neither model.safetensors nor model.safetensors.index.json" in load_error(saved)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failure after the first shard leaves the previous checkpoint at path intact and loadable."""
    path = tmp_path / "ckpt"
    old, new = random_model(small_config()), random_model(small_config())
    save_hf(old, path)
    real_write, calls = hf.write_safetensors, []

    def failing_write(file, *args, **kwargs):
        if calls:
            raise OSError("No space left on device")
        calls.append(file)
        real_write(file, *args, **kwargs)

    monkeypatch.setattr(hf, "write_safetensors", failing_write)
    with pytest.raises(OSError, match="No space left"):
        save_hf(new, path, max_shard_bytes=SHARD_BYTES)
    assert len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind
    assert_same_weights(load_hf_model(path).state_dict(), old.state_dict())

    monkeypatch.undo()
    save_hf(new, path, max_shard_bytes=SHARD_BYTES)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert not (path / hf.SINGLE).exists()  # replaced, not merged
    assert_same_weights(load_hf_model(path).state_dict(), new.state_dict())


def test_save_over_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MixtralError, match="exists and is not a directory"):
        save_hf(random_model(small_config()), tmp_path / "file")
