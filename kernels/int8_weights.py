"""Weight-only int8 products on the CPU (generation with `--dtype int8`): reference.int8_linear's numerics.

Eagerly, and for several rows, torch._weight_int8pack_mm: int8 weights read as they are stored, fp32 accumulation,
the per-channel scale applied once. A single row in a compiled inference graph is a fused multiply-sum instead
(as kernels/row_products for bf16 weights): inductor streams each int8 weight row once, converting as it goes,
so a decode step reads half the bytes of bf16 weights. Experts of several rows run as one opaque node of the graph.
"""

from __future__ import annotations

import torch

from mixtral.kernels import row_products

ONE_TOKEN_ROWS = row_products.ONE_TOKEN_ROWS


def _pack_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [R, K] times int8 weight [N, K] by torch._weight_int8pack_mm (its scale in x's dtype)."""
    if x.shape[0] == 0:
        return x.new_empty(0, weight.shape[0])
    return torch._weight_int8pack_mm(x.contiguous(), weight, scale.to(x.dtype))


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """reference.int8_linear: x [..., K], weight int8 [N, K], scale [N]."""
    if row_products.applies(x):
        return (row_products.stored(x).float().unsqueeze(-2) * weight.float()).sum(-1).mul(scale.float()).to(x.dtype)
    return _pack_mm(x.reshape(-1, x.shape[-1]), weight, scale).reshape(*x.shape[:-1], weight.shape[0])


def _grouped(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for expert, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = _pack_mm(x[start:end], weight[expert], scale[expert])
        start = end
    return out


@torch.library.custom_op("mixtral::int8_grouped_mm", mutates_args=())
def opaque_grouped_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The experts' int8 products as one node of a compiled inference graph: the loop over experts breaks none."""
    return _grouped(x, weight, scale, offs)


@opaque_grouped_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """reference.int8_grouped_mm: x [R, K] grouped by expert at offs, weight int8 [E, N, K], scale [E, N]. In a compiled
    inference graph one token's rows (each on another expert) are fused row products reading only their experts."""
    if row_products.compiled_inference():
        if x.shape[0] <= ONE_TOKEN_ROWS:
            rows = torch.arange(x.shape[0], device=x.device, dtype=offs.dtype)
            expert = (rows.unsqueeze(1) >= offs.unsqueeze(0)).sum(dim=1)
            products = (row_products.stored(x).float().unsqueeze(-2) * weight[expert].float()).sum(-1)
            return (products * scale[expert].float()).to(x.dtype)
        return opaque_grouped_mm(x, weight, scale, offs)
    return _grouped(x, weight, scale, offs)
