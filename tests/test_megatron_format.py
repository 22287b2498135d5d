"""Megatron-core torch_dist layout: the export's keys and shapes equal the docs table, its extra states and common
state are megatron-core's for each layer spec, QKV is fused per query group, round trips are exact, the vocabulary
pads with zero rows, Megatron's own variants (TE-spec norm name, padded vocabulary, TP-split chunks, older
metadata.json with common.pt, save plans in the DCP metadata) read correctly, and foreign checkpoints and bad flags
are refused by name. tests/megatron checks the same against megatron-core itself."""

from __future__ import annotations

import argparse
import io
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import BytesIOWriteData, SavePlan, TensorWriteData, WriteItem, WriteItemType

from mixtral.checkpoint import megatron
from mixtral.checkpoint.megatron import (
    FC1,
    TOP_KEYS,
    MegatronSource,
    from_megatron_state_dict,
    fuse_qkv,
    megatron_shapes,
    save_megatron,
    split_qkv,
    to_megatron_state_dict,
)
from mixtral.checkpoint.native import LazyTensor, _dcp_load, dcp_save, read_boxes, read_dcp_metadata
from mixtral.cli import main
from mixtral.errors import MixtralError
from mixtral.model import Mixtral

from conftest import small_config

DOCS = Path(__file__).resolve().parents[1] / "docs" / "checkpoint-formats.md"


def doc_table(config) -> dict[str, tuple[int, ...]]:
    """Megatron key -> shape from the one mapping table in docs/checkpoint-formats.md, symbols evaluated."""
    c = config
    symbols = {
        "L": c.num_hidden_layers,
        "E": c.num_local_experts,
        "H": c.hidden_size,
        "F": c.intermediate_size,
        "V": c.vocab_size,
        "nh": c.num_attention_heads,
        "nkv": c.num_key_value_heads,
        "d": c.head_dim,
    }
    table = {}
    for line in DOCS.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[2].startswith(("`decoder.", "`embedding.", "`output_layer.")):
            key = re.match(r"`([^`]+)`", cells[2]).group(1)
            shape = eval(cells[3].strip("`"), {"__builtins__": {}}, symbols)  # our own doc: [L, (nh + 2*nkv)*d, H]
            table[key] = tuple(shape)
    return table


def reader(state: dict[str, torch.Tensor]):
    """The (name, expert) -> tensor reader save_megatron takes, over a full state dict."""
    return lambda name, expert: state[name] if expert is None else state[name][expert : expert + 1]


def stored(release: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, object]]:
    """(tensor key -> shape, object key -> its unpickled value) of a torch_dist directory."""
    entries = read_dcp_metadata(release).state_dict_metadata
    objects = {key: io.BytesIO() for key, md in entries.items() if isinstance(md, BytesStorageMetadata)}
    _dcp_load(objects, release, local=True)  # objects load with weights_only=True
    return {key: tuple(md.size) for key, md in entries.items() if isinstance(md, TensorStorageMetadata)}, objects


def random_model(config) -> Mixtral:
    model = Mixtral(config)
    model.init_weights(0.1)
    with torch.no_grad():
        for layer in model.layers:
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_export_keys_and_shapes_match_the_docs_table(tmp_path, tied):
    config = small_config(tie_word_embeddings=tied)
    state = dict(random_model(config).named_parameters())
    save_megatron(tmp_path / "meg", reader(state), config, torch.float32)
    release = tmp_path / "meg" / "release"
    tensors, objects = stored(release)
    expected = doc_table(config)
    if tied:
        expected.pop("output_layer.weight")
    assert len(expected) == (9 if tied else 10)
    assert tensors == expected == megatron_shapes(config)
    # megatron-core 0.19: two keys in metadata.json, the common state inside the DCP files (no common.pt)
    assert json.loads((release / "metadata.json").read_text()) == {
        "sharded_backend": "torch_dist",
        "sharded_backend_version": 1,
    }
    assert sorted(path.name for path in release.iterdir() if not path.name.endswith(".distcp")) == [
        ".metadata",
        "config.json",
        "metadata.json",
    ]
    assert objects.pop("common_state/shard_0_1") == [{"checkpoint_version": 3.0, "iteration": 0}]
    assert (tmp_path / "meg" / "latest_checkpointed_iteration.txt").read_text() == "release"
    chunks = read_dcp_metadata(release).state_dict_metadata[FC1].chunks
    assert len(chunks) == config.num_hidden_layers * config.num_local_experts  # one box per (layer, expert)


