"""`mixtral-run serve`: an OpenAI-compatible (and Megatron /api) HTTP server over an HF Mixtral directory."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mixtral.backend import add_backend_argument
from mixtral.errors import MixtralError
from mixtral.serve.distributed import add_parallel_arguments
from mixtral.serve.runner import DTYPE_HELP, DTYPES, add_compile_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="HF directory, native or Megatron checkpoint, checkpoints root or training run directory",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help=DTYPE_HELP)
    parser.add_argument("--max-batch", type=int, default=8, help="requests generated together at most")
    parser.add_argument("--max-tokens-limit", type=int, default=2048, help="new tokens one request may ask for")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)")
    parser.add_argument("--model-name", default=None, help="the id /v1/models reports (default: the directory name)")
    add_compile_argument(parser)
    add_backend_argument(parser)
    add_parallel_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.max_batch < 1:
        raise MixtralError(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.max_tokens_limit < 1:
        raise MixtralError(f"--max-tokens-limit must be at least 1, got {args.max_tokens_limit}")
    if not 0 <= args.port < 65536:
        raise MixtralError(f"--port must be in 0..65535, got {args.port}")
    from mixtral.serve.runner import with_generator

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return with_generator(args, lambda generator, tokenizer: serve(args, generator, tokenizer))


def serve(args: argparse.Namespace, generator, tokenizer) -> int:
    """Serve until interrupted (on rank 0 when several ranks run the model)."""
    from mixtral.serve.protocol import ChatEncoder
    from mixtral.serve.scheduler import Scheduler
    from mixtral.serve.server import ServerSettings, build_server, create_app

    try:
        chat = ChatEncoder(tokenizer.path)
    except MixtralError as exc:  # a non-Mistral SentencePiece model: completions still work
        logging.getLogger("mixtral.serve").warning("chat disabled: %s", exc)
        chat = None
    settings = ServerSettings(args.model_name or Path(args.model).resolve().name, args.max_tokens_limit, args.api_key)
    scheduler = Scheduler(generator, tokenizer, args.max_batch).start()
    server = build_server(create_app(scheduler, tokenizer, settings, chat), args.host, args.port)
    print(
        f"serving {settings.model_name} on http://{args.host}:{args.port} (OpenAI /v1, Megatron PUT /api)", flush=True
    )
    try:
        server.run()
    finally:
        scheduler.stop()
    return 0
