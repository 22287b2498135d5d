"""`mixtral-run backends`: every registered backend, whether it is usable here and why not."""

from __future__ import annotations

import argparse

from mixtral.backend import add_backend_argument, all_backends, get_backend


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backend_argument(parser)


def run(args: argparse.Namespace) -> int:
    rows = [("name", "available", "device", "dist", "dispatcher", "reason")]
    for b in all_backends():  # in `auto`'s order
        ok = b.availability.ok
        rows.append(
            (
                b.name,
                "yes" if ok else "no",
                b.device_type,
                b.dist_backend,
                b.capabilities.preferred_dispatcher,
                b.availability.reason or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[5])
    print(f"\n--backend {args.backend} selects: {get_backend(args.backend).name}")
    return 0
