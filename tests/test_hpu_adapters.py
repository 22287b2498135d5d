"""The Gaudi adapters (backends/hpu.py) against kernels/reference, on the CPU through tests/vendor_sim.py's simulations.

fp32 throughout; tolerance 1e-5 (relative and absolute) unless stated.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from mixtral.backend import registry
from mixtral.backends import hpu
from mixtral.errors import MixtralError
from mixtral.kernels import reference
from mixtral.model.rope import rope_tables
from tests import vendor_sim as sim
from tests.vendor_sim import ATTENTION_CASES, FP32, qkv, random_mask

OPS = hpu.make_ops(sim.FusedSDPA, sim.FusedRMSNorm, sim.RotaryPosEmbeddingHelperV1)


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_reference(case) -> None:
    s, t, kv_heads, causal, mask = ATTENTION_CASES[case]
    q, k, v = qkv(s, t, kv_heads=kv_heads)
    want = reference.attention(q, k, v, mask=mask, causal=causal)
    torch.testing.assert_close(OPS.attention(q, k, v, mask=mask, causal=causal), want, **FP32)


def test_attention_scale_and_modes_pass_through() -> None:
    q, k, v = qkv(5, 5)
    want = reference.attention(q, k, v, causal=True, scale=0.3)
    for recompute in (True, False, None):
        got = hpu.attention(sim.FusedSDPA.apply, q, k, v, causal=True, scale=0.3, recompute=recompute)
        torch.testing.assert_close(got, want, **FP32)
    with pytest.raises(AssertionError, match="only when q/k/v inputs are BF16"):
        hpu.attention(sim.FusedSDPA.apply, q, k, v, causal=True, softmax_mode="fp32")


def test_wrong_attention_calls_fail() -> None:
    """The simulation catches the mistakes an adapter could make: inverted mask, wrong layout, a 2-D mask with GQA."""
    q, k, v = qkv(5, 13)
    mask = random_mask(2, 1, 5, 13)
    want = reference.attention(q, k, v, mask=mask)
    inverted = sim.FusedSDPA.apply(q, k, v, ~mask | (torch.arange(13) == 1), 0.0, False, None)
    assert not torch.allclose(inverted, want, **FP32)
    with pytest.raises(
        ValueError, match="key heads 13 must divide query heads 5"
    ):  # [B, S, H, D] passed as [B, H, S, D]
        sim.FusedSDPA.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 0.0, False, None)
    with pytest.raises(AssertionError, match="2D attention mask is not supported with grouped-query"):
        sim.FusedSDPA.apply(q, k, v, mask[0, 0], 0.0, False, None)  # the wrapper unpacks a 4-D mask under GQA
    square = mask[..., :5]  # is_causal and a mask together apply both, as the wrapper does
    both = sim.FusedSDPA.apply(q[:, :, :5], k[:, :, :5], v[:, :, :5], square, 0.0, True, None)
    torch.testing.assert_close(
        both, reference.attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], mask=square, causal=True), **FP32
    )
    with pytest.raises(ValueError, match="neither"):
        sim.FusedSDPA.apply(q, k, v, mask[..., :1, :], 0.0, False, None)  # an unexpanded broadcast mask


def test_rms_norm_matches_reference() -> None:
    x, w = torch.randn(3, 7, 40), 1 + 0.1 * torch.randn(40)
    torch.testing.assert_close(OPS.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), **FP32)


def test_rms_norm_bf16_within_rounding() -> None:
    """One fused rounding vs the reference's two: equal within bf16 resolution, dtype kept."""
    x, w = torch.randn(3, 7, 40).bfloat16(), (1 + 0.1 * torch.randn(40)).bfloat16()
    got = OPS.rms_norm(x, w, 1e-5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference.rms_norm(x, w, 1e-5).float(), rtol=1.6e-2, atol=1.6e-2)


def test_rope_matches_reference() -> None:
    cos, sin = rope_tables(16, 64, 1e6)
    x = torch.randn(2, 3, 9, 16)
    torch.testing.assert_close(OPS.rope(x, cos[5:14], sin[5:14]), reference.rope(x, cos[5:14], sin[5:14]), **FP32)


