"""`mixtral-run`: one command, one subcommand per job. Each subcommand lives in the module that does the job.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`, and keeps heavy
imports inside `run`, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mixtral.errors import MixtralError

COMMANDS: dict[str, tuple[str, str]] = {
    "backends": ("mixtral.backends_command", "list registered backends and whether they are usable here"),
    "generate": (
        "mixtral.serve.generate_command",
        "complete a prompt, a prompts file or a chat with an HF Mixtral directory",
    ),
    "serve": (
        "mixtral.serve.serve_command",
        "serve an HF Mixtral directory over HTTP: OpenAI /v1 and Megatron PUT /api",
    ),
    "client": (
        "mixtral.serve.client",
        "interactive prompt against a running server (like Megatron's text_generation_cli)",
    ),
    "preprocess": (
        "mixtral.data.preprocess",
        "tokenize text/jsonl/parquet/alpaca files into a Megatron indexed dataset",
    ),
    "train": (
        "mixtral.train.command",
        "train a recipe: mixtral-run train --recipe cpu-tiny [key=value ...] [--resume] [--nproc-per-node N]",
    ),
    "plot": ("mixtral.train.plot", "plot a run's loss (train and eval) and expert load to PNGs"),
    "recipe": (
        "mixtral.recipe_command",
        "list, show, validate recipes (layout, dispatcher, memory per device) and plan layouts",
    ),
    "convert": (
        "mixtral.checkpoint.convert",
        "convert a checkpoint between hf, native (DCP) and megatron torch_dist; --verify checks it",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixtral-run", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(module=module)
        importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # what --nproc-per-node hands its workers (mixtral.parallel.launch)
    try:
        return importlib.import_module(args.module).run(args) or 0
    except MixtralError as exc:
        print(f"mixtral-run {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
