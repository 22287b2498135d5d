"""kernels.row_products (compiled single-token decoding) against the reference GEMMs, eagerly and compiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mixtral.kernels import reference, row_products

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative; bf16: one rounding of the fp32 sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", [[0, 1, 0, 1], [2, 0, 0, 0], [0, 0, 0, 1], [1, 2, 0, 3]])
def test_grouped_mm_is_the_grouped_mm(dtype, counts):
    """Each row times its own expert's weight: empty experts, all rows on one, the last expert alone."""
    torch.manual_seed(0)
    x, w = torch.randn(sum(counts), 24).to(dtype), torch.randn(4, 24, 40).to(dtype)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = row_products.grouped_mm(x, w, offs)
    assert out.dtype == dtype
    expected = reference.grouped_mm(x.float(), w.float(), offs)
    torch.testing.assert_close(out.float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_is_f_linear(dtype):
    torch.manual_seed(0)
    x, w = torch.randn(1, 1, 48).to(dtype), torch.randn(72, 48).to(dtype)
    out = row_products.linear(x, w)
    assert out.shape == (1, 1, 72) and out.dtype == dtype
    expected = F.linear(x.float(), w.float())
    torch.testing.assert_close(out.float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_applies_to_one_row_in_compiled_inference_only():
    """Eager calls, training graphs and several rows keep the backend's GEMMs."""
    seen = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(row_products.applies(x))
        return x + 1

    compiled = torch.compile(probe, backend="eager", dynamic=False)
    with torch.no_grad():
        probe(torch.ones(1, 8))
        compiled(torch.ones(1, 1, 8))
        compiled(torch.ones(2, 8))
    compiled(torch.ones(1, 8, requires_grad=True))
    assert seen == [False, True, False, False]


def test_compiled_after_a_norm_equals_eager():
    """Compiled with inductor (the norm's output stored once, then streamed against the weight), bf16: within 1%
    of the largest logit (inductor rounds the norm's output once, eager twice)."""
    from mixtral.kernels import native

    torch.manual_seed(0)
    h, norm, w = torch.randn(1, 1, 64).bfloat16(), torch.randn(64).bfloat16(), torch.randn(96, 64).bfloat16()

    def head(h: torch.Tensor) -> torch.Tensor:
        return row_products.linear(native.rms_norm(h, norm, 1e-5), w)

    with torch.no_grad():
        out = torch.compile(head, dynamic=False)(h)
        expected = F.linear(native.rms_norm(h, norm, 1e-5).float(), w.float())
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=1e-2 * expected.abs().max().item())
