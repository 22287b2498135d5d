"""`convert --to gguf`: a Mixtral as llama.cpp and ollama read it, written with ggml's own `gguf` package.

The layout is llama.cpp's convert_hf_to_gguf.py for Mixtral: architecture `llama` with experts, each layer's expert
weights stacked (`ffn_gate_exps` / `ffn_up_exps` [E, F, H], `ffn_down_exps` [E, H, F]), the router `ffn_gate_inp`,
q and k rows permuted from HF's rotate-half order to llama.cpp's interleaved RoPE, and the SentencePiece vocabulary
with scores and token types. Norms and the router stay F32 in every file type, as llama.cpp's converter keeps them;
Q8_0 needs rows that are multiples of 32 and leaves other tensors F32. Tensors are written one at a time (one
layer's expert stack at the most in memory). The gguf package is an optional extra: pip install 'mixtral-run[gguf]'.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mixtral.config import ModelConfig
from mixtral.errors import MixtralError

GGUF_TYPES = ("f32", "bf16", "q8_0")
Q8_0_BLOCK = 32
MIXTRAL_CHAT_TEMPLATE = (  # mistralai/Mixtral-8x7B-Instruct-v0.1's template (tokenizer_config.json)
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MixtralError(
            "writing GGUF needs ggml's gguf package, which is not installed: pip install 'mixtral-run[gguf]'"
        ) from None
    return gguf


def permute_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows from HF's rotate-half layout to llama.cpp's interleaved pairs (its converter's `permute`)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
    )


def tensor_plan(config: ModelConfig) -> list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor] | None, bool]]:
    """(GGUF name, our parameter, transform, kept F32) for every tensor, in file order."""
    plan = [("token_embd.weight", "embed_tokens.weight", None, False)]
    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        ffn = config.intermediate_size
        plan += [
            (f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", None, True),
            (
                f"blk.{i}.attn_q.weight",
                p + "self_attn.q_proj.weight",
                lambda w: permute_rope(w, config.num_attention_heads),
                False,
            ),
            (
                f"blk.{i}.attn_k.weight",
                p + "self_attn.k_proj.weight",
                lambda w: permute_rope(w, config.num_key_value_heads),
                False,
            ),
            (f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", None, False),
            (f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", None, False),
            (f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", None, True),
            (f"blk.{i}.ffn_gate_inp.weight", p + "mlp.gate.weight", None, True),
            (f"blk.{i}.ffn_gate_exps.weight", p + "mlp.experts.gate_up_proj", lambda w: w[:, :ffn], False),
            (f"blk.{i}.ffn_up_exps.weight", p + "mlp.experts.gate_up_proj", lambda w: w[:, ffn:], False),
            (f"blk.{i}.ffn_down_exps.weight", p + "mlp.experts.down_proj", None, False),
        ]
    plan.append(("output_norm.weight", "norm.weight", None, True))
    if not config.tie_word_embeddings:
        plan.append(("output.weight", "lm_head.weight", None, False))
    return plan


def ggml_type(gguf, shape: tuple[int, ...], kind: str, keep_f32: bool):
    """A tensor's GGML type in a file of this kind: F32 for norms, the router and rows Q8_0 cannot block."""
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}.get(kind)
    if keep_f32 or qtype is None or (kind == "q8_0" and shape[-1] % Q8_0_BLOCK):
        return gguf.GGMLQuantizationType.F32
    return qtype


def encode(gguf, tensor: torch.Tensor, qtype) -> np.ndarray:
    """The tensor's bytes as GGML type qtype (F32 as float32, others as uint8 blocks)."""
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    return data if qtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(data, qtype)


def write_gguf(
    path: Path,
    config: ModelConfig,
    read: Callable[[str], torch.Tensor],
    tokenizer_path: Path,
    kind: str = "bf16",
    name: str = "Mixtral",
    on_write: Callable[[int], None] | None = None,
) -> None:
    """Write a GGUF file from read(parameter name) (whole parameters), metadata and vocabulary first."""
    if kind not in GGUF_TYPES:
        raise MixtralError(
            f"GGUF type {kind!r} is not one this converter writes; choose one of {', '.join(GGUF_TYPES)}"
        )
    gguf = _gguf()
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, "llama")
    _write_metadata(gguf, writer, config, kind, name)
    _write_vocabulary(gguf, writer, tokenizer_path, config.vocab_size)
    plan = tensor_plan(config)
    shapes = _planned_shapes(config, plan)
    types = [ggml_type(gguf, shape, kind, keep_f32) for (_, _, _, keep_f32), shape in zip(plan, shapes)]
    for (gguf_name, *_), shape, qtype in zip(plan, shapes, types):  # headers first: shapes and types, no data
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    last: tuple[str, torch.Tensor] | None = None
    for (_, ours, transform, _), qtype in zip(plan, types):
        if last is None or last[0] != ours:  # gate and up come from one read of the fused stack
            last = (ours, read(ours))
        data = encode(gguf, transform(last[1]) if transform else last[1], qtype)
        writer.write_tensor_data(data)
        if on_write:
            on_write(data.nbytes)
    writer.close()
    tmp.replace(path)


def _planned_shapes(config: ModelConfig, plan: list) -> list[tuple[int, ...]]:
    from mixtral.model.transformer import parameter_shapes

    shapes = parameter_shapes(config)
    out = []
    for gguf_name, ours, _, _ in plan:
        shape = tuple(shapes[ours])
        if "_exps" in gguf_name and "down" not in gguf_name:
            shape = (shape[0], config.intermediate_size, shape[2])
        out.append(shape)
    return out


def _write_metadata(gguf, writer, config: ModelConfig, kind: str, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_expert_count(config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[kind]
    )


def _write_vocabulary(gguf, writer, tokenizer_path: Path, vocab_size: int) -> None:
    """SentencePiece pieces, scores and token types (llama.cpp's `llama` tokenizer), padded to vocab_size."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(
            gguf.TokenType.UNKNOWN
            if sp.is_unknown(i)
            else gguf.TokenType.CONTROL
            if sp.is_control(i)
            else gguf.TokenType.UNUSED
            if sp.is_unused(i)
            else gguf.TokenType.BYTE
            if sp.is_byte(i)
            else gguf.TokenType.NORMAL
        )
    for i in range(sp.vocab_size(), vocab_size):  # a model vocabulary larger than the tokenizer's: unused slots
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(MIXTRAL_CHAT_TEMPLATE)
