"""Training checkpoints: an HF model directory plus trainer/ state, published atomically behind a `latest` link.

Layout: `<dir>/step_XXXXXXXX/` = config.json + safetensors (+ tokenizer.model), so generate and convert read it
as any HF directory, and `trainer/state.pt` (optimizer, RNG, data position, step; plain tensors and numbers,
loaded with weights_only=True). A checkpoint is written into a hidden temporary directory and renamed into
place when complete; `latest` is then swapped with os.replace. A crash at any point leaves `latest` loadable.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mixtral.checkpoint.hf import CONFIG, save_hf
from mixtral.errors import MixtralError
from mixtral.model import Mixtral

LATEST = "latest"
STATE = Path("trainer") / "state.pt"
STEP_DIR = re.compile(r"step_(\d{8})")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def resolve_model_dir(path: str | Path) -> Path:
    """The HF model directory meant by an HF dir, a checkpoint dir, a checkpoints/ dir or a run dir."""
    path = Path(path)
    for candidate in (path, path / LATEST, path / "checkpoints" / LATEST):
        if (candidate / CONFIG).is_file():
            return candidate
    raise MixtralError(f"{path}: no {CONFIG} here, nor in {LATEST}/ or checkpoints/{LATEST}/; model.init_from takes "
                       f"an HF Mixtral directory, a checkpoint directory or a run directory")


def rng_state(device_type: str) -> dict[str, Any]:
    """Every RNG a training step may draw from (router jitter, init), to resume bit-identically."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    module = getattr(torch, device_type, None)
    if device_type != "cpu" and hasattr(module, "get_rng_state_all"):
        state["device"] = module.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], device_type: str) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "device" in state:
        getattr(torch, device_type).set_rng_state_all(state["device"])


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_step_dir(ckpt_dir: Path) -> Path | None:
    link = ckpt_dir / LATEST
    return link.resolve() if (link / STATE).is_file() else None


def publish_latest(ckpt_dir: Path, name: str) -> None:
    """Point `latest` at name in one atomic rename of a fresh symlink."""
    tmp = ckpt_dir / f".{LATEST}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, ckpt_dir / LATEST)
    _fsync_dir(ckpt_dir)


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Published step directories, oldest first (temporary ones start with '.' and never match)."""
    return sorted(p for p in ckpt_dir.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()) if ckpt_dir.is_dir() else []


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last checkpoints; the one `latest` names is always kept."""
    if keep_last <= 0:
        return
    complete = complete_checkpoints(ckpt_dir)
    keep = set(complete[-keep_last:]) | {latest_step_dir(ckpt_dir)}
    for path in complete:
        if path.resolve() not in {k.resolve() for k in keep if k}:
            shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(ckpt_dir: Path) -> None:
    """Temporary directories a killed run left behind (never published, so never read)."""
    if ckpt_dir.is_dir():
        for path in ckpt_dir.iterdir():
            if path.name.startswith(".") and ".tmp-" in path.name:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink()


def save_checkpoint(ckpt_dir: Path, step: int, model: Mixtral, state: dict[str, Any], keep_last: int,
                    tokenizer_path: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write step's checkpoint completely, then rename it into place, then move `latest`, then prune."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / step_name(step)
    if latest_step_dir(ckpt_dir) == final.resolve():
        return final  # already published (a resumed run ending where it started)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=ckpt_dir))
    try:
        save_hf(model, tmp, dtype=dtype, tokenizer_path=tokenizer_path)
        (tmp / STATE).parent.mkdir()
        torch.save(state, tmp / STATE)
        _fsync_tree(tmp)
        if final.exists():  # left by a run that died before moving `latest` to it: not the published one
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(ckpt_dir)
    publish_latest(ckpt_dir, final.name)
    prune(ckpt_dir, keep_last)
    return final


def load_trainer_state(step_dir: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (tensors and plain values only: weights_only=True)."""
    try:
        return torch.load(step_dir / STATE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise MixtralError(f"{step_dir / STATE}: unreadable trainer state ({exc}); resume from an older "
                           f"checkpoint by pointing {LATEST} at it") from None
