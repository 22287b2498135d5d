"""`mixtral-run generate`: complete a prompt (or each line of a file, or a chat loop) with a Mixtral checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mixtral.backend import add_backend_argument
from mixtral.errors import MixtralError
from mixtral.serve.distributed import add_parallel_arguments
from mixtral.serve.runner import DTYPE_HELP, DTYPES, Settings, add_compile_argument, check_settings, with_generator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="HF directory, native or Megatron checkpoint, checkpoints root or training run directory",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="text to complete")
    source.add_argument("--prompts-file", type=Path, help="complete each non-empty line; prints JSON lines")
    source.add_argument("--interactive", action="store_true", help="chat loop on stdin (/help lists commands)")
    parser.add_argument("--max-tokens", type=int, default=Settings.max_tokens, help="new tokens at most")
    parser.add_argument("--temperature", type=float, default=Settings.temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=Settings.top_p, help="nucleus mass (1 = off)")
    parser.add_argument("--top-k", type=int, default=Settings.top_k, help="keep the k likeliest (0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same output)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help=DTYPE_HELP)
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --prompts-file")
    add_compile_argument(parser)
    add_backend_argument(parser)
    add_parallel_arguments(parser)


def complete(generator, tokenizer, text: str, settings: Settings, stream: bool) -> str:
    """The completion of one prompt; with stream, also printed piece by piece as it is generated."""
    from mixtral.serve.engine import TextStream

    if not text.strip():
        raise MixtralError("empty prompt; pass some text with --prompt")
    on_token = None
    if stream:
        pieces = TextStream(tokenizer)

        def on_token(row: int, token: int) -> None:
            print(pieces.push(token), end="", flush=True)

    ids = generator.generate([tokenizer.encode(text)], on_token=on_token, **settings.as_kwargs())[0]
    return tokenizer.decode(ids)


def read_prompts(path: Path) -> list[str]:
    """The non-empty lines of a prompts file."""
    if not path.is_file():
        raise MixtralError(f"{path}: prompts file not found; pass a text file with one prompt per line")
    prompts = [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise MixtralError(f"{path}: no prompts in the file; write one prompt per line")
    return prompts


def complete_all(generator, tokenizer, prompts: list[str], settings: Settings, batch_size: int) -> None:
    """Complete the prompts in batches, printing one JSON object per prompt in order."""
    from tqdm import tqdm

    with tqdm(total=len(prompts), unit="prompt", file=sys.stderr) as bar:
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first : first + batch_size]
            outputs = generator.generate([tokenizer.encode(p) for p in chunk], **settings.as_kwargs())
            for prompt, ids in zip(chunk, outputs):
                print(json.dumps({"prompt": prompt, "completion": tokenizer.decode(ids)}, ensure_ascii=False))
            bar.update(len(chunk))


def run(args: argparse.Namespace) -> int:
    settings = Settings(args.max_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    check_settings(settings)
    if args.batch_size < 1:
        raise MixtralError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.prompt is not None and not args.prompt.strip():
        raise MixtralError("empty prompt; pass some text with --prompt")
    prompts = read_prompts(args.prompts_file) if args.prompts_file is not None else None

    def answer(generator, tokenizer) -> int:
        if args.interactive:
            from mixtral.serve.interactive import chat

            chat(generator, tokenizer, settings, sys.stdin, sys.stdout)
        elif prompts is not None:
            complete_all(generator, tokenizer, prompts, settings, args.batch_size)
        else:
            text = complete(generator, tokenizer, args.prompt, settings, args.stream)
            print("" if args.stream else text)
        return 0

    return with_generator(args, answer)
