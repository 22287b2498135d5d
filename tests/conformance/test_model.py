"""A tiny Mixtral on every available backend against the reference ops on the CPU: loss, every gradient,
greedy tokens."""

from __future__ import annotations

import torch

from mixtral.backend import Backend, Ops
from mixtral.model import Mixtral

from conformance import ON_AVAILABLE, assert_close
from conftest import model_loss, small_config

FP32_TOLERANCE = 1e-5  # relative, loss and each parameter's gradient
BF16_LOSS_TOLERANCE = 2e-2


def model_pair(backend: Backend, dtype: torch.dtype = torch.float32) -> tuple[Mixtral, Mixtral]:
    """(reference-ops model on the CPU in fp32, the same weights on the backend in dtype)."""
    config = small_config()
    reference = Mixtral(config, Ops.reference())
    reference.init_weights(std=0.1)
    model = Mixtral(config, backend)
    model.load_state_dict(reference.state_dict())
    return reference, model.to(backend.device(), dtype)


def batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (2, 17))
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100
    targets[0, :3] = -100
    return tokens, targets


@ON_AVAILABLE
def test_loss_and_every_gradient(backend) -> None:
    reference, model = model_pair(backend)
    tokens, targets = batch(reference.config.vocab_size)
    want = model_loss(reference, tokens, targets)
    got = model_loss(model, tokens.to(backend.device()), targets.to(backend.device()))
    want.loss.backward()
    got.loss.backward()
    for name in ("loss", "ce_loss", "aux_loss"):
        assert_close(getattr(got, name), getattr(want, name), FP32_TOLERANCE, name)
    assert torch.equal(got.tokens_per_expert.cpu(), want.tokens_per_expert)
    grads = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        assert_close(grads[name].grad, param.grad, FP32_TOLERANCE, f"gradient of {name}")


@ON_AVAILABLE
def test_bf16_loss_near_fp32(backend) -> None:
    reference, model = model_pair(backend, torch.bfloat16)
    tokens, targets = batch(reference.config.vocab_size)
    with torch.no_grad():
        want = model_loss(reference, tokens, targets).loss
        got = model_loss(model, tokens.to(backend.device()), targets.to(backend.device())).loss
    assert_close(got, want, BF16_LOSS_TOLERANCE, "bf16 loss")


@torch.no_grad()
def greedy(model: Mixtral, prompt: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding through the static KV cache: prefill, then one token per step."""
    model.setup_caches(1, prompt.shape[1] + steps)
    logits = model(prompt, last_only=True).logits
    out = []
    for pos in range(prompt.shape[1], prompt.shape[1] + steps):
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        out.append(token.item())
        logits = model(token, start=pos).logits
    model.clear_caches()
    return out


@ON_AVAILABLE
def test_greedy_tokens_match_cpu(backend) -> None:
    reference, model = model_pair(backend)
    prompt = torch.randint(0, reference.config.vocab_size, (1, 7))
    assert greedy(model.eval(), prompt.to(backend.device()), 12) == greedy(reference.eval(), prompt, 12)
