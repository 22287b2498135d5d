"""Model-level behaviour: forced routing (zero-token experts, all tokens on one), CPU ops vs reference, KV cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral.backend import Ops, get_backend
from mixtral.config import ModelConfig
from mixtral.model import IGNORE_INDEX, Mixtral

from conftest import model_loss, small_config

OPS = {"reference": Ops.reference, "cpu": lambda: get_backend("cpu").ops}


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def random_model(config: ModelConfig, ops: Ops) -> Mixtral:
    model = Mixtral(config, ops).eval()
    model.init_weights(std=0.15)
    return model


@torch.no_grad()
def force_routing(model: Mixtral, scores: list[float]) -> None:
    """Every token of every layer ranks the experts by `scores`.

    Hidden feature 0 is a positive constant for all tokens (set in the embedding; attention and the
    experts never write it), and each router reads only that feature, scaled by the scores.
    """
    model.embed_tokens.weight[:, 0] = 3.0
    for layer in model.layers:
        layer.self_attn.o_proj.weight[0] = 0.0
        layer.mlp.experts.down_proj[:, 0] = 0.0
        layer.post_attention_layernorm.weight[0] = 1.0
        layer.mlp.gate.weight.zero_()
        layer.mlp.gate.weight[:, 0] = torch.tensor(scores)


def dense_moe(mlp, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """Every expert on every token, weighted by the renormalised top-k probabilities: the plain definition."""
    probs = torch.softmax(mlp.gate(x).float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(probs.shape[-1]):
        gate, up = (x @ mlp.experts.gate_up_proj[e].T).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ mlp.experts.down_proj[e].T
        out += y * (weights * (ids == e)).sum(-1, keepdim=True)
    return out


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_forced_routing_zero_token_experts_and_one_expert_taking_all(ops, top_k):
    config = small_config(num_local_experts=6, num_experts_per_tok=top_k)
    model = random_model(config, OPS[ops]())
    force_routing(model, [2.0, 1.0, -1.0, -1.5, -2.0, -2.5])  # experts 0 (and 1) take every token
    batch, seq = 2, 9
    tokens = torch.randint(0, config.vocab_size, (batch, seq))
    targets = torch.cat([tokens[:, 1:], torch.full((batch, 1), IGNORE_INDEX)], dim=1)
    out = model_loss(model, tokens, targets)

    expected = torch.tensor([batch * seq] * top_k + [0] * (6 - top_k))
    assert torch.equal(out.tokens_per_expert, expected.expand(config.num_hidden_layers, -1))
    out.loss.backward()
    for layer in model.layers:
        grads = layer.mlp.experts.gate_up_proj.grad, layer.mlp.experts.down_proj.grad
        for grad in grads:
            assert torch.isfinite(grad).all()
            assert (grad[top_k:] == 0).all() and (grad[:top_k].abs().sum((1, 2)) > 0).all()

    x = torch.randn(batch * seq, config.hidden_size)
    x[:, 0] = x[:, 0].abs() + 0.5
    mlp = model.layers[0].mlp
    with torch.no_grad():
        assert rel(mlp(x.view(batch, seq, -1))[0].view_as(x), dense_moe(mlp, x, top_k)) <= 1e-5


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_tokens_per_expert_sum_to_tokens_times_k(top_k):
    config = small_config(num_local_experts=5, num_experts_per_tok=top_k, num_hidden_layers=3)
    model = random_model(config, get_backend("cpu").ops)
    tokens = torch.randint(0, config.vocab_size, (3, 7))
    counts = model(tokens).tokens_per_expert
    assert counts.shape == (3, 5)
    assert torch.equal(counts.sum(-1), torch.full((3,), 3 * 7 * top_k))


@pytest.mark.parametrize(
    "sizes", [dict(), dict(hidden_size=44, intermediate_size=38, head_dim=14)], ids=["aligned", "odd"]
)
def test_cpu_ops_match_reference(sizes):
    config = small_config(**sizes)
    reference = random_model(config, Ops.reference())
    cpu = Mixtral(config, get_backend("cpu")).eval()
    cpu.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, config.vocab_size, (2, 11))
    targets = torch.cat([tokens[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    ours, ref = model_loss(cpu, tokens, targets), model_loss(reference, tokens, targets)
    assert rel(ours.logits, ref.logits) <= 1e-5
    assert abs(ours.loss.item() - ref.loss.item()) <= 1e-5
    assert torch.equal(ours.tokens_per_expert, ref.tokens_per_expert)


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("window", [None, 4])
def test_kv_cache_decoding_matches_full_forward(ops, window):
    config = small_config(sliding_window=window)
    model = random_model(config, OPS[ops]())
    tokens = torch.randint(0, config.vocab_size, (2, 14))
    with torch.no_grad():
        full = model(tokens).logits
        model.setup_caches(batch=2, max_len=32)
        steps = [model(tokens[:, :6]).logits]  # prefill longer than the window
        steps += [model(tokens[:, t : t + 1], start=t).logits for t in range(6, 14)]
        model.clear_caches()
    assert rel(torch.cat(steps, dim=1), full) <= 1e-5


@pytest.mark.parametrize("ops", OPS)
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_last_only_prefill_fills_the_cache_and_keeps_the_last_logits(ops, window, padded):
    """The last block runs attention and experts for the last position only: its logits, the KV cache of
    every layer and the decoding that follows equal those of a prefill that computes every position."""
    config = small_config(sliding_window=window, num_hidden_layers=3)
    model = random_model(config, OPS[ops]())
    tokens = torch.randint(0, config.vocab_size, (2, 10))
    pad = torch.tensor([0, 3]) if padded else None
    results = []
    with torch.no_grad():
        for last_only in (False, True):
            model.setup_caches(batch=2, max_len=16)
            prefill = model(tokens[:, :8], last_only=last_only, pad=pad)
            caches = [torch.cat([layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v]) for layer in model.layers]
            steps = [model(tokens[:, t : t + 1], start=t, pad=pad).logits for t in (8, 9)]
            results.append((prefill, caches, torch.cat(steps, dim=1)))
        model.clear_caches()
    (full, full_caches, full_steps), (last, last_caches, last_steps) = results
    assert last.logits.shape == (2, 1, config.vocab_size)
    assert rel(last.logits, full.logits[:, -1:]) <= 1e-5
    for ours, ref in zip(last_caches, full_caches):
        assert torch.equal(ours, ref)  # the same keys and values, computed by the same ops
    assert rel(last_steps, full_steps) <= 1e-5
    counts = last.tokens_per_expert.sum(-1)  # the last layer routed one token per row
    assert counts.tolist() == [2 * 8 * config.num_experts_per_tok] * 2 + [2 * config.num_experts_per_tok]


def test_training_forward_without_logits_gives_the_same_loss_and_gradients():
    """keep_logits=False (the trainer's step) writes the loss's gradient over the logits: same loss, same grads."""
    config = small_config()
    model = Mixtral(config, get_backend("cpu").ops)
    model.init_weights(std=0.15)
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    targets = torch.cat([tokens[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    results = []
    for keep_logits in (True, False):
        out = model_loss(model, tokens, targets, keep_logits=keep_logits)
        grads = torch.autograd.grad(out.loss, list(model.parameters()))
        results.append((out, grads))
    (kept, kept_grads), (dropped, dropped_grads) = results
    assert dropped.logits is None and kept.logits.shape == (2, 9, config.vocab_size)
    assert torch.equal(dropped.loss, kept.loss)
    for ours, ref in zip(dropped_grads, kept_grads):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)  # fp32; the head's GEMM sees [18, H] vs [2, 9, H]
