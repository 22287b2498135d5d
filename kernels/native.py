"""Ops built from PyTorch's own fused kernels (SDPA, grouped GEMM, fused RMSNorm): fast on any device.

Each function keeps the signature and numerics of its namesake in mixtral.kernels.reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixtral.kernels import reference


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """SDPA (flash / memory-efficient / CPU fused) with grouped KV heads handled inside the kernel."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


_GROUPED_MM_SUPPORT: dict[tuple[str, torch.dtype], bool] = {}


@torch.compiler.assume_constant_result  # under torch.compile: probed at trace time, the answer is a constant
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs here for this dtype (absent on the CPU before 2.10; bf16-only on older GPUs)."""
    key = (device_type, dtype)
    if key not in _GROUPED_MM_SUPPORT:
        _GROUPED_MM_SUPPORT[key] = _probe_grouped_mm(device_type, dtype)
    return _GROUPED_MM_SUPPORT[key]


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.ones(4, 16, device=device_type, dtype=dtype)
        w = torch.ones(2, 16, 16, device=device_type, dtype=dtype)
        offs = torch.tensor([2, 4], device=device_type, dtype=torch.int32)
        torch._grouped_mm(x, w, offs=offs)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def grouped_mm_runs(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm runs for this dtype here and both operands' rows are 16-byte aligned (its rule)."""
    aligned = (x.shape[1] * x.element_size()) % 16 == 0 and (w.shape[-1] * w.element_size()) % 16 == 0
    return aligned and grouped_mm_supported(x.device.type, x.dtype)


@torch.compiler.disable
def _grouped_mm_eagerly(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x, w, offs=offs)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """One grouped GEMM over contiguous row segments; falls back to a loop of mm where it cannot run.

    torch.compile traces torch._grouped_mm in bf16 only (its meta function's rule); other dtypes run it eagerly.
    """
    if not grouped_mm_runs(x, w):
        return reference.grouped_mm(x, w, offs)
    if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return _grouped_mm_eagerly(x, w, offs)
    return torch._grouped_mm(x, w, offs=offs)


class _SwiGLU(torch.autograd.Function):
    """reference.swiglu with a hand-written backward: both gradient halves are written into one [..., 2F] tensor
    (autograd's chunk backward concatenates them: a copy of the whole gradient), and only the input is saved
    (autograd also keeps silu(gate), [..., F] more per layer); silu(gate) is recomputed. Same roundings as
    autograd's, so the same numbers in every dtype."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad_gate_up = gate_up.new_empty(gate_up.shape)
        grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
        torch.ops.aten.silu.out(gate, out=grad_up).mul_(grad)
        torch.mul(grad, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_gate_up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (gate the first half of the last dimension), its backward without a concatenation."""
    return _SwiGLU.apply(gate_up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm in fp32, cast back before the weight as transformers does."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
