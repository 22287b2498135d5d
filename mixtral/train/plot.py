"""`mixtral-run plot RUN_DIR`: loss.png (train and eval loss), expert_load.png and routing.png (capacity bin edges,
expert bias) from a run's metrics.jsonl."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixtral.errors import MixtralError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (holds metrics.jsonl)")
    parser.add_argument("--output", default=None, help="where to write the PNGs (default: RUN_DIR)")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MixtralError("plotting needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> list[Path]:
    """Write loss.png, and expert_load.png (imbalance, dropped fraction, load per expert) when the run logged
    expert load; return the paths written."""
    from mixtral.train.metrics import METRICS, read_metrics

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    if not train:
        raise MixtralError(
            f"{run_dir / METRICS}: no training lines to plot; pass a run directory of `mixtral-run train`"
        )
    plt = _pyplot()
    output = Path(output or run_dir)
    output.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([r["step"] for r in train], [r.get("ce_loss", r["loss"]) for r in train], label="train (cross-entropy)")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set(xlabel="step", ylabel="loss", title=f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    written = [output / "loss.png"]
    fig.savefig(written[0], dpi=120, bbox_inches="tight")
    plt.close(fig)

    loads = [r for r in records if "expert_load" in r]
    if loads:
        drops = any(any(r.get("dropped_fraction", ())) for r in loads)  # capacity dispatchers that dropped pairs
        fig, axes = plt.subplots(1, 3 if drops else 2, figsize=(19 if drops else 13, 5))
        left, right = axes[0], axes[-1]
        steps = [r["step"] for r in loads]
        for layer in range(len(loads[-1]["expert_imbalance"])):
            left.plot(steps, [r["expert_imbalance"][layer] for r in loads], label=f"layer {layer}")
        left.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        left.set(xlabel="step", ylabel="max / mean tokens per expert", title="load imbalance (1 = balanced)")
        left.legend(fontsize="small")
        if drops:
            for layer in range(len(loads[-1]["dropped_fraction"])):
                axes[1].plot(steps, [r["dropped_fraction"][layer] for r in loads], label=f"layer {layer}")
            axes[1].set(xlabel="step", ylabel="dropped token-expert pairs / routed", title="dropped by capacity")
            axes[1].legend(fontsize="small")
        image = right.imshow(loads[-1]["expert_load"], aspect="auto", cmap="viridis")
        right.set(xlabel="expert", ylabel="layer", title=f"fraction of tokens per expert, step {steps[-1]}")
        fig.colorbar(image, ax=right)
        written.append(output / "expert_load.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    routing = plot_routing_state(plt, records, output / "routing.png")
    return written + ([routing] if routing else [])


def plot_routing_state(plt, records: list[dict], path: Path) -> Path | None:
    """routing.png: each layer group's capacity bin edges over the steps that re-made them, and each expert's bias
    per layer (lines: layer 0's experts; image: the last step's every layer). None when the run logged neither."""
    edges = [r for r in records if "capacity_bin_edges" in r]
    biases = [r for r in records if "expert_bias" in r]
    panels = [p for p in (edges and "edges", biases and "bias", biases and "bias_image") if p]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "edges":
            steps = [r["step"] for r in edges] + [records[-1]["step"]]
            for layer in range(len(edges[0]["capacity_bin_edges"])):  # layers sharing bins draw over each other
                for b in range(len(edges[0]["capacity_bin_edges"][layer])):
                    values = [r["capacity_bin_edges"][layer][b] for r in edges]
                    ax.step(steps, values + values[-1:], where="post", color=f"C{layer % 10}", linewidth=1)
            ax.set(xlabel="step", ylabel="rows per expert", title="capacity bin edges (a colour per layer)")
        elif panel == "bias":
            steps = [r["step"] for r in biases]
            for expert in range(len(biases[-1]["expert_bias"][0])):
                ax.plot(steps, [r["expert_bias"][0][expert] for r in biases], label=f"expert {expert}")
            ax.set(xlabel="step", ylabel="selection bias", title="expert bias, layer 0")
            ax.legend(fontsize="small")
        else:
            image = ax.imshow(biases[-1]["expert_bias"], aspect="auto", cmap="coolwarm")
            ax.set(xlabel="expert", ylabel="layer", title=f"expert bias, step {biases[-1]['step']}")
            fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    for path in plot_run(args.run_dir, args.output):
        print(path)
    return 0
