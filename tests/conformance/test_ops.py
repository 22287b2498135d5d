"""Every op of every available backend against mixtral.kernels.reference (float64 on the CPU), forward and backward."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from mixtral.kernels import native, reference
from mixtral.model.rope import rope_tables

from conformance import AVAILABLE, BACKENDS, GRAD_TOLERANCE, ON_AVAILABLE, TOLERANCE, assert_close

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def compare(
    fn: Callable[..., torch.Tensor],
    ref_fn: Callable[..., torch.Tensor],
    inputs: list[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    what: str,
) -> None:
    """fn on the backend's device vs ref_fn on float64 copies of the same values: output, then every input's grad."""
    dev_in = [t.to(device, copy=True).requires_grad_() for t in inputs]
    ref_in = [t.to(torch.float64, copy=True).requires_grad_() for t in inputs]
    out, ref = fn(*dev_in), ref_fn(*ref_in)
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    assert_close(out, ref, TOLERANCE[dtype], what)
    grad = torch.randn(ref.shape).to(dtype)
    out.backward(grad.to(device))
    ref.backward(grad.double())
    for i, (got, want) in enumerate(zip(dev_in, ref_in)):
        assert_close(got.grad, want.grad, GRAD_TOLERANCE[dtype], f"{what}: gradient of input {i}")


def test_available_backends_are_reported() -> None:
    """The suite runs on the backends listed as usable; the others are named here with their reason."""
    for b in BACKENDS:
        print(f"{b.name:6s} {'available' if b.availability.ok else 'unavailable: ' + b.availability.reason}")
        assert b.availability.ok or b.availability.reason, f"{b.name} is unavailable without a reason"
    assert "cpu" in [b.name for b in AVAILABLE]


ATTENTION_CASES = {  # name: (query length, key length, causal, mask kind)
    "causal": (11, 11, True, None),
    "explicit_mask": (5, 13, False, "random"),
    "prefill_with_cache": (4, 10, False, "offset_causal"),
    "decode": (1, 9, False, None),
}


def make_mask(kind: str | None, s: int, t: int) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "offset_causal":  # queries at positions t-s..t-1 over keys 0..t-1, as the KV cache produces
        return torch.arange(t).unsqueeze(0) <= torch.arange(t - s, t).unsqueeze(1)
    mask = torch.rand(2, 1, s, t) < 0.6
    mask[..., 0] = True  # every query sees at least one key (an all-masked row has no defined softmax)
    return mask


@ON_AVAILABLE
@DTYPES
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_gqa(backend, dtype, case) -> None:
    s, t, causal, kind = ATTENTION_CASES[case]
    mask = make_mask(kind, s, t)
    dev_mask = None if mask is None else mask.to(backend.device())
    inputs = [
        torch.randn(2, 6, s, 16).to(dtype),
        torch.randn(2, 2, t, 16).to(dtype),
        torch.randn(2, 2, t, 16).to(dtype),
    ]
    compare(
        lambda q, k, v: backend.ops.attention(q, k, v, mask=dev_mask, causal=causal),
        lambda q, k, v: reference.attention(q, k, v, mask=mask, causal=causal),
        inputs,
        backend.device(),
        dtype,
        f"attention[{case}]",
    )


@ON_AVAILABLE
@DTYPES
@pytest.mark.parametrize(
    "counts, k, m",
    [([3, 0, 7, 0, 5], 32, 24), ([0, 0, 12], 20, 12), ([9], 48, 8), ([4, 4, 0], 32, 24)],
    ids=["zeros_inside", "odd_shape", "one_group", "last_empty"],
)
def test_grouped_mm(backend, dtype, counts, k, m) -> None:
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    dev_offs = offs.to(backend.device())
    inputs = [torch.randn(sum(counts), k).to(dtype), torch.randn(len(counts), m, k).to(dtype)]
    # Weights arrive transposed ([G, M, K] parameters viewed as [G, K, M]), as the experts pass them.
    compare(
        lambda x, w: backend.ops.grouped_mm(x, w.transpose(1, 2), dev_offs),
        lambda x, w: reference.grouped_mm(x, w.transpose(1, 2), offs),
        inputs,
        backend.device(),
        dtype,
        f"grouped_mm{counts}",
    )


@ON_AVAILABLE
@DTYPES
@pytest.mark.parametrize("rows", [1, 3, 37], ids=["gemv", "few_rows", "many_rows"])
def test_linear(backend, dtype, rows) -> None:
    compare(
        backend.ops.linear,
        reference.linear,
        [torch.randn(1, rows, 48).to(dtype), torch.randn(40, 48).to(dtype)],
        backend.device(),
        dtype,
        f"linear[{rows} rows]",
    )


@ON_AVAILABLE
@DTYPES
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_router(backend, dtype, top_k) -> None:
    """The same experts as the reference, fp32 weights summing to one, and the weights' gradient."""
    logits = torch.randn(37, 8).to(dtype)
    dev = logits.to(backend.device(), copy=True).requires_grad_()
    ref = logits.to(torch.float64, copy=True).requires_grad_()
    (weights, ids), (ref_weights, ref_ids) = backend.ops.router(dev, top_k), reference.router(ref, top_k)
    assert weights.dtype == torch.float32 and torch.equal(ids.cpu(), ref_ids)
    assert_close(weights, ref_weights, TOLERANCE[torch.float32], f"router weights (top {top_k})")
    grad = torch.randn(37, top_k)
    weights.backward(grad.to(backend.device()))
    ref_weights.backward(grad.double())
    assert_close(dev.grad, ref.grad, GRAD_TOLERANCE[dtype], f"router gradient (top {top_k})")


