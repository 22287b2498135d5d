"""kernels/blocked_cross_entropy against F.cross_entropy on fp32 copies of the logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral.kernels import blocked_cross_entropy as ce
from mixtral.kernels.reference import IGNORE_INDEX


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(ce, "BLOCK_ELEMENTS", 7 * 1000)  # 7 rows a block: 300 rows end in a partial block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_loss_and_gradient_match_torch(dtype, reduction, scale):
    torch.manual_seed(0)
    logits = (torch.randn(300, 1000) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 1000, (300,))
    targets[::5] = IGNORE_INDEX
    ours = ce.cross_entropy(logits, targets, reduction=reduction)
    (grad,) = torch.autograd.grad(ours * scale, logits)
    ref = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref * scale, logits)
    assert ours.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)  # fp32 math on both sides
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
    else:  # within one bf16 step everywhere
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2**-7, atol=0)
    if dtype == torch.bfloat16 and scale == 1.0:  # both round an fp32 gradient to bf16 once: the same bits but
        assert (grad != ref_grad).float().mean() < 0.001  # where fp32 rounding differed (scale 2.5 rounds twice)
    assert grad[::5].abs().max() == 0  # ignored rows get no gradient


def test_logits_are_left_intact():
    logits = torch.randn(20, 50, requires_grad=True)
    before = logits.detach().clone()
    ce.cross_entropy(logits, torch.randint(0, 50, (20,))).backward()
    assert torch.equal(logits.detach(), before)


def test_all_rows_ignored_is_nan_like_torch():
    logits = torch.randn(4, 10)
    targets = torch.full((4,), IGNORE_INDEX)
    assert ce.cross_entropy(logits, targets).isnan() and F.cross_entropy(logits, targets).isnan()
    assert ce.cross_entropy(logits, targets, reduction="sum") == 0


def test_unknown_reduction_is_named():
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        ce.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.int64), reduction="none")


def test_backward_twice_is_refused():
    """backward scales the gradient saved by forward in place: autograd's version check stops a second one."""
    logits = torch.randn(6, 10, requires_grad=True)
    loss = ce.cross_entropy(logits, torch.randint(0, 10, (6,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_gradient_is_built_without_grad_mode():
    logits = torch.randn(6, 10, requires_grad=True)
    targets = torch.randint(0, 10, (6,))
    with torch.no_grad():
        loss = ce.cross_entropy(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach(), targets), rtol=1e-6, atol=0)
    assert loss.grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_gives_the_same_loss_and_gradients(dtype):
    """The gradient written over the logits flows back through the layer that made them exactly as a separate one."""
    torch.manual_seed(0)
    hidden = torch.randn(40, 16).to(dtype).requires_grad_()
    weight = torch.randn(300, 16).to(dtype).requires_grad_()
    targets = torch.randint(0, 300, (40,))
    targets[::7] = IGNORE_INDEX
    results = []
    for in_place in (False, True):
        loss = ce.cross_entropy(hidden @ weight.t(), targets, in_place=in_place)
        results.append((loss, *torch.autograd.grad(loss * 2.5, (hidden, weight))))
    for ours, ref in zip(results[1], results[0]):
        assert torch.equal(ours, ref)


def test_in_place_on_a_view_is_refused_by_name():
    logits = torch.randn(2, 5, 10, requires_grad=True) * 1.0
    with pytest.raises(ValueError, match="not a view of another tensor"):
        ce.cross_entropy(logits.reshape(-1, 10), torch.randint(0, 10, (10,)), in_place=True)
