"""The generation engine: one prefill over the (left-padded) prompts, then a decode loop over the static KV cache.

Prompts of different lengths share a batch: shorter ones are left-padded, their pad slots masked and
their positions shifted (Mixtral.forward's `pad`), so each row computes what it would compute alone.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from mixtral.backend import backend_for_device
from mixtral.errors import MixtralError
from mixtral.model import Mixtral
from mixtral.serve.sampling import SamplingParams, make_generators, sample

CACHE_ROUND = 256  # cache lengths round up to this, so successive requests reuse one cache
PROMPT_ROUND = 16  # fixed-shape backends: padded prompt lengths round up to this, so prefill graphs are few


def inference_mode(device: torch.device) -> contextlib.AbstractContextManager:
    """torch.inference_mode, or no_grad on a device whose backend rejects inference tensors (torch_xla 2.9)."""
    backend = backend_for_device(device.type)
    return torch.inference_mode() if backend is None or backend.capabilities.inference_tensors else torch.no_grad()


class Generator:
    """Generates token ids from a Mixtral; the model keeps its KV cache between calls (reused when it fits)."""

    def __init__(
        self, model: Mixtral, tokenizer=None, device: torch.device | str | None = None, fixed_shapes: bool | None = None
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else model.embed_tokens.weight.device
        self.eos_id = tokenizer.eos_id if tokenizer is not None else None
        backend = backend_for_device(self.device.type)
        # backends that compile a graph per shape: every decode step keeps one shape, prompts pad to few lengths
        self.fixed_shapes = (
            fixed_shapes if fixed_shapes is not None else bool(backend and not backend.capabilities.dynamic_shapes)
        )
        # lazy backends run each step's graph here; otherwise the cache's in-place updates chain across steps
        self.end_step = backend.mark_step if backend else lambda: None

    @property
    def max_positions(self) -> int:
        return self.model.config.max_position_embeddings

    def check(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        """Raise MixtralError for a request the model cannot run, naming the numbers and the fix."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise MixtralError("empty prompt: a prompt needs at least one token; pass some text")
        if max_new_tokens < 1:
            raise MixtralError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        vocab = self.model.config.vocab_size
        if any(t < 0 or t >= vocab for p in prompts for t in p):
            raise MixtralError(
                f"a prompt token id is outside the model's vocabulary of {vocab}; use the "
                f"model's own tokenizer (its directory's tokenizer.model)"
            )
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_positions:
            room = self.max_positions - longest
            fix = (
                f"lower max tokens to at most {room}"
                if room > 0
                else f"shorten the prompt below {self.max_positions} tokens"
            )
            raise MixtralError(
                f"prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's "
                f"max_position_embeddings of {self.max_positions}; {fix}"
            )

    def ensure_cache(self, batch: int, length: int) -> None:
        """Allocate the static KV cache unless the current one has this batch and enough positions."""
        cache = self.model.layers[0].self_attn.kv_cache
        if cache is not None and cache.k.shape[0] == batch and cache.k.shape[2] >= length:
            return
        length = min(-(-length // CACHE_ROUND) * CACHE_ROUND, self.max_positions)
        self.model.setup_caches(batch, length, device=self.device)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float | list[float] = 0.0,
        top_k: int | list[int] = 0,
        top_p: float | list[float] = 1.0,
        seed: int | list[int | None] | None = None,
        stop_at_eos: bool = True,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[list[int]]:
        """The new token ids of each prompt (an EOS that ended a row is included as its last id).

        Sampling settings are one value or one per row; seed is one for the batch or one per row.
        on_token(row, token_id) is called for every new token as soon as it is chosen.
        """
        self.check(prompts, max_new_tokens)
        with inference_mode(self.device):
            return self._generate(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, on_token)

    def _generate(
        self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eos, on_token
    ) -> list[list[int]]:
        batch, longest = len(prompts), max(len(p) for p in prompts)
        if self.fixed_shapes:  # a padded length of few values, within the positions left for the new tokens
            longest = max(longest, min(-(-longest // PROMPT_ROUND) * PROMPT_ROUND, self.max_positions - max_new_tokens))
        self.ensure_cache(batch, longest + max_new_tokens)
        pads = [longest - len(p) for p in prompts]
        tokens = torch.tensor([[0] * n + p for n, p in zip(pads, prompts)], dtype=torch.long, device=self.device)
        pad = torch.tensor(pads, device=self.device) if any(pads) or self.fixed_shapes else None
        params = SamplingParams.build(batch, temperature, top_k, top_p, device=self.device)
        generators = make_generators(seed, batch, self.device)
        eos = self.eos_id if stop_at_eos else None

        logits = self.model(tokens, last_only=True, pad=pad).logits[:, -1]
        self.end_step()
        out: list[list[int]] = [[] for _ in prompts]
        active = [True] * batch
        for step in range(max_new_tokens):
            next_ids = sample(logits, params, generators)
            for row, token in enumerate(next_ids.tolist()):
                if active[row]:
                    out[row].append(token)
                    if on_token is not None:
                        on_token(row, token)
                    active[row] = token != eos
            if step == max_new_tokens - 1 or not any(active):
                break
            start: int | torch.Tensor = longest + step
            if self.fixed_shapes:  # the position lives on the device, advanced in place: one graph for every step
                if step == 0:
                    position = torch.tensor(start, device=self.device)
                else:
                    position.add_(1)
                start = position
            logits = self.model(next_ids.view(batch, 1), start=start, pad=pad).logits[:, -1]
            self.end_step()
        return out


class TextStream:
    """Token ids in, new text out: re-decodes the row so spaces and multi-byte characters come out right."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        """The text this token completes ('' while a multi-byte character is still incomplete)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        return new
