"""Training-step tokens/s (forward + backward + grad clip + AdamW) of our trainer next to transformers, on the CPU.

Config A: vocab 32000, hidden 512, 4 layers, 8 heads / 2 kv heads, intermediate 1408, 8 experts top-2; batch 4 x 512.
fp32: both models in fp32. bf16: transformers with bf16 parameters and AdamW on them (pure bf16); ours with the
trainer's bf16_master precision (bf16 parameters and gradients, fp32 master weights in AdamW: more work, not less).

    python bench/bench_train.py [--threads 2] [--repeat 3] [--precisions fp32,bf16] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from mixtral.config import ModelConfig
from mixtral.recipes import recipe_from_dict
from mixtral.train.trainer import Trainer

CONFIG_A = {
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 1024,
}
BATCH, SEQ = 4, 512


class RandomTokens:
    def __init__(self, n: int) -> None:
        self.data = torch.randint(0, CONFIG_A["vocab_size"], (n, SEQ + 1))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def seconds(steps: list, repeat: int) -> list[float]:
    """Median wall time of each step() over `repeat` rounds. In each round every step runs twice and the second run
    is timed: the rounds spread a shared machine's slow spells over all steps alike, and the untimed run lets the
    allocator settle after the other model's step (timed right after it, transformers' step ran ~10% slower)."""
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeat):
        for step, record in zip(steps, times):
            step()
            start = time.perf_counter()
            step()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def ours(precision: str, batch: torch.Tensor, compile: bool = False):
    recipe = recipe_from_dict(
        {
            "model": CONFIG_A,
            "seq_len": SEQ,
            "precision": precision,
            "backend": "cpu",
            "compile": compile,
            "batch": {"micro_batch": BATCH, "global_batch": BATCH},
            "train": {"output_dir": tempfile.mkdtemp(), "tensorboard": False},
        }
    )
    trainer = Trainer(recipe, data=(RandomTokens(BATCH), RandomTokens(BATCH)))
    return lambda: trainer.train_step([batch])


def transformers_step(dtype: torch.dtype, batch: torch.Tensor):
    import transformers

    config = transformers.MixtralConfig(**ModelConfig(**CONFIG_A).to_hf_dict())
    model = transformers.MixtralForCausalLM._from_config(config, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    inputs, labels = batch[:, :-1], batch[:, :-1]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=inputs, labels=labels, output_router_logits=True).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--compile", action="store_true", help="ours with compile: true (torch.compile per block)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = torch.randint(0, CONFIG_A["vocab_size"], (BATCH, SEQ + 1))
    tokens = BATCH * SEQ
    print(f"torch {torch.__version__}, {args.threads} threads, batch {BATCH} x {SEQ}, median of {args.repeat} rounds")
    print("| precision | transformers tok/s | ours tok/s | ratio |\n| --- | --- | --- | --- |")
    for name, dtype, precision in (("fp32", torch.float32, "fp32"), ("bf16", torch.bfloat16, "bf16_master")):
        if name not in args.precisions.split(","):
            continue
        ref_s, mine_s = seconds([transformers_step(dtype, batch), ours(precision, batch, args.compile)], args.repeat)
        ref, mine = tokens / ref_s, tokens / mine_s
        print(f"| {name} | {ref:.0f} | {mine:.0f} | {mine / ref:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
