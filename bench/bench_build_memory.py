"""Per-rank bytes of every vendor recipe from the real build path, next to the planner's.

    python bench/bench_build_memory.py [--out table.md]

For each recipe (Mixtral-8x7B and 8x22B presets) the first rank of every pipeline stage is built exactly as
`mixtral-run train` builds it (mixtral.build.build_for_training: meta device, the recipe's layout, FSDP2), under a
fake process group of the recipe's world size, and stopped before materialising. Its weights, gradients and
optimizer states (from the local shards at the ZeRO levels that shard each row) are printed next to the planner's
rows for that stage. No memory is allocated, so it runs anywhere in a minute or two.
"""

from __future__ import annotations

import argparse
import sys

from mixtral.dry_run import build_ranks, built_rows
from mixtral.planner import GiB, Workload, recipe_device, stage_memory
from mixtral.recipes import RECIPES_DIR, load_recipe


def recipe_rows(name: str) -> list[str]:
    """Markdown rows: recipe, stage, then built / planned GiB for weights, gradients and optimizer states."""
    recipe = load_recipe(name)
    config, w, device = recipe.model_config(), Workload.from_recipe(recipe), recipe_device(recipe)
    per_stage = w.world_size // w.pp
    built = build_ranks(recipe, [stage * per_stage for stage in range(w.pp)])
    rows = []
    for stage, params in enumerate(built):
        planned = dict(stage_memory(config, w, device, stage).rows)
        cells = [f"{have / GiB:.2f} / {planned[row] / GiB:.2f}" for row, have in built_rows(w, params).items()]
        cells += ["-"] * (3 - len(cells))  # inference recipes hold weights only
        rows.append(f"| {name} | {w.layout} | {stage} | " + " | ".join(cells) + " |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = parser.parse_args()
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if load_recipe(p.stem).model.preset in ("8x7b", "8x22b"))
    lines = [
        "| recipe | layout | stage | weights GiB built / plan | gradients | optimizer states |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        for line in recipe_rows(name):
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
