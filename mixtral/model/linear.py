"""A bias-free projection whose product is the backend's `linear` op."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Linear(nn.Linear):
    """nn.Linear without bias computed by `op` (same signature as F.linear); still an nn.Linear, so tensor
    parallelism's Colwise/RowwiseParallel and FSDP treat it as one."""

    def __init__(self, in_features: int, out_features: int, op: Callable[..., torch.Tensor]) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight)
