"""Cross-backend conformance: every backend usable on this machine checked against mixtral.kernels.reference.

The same suite runs CUDA on a GPU, HPU on a Gaudi and NPU on an Ascend; unusable backends are listed, not passed.
"""

from __future__ import annotations

import pytest
import torch

from mixtral.backend import Backend, all_backends

BACKENDS: list[Backend] = sorted(all_backends(), key=lambda b: b.name)
AVAILABLE: list[Backend] = [b for b in BACKENDS if b.availability.ok]
ON_AVAILABLE = pytest.mark.parametrize("backend", AVAILABLE, ids=[b.name for b in AVAILABLE])

# Relative Frobenius error vs a float64 CPU reference: fp32 arithmetic, and bf16 operands (outputs, then gradients).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; a NaN or Inf anywhere in out fails outright."""
    assert torch.isfinite(out).all(), "non-finite values in the backend's output"
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"