@pytest.mark.parametrize("spec", ["local", "te"])
def test_export_writes_each_specs_extra_states(tmp_path, spec):
    """The local spec's linear layers store None as extra state, Transformer Engine's modules an empty uint8 tensor;
    the TE spec names the pre-MLP norm pre_mlp_layernorm and gives it and the final norm extra states too."""
    config = small_config()
    state = dict(random_model(config).named_parameters())
    save_megatron(tmp_path / "meg", reader(state), config, torch.float32, spec=spec)
    tensors, objects = stored(tmp_path / "meg" / "release")
    L, E = config.num_hidden_layers, config.num_local_experts
    extra_states = {
        "decoder.layers.self_attention.linear_qkv": L,
        "decoder.layers.self_attention.linear_proj": L,
        "decoder.layers.mlp.experts.experts.linear_fc1": L * E,
        "decoder.layers.mlp.experts.experts.linear_fc2": L * E,
    }
    if spec == "te":
        extra_states |= {"decoder.layers.pre_mlp_layernorm": L, "decoder.final_layernorm": 1}
    assert {
        module: sum(key.startswith(f"{module}._extra_state/") for key in objects) for module in extra_states
    } == extra_states
    assert len(objects) == sum(extra_states.values()) + 1  # and the common state
    assert "decoder.layers.mlp.experts.experts.linear_fc1._extra_state/shard_1.4_2.5" in objects  # layer 1, expert 4
    values = [value for key, value in objects.items() if "_extra_state" in key]
    if spec == "local":
        assert all(value == [None] for value in values)
        assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in tensors
    else:
        assert all(value[0].dtype == torch.uint8 and value[0].numel() == 0 for value in values)
        assert "decoder.layers.pre_mlp_layernorm.weight" in tensors
        assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" not in tensors
        assert "decoder.final_layernorm._extra_state/shard_0_1" in objects
    source = MegatronSource(tmp_path / "meg")
    assert all(torch.equal(source.read(name), tensor) for name, tensor in state.items())


def test_padded_vocabulary(tmp_path):
    config = small_config()  # vocabulary 101
    state = dict(random_model(config).named_parameters())
    rows = megatron.padded_vocab_size(config.vocab_size, 32 * 2)
    assert rows == 128
    save_megatron(tmp_path / "meg", reader(state), config, torch.float32, vocab_rows=rows)
    release = tmp_path / "meg" / "release"
    for name in ("embed_tokens.weight", "lm_head.weight"):
        key = TOP_KEYS[name]
        padded = read_boxes(release, {key: [((0, 0), (rows, config.hidden_size))]})[key][0]
        assert torch.equal(padded[:101], state[name]) and not padded[101:].any()
    source = MegatronSource(tmp_path / "meg")  # drops the padding
    assert torch.equal(source.read("embed_tokens.weight"), state["embed_tokens.weight"])
    with pytest.raises(MixtralError, match=r"a padded vocabulary of 100 rows is smaller than the vocabulary \(101\)"):
        save_megatron(tmp_path / "small", reader(state), config, torch.float32, vocab_rows=100)


def test_reads_older_metadata_and_save_plans(tmp_path):
    """megatron-core before 0.19 wrote four keys to metadata.json and the common state to common.pt; megatron-core
    keeps each rank's save plan in the DCP metadata. Both read; a global outside DCP's record types still does not."""
    config = small_config()
    state = dict(random_model(config).named_parameters())
    save_megatron(tmp_path / "meg", reader(state), config, torch.float32)
    release = tmp_path / "meg" / "release"
    (release / "metadata.json").write_text(
        json.dumps(
            {
                "sharded_backend": "torch_dist",
                "sharded_backend_version": 1,
                "common_backend": "torch",
                "common_backend_version": 1,
            }
        )
    )
    torch.save({"checkpoint_version": 3.0, "iteration": 0}, release / "common.pt")
    metadata = read_dcp_metadata(release)
    fc1 = metadata.state_dict_metadata[FC1]
    write_data = TensorWriteData(fc1.chunks[0], fc1.properties, fc1.size)
    index = MetadataIndex(FC1, torch.Size([0, 0, 0, 0]))
    metadata.all_local_plans = [
        SavePlan(
            [
                WriteItem(index, WriteItemType.SHARD, tensor_data=write_data),
                WriteItem(
                    MetadataIndex("common_state/shard_0_1"), WriteItemType.BYTE_IO, bytes_io_data=BytesIOWriteData(1)
                ),
            ],
            _StoragePrefix("__0_"),
        )
    ]
    (release / ".metadata").write_bytes(pickle.dumps(metadata))
    source = MegatronSource(tmp_path / "meg")
    assert all(torch.equal(source.read(name), tensor) for name, tensor in state.items())
    metadata.all_local_plans = [argparse.Namespace(tensor_model_parallel_size=1)]  # as Megatron-LM's args pickle
    (release / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(MixtralError, match=r"refers to 'argparse.Namespace'.*only DCP record types"):
        MegatronSource(tmp_path / "meg")


def test_qkv_is_fused_per_query_group():
    config = small_config(num_attention_heads=6, num_key_value_heads=2)  # 3 query heads per group
    d, hidden = config.head_dim, config.hidden_size
    q = torch.arange(6).repeat_interleave(d)[:, None].expand(-1, hidden).float()  # rows of q head h: h
    k = (10 + torch.arange(2)).repeat_interleave(d)[:, None].expand(-1, hidden).float()  # k head g: 10 + g
    v = (20 + torch.arange(2)).repeat_interleave(d)[:, None].expand(-1, hidden).float()  # v head g: 20 + g
    fused = fuse_qkv(q, k, v, config)
    heads = fused[::d, 0].tolist()
    assert heads == [0, 1, 2, 10, 20, 3, 4, 5, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, config), (q, k, v)))


