"""Serving throughput: 16 concurrent clients vs the same 16 requests one after another, through HTTP.

A tiny random Mixtral (saved as an HF directory) is served in-process on 127.0.0.1 with the real server
(scheduler, FastAPI, uvicorn); clients post /v1/completions (different prompts, greedy, max_tokens new tokens
each). Tokens/s = completion tokens (from "usage") / wall time; the ratio concurrent / sequential is what
batching buys. Best of --repeats per mode (the least disturbed run on a shared machine).

    python bench/bench_serve.py [--clients 16] [--max-tokens 64] [--max-batch 16] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import tempfile
import time
from pathlib import Path

import httpx
import torch

from mixtral.backend import get_backend
from mixtral.checkpoint.hf import load_hf_model, save_hf
from mixtral.config import ModelConfig
from mixtral.data.tokenizer import Tokenizer
from mixtral.model import Mixtral
from mixtral.serve.engine import Generator
from mixtral.serve.protocol import ChatEncoder
from mixtral.serve.scheduler import Scheduler
from mixtral.serve.server import ServerSettings, build_server, create_app, start_in_thread

CONFIG = ModelConfig(
    vocab_size=32000,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=512,
)


def serve(model_dir: Path, max_batch: int, device: str) -> tuple[str, Scheduler]:
    tokenizer = Tokenizer(model_dir)
    model = load_hf_model(model_dir, get_backend(device), device=device)
    scheduler = Scheduler(Generator(model, tokenizer), tokenizer, max_batch).start()
    app = create_app(scheduler, tokenizer, ServerSettings("tiny", max_tokens_limit=1024), ChatEncoder(tokenizer.path))
    _, port = start_in_thread(build_server(app, port=0))
    return f"http://127.0.0.1:{port}", scheduler


def complete(client: httpx.Client, url: str, i: int, max_tokens: int) -> int:
    body = {"prompt": f"Request number {i}: tell me about item {i * 7}", "max_tokens": max_tokens, "temperature": 0}
    response = client.post(url + "/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"]


def timed(url: str, clients: int, max_tokens: int, together: bool) -> tuple[float, int]:
    """(seconds, completion tokens) for `clients` requests, all at once or one after another."""
    with httpx.Client() as client:
        start = time.perf_counter()
        if together:
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                tokens = sum(pool.map(lambda i: complete(client, url, i, max_tokens), range(clients)))
        else:
            tokens = sum(complete(client, url, i, max_tokens) for i in range(clients))
        return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="backend name: cpu, cuda, ...")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model = Mixtral(CONFIG, get_backend("cpu"))
        model.init_weights()
        save_hf(model, Path(tmp) / "tiny")
        url, scheduler = serve(Path(tmp) / "tiny", args.max_batch, args.device)
        timed(url, 2, 4, together=False)  # warm-up: caches, first-request costs
        best: dict[bool, tuple[float, int]] = {}
        for _ in range(args.repeats):
            for mode in (False, True):
                before = (scheduler.batches, scheduler.rows)
                seconds, tokens = timed(url, args.clients, args.max_tokens, mode)
                if mode not in best or tokens / seconds > best[mode][1] / best[mode][0]:
                    best[mode] = (seconds, tokens)
                if mode:
                    rows_per_round = (scheduler.rows - before[1]) / max(1, scheduler.batches - before[0])
        scheduler.stop()
    sequential, together = (best[m][1] / best[m][0] for m in (False, True))
    print(
        f"model: hidden {CONFIG.hidden_size}, {CONFIG.num_hidden_layers} layers, {CONFIG.num_local_experts} experts "
        f"top-{CONFIG.num_experts_per_tok}, vocab {CONFIG.vocab_size}, fp32, device {args.device}, "
        f"{args.threads} torch threads; {args.clients} requests x {args.max_tokens} new tokens, greedy, "
        f"--max-batch {args.max_batch}; best of {args.repeats}\n"
    )
    print("| mode | seconds | completion tokens | tokens/s |\n| --- | --- | --- | --- |")
    for name, mode in (
        ("16 sequential clients" if args.clients == 16 else "sequential", False),
        ("16 concurrent clients" if args.clients == 16 else "concurrent", True),
    ):
        seconds, tokens = best[mode]
        print(f"| {name} | {seconds:.2f} | {tokens} | {tokens / seconds:.1f} |")
    print(
        f"\nconcurrent / sequential tokens/s: **{together / sequential:.2f}x** "
        f"(last concurrent run: {rows_per_round:.1f} requests per scheduler round)"
    )


if __name__ == "__main__":
    main()
