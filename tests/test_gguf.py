"""`convert --to gguf`, read back by ggml's own gguf reader and, where llama-cpp-python is installed, run by llama.cpp.

The llama.cpp checks (tokenizer ids, 32 greedy tokens equal to ours in fp32, BF16 and Q8_0 loading and generating)
skip without llama_cpp; `bash bench/check_gguf_llama_cpp.sh` builds llama-cpp-python and runs them.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from mixtral.checkpoint.gguf_export import permute_rope
from mixtral.checkpoint.hf import save_hf
from mixtral.cli import main
from mixtral.data.tokenizer import Tokenizer, default_tokenizer_path
from mixtral.model import Mixtral
from mixtral.serve.engine import Generator

from conftest import small_config

gguf = pytest.importorskip("gguf")

CONFIGS = {  # two random models, rows multiples of 32 (Q8_0 blocks), weights large enough for decisive logits
    "gqa_untied": dict(
        vocab_size=32000,
        hidden_size=128,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        tie_word_embeddings=False,
    ),
    "mha_8_experts": dict(
        vocab_size=32000,
        hidden_size=96,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=3,
        num_key_value_heads=3,
        num_local_experts=8,
        tie_word_embeddings=False,
        rope_theta=1e6,
    ),
}
PROMPTS = ["The with statement", "  two  spaces   and three", "Grüße, naïve café — 東京 ✓", "def f(x):\n    return x"]


def make_checkpoint(tmp_path, name: str) -> tuple[Mixtral, object]:
    model = Mixtral(small_config(**CONFIGS[name]))
    model.init_weights(seed=11, std=0.2)
    save_hf(model, tmp_path / "hf")
    shutil.copyfile(default_tokenizer_path(), tmp_path / "hf" / "tokenizer.model")
    return model, tmp_path / "hf"


def to_gguf(hf_dir, out, dtype: str) -> None:
    assert main(["convert", "--input", str(hf_dir), "--output", str(out), "--to", "gguf", "--dtype", dtype]) == 0


def test_gguf_reader_sees_llama_cpp_layout(tmp_path):
    """Names, shapes, types, hyper-parameters and the vocabulary as llama.cpp's converter writes a Mixtral."""
    model, hf_dir = make_checkpoint(tmp_path, "gqa_untied")
    config = model.config
    to_gguf(hf_dir, tmp_path / "m.gguf", "fp32")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.expert_count"] == 4
    assert fields["llama.expert_used_count"] == 2 and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.dimension_count"] == config.head_dim
    tokenizer = Tokenizer(hf_dir)
    assert fields["tokenizer.ggml.model"] == "llama" and len(fields["tokenizer.ggml.tokens"]) == 32000
    assert fields["tokenizer.ggml.tokens"][1000] == tokenizer.sp.id_to_piece(1000)
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_id
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 3 + 10 * config.num_hidden_layers
    gate = tensors["blk.1.ffn_gate_exps.weight"]
    ours = model.layers[1].mlp.experts.gate_up_proj.detach()
    assert np.array_equal(np.asarray(gate.data), ours[:, : config.intermediate_size].numpy())
    q = np.asarray(tensors["blk.0.attn_q.weight"].data)
    assert np.array_equal(q, permute_rope(model.layers[0].self_attn.q_proj.weight.detach(), 4).numpy())
    q8 = tmp_path / "q8.gguf"
    to_gguf(hf_dir, q8, "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(q8)).tensors}
    assert types["blk.0.ffn_down_exps.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"  # the router stays F32, as llama.cpp keeps it


def test_bad_gguf_requests_are_one_line_errors(tmp_path, capsys):
    _, hf_dir = make_checkpoint(tmp_path, "gqa_untied")
    assert (
        main(
            ["convert", "--input", str(hf_dir), "--output", str(tmp_path / "m.gguf"), "--to", "gguf", "--dtype", "q4_k"]
        )
        == 2
    )
    assert "--dtype 'q4_k' is not one convert writes; choose one of bf16, fp32, q8_0" in capsys.readouterr().err
    assert main(["convert", "--input", str(hf_dir), "--output", str(tmp_path / "out"), "--to", "gguf"]) == 2
    assert "a GGUF output is one file named *.gguf" in capsys.readouterr().err
    assert (
        main(["convert", "--input", str(hf_dir), "--output", str(tmp_path / "n"), "--to", "native", "--dtype", "q8_0"])
        == 2
    )
    assert "--dtype q8_0 is a GGUF type" in capsys.readouterr().err


def _llama(path):
    llama_cpp = pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python is not installed: bash bench/check_gguf_llama_cpp.sh builds it and runs these",
    )
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=False, verbose=False)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llama_cpp_tokenizes_and_generates_as_we_do(tmp_path, name):
    model, hf_dir = make_checkpoint(tmp_path, name)
    to_gguf(hf_dir, tmp_path / "f32.gguf", "fp32")
    llm = _llama(tmp_path / "f32.gguf")
    tokenizer = Tokenizer(hf_dir)
    for text in PROMPTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tokenizer.encode(text), text
    generator = Generator(model.eval(), tokenizer)
    for text in PROMPTS[:2]:
        ids = tokenizer.encode(text)
        ours = generator.generate([ids], 32, temperature=0.0, stop_at_eos=False)[0]
        llm.reset()
        theirs = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            theirs.append(token)
            if len(theirs) == 32:
                break
        assert theirs == ours, (text, theirs, ours)


@pytest.mark.parametrize("dtype", ["bf16", "q8_0"])
def test_llama_cpp_loads_and_generates_bf16_and_q8_0(tmp_path, dtype):
    model, hf_dir = make_checkpoint(tmp_path, "gqa_untied")
    to_gguf(hf_dir, tmp_path / f"{dtype}.gguf", dtype)
    llm = _llama(tmp_path / f"{dtype}.gguf")
    ids = Tokenizer(hf_dir).encode(PROMPTS[0])
    with torch.no_grad():
        ours = model.eval()(torch.tensor([ids])).logits[0, -1]
    theirs = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == 8:
            break
    assert len(theirs) == 8 and all(0 <= t < 32000 for t in theirs)
    assert theirs[0] in torch.topk(ours, 5).indices.tolist()  # rounding may reorder close logits, not far ones
