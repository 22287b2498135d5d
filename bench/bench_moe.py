"""MoE layer forward + backward GFLOP/s per dispatcher, next to dense torch.mm at equal FLOPs (CPU).

Config A shapes: hidden 512, intermediate 1408, 8 experts top-2, 4 x 512 tokens. Useful FLOPs are
the expert GEMMs of the routed pairs (3 matmuls of 2*H*F per pair, x3 for forward + backward);
padding and dropped pairs are not counted, so padding shows up as lower GFLOP/s. The dense line
runs the same GEMMs as one SwiGLU MLP over tokens*top_k rows with torch.mm.

    python bench/bench_moe.py [--threads 2] [--repeat 7] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mixtral.backend import get_backend
from mixtral.config import ModelConfig, MoEConfig
from mixtral.model.moe import MoE

HIDDEN, INTER, EXPERTS, TOP_K, BATCH, SEQ = 512, 1408, 8, 2, 4, 512
DISPATCHERS = {
    "dropless": MoEConfig(),
    "capacity 1.25 padded": MoEConfig(dispatcher="capacity", capacity_factor=1.25),
    "capacity 1.25 packed": MoEConfig(dispatcher="capacity", capacity_factor=1.25, pad_to_capacity=False),
    "capacity_bins (6 bins, align 64)": MoEConfig(dispatcher="capacity_bins", capacity_bins={"num_bins": 6}),
}


def seconds(step, repeat: int) -> float:
    """Median wall time of step() after three warm-up calls (oneDNN builds its kernels on first use)."""
    for _ in range(3):
        step()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def moe_step(moe: MoEConfig, dtype: torch.dtype):
    config = ModelConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    layer = MoE(config, get_backend("cpu").ops, moe).to(dtype).train()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(BATCH, SEQ, HIDDEN, dtype=dtype, requires_grad=True)

    def step() -> None:
        y, _ = layer(x)
        y.sum().backward()

    return step


def dense_step(dtype: torch.dtype):
    rows = BATCH * SEQ * TOP_K
    w13 = torch.randn(HIDDEN, 2 * INTER, dtype=dtype, requires_grad=True)
    w2 = torch.randn(INTER, HIDDEN, dtype=dtype, requires_grad=True)
    x = torch.randn(rows, HIDDEN, dtype=dtype, requires_grad=True)

    def step() -> None:
        gate, up = torch.mm(x, w13).chunk(2, dim=-1)
        torch.mm(F.silu(gate) * up, w2).sum().backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    flops = 3 * 3 * 2 * HIDDEN * INTER * BATCH * SEQ * TOP_K
    print(f"torch {torch.__version__}, {args.threads} threads, {flops / 1e9:.1f} GFLOP per step")
    print("| dtype | path | ms / step | GFLOP/s | vs dense |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        dense = seconds(dense_step(dtype), args.repeat)
        print(f"| {name} | dense torch.mm | {dense * 1e3:.0f} | {flops / dense / 1e9:.0f} | 1.00 |")
        for label, moe in DISPATCHERS.items():
            t = seconds(moe_step(moe, dtype), args.repeat)
            print(f"| {name} | {label} | {t * 1e3:.0f} | {flops / t / 1e9:.0f} | {dense / t:.2f} |")


if __name__ == "__main__":
    main()
