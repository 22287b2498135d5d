"""`mixtral-run train --recipe PATH_OR_NAME [key=value ...] [--resume]`: train a recipe on one device."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="a recipe YAML file, or a name in recipes/ (e.g. cpu-tiny)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides by dotted key, e.g. optimizer.lr=1e-4 train.steps=50")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run's checkpoints/latest (model, optimizer, data, RNG)")


def run(args: argparse.Namespace) -> int:
    from mixtral.recipes import load_recipe
    from mixtral.train.trainer import Trainer

    recipe = load_recipe(args.recipe, args.overrides)
    summary = Trainer(recipe).fit(resume=args.resume)
    latest = recipe.checkpoint_dir / "latest"
    evaluated = f", eval loss {summary['eval_loss']:.4f}" if "eval_loss" in summary else ""
    print(f"trained {recipe.name} to step {summary['step']}{evaluated}; metrics in "
          f"{recipe.output_dir / 'metrics.jsonl'}; model in {latest}")
    return 0
