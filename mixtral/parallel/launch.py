"""Process-group start-up from torchrun's environment, fail-fast reporting that names the failed rank, and
`--nproc-per-node N`: N workers of the same command started through torch.distributed.run.

A rank that raises writes `mixtral/failed/<rank>` into the rendezvous store before it exits; a peer
whose collective then breaks (connection closed, or the process-group timeout) reads that key, so
every rank exits non-zero with a message naming the rank that failed first.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mixtral.backend import get_backend
from mixtral.errors import MixtralError

FAILED_KEY = "mixtral/failed/"
ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(backend_name: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK).

    The collective timeout is timeout_s, so a hung or dead peer ends in an error instead of a silent hang.
    """
    missing = [name for name in ENV_VARS if name not in os.environ]
    if missing:
        raise MixtralError(
            f"distributed start: environment variables {', '.join(missing)} are not set; "
            f"launch with `torchrun --nproc-per-node N ...` or `mixtral-run ... --nproc-per-node N`"
        )
    backend = get_backend(backend_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = backend.device(local_rank)
    if device.type != "cpu":  # one accelerator per local rank, chosen before the group binds to it
        torch.get_device_module(device.type).set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend.dist_backend, init_method="env://", timeout=timedelta(seconds=timeout_s)
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _store() -> dist.Store | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no group, or a private API that moved: reporting degrades to the local message
        return None


def _reported_failures(store: dist.Store | None, world_size: int) -> list[str]:
    """Messages that other ranks published before dying; empty when the store is gone too."""
    if store is None:
        return []
    found = []
    for rank in range(world_size):
        key = f"{FAILED_KEY}{rank}"
        try:
            if store.check([key]):
                found.append(store.get(key).decode())
        except Exception:  # the store host itself died: nothing more to learn
            break
    return found


def fail_fast(main: Callable[[], int | None]) -> int:
    """Run one rank's main; on an exception publish it, print who failed, and return a non-zero exit code."""
    try:
        return main() or 0
    except BaseException as exc:  # every failure is reported, KeyboardInterrupt too
        if not dist.is_initialized():
            raise
        rank, world = dist.get_rank(), dist.get_world_size()
        store = _store()
        others = [m for m in _reported_failures(store, world) if not m.startswith(f"rank {rank}:")]
        if others:
            print(f"rank {rank}: stopping because {others[0]}", file=sys.stderr, flush=True)
            return 1
        summary = f"rank {rank}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if store is not None:
            try:
                store.set(f"{FAILED_KEY}{rank}", summary)
            except Exception:  # the store host is gone; the local message below still names this rank
                pass
        traceback.print_exc()
        print(f"rank {rank} failed: {summary}", file=sys.stderr, flush=True)
        return 1


def _without_option(argv: list[str], option: str) -> list[str]:
    """argv less `option VALUE` and `option=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def launched() -> bool:
    """Whether this process is a worker that torchrun (or --nproc-per-node) started."""
    return "LOCAL_RANK" in os.environ


def launch_workers(nproc: int, argv: list[str]) -> int:
    """The command line argv (`COMMAND ... --nproc-per-node N ...`) on nproc workers of this host under
    torch.distributed.run (standalone rendezvous on a free port); non-zero, naming the rank, if one failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if nproc < 1:
        raise MixtralError(f"--nproc-per-node must be at least 1, got {nproc}")
    command, worker = argv[0], _without_option(argv[1:], "--nproc-per-node")
    try:
        torchrun(["--standalone", "--nproc-per-node", str(nproc), "-m", "mixtral.cli", command, *worker])
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        print(
            f"mixtral-run {command}: rank {rank} failed first (exit code {failure.exitcode}); the others were "
            f"stopped; see its messages above",
            flush=True,
        )
        return 1
    return 0
