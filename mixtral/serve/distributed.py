"""Generating and serving on several ranks: rank 0 leads, the other ranks replay every model call it makes.

Under tensor or expert parallelism every rank must run each forward together (their collectives pair
up), but only rank 0 decides what to run: the HTTP server, the scheduler and the sampler live there.
The leader broadcasts each call (method and arguments) before making it; followers replay the calls
until the leader says stop. The logits are replicated over these layouts, so rank 0's are the model's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixtral.serve.engine import inference_mode

STOP = "stop"
MIRRORED = ("forward", "setup_caches", "clear_caches")


def _to(value: Any, device: torch.device) -> Any:
    """Tensors and devices among a call's arguments moved to `device` (CPU to pickle them, the model's to run)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, torch.device):
        return device
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class Leader:
    """Rank 0's stand-in for the model: the same calls, each announced to the followers first."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        self._model, self._group = model, group

    def __getattr__(self, name: str) -> Any:  # config, layers, embed_tokens...: the model's own
        return getattr(self._model, name)

    def eval(self) -> Leader:
        self._model.eval()
        return self

    def _announce(self, method: str, args: tuple, kwargs: dict) -> None:
        message = [(method, _to(args, torch.device("cpu")), _to(kwargs, torch.device("cpu")))]
        dist.broadcast_object_list(message, src=dist.get_global_rank(self._group, 0) if self._group else 0,
                                   group=self._group)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._announce("forward", args, kwargs)
        return self._model(*args, **kwargs)

    def setup_caches(self, *args: Any, **kwargs: Any) -> None:
        self._announce("setup_caches", args, kwargs)
        self._model.setup_caches(*args, **kwargs)

    def clear_caches(self) -> None:
        self._announce("clear_caches", (), {})
        self._model.clear_caches()

    def stop(self) -> None:
        """Release the followers (their follow() returns)."""
        self._announce(STOP, (), {})


def follow(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Replay the leader's model calls until it stops; returns how many calls were replayed."""
    device = next(model.parameters()).device
    src = dist.get_global_rank(group, 0) if group else 0
    model.eval()
    replayed = 0
    while True:
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=src, group=group)
        method, args, kwargs = message[0]
        if method == STOP:
            return replayed
        if method not in MIRRORED:
            raise RuntimeError(f"the leader sent an unknown call '{method}'")
        with inference_mode(device):
            getattr(model, method)(*_to(args, device), **_to(kwargs, device))
        replayed += 1
