"""Next-token choice: greedy at temperature 0, else temperature, top-k and top-p (nucleus) sampling.

Every parameter may differ per row (the server batches requests with different settings). Draws
come from seeded torch.Generators, so the same seed gives the same tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """Per-row settings as [B] tensors: temperature (0 = greedy), top_k (0 = off), top_p (1 = off)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor

    @classmethod
    def build(
        cls,
        batch: int,
        temperature: float | list[float] = 0.0,
        top_k: int | list[int] = 0,
        top_p: float | list[float] = 1.0,
        device: torch.device | str = "cpu",
    ) -> "SamplingParams":
        """From one value for every row or a list with one value per row."""

        def column(value, dtype):
            values = value if isinstance(value, (list, tuple)) else [value] * batch
            if len(values) != batch:
                raise ValueError(f"{len(values)} sampling values for a batch of {batch}")
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(column(temperature, torch.float32), column(top_k, torch.int64), column(top_p, torch.float32))

    @functools.cached_property
    def greedy(self) -> bool:
        return bool((self.temperature <= 0).all())

    @functools.cached_property
    def filtered(self) -> bool:
        """Whether any row uses top-k or top-p (they need the sorted distribution)."""
        return bool((self.top_k > 0).any() or (self.top_p < 1).any())


def make_generators(
    seed: int | list[int | None] | None, batch: int, device: torch.device | str = "cpu"
) -> list[torch.Generator] | None:
    """One generator for the batch (int seed), one per row (list of seeds), or None (global RNG)."""
    if seed is None:
        return None
    seeds = seed if isinstance(seed, (list, tuple)) else [seed]
    if len(seeds) not in (1, batch):
        raise ValueError(f"{len(seeds)} seeds for a batch of {batch}")
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        if s is None:
            g.seed()
        else:
            g.manual_seed(int(s))
        gens.append(g)
    return gens


def uniforms(batch: int, generators: list[torch.Generator] | None, device: torch.device) -> torch.Tensor:
    """[B] uniform draws in [0, 1): from the shared generator, or one from each row's generator."""
    if generators is None or len(generators) == 1:
        return torch.rand(batch, device=device, generator=generators[0] if generators else None)
    return torch.cat([torch.rand(1, device=device, generator=g) for g in generators])


def sample(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """logits [B, V] -> next token ids [B] (int64)."""
    greedy_ids = logits.float().argmax(dim=-1)  # the same ids; PyTorch's CPU argmax is 2x slower over bf16
    if params.greedy:
        return greedy_ids
    temperature = params.temperature.clamp_min(1e-5).unsqueeze(1)
    scaled = logits.float() / temperature
    if params.filtered:
        scaled, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(scaled.shape[-1], device=logits.device)
        top_k = params.top_k.unsqueeze(1)
        cut = (top_k > 0) & (rank >= top_k)
        probs = scaled.masked_fill(cut, float("-inf")).softmax(dim=-1)
        # nucleus: keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        cut |= (probs.cumsum(dim=-1) - probs) >= params.top_p.unsqueeze(1)
        probs = probs.masked_fill(cut, 0.0)
    else:
        probs, order = scaled.softmax(dim=-1), None
    cdf = probs.cumsum(dim=-1)
    draws = uniforms(logits.shape[0], generators, logits.device).unsqueeze(1) * cdf[:, -1:]
    last = (cdf < cdf[:, -1:]).sum(dim=-1, keepdim=True)  # the last token with mass (rounding guard)
    picked = torch.minimum(torch.searchsorted(cdf, draws, right=True), last).squeeze(1)
    ids = picked if order is None else order.gather(1, picked.unsqueeze(1)).squeeze(1)
    return torch.where(params.temperature > 0, ids, greedy_ids)
