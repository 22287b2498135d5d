"""Fail fast: when one rank raises or dies, every rank exits non-zero within 60 s, naming the failed rank."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from mixtral.errors import MixtralError
from mixtral.parallel import init_distributed

from dist_utils import host_store, rank_env

WORKER = """
import os, sys, torch, torch.distributed as dist
from mixtral.parallel import fail_fast, init_distributed

info = init_distributed("cpu", timeout_s=20)

def main():
    if info.rank == {bad}:
        if {kill}:
            os._exit(9)  # killed: no chance to report
        raise RuntimeError("injected failure")
    dist.all_reduce(torch.ones(1))  # the peers wait here for the failed rank

sys.exit(fail_fast(main))
"""


def launch(world: int, bad: int, kill: bool = False) -> tuple[list[int], list[str], float]:
    """Start world ranks running WORKER; returns exit codes, stderr texts and the seconds until all exited."""
    store = host_store(world)
    code = WORKER.format(bad=bad, kill=kill)
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, **rank_env(r, world, store.port)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    errs = [p.communicate(timeout=90)[1] for p in procs]
    return [p.returncode for p in procs], errs, time.monotonic() - start


@pytest.mark.parametrize("bad", [0, 1])  # rank 0 too: the store lives with the launcher, as under torchrun
def test_a_raising_rank_stops_every_rank_naming_it(bad: int) -> None:
    codes, errs, seconds = launch(2, bad)
    assert all(c != 0 for c in codes), codes
    assert seconds < 60
    assert f"rank {bad} failed: rank {bad}: RuntimeError: injected failure" in errs[bad]
    peer = 1 - bad
    assert f"rank {peer}: stopping because rank {bad}: RuntimeError: injected failure" in errs[peer], errs[peer]


def test_a_killed_rank_stops_every_rank() -> None:
    """Nobody can publish for a killed rank: the peer reports its broken collective (torchrun names the dead one)."""
    codes, errs, seconds = launch(2, 1, kill=True)
    assert codes[1] == 9 and codes[0] != 0 and seconds < 60
    assert "rank 0 failed: rank 0: RuntimeError: " in errs[0] and "by peer" in errs[0]  # closed or reset


def test_missing_torchrun_environment_is_a_user_error(monkeypatch) -> None:
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(MixtralError, match="MASTER_PORT are not set; launch with `torchrun --nproc-per-node N"):
        init_distributed("cpu")


def _descendants(root: int) -> dict[int, dict[str, str]]:
    """pid -> environment of every live descendant of root (Linux /proc)."""
    parents, envs = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as environ:
                envs[int(entry)] = dict(
                    item.decode(errors="replace").partition("=")[::2]
                    for item in environ.read().split(b"\0")
                    if b"=" in item
                )
        except OSError:  # exited meanwhile
            continue

    def under_root(pid: int) -> bool:
        while pid in parents and pid != root:
            pid = parents[pid]
        return pid == root

    return {pid: env for pid, env in envs.items() if pid != root and under_root(pid)}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_a_rank_killed_during_training_stops_the_run_naming_it(tmp_path, world: int) -> None:
    """SIGKILL one worker of `mixtral-run train --nproc-per-node N` mid-run: the launcher reports that rank within
    60 s and no worker is left running."""
    import signal

    command = [
        sys.executable,
        "-m",
        "mixtral.cli",
        "train",
        "--recipe",
        "cpu-tiny",
        "--nproc-per-node",
        str(world),
        f"parallel.dp={world}",
        "train.steps=100000",
        f"batch.global_batch={world}",
        "batch.micro_batch=1",
        "model.num_hidden_layers=1",
        "seq_len=32",
        "eval.interval=0",
        "checkpoint.interval=0",
        "train.tensorboard=false",
        "train.peak_flops=1e12",
        f"train.output_dir={tmp_path}",
    ]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = world - 1
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "metrics.jsonl").is_file():  # training has started on every rank
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.5)
        workers = {
            int(env["RANK"]): pid
            for pid, env in _descendants(launcher.pid).items()
            if "RANK" in env and "TORCHELASTIC_RUN_ID" in env
        }
        assert sorted(workers) == list(range(world)), workers
        os.kill(workers[victim], signal.SIGKILL)
        killed = time.monotonic()
        output, _ = launcher.communicate(timeout=90)
        assert time.monotonic() - killed < 60
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert f"rank {victim} failed first (exit code -9)" in output, output[-3000:]
    assert not any(pid in _descendants(os.getpid()) for pid in workers.values())  # every rank has exited


MISSING_CHECKPOINT_WORKER = """
import sys
from mixtral.parallel import fail_fast, init_distributed
from mixtral.recipes import load_recipe
from mixtral.train.trainer import Trainer

info = init_distributed("cpu", timeout_s=20)
path = {paths!r}[info.rank]  # the checkpoint exists where rank 0 looks, not where rank 1 does
sys.exit(fail_fast(lambda: Trainer(load_recipe("cpu-tiny", ["model.preset=null", f"model.init_from={{path}}",
                                                          "parallel.dp=2", "batch.micro_batch=8"]))))
"""


def test_a_checkpoint_missing_on_one_rank_names_the_rank_and_the_path(tmp_path) -> None:
    from mixtral.checkpoint.hf import save_hf
    from mixtral.model import Mixtral
    from mixtral.recipes import load_recipe

    save_hf(Mixtral(load_recipe("cpu-tiny").model_config()), tmp_path / "here")
    paths = [str(tmp_path / "here"), str(tmp_path / "not-on-this-host")]
    store = host_store(2)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MISSING_CHECKPOINT_WORKER.format(paths=paths)],
            env={**os.environ, **rank_env(r, 2, store.port)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert procs[1].returncode != 0 and procs[0].returncode != 0
    assert f"rank 1 failed: rank 1: MixtralError: {paths[1]}: model directory not found" in errs[1], errs[1][-2000:]
