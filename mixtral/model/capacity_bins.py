"""Intel Gaudi's capacity bins: few static expert-input shapes without dropping tokens.

Re-implemented from the description of HabanaAI/Megatron-LM's capacity_bins.py. N bin edges lie
between the balanced load ceil(top_k * tokens / E) and all tokens. Bin i has width exp_base**i;
the widths are normalised, accumulated and scaled into that range, and each edge is rounded up to
`alignment`. A forward pads every expert to the first edge >= its largest per-expert count, so
only N shapes ever reach the experts. Training counts how often each bin is used, and every
`optimize_interval` steps `optimize_bins` moves edges to where the counts are.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import torch
from torch import nn

from mixtral.config import CapacityBinsConfig
from mixtral.errors import MixtralError
from mixtral.model.layout import Reduce


def align_up(value: float, alignment: int) -> int:
    return int(math.ceil(value / alignment)) * alignment


def balanced_load(tokens: int, num_experts: int, top_k: int) -> int:
    """Rows per expert when routing is perfectly even: the lower end of the bins' range."""
    return -(-top_k * tokens // num_experts)


def make_bins(tokens: int, num_experts: int, top_k: int, num_bins: int, exp_base: float, alignment: int) -> list[int]:
    """N aligned edges from the balanced load up to all tokens, widths growing by exp_base."""
    lower = balanced_load(tokens, num_experts, top_k)
    widths = [exp_base**i for i in range(num_bins)]
    total, acc, edges = sum(widths), 0.0, []
    for width in widths:
        acc += width
        edges.append(align_up(lower + (tokens - lower) * acc / total, alignment))
    edges[-1] = align_up(tokens, alignment)  # exactly all tokens, whatever the float sum gave
    if len(set(edges)) != num_bins:
        raise MixtralError(
            f"moe.capacity_bins: {num_bins} bins between {lower} and {tokens} tokens per expert at "
            f"alignment {alignment} give only {len(set(edges))} distinct edges {edges}; lower "
            f"capacity_bins.num_bins, capacity_bins.alignment or capacity_bins.exp_base, or use more "
            f"tokens per micro-batch"
        )
    return edges


def optimize_bins(edges: list[int], usage: list[int], lower: int, alignment: int) -> list[int]:
    """Re-shape the bins from their usage, keeping their number.

    A bin's cost is usage x width / 2 (the mean padding it adds). Repeatedly pair the cheapest
    bin left with the most expensive one left: drop the cheap edge and split the expensive bin at
    its aligned midpoint, while the cheap one costs less. The last edge (all tokens) is never
    dropped; a bin too narrow to split at an aligned point is left whole.
    """
    n = len(edges)
    starts = [lower, *edges[:-1]]
    cost = [u * (e - s) / 2 for u, e, s in zip(usage, edges, starts)]
    order = sorted(range(n), key=lambda i: cost[i])
    lo, hi = 0, n - 1
    dropped, added = set(), []
    while lo < hi and cost[order[lo]] < cost[order[hi]]:
        cheap, dear = order[lo], order[hi]
        if cheap == n - 1:
            lo += 1
            continue
        mid = align_up((starts[dear] + edges[dear]) // 2, alignment)
        if not starts[dear] < mid < edges[dear]:
            hi -= 1
            continue
        dropped.add(cheap)
        added.append(mid)
        lo, hi = lo + 1, hi - 1
    return sorted([e for i, e in enumerate(edges) if i not in dropped] + added)


class CapacityBins(nn.Module):
    """One layer's bins as model state (edges, usage, steps are saved and restored with the model).

    `agree` maps this rank's largest count to the largest over the ranks that must agree on the shape (expert
    parallelism's: an all-reduce MAX over the EP group); None keeps the choice local.
    """

    def __init__(self, config: CapacityBinsConfig, num_experts: int, top_k: int, agree: Reduce | None = None) -> None:
        super().__init__()
        self.config, self.num_experts, self.top_k = config, num_experts, top_k
        self.alignment = config.alignment
        self.agree = agree
        self.tokens = config.tokens
        self.register_buffer("edges", torch.zeros(config.num_bins, dtype=torch.int64))  # all 0: not set yet
        self.register_buffer("usage", torch.zeros(config.num_bins, dtype=torch.int64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self._edges: list[int] | None = None  # host copy of `edges`, read once

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._edges = None

    def host_edges(self) -> list[int]:
        if self._edges is None:
            self._edges = self.edges.tolist()
        return self._edges

    def set_edges(self, edges: list[int]) -> None:
        """New bins; their usage starts again from zero."""
        with torch.no_grad():
            self.edges.copy_(torch.tensor(edges, dtype=torch.int64))
            self.usage.zero_()
        self._edges = list(edges)

    def lower(self) -> int:
        return balanced_load(self.tokens, self.num_experts, self.top_k)

    def capacity(self, counts: torch.Tensor, tokens: int) -> tuple[int, int]:
        """(rows per expert, bin index) for this batch's per-expert counts [E]; one host read.

        Before the bins exist (no training batch yet, no capacity_bins.tokens) the largest count
        rounded up to the alignment is used, bin index -1. A count above the last edge (a larger
        batch than the bins were made for) also rounds up rather than dropping, counted as the last bin.
        """
        edges = self.host_edges()
        if self.training:
            self.tokens = self.tokens or tokens
        if edges[0] == 0 and self.training:
            self.set_edges(
                make_bins(
                    self.tokens,
                    self.num_experts,
                    self.top_k,
                    self.config.num_bins,
                    self.config.exp_base,
                    self.alignment,
                )
            )
            edges = self._edges
        largest = counts.max()
        largest = int(self.agree(largest) if self.agree is not None else largest)
        if edges[0] == 0:
            return align_up(max(largest, 1), self.alignment), -1
        index = min(bisect.bisect_left(edges, largest), len(edges) - 1)
        if self.training:
            self.usage[index] += 1
        return max(edges[index], align_up(largest, self.alignment)), index


def step_bins(bins: list[CapacityBins], total: Reduce | None = None, first_layer: int = 0) -> bool:
    """End of a training step: count it and, every optimize_interval steps, re-shape the bins.

    Layers in groups of `group_size` (by model layer index: bins[i] is layer first_layer + i, so a pipeline
    stage groups its layers as the whole model does) pool their usage, summed by `total` over the data ranks
    (the trainer's all-reduce; None: this process's), and all take the same new bins. Returns whether the bins
    were re-shaped.
    """
    if not bins:
        return False
    for b in bins:
        b.steps += 1
    interval = bins[0].config.optimize_interval
    if not interval or int(bins[0].steps) % interval or bins[0].host_edges()[0] == 0:
        return False
    size = bins[0].config.group_size
    groups: dict[int, list[CapacityBins]] = {}
    for i, b in enumerate(bins):
        groups.setdefault((first_layer + i) // size, []).append(b)
    for group in groups.values():
        usage = torch.stack([b.usage for b in group]).sum(0)
        if total is not None:
            usage = total(usage)
        first = group[0]
        edges = optimize_bins(first.host_edges(), usage.tolist(), first.lower(), first.alignment)
        for b in group:
            b.set_edges(edges)
    return True