def test_round_trips_and_logits(tmp_path):
    config = small_config()
    model = random_model(config)
    state = dict(model.named_parameters())
    exported = to_megatron_state_dict(state, config)
    assert torch.equal(exported[FC1][1, 3], state["layers.1.mlp.experts.gate_up_proj"][3])
    assert torch.equal(
        exported["decoder.layers.mlp.linear_fc1.layer_norm_weight"][1],
        state["layers.1.post_attention_layernorm.weight"],
    )
    back = from_megatron_state_dict(exported, config)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)

    save_megatron(tmp_path / "meg", reader(state), config, torch.float32)
    source = MegatronSource(tmp_path / "meg")  # follows the tracker file to release/, reads its config.json
    assert source.config == config
    for name, tensor in state.items():
        assert torch.equal(source.read(name), tensor), name
    assert torch.equal(source.read("layers.0.mlp.experts.down_proj", 4), state["layers.0.mlp.experts.down_proj"][4:5])
    rebuilt = Mixtral(config)
    rebuilt.load_state_dict({name: source.read(name) for name in state})
    tokens = torch.randint(0, config.vocab_size, (2, 7))
    assert torch.equal(rebuilt(tokens).logits, model(tokens).logits)


def write_like_megatron(path: Path, exported: dict[str, torch.Tensor], config, pad_vocab: int) -> None:
    """A torch_dist directory as Megatron's TE spec with TP2 would write it: `pre_mlp_layernorm`, a padded
    vocabulary, QKV rows split over two TP ranks, fc1 stored as separate gate and up halves, extra state."""
    state = {}
    for key, full in exported.items():
        if key == "decoder.layers.mlp.linear_fc1.layer_norm_weight":
            key = "decoder.layers.pre_mlp_layernorm.weight"
        if key in megatron.VOCAB_KEYS:
            full = torch.cat([full, torch.randn(pad_vocab, full.shape[1])])
        shape = tuple(full.shape)
        if full.ndim >= 3:  # split the row dim (dim -2) in two, per layer (and expert)
            half = shape[-2] // 2
            lead = [()] if full.ndim == 3 else [(e,) for e in range(shape[1])]
            halves = ((0, half), (half, shape[-2] - half))
            boxes = [
                ((layer, *e, start, 0), (1, *(1,) * len(e), rows, shape[-1]))
                for layer in range(shape[0])
                for e in lead
                for start, rows in halves
            ]
        else:
            boxes = [((0,) * full.ndim, shape)]
        state[key] = LazyTensor(
            shape, full.dtype, boxes, lambda box, full=full: full[tuple(slice(o, o + s) for o, s in zip(*box))]
        )
    state["optimizer.state.exp_avg.decoder.final_layernorm.weight"] = torch.zeros(config.hidden_size)
    state["rng_state"] = [{"random_rng_state": (1, 2, 3)}]
    dcp_save(state, path)
    (path / "metadata.json").write_text(json.dumps(megatron.CHECKPOINTING_CONFIG))


def test_reads_megatron_layout_variants(tmp_path):
    config = small_config()
    state = dict(random_model(config).named_parameters())
    write_like_megatron(tmp_path, to_megatron_state_dict(state, config), config, pad_vocab=27)
    with pytest.raises(MixtralError, match="pass --config"):
        MegatronSource(tmp_path)
    source = MegatronSource(tmp_path, config)
    assert source.keys["decoder.layers.mlp.linear_fc1.layer_norm_weight"] == "decoder.layers.pre_mlp_layernorm.weight"
    for name, tensor in state.items():
        assert torch.equal(source.read(name), tensor), name
    expert = source.read("layers.1.mlp.experts.gate_up_proj", 2)
    assert torch.equal(expert, state["layers.1.mlp.experts.gate_up_proj"][2:3])


