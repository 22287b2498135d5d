"""CUDA benchmarks: grouped GEMM vs dense GEMM at equal FLOPs, Triton permute/unpermute, training-step MFU.

    python bench/bench_cuda.py --out results.md       # all sections; prints a markdown section to append to RESULTS.md

MFU = model FLOPs per step (ModelConfig.flops_per_token: 6 x active parameters + causal attention)
/ step time / the device's dense bf16 peak (989 TFLOPS for an H100 SXM; --peak-tflops for other cards).
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton

from mixtral.backend import get_backend
from mixtral.config import ModelConfig
from mixtral.kernels import reference, triton_grouped_mm, triton_moe
from mixtral.model import Mixtral
from mixtral.train.loss import TrainingLoss

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0}  # dense bf16, SXM datasheet


def median_ms(fn, rep: int = 200) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def expert_counts(rows: int, experts: int, balanced: bool) -> torch.Tensor:
    """Rows per expert: equal, or drawn like a skewed router (Dirichlet-ish via softmax of noise)."""
    if balanced:
        return torch.full((experts,), rows // experts)
    share = torch.softmax(torch.randn(experts) * 0.5, 0)
    counts = (share * rows).floor().long()
    counts[0] += rows - counts.sum()
    return counts


def bench_grouped_mm(lines: list[str], rows: int) -> None:
    """Expert GEMMs of Mixtral-8x7B (gate_up: 4096 -> 2x14336, down: 14336 -> 4096) over `rows` routed tokens."""
    lines += [
        f"\n### Grouped GEMM vs dense GEMM at equal FLOPs (bf16, {rows} routed rows, 8 experts)\n",
        "| GEMM | routing | dense TFLOPS | torch._grouped_mm TFLOPS | ratio | Triton grouped TFLOPS | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, k, m in (("gate_up", 4096, 2 * 14336), ("down", 14336, 4096)):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(8, m, k, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # as the experts pass it
        dense_w = torch.randn(k, m, device="cuda", dtype=torch.bfloat16)
        flops = 2 * rows * k * m
        dense = flops / median_ms(lambda: x @ dense_w) / 1e9
        for balanced in (True, False):
            offs = expert_counts(rows, 8, balanced).cumsum(0).to(torch.int32).cuda()
            check = torch._grouped_mm(x, w, offs=offs)
            triton_out = triton_grouped_mm.grouped_mm(x, w, offs)
            err = ((triton_out.float() - check.float()).norm() / check.float().norm()).item()
            assert err < 1e-2, f"Triton grouped GEMM disagrees with torch._grouped_mm: {err}"
            grouped = flops / median_ms(lambda: torch._grouped_mm(x, w, offs=offs)) / 1e9
            tri = flops / median_ms(lambda: triton_grouped_mm.grouped_mm(x, w, offs)) / 1e9
            lines.append(
                f"| {name} {rows}x{k}x{m} | {'balanced' if balanced else 'skewed'} | {dense:.0f} | "
                f"{grouped:.0f} | {grouped / dense:.2f} | {tri:.0f} | {tri / dense:.2f} |"
            )


def bench_permute(lines: list[str], tokens: int, hidden: int = 4096, k: int = 2) -> None:
    """Permute + weighted unpermute, forward and backward: Triton kernels vs the plain-torch reference."""
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.rand(tokens, 8, device="cuda").topk(k).indices
    weights = torch.rand(tokens, k, device="cuda").softmax(-1).requires_grad_()
    grad = torch.randn_like(x)

    def step(ops):
        rows, order, _ = ops.permute(x, ids, 8)
        out = ops.unpermute(rows, order, weights)
        torch.autograd.backward(out, grad)

    times = {name: median_ms(lambda: step(ops)) for name, ops in (("reference", reference), ("triton", triton_moe))}
    lines += [
        f"\n### Permute + weighted unpermute, forward + backward ({tokens} tokens x {hidden}, top-{k}, bf16)\n",
        "| implementation | ms |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {ms:.3f} |" for name, ms in times.items()]
    lines.append(f"\nTriton speed-up: {times['reference'] / times['triton']:.2f}x")


def build_model(layers: int, vocab: int) -> tuple[Mixtral, ModelConfig]:
    config = ModelConfig.preset("8x7b").replace(
        num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096
    )
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Mixtral(config, get_backend("cuda"))
            model.init_weights()
    finally:
        torch.set_default_dtype(torch.float32)
    return model, config


def train_step_ms(model: Mixtral, tokens: torch.Tensor, steps: int) -> float:
    """Median forward + backward time of one step (no optimizer), after two warm-up steps."""
    times = []
    for i in range(steps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        TrainingLoss(model.config).of(model, tokens, tokens).loss.backward()
        end.record()
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def measure_step(layers: int, vocab: int, seq: int, steps: int) -> tuple[float, ModelConfig] | None:
    """(median step ms, config) with this many layers, or None when they do not fit in memory."""
    torch.cuda.reset_peak_memory_stats()
    try:
        model, config = build_model(layers, vocab)
        tokens = torch.randint(0, vocab, (1, seq), device="cuda")
        return train_step_ms(model, tokens, steps), config
    except torch.OutOfMemoryError:
        return None


def print_profile(layers: int, vocab: int, seq: int) -> None:
    """Where one training step's GPU time goes, by kernel."""
    model, _ = build_model(layers, vocab)
    tokens = torch.randint(0, vocab, (1, seq), device="cuda")
    train_step_ms(model, tokens, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        TrainingLoss(model.config).of(model, tokens, tokens).loss.backward()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


def bench_mfu(
    lines: list[str], max_layers: int, seq: int, vocab: int, peak: float, steps: int, profile: bool = False
) -> None:
    """Mixtral-8x7B-shaped layers, as many as fit (tried from max_layers down), batch 1 x seq, bf16."""
    for layers in range(max_layers, 0, -1):
        result = measure_step(layers, vocab, seq, steps)
        torch.cuda.empty_cache()
        if result is not None:
            break
        print(f"{layers} layers do not fit; trying {layers - 1}", file=sys.stderr)
    ms, config = result
    if profile:
        print_profile(layers, vocab, seq)
    flops = config.flops_per_token(seq) * seq
    tflops = flops / ms / 1e9
    peak_gb = torch.cuda.max_memory_allocated() / 2**30
    lines += [
        "\n### Training step (forward + backward, no optimizer), Mixtral-8x7B layers, bf16\n",
        f"- shape: hidden 4096, ffn 14336, 8 experts top-2, 32 heads / 8 kv heads, seq {seq}, batch 1, "
        f"{layers} layers (the most that fit, trying from {max_layers} down), vocab {vocab}, "
        "dropless dispatcher, no activation checkpointing",
        f"- step time (median of {steps}): {ms:.1f} ms; model FLOPs per step {flops / 1e12:.1f} TFLOP "
        f"(ModelConfig.flops_per_token: 6 x active params + causal attention)",
        f"- achieved {tflops:.0f} TFLOPS; **MFU {100 * tflops / peak:.1f}%** of {peak:.0f} TFLOPS dense bf16 peak; "
        f"peak memory {peak_gb:.1f} GiB",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="gemm,permute,mfu")
    parser.add_argument("--rows", type=int, default=16384, help="routed rows for the grouped GEMM (tokens x top-k)")
    parser.add_argument("--layers", type=int, default=14, help="most layers to try for the MFU step")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak; default from the device name")
    parser.add_argument("--profile", action="store_true", help="print the CUDA kernels of one training step by time")
    parser.add_argument("--out", default=None, help="also write the markdown section to this file")
    args = parser.parse_args()
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for key, v in PEAK_BF16_TFLOPS.items() if key in name), None)
    if peak is None:
        parser.error(f"no known bf16 peak for '{name}'; pass --peak-tflops")
    torch.manual_seed(0)
    lines = [
        f"## CUDA: {name}",
        "",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}; "
        f"command: `python bench/bench_cuda.py {' '.join(sys.argv[1:])}`",
    ]
    sections = args.sections.split(",")
    if "gemm" in sections:
        bench_grouped_mm(lines, args.rows)
    if "permute" in sections:
        bench_permute(lines, args.seq * 2)
    if "mfu" in sections:
        bench_mfu(lines, args.layers, args.seq, args.vocab, peak, args.steps, args.profile)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
