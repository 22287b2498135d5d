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
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args.module).run(args) or 0
    except MixtralError as exc:
        print(f"mixtral-run {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
