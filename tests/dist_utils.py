"""Run a function on N real gloo processes (torchrun's environment, store hosted here) and gather results.

The parent hosts the rendezvous TCPStore as torchrun's agent does (TORCHELASTIC_USE_AGENT_STORE), so
any rank may die without taking the store along. The first rank that fails stops the whole run and
its traceback becomes the test failure.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

HOST = "127.0.0.1"


def host_store(world_size: int) -> dist.TCPStore:
    """The rendezvous store, owned by the test process; its .port goes into MASTER_PORT."""
    return dist.TCPStore(HOST, 0, world_size, is_master=True, wait_for_workers=False)


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun gives each worker."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": HOST,
        "MASTER_PORT": str(port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "OMP_NUM_THREADS": "1",
    }


def _worker(
    rank: int, world_size: int, port: int, timeout_s: float, fn: Callable[..., Any], args: tuple, results: mp.Queue
) -> None:
    os.environ.update(rank_env(rank, world_size, port))
    torch.set_num_threads(1)
    from mixtral.parallel.launch import init_distributed

    try:
        init_distributed("cpu", timeout_s=timeout_s)
        buffer = io.BytesIO()  # bytes, not shared-memory tensors: those die with this process
        torch.save(fn(*args), buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # any failure goes to the parent, which reports it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """fn(*args) on world_size spawned ranks joined into one gloo group; returns results by rank.

    fn must be importable (module level) and return what torch.load(weights_only=True) reads back:
    tensors, numbers, strings and containers of them.
    """
    ctx = mp.get_context("spawn")
    store = host_store(world_size)
    results: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, store.port, timeout_s, fn, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    raise AssertionError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
                if time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in out]
                    raise AssertionError(f"ranks {missing} did not finish within {timeout_s} s") from None
                continue
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = torch.load(io.BytesIO(value), weights_only=True)
    finally:
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]


def run_layouts(fn: Callable[[list[str]], dict], layouts: dict[str, Any], timeout_s: float = 240.0) -> dict:
    """fn(names) on each world size's ranks, for the named layouts of that size (each has .world): one spawn
    per world size keeps process start-ups few. Returns rank 0's results of every layout, merged."""
    results: dict = {}
    for world in sorted({layout.world for layout in layouts.values()}):
        names = [name for name, layout in layouts.items() if layout.world == world]
        results.update(run_ranks(fn, world, names, timeout_s=timeout_s)[0])
    return results


def laid_out_copy(reference, meshes, ops=None, **layout_options):
    """reference's weights and buffers in a model built with the meshes' expert and context parallel layout
    (mixtral.parallel.model_layout), each rank holding its own experts: tensor parallelism and FSDP still to apply."""
    from mixtral.checkpoint.loading import ModuleSource, load_parameters
    from mixtral.model import Mixtral
    from mixtral.parallel import ShardMap, model_layout

    layout = model_layout(reference.config, reference.moe, meshes, **layout_options)
    model = Mixtral(reference.config, ops, reference.moe, layout=layout)
    shards = ShardMap(reference.config, meshes)
    load_parameters(model, ModuleSource(reference), shards, shards.shapes)
    held = dict(model.named_buffers())
    with torch.no_grad():
        for name, buffer in reference.named_buffers():
            if name in held and held[name].shape == buffer.shape:
                held[name].copy_(buffer)
    return model.train(reference.training)
