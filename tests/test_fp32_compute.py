"""bf16 GEMMs computed in fp32 on CPUs without bf16 GEMM instructions (mixtral.kernels.fp32_compute).

The path is forced on (whatever this CPU has) and compared with a float64 reference of the same bf16 values:
it must be at least as accurate as PyTorch's native bf16 GEMM, keep bf16 in and out, and save only bf16
tensors for the backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral.kernels import fp32_compute, reference

BF16 = torch.bfloat16


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setattr(fp32_compute, "needed", lambda dtype: dtype in (torch.bfloat16, torch.float16))


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def test_linear_matches_float64_at_least_as_well_as_native(forced) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 37, 96).to(BF16).requires_grad_()
    w = torch.randn(80, 96).to(BF16).requires_grad_()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    out, ref = fp32_compute.linear(x, w), F.linear(x64, w64)
    assert out.dtype == BF16 and out.shape == (2, 37, 80)
    native = F.linear(x.detach(), w.detach())
    assert rel(out, ref) <= rel(native, ref) * 1.01 and rel(out, ref) < 4e-3
    grad = torch.randn(out.shape).to(BF16)
    out.backward(grad)
    ref.backward(grad.double())
    assert x.grad.dtype == BF16 and w.grad.dtype == BF16
    assert rel(x.grad, x64.grad) < 4e-3 and rel(w.grad, w64.grad) < 4e-3


def test_linear_saves_only_bf16_for_backward(forced) -> None:
    """No fp32 copy of the weight is kept alive between forward and backward."""
    saved: list[torch.dtype] = []
    x, w = torch.randn(16, 32).to(BF16).requires_grad_(), torch.randn(24, 32).to(BF16).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        fp32_compute.linear(x, w).sum().backward()
    assert saved and set(saved) == {BF16}


def test_linear_keeps_the_native_kernel_for_few_rows(forced) -> None:
    """Below MIN_ROWS the GEMM is weight-read bound: the native bf16 kernel runs, bit for bit."""
    x, w = torch.randn(1, fp32_compute.MIN_ROWS - 1, 32).to(BF16), torch.randn(24, 32).to(BF16)
    assert torch.equal(fp32_compute.linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("k, n", [(100, 300), (300, 100)], ids=["column_blocks", "row_blocks_summed"])
def test_blocked_conversion_equals_one_block(forced, monkeypatch, k, n) -> None:
    a, b = torch.randn(9, k).to(BF16), torch.randn(k, n).to(BF16)
    whole = fp32_compute.mm(a, b)
    monkeypatch.setattr(fp32_compute, "BLOCK_ELEMENTS", 64 * 100)  # 64-wide blocks: 5 of them
    torch.testing.assert_close(fp32_compute.mm(a, b), whole, rtol=1e-5, atol=1e-5)
    assert whole.dtype == torch.float32


def test_linear_under_autocast_casts_like_autocast(forced) -> None:
    """Under CPU autocast (fp32 parameters) the op rounds its operands to bf16 first, returns bf16, and the
    gradients reach the fp32 parameters."""
    x, w = torch.randn(12, 32, requires_grad=True), torch.randn(20, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        out = fp32_compute.linear(x, w)
        native = F.linear(x, w)
    assert out.dtype == BF16 == native.dtype
    exact = F.linear(x.detach().to(BF16).double(), w.detach().to(BF16).double())
    assert rel(out, exact) <= rel(native, exact) * 1.01
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("counts", [[0, 20, 2, 0, 17], [fp32_compute.MIN_ROWS - 1], [40, 0]])
def test_grouped_mm_against_float64(forced, counts) -> None:
    """Segments above and below MIN_ROWS and empty ones; weights as the experts pass them (transposed views)."""
    torch.manual_seed(1)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 32).to(BF16).requires_grad_()
    params = torch.randn(len(counts), 24, 32).to(BF16).requires_grad_()
    x64, p64 = x.detach().double().requires_grad_(), params.detach().double().requires_grad_()
    out = fp32_compute.grouped_mm(x, params.transpose(1, 2), offs)
    ref = reference.grouped_mm(x64, p64.transpose(1, 2), offs)
    assert out.dtype == BF16 and rel(out, ref) < 4e-3
    grad = torch.randn(out.shape).to(BF16)
    out.backward(grad)
    ref.backward(grad.double())
    assert rel(x.grad, x64.grad) < 4e-3 and rel(params.grad, p64.grad) < 4e-3
    for g, n in enumerate(counts):
        if n == 0:
            assert not params.grad[g].any(), f"expert {g} got no rows but a gradient"


@pytest.mark.parametrize("queries", [20, 1], ids=["prefill", "decode"])
def test_attention_in_fp32_at_least_as_accurate_as_native(forced, queries) -> None:
    """Prefill and decode steps (one query over a cache prefix, grouped KV heads) both run on fp32 copies."""
    from mixtral.kernels import native

    torch.manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, queries, 16).to(BF16),
        torch.randn(2, 2, 20, 16).to(BF16),
        torch.randn(2, 2, 20, 16).to(BF16),
    )
    causal = queries == k.shape[2]
    exact = reference.attention(q.double(), k.double(), v.double(), causal=causal)
    out = fp32_compute.attention(q, k, v, causal=causal)
    expected = native.attention(q.float(), k.float(), v.float(), causal=causal).to(BF16)
    assert out.dtype == BF16 and torch.equal(out, expected)
    assert rel(out, exact) <= rel(native.attention(q, k, v, causal=causal), exact) * 1.01


def test_fp32_inputs_take_the_plain_path() -> None:
    """fp32 never needs it: the op is F.linear / the native grouped GEMM exactly."""
    assert not fp32_compute.needed(torch.float32)
    x, w = torch.randn(10, 16), torch.randn(8, 16)
    assert torch.equal(fp32_compute.linear(x, w), F.linear(x, w))