def test_rope_keeps_the_input_dtype() -> None:
    """The helper promotes to fp32 if any input is fp32; the adapter casts the tables so bf16 stays bf16."""
    cos, sin = rope_tables(16, 9, 1e6)
    x = torch.randn(2, 3, 9, 16).bfloat16()
    got = OPS.rope(x, cos, sin)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference.rope(x, cos.bfloat16(), sin.bfloat16()), rtol=1.6e-2, atol=1.6e-2)
    assert sim.RotaryPosEmbeddingHelperV1.apply(x, cos[None, None], sin[None, None], 0).dtype == torch.float32
    with pytest.raises(ValueError, match="must have the rank of p"):
        sim.RotaryPosEmbeddingHelperV1.apply(x, cos, sin, 0)  # [S, D] tables without the leading dims


def test_op_table_uses_the_fused_kernels_and_reference_for_the_rest() -> None:
    assert OPS.attention.func is hpu.attention and OPS.attention.args == (sim.FusedSDPA.apply,)
    assert OPS.rms_norm.func is hpu.rms_norm and OPS.rope.func is hpu.rope
    for name in ("grouped_mm", "permute", "unpermute", "swiglu"):
        assert getattr(OPS, name) is getattr(reference, name)


def test_tiny_mixtral_logits_equal_reference_ops() -> None:
    sim.assert_mixtral_matches_reference(OPS)


def fake_habana(monkeypatch) -> list[str]:
    """Stand-in habana_frameworks.torch.core / .hpu modules that record calls."""
    calls: list[str] = []
    core = types.ModuleType("habana_frameworks.torch.core")
    core.mark_step = lambda: calls.append("mark_step")
    device = types.ModuleType("habana_frameworks.torch.hpu")
    device.synchronize = lambda: calls.append("synchronize")
    package, torch_package = types.ModuleType("habana_frameworks"), types.ModuleType("habana_frameworks.torch")
    package.torch, torch_package.core, torch_package.hpu = torch_package, core, device
    for name, module in [
        ("habana_frameworks", package),
        ("habana_frameworks.torch", torch_package),
        ("habana_frameworks.torch.core", core),
        ("habana_frameworks.torch.hpu", device),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.mark.parametrize("env, steps", [("1", ["mark_step"]), ("0", []), (None, [])])
def test_mark_step_only_in_lazy_mode(monkeypatch, env, steps) -> None:
    calls = fake_habana(monkeypatch)
    if env is None:
        monkeypatch.delenv("PT_HPU_LAZY_MODE", raising=False)
    else:
        monkeypatch.setenv("PT_HPU_LAZY_MODE", env)
    backend = hpu.HPUBackend(name="hpu", device_type="hpu", dist_backend="hccl")
    backend.mark_step()
    assert calls == steps
    backend.synchronize()
    assert calls[-1] == "synchronize"


def test_compile_uses_the_hpu_backend_in_eager_mode_only(monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(
        torch.nn.Module,
        "compile",
        lambda self, backend, dynamic, options: seen.update(
            module=self, backend=backend, dynamic=dynamic, options=options
        ),
    )
    module = torch.nn.Linear(2, 2)
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "0")
    registry().backends["hpu"].compile(module, dynamic=True, inference=True)
    assert seen == {"module": module, "backend": "hpu_backend", "dynamic": True, "options": None}
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "1")
    with pytest.raises(MixtralError, match="PT_HPU_LAZY_MODE=0"):
        registry().backends["hpu"].compile(module)


def test_registered_with_hccl_and_capacity_bins() -> None:
    b = registry().backends["hpu"]
    assert (b.dist_backend, b.capabilities.preferred_dispatcher, b.capabilities.dynamic_shapes) == (
        "hccl",
        "capacity_bins",
        False,
    )
    if not b.availability.ok:  # this machine: no Gaudi stack
        assert b.availability.reason.startswith("python package 'habana_frameworks.torch' is not importable")
        assert b.availability.reason.endswith(b.install_hint)
