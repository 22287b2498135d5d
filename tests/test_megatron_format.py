"""Megatron-core torch_dist layout: the export's keys and shapes equal the docs table, QKV is fused per query
group, round trips are exact, Megatron's own variants (TE-spec norm name, padded vocabulary, TP-split chunks)
read correctly, and foreign checkpoints are refused by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import small_config

from mixtral.checkpoint import megatron
from mixtral.checkpoint.megatron import (FC1, MegatronSource, from_megatron_state_dict, fuse_qkv, megatron_shapes,
                                         save_megatron, split_qkv, to_megatron_state_dict)
from mixtral.checkpoint.native import LazyTensor, dcp_save, read_dcp_metadata
from mixtral.errors import MixtralError
from mixtral.model import Mixtral

DOCS = Path(__file__).resolve().parents[1] / "docs" / "checkpoint-formats.md"


def doc_table(config) -> dict[str, tuple[int, ...]]:
    """Megatron key -> shape from the one mapping table in docs/checkpoint-formats.md, symbols evaluated."""
    c = config
    symbols = {"L": c.num_hidden_layers, "E": c.num_local_experts, "H": c.hidden_size, "F": c.intermediate_size,
               "V": c.vocab_size, "nh": c.num_attention_heads, "nkv": c.num_key_value_heads, "d": c.head_dim}
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
    return lambda name, expert: state[name] if expert is None else state[name][expert:expert + 1]


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
    stored = {key: tuple(md.size) for key, md in read_dcp_metadata(release).state_dict_metadata.items()}
    expected = doc_table(config)
    if tied:
        expected.pop("output_layer.weight")
    assert len(expected) == (9 if tied else 10)
    assert stored == expected == megatron_shapes(config)
    assert json.loads((release / "metadata.json").read_text()) == {
        "sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
        "common_backend_version": 1}
    assert (tmp_path / "meg" / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert torch.load(release / "common.pt", weights_only=True) == {"checkpoint_version": 3.0, "iteration": 0}
    chunks = read_dcp_metadata(release).state_dict_metadata[FC1].chunks
    assert len(chunks) == config.num_hidden_layers * config.num_local_experts  # one box per (layer, expert)


def test_qkv_is_fused_per_query_group():
    config = small_config(num_attention_heads=6, num_key_value_heads=2)  # 3 query heads per group
    d, hidden = config.head_dim, config.hidden_size
    q = torch.arange(6).repeat_interleave(d)[:, None].expand(-1, hidden).float()          # rows of q head h: h
    k = (10 + torch.arange(2)).repeat_interleave(d)[:, None].expand(-1, hidden).float()   # k head g: 10 + g
    v = (20 + torch.arange(2)).repeat_interleave(d)[:, None].expand(-1, hidden).float()   # v head g: 20 + g
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
    assert torch.equal(exported["decoder.layers.mlp.linear_fc1.layer_norm_weight"][1],
                       state["layers.1.post_attention_layernorm.weight"])
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
            boxes = [((layer, *e, start, 0), (1, *(1,) * len(e), rows, shape[-1]))
                     for layer in range(shape[0]) for e in lead for start, rows in halves]
        else:
            boxes = [((0,) * full.ndim, shape)]
        state[key] = LazyTensor(shape, full.dtype, boxes,
                                lambda box, full=full: full[tuple(slice(o, o + s) for o, s in zip(*box))])
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
    with pytest.raises(MixtralError, match=r"'decoder.layers.self_attention.linear_qkv.weight' has shape .*--config"):
        MegatronSource(release, small_config(num_key_value_heads=3))
    with pytest.raises(MixtralError, match=r"'decoder.layers.mlp.experts.experts.linear_fc1.weight' is missing \(not a "
                                           r"mixture-of-experts model\?\)"):
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
