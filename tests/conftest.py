"""Shared fixtures: small random Mixtral configs and deterministic seeds."""

from __future__ import annotations

import pytest
import torch

from mixtral.config import ModelConfig


def small_config(**overrides) -> ModelConfig:
    """A tiny Mixtral with odd sizes, fast enough for many tests."""
    base = dict(vocab_size=101, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2,
                max_position_embeddings=256, router_aux_loss_coef=0.02)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
