"""Bias-free projections whose product is the backend's `linear` op, or `int8_linear` on int8 weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mixtral.backend import Ops


class Linear(nn.Linear):
    """nn.Linear without bias computed by `op` (same signature as F.linear); still an nn.Linear, so tensor
    parallelism's Colwise/RowwiseParallel and FSDP treat it as one."""

    def __init__(self, in_features: int, out_features: int, op: Callable[..., torch.Tensor]) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight)


class Int8Linear(nn.Module):
    """A projection held as int8 weights [out, in] with a per-output-channel scale (weight_scale [out], the model's
    float dtype), computed by `op` (reference.int8_linear's signature). Generation only: no gradient."""

    def __init__(self, in_features: int, out_features: int, op: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.register_buffer("weight_scale", torch.empty(out_features))
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight, self.weight_scale)


def projection(in_features: int, out_features: int, ops: Ops, int8: bool = False) -> Linear | Int8Linear:
    """A bias-free projection by the backend's ops, int8 when the model holds its large weights so."""
    if int8:
        return Int8Linear(in_features, out_features, ops.int8_linear)
    return Linear(in_features, out_features, ops.linear)


INT8_SUFFIXES = (  # the parameters an int8 model holds as int8: the projections, the lm head and the experts
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "lm_head.weight",
    "experts.gate_up_proj",
    "experts.down_proj",
)


def int8_weight(name: str) -> bool:
    """Parameter `name` is held as int8 in an int8 model (its embedding, norms and router stay in float)."""
    return name.endswith(INT8_SUFFIXES)


def int8_scale_name(name: str) -> str:
    """The buffer holding the per-output-channel scales of int8 parameter `name`."""
    return f"{name}_scale"
