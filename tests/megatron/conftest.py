"""megatron-core 0.19 on the CPU, in this process: a one-rank gloo world with megatron-core's parallel state over it.
Run by ci/megatron.sh in its venv.

megatron-core asks CUDA for streams, the current device and synchronisation even on the CPU; the shims answer for
the CPU. Nothing here imports megatron at import time, so the main test run collects this folder and skips it.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


def pytest_configure(config: pytest.Config) -> None:
    """Every conftest.py outside a package is module `conftest`, and the one imported last stays in sys.modules; the
    suite's tests import tests/conftest.py's helpers by that name, so it is put back."""
    sys.modules["conftest"] = config.pluginmanager.get_plugin(str(Path(__file__).parents[1] / "conftest.py"))


class _CpuStream:
    """torch.cuda.Stream as megatron-core uses it, on the CPU (one stream: nothing to wait for)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def wait_stream(self, *args: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


@pytest.fixture(scope="session")
def megatron_world() -> Iterator[None]:
    """A one-rank gloo process group, megatron-core's parallel state over it, the CUDA shims and the inference RNG
    tracker (megatron-core's training tracker keeps CUDA RNG states)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "Stream", _CpuStream)
        patch.setattr(torch.cuda, "current_stream", lambda *args, **kwargs: _CpuStream())
        patch.setattr(torch.cuda, "stream", lambda *args, **kwargs: contextlib.nullcontext())
        patch.setattr(torch.cuda, "current_device", lambda: "cpu")
        patch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1, 1)
        initialize_rng_tracker(inference_rng_tracker=True)
        yield
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
