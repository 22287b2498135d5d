"""`mixtral-run recipe list | show | validate | plan`: check a layout against the model and the device before launch.

validate loads the recipe (every key checked), then checks the world size and every divisibility rule
(ParallelDims), the hardware section, the dispatcher against the backend, and the memory per device
(mixtral.planner), and prints the memory table and the estimated step time. --dry-run then builds the
real-size model's shards on the meta device under a fake process group (mixtral.dry_run); --scaled-down
trains the layout divided down to a few gloo ranks (mixtral.scaled_down). Any failure exits 2 with the
key and the fix.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOKENS_PER_BATCH = 2**22  # plan's default global batch: 4M tokens (Gaudi's and LLaMA's regime)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="every recipe in recipes/: model, devices, layout, dispatcher")
    show = sub.add_parser("show", help="the resolved recipe as YAML, every default filled in")
    validate = sub.add_parser("validate", help="check layout, dispatcher and memory; exit 2 with the fix on failure")
    for p in (show, validate):
        p.add_argument("name", help="recipe name in recipes/ or a path to a YAML file")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. parallel.pp=2")
    validate.add_argument("--device-type", help="device to check against (default: the recipe's, else its backend's)")
    validate.add_argument("--devices", type=int, help="devices you will launch on (default: the recipe's)")
    validate.add_argument(
        "--dry-run",
        action="store_true",
        help="build every pipeline stage's rank shard of the real-size model on the meta device "
        "under a fake process group, and compare shapes and bytes with the estimate",
    )
    validate.add_argument(
        "--scaled-down",
        action="store_true",
        help="train the layout divided down to at most --max-ranks gloo ranks, tiny model, CPU, "
        "3 steps, and compare the loss with one process",
    )
    validate.add_argument("--max-ranks", type=int, default=8, help="rank limit for --scaled-down (default 8)")
    plan = sub.add_parser("plan", help="layouts of N devices that fit, fastest first by the cost model")
    plan.add_argument("--devices", type=int, required=True)
    plan.add_argument("--device-type", required=True, help="h100, gaudi2, 910b, v5p or cpu")
    plan.add_argument("--model", default="8x7b", help="preset name (8x7b, 8x22b) or an HF config.json / directory")
    plan.add_argument("--seq", type=int, default=4096, help="sequence length (default 4096)")
    plan.add_argument("--global-batch", type=int, help="sequences per step (default: 4M tokens / seq)")
    plan.add_argument("--micro-batch", type=int, default=1)
    plan.add_argument("--top", type=int, default=10, help="how many layouts to print")


def run(args: argparse.Namespace) -> int:
    return {"list": list_recipes, "show": show, "validate": validate_command, "plan": plan}[args.action](args)


def list_recipes(args: argparse.Namespace) -> int:
    from mixtral.errors import MixtralError
    from mixtral.planner import Workload, recipe_device
    from mixtral.recipes import RECIPES_DIR, load_recipe

    rows = [("name", "model", "devices", "layout", "dispatcher", "device", "mode")]
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        try:
            recipe = load_recipe(path)
            w = Workload.from_recipe(recipe)
            rows.append(
                (
                    path.stem,
                    recipe.model.preset or recipe.model.config or recipe.model.init_from or "custom",
                    str(recipe.hardware.devices or w.world_size),
                    w.layout,
                    w.dispatcher,
                    recipe_device(recipe).name,
                    w.mode,
                )
            )
        except MixtralError as exc:
            rows.append((path.stem, f"ERROR: {exc}", "", "", "", "", ""))
    widths = [max(len(r[i]) for r in rows if not r[1].startswith("ERROR")) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


def show(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from mixtral.recipes import load_recipe

    recipe = load_recipe(args.name, args.overrides)
    data = recipe.to_dict()
    sources = {k: v for k, v in data["model"].items() if k in ("preset", "config", "init_from") and v is not None}
    data["model"] = {**sources, **dataclasses.asdict(recipe.model_config())}  # every model field, resolved
    print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def validate(recipe, device_type: str | None = None, devices: int | None = None, out: Callable[[str], Any] = print):
    """Every check of a loaded recipe; prints what passed and the tables. Returns (MemoryEstimate, StepTime | None)."""
    from mixtral.errors import MixtralError
    from mixtral.planner import (
        Workload,
        check_dispatcher,
        check_hardware,
        check_layout,
        check_memory,
        recipe_device,
        step_time,
    )

    device = recipe_device(recipe, device_type)
    devices = devices or recipe.hardware.devices
    config = recipe.model_config()
    w = Workload.from_recipe(recipe)
    out(
        f"recipe {recipe.name}: {config.num_parameters / 1e9:.1f} B parameters, {w.mode}, {w.layout} on "
        f"{devices or w.world_size} x {device.name}, dispatcher {w.dispatcher}, backend {recipe.backend}"
    )
    check_layout(config, w, devices)
    out(
        f"  ok  world size {w.world_size} = dp {w.dp} x tp {w.tp} x pp {w.pp} x cp {w.cp}; "
        f"ep {w.ep} x etp {w.etp} fold over dp x cp x tp; heads, experts, layers and seq_len divide"
    )
    check_hardware(w, device, devices, recipe.hardware.nodes)
    check_dispatcher(w.dispatcher, recipe.backend)
    out(f"  ok  dispatcher {w.dispatcher} runs on backend {recipe.backend}")
    try:
        memory = check_memory(config, w, device, f"recipe {recipe.name}")
    except MixtralError:
        from mixtral.planner import estimate_memory

        out(estimate_memory(config, w, device).table())
        raise
    out(memory.table())
    time = step_time(config, w, device) if w.mode == "train" else None
    if time is not None:
        out(time.table())
    return memory, time


def validate_command(args: argparse.Namespace) -> int:
    from mixtral.recipes import load_recipe

    recipe = load_recipe(args.name, args.overrides)
    validate(recipe, args.device_type, args.devices)
    if args.dry_run:
        from mixtral.dry_run import dry_run

        dry_run(recipe, args.device_type)
    if args.scaled_down:
        from mixtral.scaled_down import scaled_down_run

        scaled_down_run(recipe, args.max_ranks)
    print(f"recipe {recipe.name}: valid")
    return 0


def _model_config(name: str):
    from mixtral.config import PRESETS, ModelConfig

    return ModelConfig.preset(name) if name in PRESETS or not Path(name).exists() else ModelConfig.from_json(name)


def plan(args: argparse.Namespace) -> int:
    from mixtral.errors import MixtralError
    from mixtral.planner import GiB, get_device, plan_layouts

    device = get_device(args.device_type)
    config = _model_config(args.model)
    global_batch = args.global_batch or max(1, TOKENS_PER_BATCH // args.seq)
    plans = plan_layouts(config, device, args.devices, args.seq, global_batch, args.micro_batch)
    if not plans:
        raise MixtralError(
            f"no layout of {args.devices} x {device.name} fits {args.model} at seq {args.seq}, "
            f"global batch {global_batch}, micro-batch {args.micro_batch}; use more devices, a "
            f"shorter --seq, or a --global-batch that dp x micro-batch divides"
        )
    print(
        f"{args.model} on {args.devices} x {device.label}, seq {args.seq}, global batch {global_batch}, "
        f"micro-batch {args.micro_batch}, dispatcher {plans[0].workload.dispatcher}: {len(plans)} layouts fit, "
        f"fastest first (cost model in mixtral/planner.py)"
    )
    print(f"{'#':>3}  {'layout':<28} {'ckpt':<9} {'zero':>4} {'GiB':>6} {'step s':>8} {'tok/s/dev':>10} {'MFU':>6}")
    for i, p in enumerate(plans[: args.top], 1):
        w = p.workload
        print(
            f"{i:>3}  {w.layout:<28} {w.checkpointing:<9} {w.zero:>4} {p.memory.total / GiB:>6.1f} "
            f"{p.time.total:>8.2f} {p.time.tokens_per_device:>10,.0f} {p.time.mfu:>6.1%}"
        )
    return 0
