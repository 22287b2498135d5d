"""`mixtral-run client URL`: an interactive prompt against a running server, like Megatron's text_generation_cli.

Each stdin line is a prompt; the completion is printed (PUT /api, or streamed from /v1/completions with
--openai). Standard library only, so it runs anywhere Python does.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TextIO

from mixtral.errors import MixtralError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000 or 127.0.0.1:8000")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--openai", action="store_true", help="stream from /v1/completions instead of PUT /api")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one reply")


def request(url: str, method: str, body: dict, api_key: str | None, timeout: float):
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method=method)
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        payload = json.loads(exc.read() or b"{}")
        message = payload.get("message") or payload.get("error", {}).get("message") or exc.reason
        raise MixtralError(f"the server answered {exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise MixtralError(f"cannot reach {url} ({exc.reason}); is `mixtral-run serve` running there?") from None


def stream_text(response) -> Iterator[str]:
    """The text pieces of a /v1/completions server-sent event stream."""
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise MixtralError(f"the server failed mid-stream: {chunk['error']['message']}")
        yield chunk["choices"][0]["text"]


def complete(base: str, prompt: str, args: argparse.Namespace, out: TextIO) -> None:
    if args.openai:
        body = {"prompt": prompt, "max_tokens": args.tokens, "temperature": args.temperature, "stream": True}
        with request(base + "/v1/completions", "POST", body, args.api_key, args.timeout) as response:
            for piece in stream_text(response):
                print(piece, end="", file=out, flush=True)
        print(file=out)
        return
    body = {"prompts": [prompt], "tokens_to_generate": args.tokens, "temperature": args.temperature}
    with request(base + "/api", "PUT", body, args.api_key, args.timeout) as response:
        print(json.loads(response.read())["text"][0], file=out)


def run(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    if args.tokens < 1:
        raise MixtralError(f"--tokens must be at least 1, got {args.tokens}")
    base = args.url.rstrip("/")
    if "://" not in base:
        base = "http://" + base
    while True:
        print("Enter prompt: ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line:
            print(file=out)
            return 0
        prompt = line.rstrip("\n")
        if not prompt.strip():
            continue
        try:
            complete(base, prompt, args, out)
        except MixtralError as exc:
            print(f"error: {exc}", file=out)
