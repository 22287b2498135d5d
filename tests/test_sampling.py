"""Sampling: greedy at temperature 0, seeded reproducibility, and the distributions top-k / top-p leave."""

from __future__ import annotations

import torch

from mixtral.serve.sampling import SamplingParams, make_generators, sample

DRAWS = 20_000


def params(batch: int, **kwargs) -> SamplingParams:
    return SamplingParams.build(batch, **kwargs)


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 300)
    assert torch.equal(sample(logits, params(5)), logits.argmax(-1))


def test_same_seed_same_tokens_different_seed_different():
    logits = torch.randn(16, 1000) * 0.1  # nearly flat: every draw is a real choice
    p = params(16, temperature=1.0, top_k=50, top_p=0.9)
    first = sample(logits, p, make_generators(7, 16))
    assert torch.equal(first, sample(logits, p, make_generators(7, 16)))
    assert not torch.equal(first, sample(logits, p, make_generators(8, 16)))


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(8, 500)
    greedy = logits.argmax(-1)
    gens = make_generators(0, 8)
    assert torch.equal(sample(logits, params(8, temperature=1.5, top_k=1), gens), greedy)
    assert torch.equal(sample(logits, params(8, temperature=1.5, top_p=1e-6), gens), greedy)


def frequencies(logits: torch.Tensor, **kwargs) -> torch.Tensor:
    """Empirical token frequencies of DRAWS samples from one row of logits."""
    ids = sample(logits.expand(DRAWS, -1), params(DRAWS, **kwargs), make_generators(0, DRAWS))
    return torch.bincount(ids, minlength=logits.shape[-1]).double() / DRAWS


def test_distributions_match_their_definitions():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    probs = logits[0].double().div(0.8).softmax(-1)
    torch.testing.assert_close(frequencies(logits, temperature=0.8), probs, atol=0.015, rtol=0)
    top3 = torch.zeros_like(probs)
    top3[:3] = probs[:3] / probs[:3].sum()
    torch.testing.assert_close(frequencies(logits, temperature=0.8, top_k=3), top3, atol=0.015, rtol=0)
    # nucleus 0.6: the smallest prefix with mass >= 0.6
    keep = int((probs.cumsum(0) < 0.6).sum()) + 1
    nucleus = torch.zeros_like(probs)
    nucleus[:keep] = probs[:keep] / probs[:keep].sum()
    torch.testing.assert_close(frequencies(logits, temperature=0.8, top_p=0.6), nucleus, atol=0.015, rtol=0)


def test_per_row_settings_and_seeds():
    logits = torch.randn(3, 400) * 0.1
    p = params(3, temperature=[0.0, 1.0, 1.0], top_k=[0, 0, 5], top_p=[1.0, 0.5, 1.0])
    ids = sample(logits, p, make_generators([1, 2, 3], 3))
    assert ids[0] == logits[0].argmax()
    assert ids[2] in logits[2].topk(5).indices
    # a row's draw depends only on its own seed, not on the rest of the batch
    alone = sample(logits[1:2], params(1, temperature=1.0, top_p=0.5), make_generators([2], 1))
    assert ids[1] == alone[0]
