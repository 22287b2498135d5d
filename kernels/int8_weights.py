"""Weight-only int8 products on the CPU (generation with `--dtype int8`): reference.int8_linear's numerics.

torch._weight_int8pack_mm reads the int8 weights as they are stored, accumulates in fp32 and applies the
per-channel scale once; for a single row it streams the weight near memory speed (2-core AVX2 EPYC, 32000 x 512:
0.94 ms, where a bf16 GEMV takes 2.3 ms and inductor's fused int8 multiply-sum 7.8 ms), so it serves every row
count, in compiled graphs too. The experts loop over their groups on the host: one opaque node of a compiled graph.
"""

from __future__ import annotations

import torch

from mixtral.kernels import row_products


def _pack_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [R, K] times int8 weight [N, K] by torch._weight_int8pack_mm (its scale in x's dtype)."""
    if x.shape[0] == 0:
        return x.new_empty(0, weight.shape[0])
    return torch._weight_int8pack_mm(x.contiguous(), weight, scale.to(x.dtype))


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """reference.int8_linear: x [..., K], weight int8 [N, K], scale [N]."""
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
    """reference.int8_grouped_mm: x [R, K] grouped by expert at offs, weight int8 [E, N, K], scale [E, N]; one opaque
    node in a compiled inference graph."""
    if row_products.compiled_inference():
        return opaque_grouped_mm(x, weight, scale, offs)
    return _grouped(x, weight, scale, offs)
