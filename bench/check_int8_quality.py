"""Weight-only int8 against bf16 on a trained model: greedy tokens and validation loss.

    mixtral-run train --recipe cpu-tiny          # README's run: runs/cpu-tiny/checkpoints/latest
    python bench/check_int8_quality.py [--model runs/cpu-tiny/checkpoints/latest] [--recipe cpu-tiny]

Eight prompts (the first 16 tokens of eight validation sequences) are continued greedily by 32 tokens each
(256 tokens): int8's tokens are compared with bf16's position by position as generated, and teacher-forced (int8's
next-token choice on bf16's own continuation, which does not let one early difference decide the rest). The loss is
the mean cross-entropy over the recipe's eval.samples validation sequences, for fp32, bf16 and int8 weights.
"""

from __future__ import annotations

import argparse

import torch

from mixtral.backend import get_backend
from mixtral.build import build_on_meta, materialize
from mixtral.checkpoint.loading import checkpoint_config, resolve_checkpoint
from mixtral.data.loader import build_datasets
from mixtral.kernels import reference
from mixtral.model.layout import ModelLayout
from mixtral.recipes import load_recipe
from mixtral.serve.engine import Generator

PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 8, 16, 32


def load(path, dtype: torch.dtype, int8: bool):
    model = build_on_meta(checkpoint_config(path), get_backend("cpu"), dtype=dtype, layout=ModelLayout(int8=int8))
    materialize(model, model, "cpu", init_from=path)
    return model.eval()


@torch.no_grad()
def eval_loss(model, valid, samples: int) -> float:
    batch = torch.stack([valid[i] for i in range(min(samples, len(valid)))])
    logits = model(batch[:, :-1]).logits
    return reference.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()


@torch.no_grad()
def teacher_forced_agreement(model, sequences: list[list[int]]) -> float:
    """The share of continuation positions where model's greedy choice is the token the sequence has there."""
    agree = total = 0
    for seq in sequences:
        tokens = torch.tensor([seq])
        choices = model(tokens[:, :-1]).logits.argmax(-1)[0, PROMPT_TOKENS - 1 :]
        agree += (choices == tokens[0, PROMPT_TOKENS:]).sum().item()
        total += choices.numel()
    return agree / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/cpu-tiny/checkpoints/latest")
    parser.add_argument("--recipe", default="cpu-tiny")
    args = parser.parse_args()
    path = resolve_checkpoint(args.model)
    recipe = load_recipe(args.recipe)
    _, valid = build_datasets(recipe.data, recipe.seq_len, recipe.train.seed)
    models = {
        name: load(path, dtype, int8)
        for name, dtype, int8 in [
            ("fp32", torch.float32, False),
            ("bf16", torch.bfloat16, False),
            ("int8", torch.bfloat16, True),
        ]
    }
    losses = {name: eval_loss(model, valid, recipe.eval.samples) for name, model in models.items()}
    prompts = [valid[i][:PROMPT_TOKENS].tolist() for i in range(PROMPTS)]
    bf16 = Generator(models["bf16"]).generate(prompts, NEW_TOKENS, stop_at_eos=False)
    forced = teacher_forced_agreement(models["int8"], [p + g for p, g in zip(prompts, bf16)])  # before its cache
    int8 = Generator(models["int8"]).generate(prompts, NEW_TOKENS, stop_at_eos=False)
    same = sum(a == b for x, y in zip(bf16, int8) for a, b in zip(x, y))
    total = sum(len(tokens) for tokens in bf16)
    print(f"model {path} ({recipe.name}), {PROMPTS} prompts x {NEW_TOKENS} greedy tokens = {total} tokens")
    print(f"int8 tokens equal to bf16's, as generated: {same}/{total} = {same / total:.1%}")
    print(f"int8 next-token choice on bf16's continuation: {forced:.1%}")
    print(
        "eval loss ("
        + f"{recipe.eval.samples} validation sequences): "
        + ", ".join(f"{name} {loss:.4f}" for name, loss in losses.items())
        + f"; int8 vs bf16 {losses['int8'] / losses['bf16'] - 1:+.2%}"
    )


if __name__ == "__main__":
    main()
