"""Batch-1 greedy decoding, ours against llama.cpp on the same weights, with the memory-bandwidth floor.

The same random weights go to ours (`generate --compile`'s path) in bf16 and weight-only int8, and to llama.cpp
(llama-cpp-python, 2 threads) as GGUF written by `mixtral-run convert --to gguf` in BF16 and Q8_0, flash
attention off and on. Each case: prompt 32 tokens, 128 new tokens, tokens/s of the decode steps (the prompt's
prefill is timed apart), the median of --repeats rounds taken in turns after a warm-up. The floor is the bytes one
decode step must read (attention, the two chosen experts of each layer, the lm head, in the case's weight format)
over the rate this machine streams memory (a sum over 256 MB): no decoder of these weights can step faster.

    bash bench/check_gguf_llama_cpp.sh          # builds llama-cpp-python once
    python bench/bench_decode_peers.py [--configs A,B] [--repeats 3]

Config A: hidden 512, 4 layers, 8 / 2 heads, ffn 1408, 8 experts top-2, vocab 32000. Config B: hidden 1024,
8 layers, 16 / 4 heads, ffn 3584. 8x7B-2L: Mixtral-8x7B's shapes with 2 layers.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mixtral.backend import get_backend
from mixtral.build import build_on_meta, materialize
from mixtral.checkpoint.hf import save_hf
from mixtral.checkpoint.loading import checkpoint_config
from mixtral.cli import main as cli
from mixtral.config import ModelConfig
from mixtral.data.tokenizer import default_tokenizer_path
from mixtral.model import Mixtral
from mixtral.model.layout import ModelLayout
from mixtral.serve.engine import Generator


def shaped(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int) -> ModelConfig:
    """A Mixtral of these sizes: 8 experts, top-2, Mixtral's 32000-token vocabulary."""
    return ModelConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
    )


CONFIGS = {"A": shaped(512, 1408, 4, 8, 2), "B": shaped(1024, 3584, 8, 16, 4), "8x7B-2L": shaped(4096, 14336, 2, 32, 8)}
PROMPT, NEW = 32, 128
BYTES = {"bf16": 2.0, "int8": 1.0 + 2 / 4096, "BF16": 2.0, "Q8_0": 34 / 32}  # per weight, scales included (approx.)


def step_weights(config: ModelConfig) -> int:
    """Weights one decode step reads: attention, two experts per layer, the lm head (the embedding row is noise)."""
    h, f, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    attention = 2 * h * h + 2 * h * kv
    return config.num_hidden_layers * (attention + config.num_experts_per_tok * 3 * h * f) + config.vocab_size * h


def read_bandwidth(repeats: int = 10) -> float:
    """Bytes per second the CPU streams from memory on 2 threads: the sum of a 256 MB fp32 tensor (a GEMV cannot
    read faster; on CPUs without bf16 units the bf16 GEMV is slower than this)."""
    x = torch.randn(64 * 1024 * 1024)
    x.sum()
    return x.numel() * 4 / min(timed(x.sum) for _ in range(repeats))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Ours:
    """Our compiled model; decode tokens/s = new tokens / (generate - prefill-only generate)."""

    def __init__(self, checkpoint: Path, dtype: str) -> None:
        model = build_on_meta(
            checkpoint_config(checkpoint),
            get_backend("cpu"),
            dtype=torch.bfloat16,
            layout=ModelLayout(int8=dtype == "int8"),
        )
        materialize(model, model, "cpu", init_from=checkpoint)
        get_backend("cpu").compile(model.eval(), dynamic=True, inference=True)
        self.generator = Generator(model)

    def decode_seconds(self, prompt: list[int]) -> float:
        whole = timed(lambda: self.generator.generate([prompt], NEW, stop_at_eos=False))
        return whole - timed(lambda: self.generator.generate([prompt], 1, stop_at_eos=False))


class LlamaCpp:
    """llama.cpp through llama-cpp-python: the prompt evaluated, then NEW greedy tokens one at a time."""

    def __init__(self, gguf: Path, flash_attn: bool) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=256, n_threads=2, n_batch=PROMPT, flash_attn=flash_attn, verbose=False
        )
        self.vocab = self.llm.n_vocab()  # the last position's logits, read as llama.cpp's own greedy sampler does

    def decode_seconds(self, prompt: list[int]) -> float:
        self.llm.reset()
        self.llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(NEW):
            token = int(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,)).argmax())
            self.llm.eval([token])
        return time.perf_counter() - start


def run_config(name: str, config: ModelConfig, repeats: int, floor_bw: float, work: Path) -> None:
    torch.manual_seed(0)
    model = Mixtral(config)
    model.init_weights(seed=0)
    hf = work / name / "hf"
    save_hf(model.to(torch.bfloat16), hf)
    shutil.copyfile(default_tokenizer_path(), hf / "tokenizer.model")
    del model
    runners = {"ours bf16": Ours(hf, "bf16"), "ours int8": Ours(hf, "int8")}
    for kind in ("bf16", "q8_0"):
        out = work / name / f"{kind}.gguf"
        assert cli(["convert", "--input", str(hf), "--output", str(out), "--to", "gguf", "--dtype", kind]) == 0
        for flash in (False, True):
            runners[f"llama.cpp {kind.upper()}{' fa' if flash else ''}"] = LlamaCpp(out, flash)
    prompt = torch.randint(3, config.vocab_size, (PROMPT,)).tolist()
    for runner in runners.values():
        runner.decode_seconds(prompt)  # warm-up (ours compiles here)
    seconds = {label: [] for label in runners}
    for _ in range(repeats):
        for label, runner in runners.items():
            seconds[label].append(runner.decode_seconds(prompt))
    weights = step_weights(config)
    reference = NEW / statistics.median(seconds["llama.cpp BF16"])
    for label, times in seconds.items():
        fmt = label.split()[-2] if label.endswith(" fa") else label.split()[-1]
        rate = NEW / statistics.median(times)
        floor = floor_bw / (weights * BYTES[fmt])
        print(
            f"| {name} | {label} | {rate:.0f} | {rate / reference:.2f}x | {floor:.0f} | {rate / floor:.0%} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="A,B")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    bandwidth = read_bandwidth()
    print(f"torch {torch.__version__}, 2 threads, memory reads {bandwidth / 1e9:.1f} GB/s; median of {args.repeats}")
    print("| config | implementation | decode tok/s | vs llama.cpp BF16 | floor tok/s | of floor |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            run_config(name, CONFIGS[name], args.repeats, bandwidth, Path(tmp))


if __name__ == "__main__":
    main()
