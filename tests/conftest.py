"""Shared fixtures: small random Mixtral configs and deterministic seeds."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch

from mixtral.config import ModelConfig
from mixtral.model import Mixtral


def model_loss(model: Mixtral, tokens: torch.Tensor, targets: torch.Tensor, keep_logits: bool = True):
    """The training loss of one process's model on tokens (mixtral.train.loss): logits, routing and the losses."""
    from mixtral.train.loss import TrainingLoss

    return TrainingLoss(model.config, model.moe).of(model, tokens, targets, keep_logits)


def small_config(**overrides) -> ModelConfig:
    """A tiny Mixtral with odd sizes, fast enough for many tests."""
    base = dict(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        num_local_experts=5,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        router_aux_loss_coef=0.02,
    )
    base.update(overrides)
    return ModelConfig(**base)


# ~210 MB in fp32: big enough that a memory bound tells reading a shard from reading everything
BIG_CONFIG = dict(
    vocab_size=4096,
    hidden_size=768,
    intermediate_size=768,
    num_hidden_layers=3,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=64,
)


def big_random_model() -> tuple[Mixtral, float]:
    """(the BIG_CONFIG model with uniform(-0.05, 0.05) weights, its size in MB), built on meta: no slow init."""
    with torch.device("meta"):
        model = Mixtral(ModelConfig(**BIG_CONFIG))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.05, 0.05)
    return model, sum(p.numel() * 4 for p in model.parameters()) / 2**20


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy machine OpenMP barriers cost seconds a step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_process(model_dir, *args: str, start_s: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mixtral-run serve --model model_dir *args` on a free port, as a user starts it: (its URL once /health
    answers, the process); stopped on leaving, its output left to read."""
    import httpx

    port = free_port()
    command = ["serve", "--model", str(model_dir), "--port", str(port), "--backend", "cpu", *args]
    process = subprocess.Popen(
        [sys.executable, "-m", "mixtral.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_s
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"server did not start in {start_s} s"
                time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=60)
