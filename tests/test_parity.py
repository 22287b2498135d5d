"""Our Mixtral against transformers' MixtralForCausalLM, fp32, both checkpoint directions."""

from __future__ import annotations

import pytest
import torch
import transformers

from mixtral.backend import get_backend
from mixtral.checkpoint.hf import load_hf_model, save_hf
from mixtral.config import ModelConfig
from mixtral.model import IGNORE_INDEX, Mixtral

from conftest import model_loss, small_config

# Odd sizes; non-default rope_theta, eps and aux coefficient so a dropped config field shows up.
CONFIGS = {
    "untied-top2-head_dim": dict(
        vocab_size=97,
        hidden_size=44,
        intermediate_size=38,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=14,
        num_local_experts=5,
        num_experts_per_tok=2,
    ),
    "tied-top1": dict(
        vocab_size=83,
        hidden_size=36,
        intermediate_size=30,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        num_local_experts=3,
        num_experts_per_tok=1,
        tie_word_embeddings=True,
    ),
    "untied-top3-window": dict(
        vocab_size=101,
        hidden_size=40,
        intermediate_size=46,
        num_attention_heads=5,
        num_key_value_heads=1,
        num_local_experts=7,
        num_experts_per_tok=3,
        sliding_window=5,
    ),
}
COMMON = dict(rope_theta=500.0, rms_norm_eps=1e-6, router_aux_loss_coef=0.05)
BATCH, SEQ = 2, 12  # SEQ > sliding_window
# transformers' plain-loop kernels are the reference (its grouped_mm experts need 16-byte-aligned sizes).
EAGER = dict(attn_implementation="eager", experts_implementation="eager")


def hf_name(name: str) -> str:
    """Our parameter name -> transformers' in-memory name."""
    return name if name == "lm_head.weight" else f"model.{name}"


@torch.no_grad()
def randomize(named_parameters) -> None:
    """Weights large enough that routing and attention are far from uniform; norms away from 1."""
    for name, param in named_parameters:
        if name.endswith("norm.weight"):
            param.uniform_(0.5, 1.5)
        else:
            param.normal_(0.0, 0.15)


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's largest magnitude."""
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_parity(ours: Mixtral, hf: transformers.MixtralForCausalLM, config: ModelConfig) -> None:
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    targets = torch.cat([tokens[:, 1:], torch.full((BATCH, 1), IGNORE_INDEX)], dim=1)
    out = model_loss(ours, tokens, targets)
    ref = hf(input_ids=tokens, labels=tokens, output_router_logits=True)

    assert rel(out.logits, ref.logits) <= 1e-5
    assert abs(out.aux_loss.item() - ref.aux_loss.item()) <= 1e-6
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-6
    out.loss.backward()
    ref.loss.backward()

    hf_params = dict(hf.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert {hf_name(n) for n in ours_params} == set(hf_params)
    for name, param in ours_params.items():
        ref_grad = hf_params[hf_name(name)].grad
        assert ref_grad is not None and ref_grad.abs().max() > 0, name
        assert rel(param.grad, ref_grad) <= 1e-5, name


@pytest.mark.parametrize("name", CONFIGS)
def test_ours_loads_transformers_checkpoint(name, tmp_path):
    config = small_config(**CONFIGS[name], **COMMON)
    hf = transformers.MixtralForCausalLM._from_config(transformers.MixtralConfig(**config.to_hf_dict()), **EAGER)
    randomize(hf.named_parameters())
    hf.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path, backend="cpu")
    assert ours.config == config
    assert_parity(ours, hf.eval(), config)


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_loads_our_checkpoint(name, tmp_path):
    config = small_config(**CONFIGS[name], **COMMON)
    ours = Mixtral(config, get_backend("cpu")).eval()
    randomize(ours.named_parameters())
    save_hf(ours, tmp_path, max_shard_bytes=40_000)  # sharded: transformers reads our index too
    assert (tmp_path / "model.safetensors.index.json").is_file()
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, **EAGER)
    assert_parity(ours, hf, config)


def test_router_jitter_is_off_in_eval(tmp_path):
    config = small_config(router_jitter_noise=0.5)
    ours = Mixtral(config, get_backend("cpu"))
    randomize(ours.named_parameters())
    save_hf(ours, tmp_path)
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, **EAGER)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    with torch.no_grad():
        trained = ours.train()(tokens).logits
        first, second = ours.eval()(tokens).logits, ours(tokens).logits
        ref = hf.eval()(tokens).logits
    assert torch.equal(first, second)
    assert rel(first, ref) <= 1e-5
    assert rel(trained, first) > 1e-3  # jitter really acts in training
