"""The chat loop of `mixtral-run generate --interactive`: Mixtral's [INST] format, streamed replies, /commands."""

from __future__ import annotations

from typing import TextIO

from mixtral.errors import MixtralError
from mixtral.serve.engine import Generator, TextStream
from mixtral.serve.runner import Settings, check_settings

HELP = """commands:
  /set temperature T   sampling temperature (0 = greedy)
  /set top_p P         nucleus mass in (0, 1] (1 = off)
  /set top_k K         keep the K likeliest tokens (0 = off)
  /set max_tokens N    new tokens per reply at most
  /set seed S          sampling seed (none = random)
  /show                print the current settings
  /clear               forget the conversation
  /help                this help
  /quit                leave (so does end of input)"""

SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "max_tokens": int, "seed": int}


def apply_set(settings: Settings, words: list[str]) -> str:
    """Apply `/set NAME VALUE` to settings (validated); returns the line to print."""
    if len(words) != 2 or words[0] not in SETTABLE:
        return f"usage: /set NAME VALUE with NAME one of {', '.join(SETTABLE)}"
    name, raw = words
    old = getattr(settings, name)
    try:
        value = None if name == "seed" and raw == "none" else SETTABLE[name](raw)
        setattr(settings, name, value)
        check_settings(settings)
    except (ValueError, MixtralError) as exc:
        setattr(settings, name, old)
        return f"not set: {exc}"
    return f"{name} = {value}"


def command_reply(command: str, words: list[str], settings: Settings) -> str:
    """What a /command prints (/quit and /clear's effect on the history are the caller's)."""
    if command == "/help":
        return HELP
    if command == "/show":
        return " ".join(f"{name}={getattr(settings, name)}" for name in SETTABLE)
    if command == "/set":
        return apply_set(settings, words)
    if command == "/clear":
        return "conversation cleared"
    return f"unknown command {command}; /help lists commands"


def chat(generator: Generator, tokenizer, settings: Settings, stdin: TextIO, out: TextIO) -> None:
    """Read lines from stdin until /quit or EOF; every other line is a user turn answered in the stream."""
    history: list[int] = []  # the conversation so far, as Mixtral instruct tokens
    print("chat with the model; /help lists commands", file=out)
    while True:
        print(">>> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line:
            print(file=out)
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, *words = line.split()
            if command == "/quit":
                return
            if command == "/clear":
                history = []
            print(command_reply(command, words, settings), file=out)
            continue
        turn = tokenizer.encode(f"[INST] {line} [/INST]", bos=False)
        if len(history) + len(turn) + settings.max_tokens > generator.max_positions:
            history = []  # the conversation no longer fits: start a fresh one
        prompt = (history or [tokenizer.bos_id]) + turn
        pieces = TextStream(tokenizer)
        try:
            reply = generator.generate(
                [prompt],
                on_token=lambda row, token: print(pieces.push(token), end="", file=out, flush=True),
                **settings.as_kwargs(),
            )[0]
        except MixtralError as exc:
            print(f"error: {exc}", file=out)
            continue
        print(file=out)
        history = prompt + reply + ([] if reply[-1] == tokenizer.eos_id else [tokenizer.eos_id])