def test_foreign_checkpoints_refused(tmp_path):
    config = small_config()
    state = dict(random_model(config).named_parameters())
    save_megatron(tmp_path / "meg", reader(state), config, torch.float32)
    release = tmp_path / "meg" / "release"
    with pytest.raises(
        MixtralError,
        match=r"--config does not match the config.json saved with these weights "
        r"\(num_key_value_heads: 3 given, 2 saved\); drop --config",
    ):
        MegatronSource(release, small_config(num_key_value_heads=3))
    (release / "config.json").rename(tmp_path / "config.json")  # as megatron-core saves it: the config is --config's
    with pytest.raises(MixtralError, match=r"'decoder.layers.self_attention.linear_qkv.weight' has shape .*--config"):
        MegatronSource(release, small_config(num_key_value_heads=3))
    with pytest.raises(MixtralError, match=r"holds 'output_layer.weight' but the config ties the embeddings"):
        MegatronSource(release, small_config(tie_word_embeddings=True))
    with pytest.raises(
        MixtralError,
        match=r"'embedding.word_embeddings.weight' has shape \[101, 48\] but the config "
        r"implies \[102, 48\]",
    ):
        MegatronSource(release, small_config(vocab_size=102))
    (tmp_path / "config.json").rename(release / "config.json")
    with pytest.raises(
        MixtralError,
        match=r"'decoder.layers.mlp.experts.experts.linear_fc1.weight' is missing \(not a "
        r"mixture-of-experts model\?\)",
    ):
        dense = {k: v for k, v in to_megatron_state_dict(state, config).items() if ".experts." not in k}
        dcp_save(dense, tmp_path / "dense")
        (tmp_path / "dense" / "metadata.json").write_text(json.dumps(megatron.CHECKPOINTING_CONFIG))
        MegatronSource(tmp_path / "dense", config)
    (release / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(MixtralError, match=r"sharded_backend is 'zarr'; only 'torch_dist'"):
        MegatronSource(tmp_path / "meg")
    (tmp_path / "meg" / "latest_checkpointed_iteration.txt").write_text("../../x")
    with pytest.raises(MixtralError, match="not an iteration number"):
        MegatronSource(tmp_path / "meg")


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--to", "megatron", "--megatron-spec", "mcore"],
            "Megatron layer spec 'mcore' is unknown; choose --megatron-spec local (megatron-core's own modules) or te",
        ),
        (
            ["--to", "megatron", "--make-vocab-size-divisible-by", "0"],
            "--make-vocab-size-divisible-by 0: must be a positive integer (Megatron-LM's defaults: ",
        ),
        (["--to", "megatron", "--megatron-tp", "-2"], "--megatron-tp -2: must be a positive integer"),
        (["--to", "hf", "--megatron-spec", "te"], "--megatron-spec: applies to --to megatron only (hf output has no "),
        (
            ["--to", "hf", "--config", "CONFIG"],
            "--config does not match the config.json saved with these weights "
            "(hidden_size: 64 given, 48 saved; head_dim: 10 given, 8 saved); drop "
            "--config",
        ),
    ],
)
def test_bad_megatron_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    config = small_config()
    save_megatron(tmp_path / "meg", reader(dict(random_model(config).named_parameters())), config, torch.float32)
    (tmp_path / "config.json").write_text(json.dumps(small_config(hidden_size=64).to_hf_dict()))
    flags = [str(tmp_path / "config.json") if flag == "CONFIG" else flag for flag in flags]
    assert main(["convert", "--input", str(tmp_path / "meg"), "--output", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_cli_exports_te_spec_with_padded_vocabulary(tmp_path):
    config = small_config()
    state = dict(random_model(config).named_parameters())
    save_megatron(tmp_path / "meg", reader(state), config, torch.float32)
    assert (
        main(
            [
                "convert",
                "--input",
                str(tmp_path / "meg"),
                "--output",
                str(tmp_path / "te"),
                "--to",
                "megatron",
                "--megatron-spec",
                "te",
                "--make-vocab-size-divisible-by",
                "32",
                "--megatron-tp",
                "4",
            ]
        )
        == 0
    )
    tensors, objects = stored(tmp_path / "te" / "release")
    assert tensors["embedding.word_embeddings.weight"] == (128, config.hidden_size)
    assert "decoder.layers.pre_mlp_layernorm.weight" in tensors
    assert "decoder.final_layernorm._extra_state/shard_0_1" in objects
    source = MegatronSource(tmp_path / "te")
    assert all(torch.equal(source.read(name), tensor) for name, tensor in state.items())
