"""kernels.causal_blocks: causal prefill attention in query blocks, against the reference."""

from __future__ import annotations

import pytest
import torch

from mixtral.kernels import causal_blocks, fp32_compute, reference


def qkv(seq: int, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    return (
        torch.randn(2, 6, seq, 16, dtype=dtype),
        torch.randn(2, 2, seq, 16, dtype=dtype),
        torch.randn(2, 2, seq, 16, dtype=dtype),
    )


def counted_calls(monkeypatch) -> list[int]:
    calls, attention = [], fp32_compute.attention

    def counted(q, *args, **kwargs):
        calls.append(q.shape[2])
        return attention(q, *args, **kwargs)

    monkeypatch.setattr(fp32_compute, "attention", counted)
    return calls


@pytest.mark.parametrize("seq", [128, 203, 512])
def test_blocks_match_the_reference(monkeypatch, seq):
    calls = counted_calls(monkeypatch)
    q, k, v = qkv(seq)
    with torch.no_grad():
        out = causal_blocks.attention(q, k, v, causal=True, scale=0.3)
    assert len(calls) == causal_blocks.QUERY_BLOCKS and sum(calls) == seq
    torch.testing.assert_close(out, reference.attention(q, k, v, causal=True, scale=0.3), rtol=1e-5, atol=1e-6)


def test_bf16_blocks_match_the_reference():
    q, k, v = qkv(256, torch.bfloat16)
    with torch.no_grad():
        out = causal_blocks.attention(q, k, v, causal=True)
    torch.testing.assert_close(out.float(), reference.attention(q, k, v, causal=True).float(), rtol=2**-7, atol=2e-2)


@pytest.mark.parametrize("case", ["autograd", "short", "long", "masked", "not causal"])
def test_other_calls_are_one_call(monkeypatch, case):
    """Training (the masked backward is slower), under 128 or over 512 positions (the kernel skips blocks itself
    past 512), an explicit mask or no causal mask: fp32_compute.attention as it is."""
    calls = counted_calls(monkeypatch)
    q, k, v = qkv({"short": 100, "long": 520}.get(case, 256))
    mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril() if case == "masked" else None
    with torch.set_grad_enabled(case == "autograd"):
        out = causal_blocks.attention(q, k, v, mask=mask, causal=case != "not causal" and mask is None)
    assert calls == [q.shape[2]]
    assert torch.equal(out, fp32_compute.attention(q, k, v, mask=mask, causal=case != "not causal" and mask is None))
