"""`mixtral-run train --recipe PATH_OR_NAME [key=value ...] [--resume] [--nproc-per-node N]`: train a recipe.

With --nproc-per-node N the command starts N workers on this host through torch.distributed.run (torchrun's
own launcher, a free port picked by its standalone rendezvous); each worker runs this command again, now
under torchrun's environment. Launching with `torchrun ... -m mixtral.cli train ...` directly does the same
and adds torchrun's multi-node rendezvous flags.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="a recipe YAML file, or a name in recipes/ (e.g. cpu-tiny)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="recipe overrides by dotted key, e.g. optimizer.lr=1e-4 train.steps=50",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the run's checkpoints/latest (model, optimizer, data, RNG)"
    )
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        default=None,
        metavar="N",
        help="start N worker processes on this host through torch.distributed.run (the recipe's "
        "parallel.dp x tp x pp x cp ranks); for several hosts launch with torchrun",
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="backend name (see `mixtral-run backends`) or 'auto'; the same as the override "
        "backend=NAME (default: the recipe's)",
    )


def overrides(args: argparse.Namespace) -> list[str]:
    """The recipe overrides of the command line, --backend among them."""
    return [*args.overrides, *([f"backend={args.backend}"] if args.backend else [])]


def run(args: argparse.Namespace) -> int:
    from mixtral.parallel.launch import fail_fast, init_distributed, launch_workers, launched

    if args.nproc_per_node is not None and not launched():
        from mixtral.errors import MixtralError
        from mixtral.recipes import load_recipe

        world = load_recipe(args.recipe, overrides(args)).parallel.world_size  # a bad recipe fails once, here
        if world != args.nproc_per_node:
            raise MixtralError(
                f"the recipe's layout has {world} ranks (parallel.dp x tp x pp x cp) but "
                f"--nproc-per-node is {args.nproc_per_node}; change one of them"
            )
        return launch_workers(args.nproc_per_node, args.argv)
    if "WORLD_SIZE" not in os.environ:
        return train(args)
    from mixtral.recipes import load_recipe

    init_distributed(load_recipe(args.recipe, overrides(args)).backend)
    return fail_fast(lambda: train(args))


def train(args: argparse.Namespace) -> int:
    """This process's part of the run (all of it on one device); rank 0 prints the summary."""
    import torch.distributed as dist

    from mixtral.recipes import load_recipe
    from mixtral.train.trainer import Trainer

    recipe = load_recipe(args.recipe, overrides(args))
    trainer = Trainer(recipe)
    if trainer.spmd_mesh:
        print(
            f"one SPMD program over {recipe.parallel.world_size} {trainer.device.type} devices, mesh "
            + " ".join(f"{axis}={size}" for axis, size in trainer.spmd_mesh.items()),
            flush=True,
        )
    summary = trainer.fit(resume=args.resume)
    if trainer.is_main:
        latest = recipe.checkpoint_dir / "latest"
        evaluated = f", eval loss {summary['eval_loss']:.4f}" if "eval_loss" in summary else ""
        print(
            f"trained {recipe.name} to step {summary['step']}{evaluated}; metrics in "
            f"{recipe.output_dir / 'metrics.jsonl'}; model in {latest}"
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
