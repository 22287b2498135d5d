"""Inference speed, ours vs transformers' MixtralForCausalLM side by side, same random weights, same run.

Config A (vocab 32000, hidden 512, 4 layers, 8 heads, 2 kv heads, ffn 1408, 8 experts, top-2) on 2 CPU
threads: prefill (batch 4 x 512, last-position logits) and greedy decode (batch 1 and 8, prompt 32,
128 new tokens, prefill included), fp32 and bf16. Each number is the best of --repeats timed runs
after one warm-up (the best is the least disturbed by other processes on a shared machine), ours and
transformers' runs taking turns.

    python bench/bench_inference.py [--repeats 3] [--only prefill|decode] [--dtypes fp32,bf16] [--compile]

--compile runs ours as `generate --compile` does (torch.compile of the whole model, dynamic shapes); the
warm-up call compiles, so the times exclude compilation.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import transformers

from mixtral.backend import get_backend
from mixtral.config import ModelConfig
from mixtral.model import Mixtral
from mixtral.serve.engine import Generator

CONFIG_A = ModelConfig(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(dtype: torch.dtype) -> tuple[Mixtral, transformers.MixtralForCausalLM]:
    """Ours (cpu backend) and transformers' model with the same random weights."""
    torch.manual_seed(0)
    ours = Mixtral(CONFIG_A, get_backend("cpu"))
    ours.init_weights()
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**CONFIG_A.to_hf_dict()))
    hf.load_state_dict({("" if k == "lm_head.weight" else "model.") + k: v for k, v in ours.state_dict().items()})
    return ours.to(dtype).eval(), hf.to(dtype).eval()


def best_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """The best time of each fn after a warm-up call each, the fns taking turns (a, b, a, b, ...) so that a shared
    machine's slow and fast spells fall on all of them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return [min(record) for record in times]


@torch.inference_mode()
def prefill(ours: Mixtral, hf: transformers.MixtralForCausalLM, repeats: int) -> tuple[float, float]:
    tokens = torch.randint(0, CONFIG_A.vocab_size, (4, 512))
    ours.setup_caches(4, 512)
    t_ours, t_hf = best_times([lambda: ours(tokens, last_only=True), lambda: hf(tokens, logits_to_keep=1)], repeats)
    ours.clear_caches()
    return tokens.numel() / t_ours, tokens.numel() / t_hf


@torch.inference_mode()
def decode(
    ours: Mixtral, hf: transformers.MixtralForCausalLM, batch: int, repeats: int, prompt_len: int = 32, new: int = 128
) -> tuple[float, float]:
    prompts = torch.randint(3, CONFIG_A.vocab_size, (batch, prompt_len))
    generator = Generator(ours)  # no tokenizer: no EOS, every row makes all `new` tokens
    t_ours, t_hf = best_times(
        [
            lambda: generator.generate(prompts.tolist(), new),
            lambda: hf.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                do_sample=False,
                min_new_tokens=new,
                max_new_tokens=new,
                pad_token_id=0,
            ),
        ],
        repeats,
    )
    ours.clear_caches()
    return batch * new / t_ours, batch * new / t_hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["prefill", "decode"])
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--compile", action="store_true", help="ours compiled as `generate --compile` does")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
        f"best of {args.repeats}" + (", ours compiled" if args.compile else "")
    )
    print("| case | dtype | ours tok/s | transformers tok/s | ours / transformers |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.dtypes.split(","):
        ours, hf = build(DTYPES[name])
        if args.compile:
            torch._dynamo.reset()  # each dtype compiles its own graphs: stay below the recompile limit
            get_backend("cpu").compile(ours, dynamic=True, inference=True)
        cases = []
        if args.only in (None, "prefill"):
            cases.append(("prefill 4x512", lambda: prefill(ours, hf, args.repeats)))
        if args.only in (None, "decode"):
            cases += [(f"decode batch {b}", lambda b=b: decode(ours, hf, b, args.repeats)) for b in (1, 8)]
        for case, run in cases:
            t_ours, t_hf = run()
            print(f"| {case} | {name} | {t_ours:.0f} | {t_hf:.0f} | {t_ours / t_hf:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