PERMUTE_CASES = {"empty_experts": (2, (0, 2, 3, 5)), "one_expert": (1, (3,))}  # name: (top_k, experts that get tokens)


def routing(tokens: int, k: int, used: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct experts per token drawn from `used`, and fp32 weights that sum to one."""
    ids = torch.tensor(used)[torch.rand(tokens, len(used)).topk(k).indices]
    weights = torch.rand(tokens, k) + 0.1
    return ids, weights / weights.sum(dim=-1, keepdim=True)


@ON_AVAILABLE
@DTYPES
@pytest.mark.parametrize("case", list(PERMUTE_CASES))
def test_permute_round_trip(backend, dtype, case) -> None:
    k, used = PERMUTE_CASES[case]
    dev = backend.device()
    x = torch.randn(13, 24).to(dtype)
    ids, weights = routing(13, k, used)
    rows, order, counts = backend.ops.permute(x.to(dev), ids.to(dev), 6)
    ref_rows, ref_order, ref_counts = reference.permute(x, ids, 6)
    assert torch.equal(counts.cpu(), ref_counts) and torch.equal(order.cpu(), ref_order)
    assert torch.equal(rows.cpu(), ref_rows), "permute must move rows exactly"
    back = backend.ops.unpermute(rows, order, weights.to(dev))
    assert back.dtype == dtype
    assert_close(back, x, TOLERANCE[dtype], "unpermute(permute(x)) with weights summing to one")


@ON_AVAILABLE
@DTYPES
@pytest.mark.parametrize("case", list(PERMUTE_CASES))
def test_permute_unpermute_weighting(backend, dtype, case) -> None:
    """permute -> per-row expert stand-in -> weighted unpermute, with gradients for x, the rows and the weights."""
    k, used = PERMUTE_CASES[case]
    ids, weights = routing(13, k, used)
    dev_ids = ids.to(backend.device())

    def moe(ops, ids):
        def fn(x, scale, weights):
            rows, order, _ = ops.permute(x, ids, 6)
            return ops.unpermute(rows * scale, order, weights)

        return fn

    inputs = [torch.randn(13, 24).to(dtype), torch.randn(13 * k, 24).to(dtype), weights]
    compare(moe(backend.ops, dev_ids), moe(reference, ids), inputs, backend.device(), dtype, "permute/unpermute")


@ON_AVAILABLE
@DTYPES
def test_rms_norm(backend, dtype) -> None:
    compare(
        lambda x, w: backend.ops.rms_norm(x, w, 1e-5),
        lambda x, w: reference.rms_norm(x, w, 1e-5),
        [torch.randn(3, 7, 40).to(dtype), (1 + 0.1 * torch.randn(40)).to(dtype)],
        backend.device(),
        dtype,
        "rms_norm",
    )


@ON_AVAILABLE
@DTYPES
def test_rope(backend, dtype) -> None:
    cos, sin = rope_tables(16, 64, 1e6)
    compare(
        backend.ops.rope,
        reference.rope,
        [torch.randn(2, 3, 9, 16).to(dtype), cos[5:14].to(dtype), sin[5:14].to(dtype)],
        backend.device(),
        dtype,
        "rope",
    )


@ON_AVAILABLE
@DTYPES
def test_swiglu(backend, dtype) -> None:
    compare(
        backend.ops.swiglu, reference.swiglu, [torch.randn(17, 2 * 40).to(dtype)], backend.device(), dtype, "swiglu"
    )


@DTYPES
@pytest.mark.parametrize("layout", ["2d", "3d", "strided"])
def test_native_swiglu_backward_is_autograds_bit_for_bit(dtype, layout) -> None:
    """native.swiglu's hand-written backward (no concatenation, silu recomputed) rounds as autograd does through
    reference.swiglu: the same bits, eager and under torch.compile. A column-major input takes PyTorch's
    non-vectorised silu kernels, whose last bit may differ (torch.testing's default tolerance for the dtype)."""
    x = {"2d": torch.randn(33, 2 * 48), "3d": torch.randn(4, 9, 2 * 48), "strided": torch.randn(2 * 48, 33).t()}[
        layout
    ].to(dtype)
    grad = torch.randn(*x.shape[:-1], 48).to(dtype)
    for fn in (native.swiglu, torch.compile(native.swiglu, backend="aot_eager")):
        ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, ref_out = fn(ours), reference.swiglu(ref)
        out.backward(grad)
        ref_out.backward(grad)
        tolerance = {} if layout == "strided" else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(out, ref_out, **tolerance)
        torch.testing.assert_close(ours.grad, ref.grad, **tolerance)


@ON_AVAILABLE
@DTYPES
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("in_place", [False, True], ids=["kept", "in_place"])
def test_cross_entropy(backend, dtype, reduction, in_place) -> None:
    """The loss (fp32 or wider) and the logits' gradient; ignored targets are not counted."""
    logits, targets = torch.randn(37, 300).to(dtype), torch.randint(0, 300, (37,))
    targets[::6] = reference.IGNORE_INDEX
    dev = logits.to(backend.device(), copy=True).requires_grad_()
    ref = logits.to(torch.float64, copy=True).requires_grad_()
    out = backend.ops.cross_entropy(dev * 1, targets.to(backend.device()), reduction=reduction, in_place=in_place)
    want = reference.cross_entropy(ref, targets, reduction=reduction)
    assert out.dtype == torch.float32
    assert_close(out.reshape(1), want.reshape(1), TOLERANCE[torch.float32], "cross_entropy")
    out.backward()
    want.backward()
    assert_close(dev.grad, ref.grad, GRAD_TOLERANCE[dtype], "cross_entropy: gradient of the logits")


COMPILING = [b for b in AVAILABLE if b.capabilities.compile_backend is not None]  # XLA traces its own graphs


@pytest.mark.parametrize("backend", COMPILING, ids=[b.name for b in COMPILING])
@DTYPES
@pytest.mark.parametrize("counts", [[0, 1, 0, 1], [1, 0, 0, 0], [2, 0, 3, 1]], ids=["one_token", "one_row", "batch"])
def test_grouped_mm_in_a_compiled_inference_graph(backend, dtype, counts) -> None:
    """What generation's compiled graphs run (a backend may fuse one token's rows, or multiply packed weights), on
    every available backend that compiles with torch.compile."""
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x, w = torch.randn(sum(counts), 32).to(dtype), torch.randn(len(counts), 24, 32).to(dtype).transpose(1, 2)
    device = backend.device()
    compiled = torch.compile(backend.ops.grouped_mm, backend=backend.capabilities.compile_backend, fullgraph=True)
    with torch.no_grad():
        out = compiled(x.to(device), w.to(device), offs.to(device))
    assert out.dtype == dtype
    assert_close(out, reference.grouped_mm(x.double(), w.double(), offs), TOLERANCE[dtype], f"grouped_mm{counts}")
