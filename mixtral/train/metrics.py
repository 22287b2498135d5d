"""Run metrics: metrics.jsonl (always), TensorBoard (when installed), expert load statistics, MFU."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

METRICS = "metrics.jsonl"


class MetricsLog:
    """One JSON object per line; numeric values are mirrored to TensorBoard when it is importable."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = run_dir / METRICS
        self.file = open(self.path, "a")  # noqa: SIM115 (kept open for the run; closed by close())
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def truncate_after(run_dir: Path, step: int) -> None:
    """Drop lines past step (a crashed run's tail) before a resumed run appends: one line per step, always."""
    path = run_dir / METRICS
    if not path.is_file():
        return
    kept = [json.dumps(r) + "\n" for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{METRICS}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def expert_load(tokens_per_expert: torch.Tensor) -> dict[str, Any]:
    """Per layer: each expert's fraction of the routed tokens, and max/mean load (1.0 = perfectly balanced)."""
    counts = tokens_per_expert.double()
    fractions = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    imbalance = counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-9)
    return {
        "expert_load": [[round(f, 5) for f in row] for row in fractions.tolist()],
        "expert_imbalance": [round(x, 4) for x in imbalance.tolist()],
        "max_expert_imbalance": round(imbalance.max().item(), 4),
    }


def measure_peak_flops(
    device: torch.device,
    dtype: torch.dtype,
    synchronize: Callable[[], None],
    size: int = 1024,
    seconds: float = 2.0,
    windows: int = 4,
) -> float:
    """Achievable dense-matmul FLOP/s here, MFU's denominator where the backend knows no datasheet peak: the best of
    several windows after a warm-up, so a moment when the machine is busy does not lower it."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize()
    best = 0.0
    for _ in range(windows):
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            a @ b
            reps += 1
            if reps % 4 == 0:
                synchronize()
        synchronize()
        best = max(best, 2 * size**3 * reps / (time.perf_counter() - start))
    return best
