"""Hugging Face model IDs (`mistralai/Mixtral-8x7B-v0.1`) wherever a checkpoint directory is taken.

An ID resolves to its snapshot in huggingface_hub's cache, downloading what is missing (weights, config and tokenizer
files only) unless HF_HUB_OFFLINE is set; an ID that is not cached while offline is a one-line error naming the cache
and how to fill it. A local directory of the same name always wins.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mixtral.errors import MixtralError

MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
]


def is_model_id(text: str | Path) -> bool:
    """Whether text names a Hub repository (owner/name) rather than an existing local path."""
    return isinstance(text, str) and MODEL_ID.fullmatch(text) is not None and not Path(text).exists()


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def snapshot(model_id: str) -> Path:
    """The local snapshot directory of model_id, fetched into the Hub cache if needed and allowed."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise MixtralError(
            f"{model_id} looks like a Hugging Face model ID, which needs huggingface_hub: "
            f"pip install huggingface_hub, or pass a local directory"
        ) from None
    cache = os.environ.get("HF_HUB_CACHE") or str(
        Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    )
    try:
        return Path(snapshot_download(model_id, allow_patterns=FILES, cache_dir=cache, local_files_only=offline()))
    except LocalEntryNotFoundError:
        how = (
            (f"unset HF_HUB_OFFLINE and run the command again online, or fetch it with `hf download {model_id}`")
            if offline()
            else "check the network, or fetch it elsewhere and copy it"
        )
        raise MixtralError(f"{model_id}: not in the Hugging Face cache {cache}; {how}") from None
    except HfHubHTTPError as exc:
        raise MixtralError(
            f"{model_id}: the Hugging Face Hub refused it ({str(exc).splitlines()[0][:160]}); check "
            f"the ID, and for a gated model accept its terms and log in (`hf auth login`)"
        ) from None
