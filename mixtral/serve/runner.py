"""What generate and serve share: the sampling settings, the model's loading (one rank or several) and compiling."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

from mixtral.errors import MixtralError

DTYPES = ("fp32", "bf16", "int8")
DTYPE_HELP = "weights and activations; int8: int8 weights (per-channel scales), bf16 activations and KV cache"


@dataclass
class Settings:
    """The sampling settings a run uses (the chat loop changes them with /set)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def as_kwargs(self) -> dict:
        return dict(
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
        )


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model with the backend's compiler: less overhead per decoded token, "
        "after a one-off compile at start (about a minute on a small CPU)",
    )


def check_settings(settings: Settings) -> None:
    if settings.max_tokens < 1:
        raise MixtralError(f"--max-tokens must be at least 1, got {settings.max_tokens}")
    if settings.temperature < 0:
        raise MixtralError(f"--temperature must be >= 0 (0 is greedy), got {settings.temperature}")
    if not 0 < settings.top_p <= 1:
        raise MixtralError(f"--top-p must be in (0, 1], got {settings.top_p}")
    if settings.top_k < 0:
        raise MixtralError(f"--top-k must be >= 0 (0 turns it off), got {settings.top_k}")


def load(args: argparse.Namespace, device=None):
    """(model, tokenizer, device) for the checkpoint (any format), on the chosen backend, device and dtype. Under
    torch.distributed the model is laid out on the meta device first (mixtral.serve.distributed.parallel_model) and
    each rank reads only its shards."""
    import torch
    import torch.distributed as dist

    from mixtral.backend import get_backend
    from mixtral.build import build_on_meta, materialize
    from mixtral.checkpoint.loading import checkpoint_config, resolve_checkpoint
    from mixtral.data.tokenizer import Tokenizer
    from mixtral.model.layout import ModelLayout
    from mixtral.parallel import model_layout
    from mixtral.serve.distributed import generation_meshes, parallel_model

    path = resolve_checkpoint(args.model)  # a run's checkpoints/latest: the step it names now
    config = checkpoint_config(path)  # fails early on a missing directory or a non-Mixtral config
    backend = get_backend(args.backend)
    tokenizer = Tokenizer(path)  # the directory's tokenizer.model, else Mixtral's from mistral-common
    if tokenizer.vocab_size > config.vocab_size:
        raise MixtralError(
            f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's "
            f"vocab_size is {config.vocab_size}; put the model's own tokenizer.model in {path}"
        )
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    device = device or backend.device()
    dims = meshes = None
    layout = ModelLayout()
    if dist.is_initialized():
        dims, meshes = generation_meshes(config, args, device)
        layout = model_layout(config, None, meshes, ep_comm=args.ep_comm)
    model = build_on_meta(config, backend, dtype=dtype, layout=replace(layout, int8=args.dtype == "int8"))
    runner, part = parallel_model(model, dims, meshes, device) if meshes is not None else (model, model)
    materialize(model, part, device, meshes, init_from=path)
    model.eval()
    if args.compile:
        compile_for_generation(model, backend, device)
    return runner, tokenizer, device


def compile_for_generation(model, backend, device) -> None:
    """torch.compile the whole model (shapes dynamic: prompt lengths and positions vary) and compile its prefill
    and decode graphs now, so the first request does not wait for them."""
    from mixtral.serve.engine import Generator

    backend.compile(model, dynamic=True, inference=True)
    print("compiling the model for generation (one-off) ...", file=sys.stderr, flush=True)
    Generator(model, device=device).generate([[1, 2, 3]], 2)


def with_generator(args: argparse.Namespace, body: Callable) -> int:
    """body(Generator, tokenizer) in this process, or on rank 0 of several (--nproc-per-node, torchrun)
    while the other ranks replay its model calls (mixtral.serve.distributed)."""
    import torch.distributed as dist

    from mixtral.parallel.launch import fail_fast, init_distributed, launch_workers, launched
    from mixtral.serve.distributed import lead_or_follow
    from mixtral.serve.engine import Generator

    if args.nproc_per_node is not None and not launched():
        return launch_workers(args.nproc_per_node, args.argv)
    if args.compile and args.tp * args.ep * args.pp > 1:
        raise MixtralError(
            "--compile runs a single rank's model; it does not combine with --tp / --ep / --pp yet: "
            "drop --compile or the parallel flags"
        )
    if "WORLD_SIZE" not in os.environ:
        if args.tp * args.ep * args.pp > 1:
            raise MixtralError(
                f"--tp {args.tp} --ep {args.ep} --pp {args.pp} need several ranks; add "
                f"--nproc-per-node N or launch with torchrun"
            )
        model, tokenizer, device = load(args)
        return body(Generator(model, tokenizer, device), tokenizer)
    info = init_distributed(args.backend)

    def rank_main() -> int:
        model, tokenizer, device = load(args, info.device)
        code = lead_or_follow(model, lambda leader: body(Generator(leader, tokenizer, device), tokenizer))
        dist.destroy_process_group()  # now: torn down at interpreter exit, gloo's threads can abort the process
        return code

    return fail_fast(rank_main)
