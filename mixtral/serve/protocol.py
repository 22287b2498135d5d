"""What clients may send and what they get back: OpenAI completions/chat schemas, Megatron's PUT /api, errors.

Requests are validated here (strict types, ranges, limits) so that a bad request is a 400 that names the
field and the fix, before anything reaches the scheduler.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mixtral.errors import MixtralError

MAX_PROMPTS = 128  # per request, as Megatron's /api allows
MAX_STOPS = 4  # stop strings per request, as OpenAI allows


class RequestError(Exception):
    """A request the server refuses: HTTP status and a message that names the problem and the fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


class Strict(BaseModel):
    """No type coercion ('10' is not an int), unknown fields ignored (clients send extras)."""

    model_config = ConfigDict(strict=True, extra="ignore")


class Sampling(Strict):
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # extension: 0 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1)

    def sampling(self) -> dict:
        """The engine's per-row sampling settings."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise RequestError(f"stop takes at most {MAX_STOPS} non-empty strings, got {stops!r}")
        return tuple(stops)

    def check_unsupported(self) -> None:
        if self.n != 1:
            raise RequestError(f"n={self.n} is not supported; send n=1 (or send the request n times)")


class CompletionRequest(Sampling):
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.logprobs is not None:
            raise RequestError("logprobs is not supported on /v1/completions; use PUT /api with logprobs: true")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)


def prompt_ids(prompt: str | list[str] | list[int] | list[list[int]], tokenizer) -> list[list[int]]:
    """The token ids of each prompt of a completion request (text gets BOS, as the model was trained)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise RequestError("prompt is empty; send a string, a list of strings or a list of token ids")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise RequestError(f"{len(prompt)} prompts in one request; send at most {MAX_PROMPTS}")
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


class ChatEncoder:
    """Mixtral's instruct format through mistral-common: <s>[INST] user [/INST] assistant</s>[INST] ... [/INST]."""

    def __init__(self, tokenizer_path) -> None:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        try:
            self.tokenizer = MistralTokenizer.from_file(str(tokenizer_path), mode=ValidationMode.serving)
        except (MistralCommonException, AssertionError, OSError, ValueError) as exc:
            raise MixtralError(
                f"{tokenizer_path}: mistral-common cannot build Mixtral's chat format from this "
                f"tokenizer ({exc}); use Mixtral's tokenizer.model for chat"
            ) from None

    def encode(self, messages: list[ChatMessage]) -> list[int]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        request = ChatCompletionRequest(model="mixtral", messages=[kinds[m.role](content=m.text()) for m in messages])
        try:
            return self.tokenizer.encode_chat_completion(request).tokens
        except MistralCommonException as exc:
            raise RequestError(
                f"messages do not form a Mixtral conversation: {exc}; start with a system or "
                f"user message, alternate user and assistant, and end with a user message"
            ) from None


def check_limit(name: str, value: int, limit: int) -> None:
    if value > limit:
        raise RequestError(
            f"{name}={value} is over this server's limit of {limit}; ask for at most {limit} "
            f"(the server's --max-tokens-limit)"
        )


def openai_error(message: str, status: int) -> dict:
    kind = {401: "authentication_error", 413: "invalid_request_error", 429: "rate_limit_error"}.get(status)
    return {
        "error": {
            "message": message,
            "type": kind or ("invalid_request_error" if status < 500 else "server_error"),
            "param": None,
            "code": None,
        }
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_chunk(request_id: str, model: str, index: int, text: str, finish: str | None) -> dict:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def chat_chunk(request_id: str, model: str, delta: dict, finish: str | None) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# ---- Megatron-LM's PUT /api (megatron/inference/text_generation_server.py), same fields and messages ----


class MegatronRequest(BaseModel):
    prompts: list[str]
    tokens_to_generate: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0  # Megatron's 0 = off
    logprobs: bool = False
    add_BOS: bool = True  # Mixtral was trained with BOS; send false for Megatron's raw behaviour
    random_seed: int | None = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_megatron(body: Any) -> MegatronRequest:
    """Validate a PUT /api body with Megatron's rules and messages (temperature 0 is allowed here: greedy)."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object with a prompts list")
    if "prompts" not in body:
        raise RequestError("prompts argument required")
    if "max_len" in body:
        raise RequestError("max_len is no longer used.  Replace with tokens_to_generate")
    if "sentences" in body:
        raise RequestError("sentences is no longer used.  Replace with prompts")
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts is not a list of strings")
    if not prompts:
        raise RequestError("prompts is empty")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"Maximum number of prompts is {MAX_PROMPTS}")
    unknown = sorted(set(body) - set(MegatronRequest.model_fields) - {"no_log"})  # no_log: server logging only
    if unknown:
        raise RequestError(
            f"{unknown[0]} is not supported by this server; remove it (supported: "
            f"{', '.join(MegatronRequest.model_fields)})"
        )
    request = MegatronRequest(prompts=prompts)
    checks = {
        "tokens_to_generate": (
            _is_int,
            lambda v: v >= 0,
            "tokens_to_generate must be an integer greater than or equal to 0",
        ),
        "logprobs": (lambda v: isinstance(v, bool), lambda v: True, "logprobs must be a boolean value"),
        "temperature": (
            _is_number,
            lambda v: 0.0 <= v <= 100.0,
            "temperature must be a number from 0 (greedy) to 100.0",
        ),
        "top_k": (
            _is_int,
            lambda v: 0 <= v <= 1000,
            "top_k must be equal to or greater than 0 and less than or equal to 1000",
        ),
        "top_p": (_is_number, lambda v: 0.0 <= v <= 1.0, "top_p must be less than or equal to 1.0"),
        "add_BOS": (lambda v: isinstance(v, bool), lambda v: True, "add_BOS must be a boolean value"),
        "random_seed": (_is_int, lambda v: v >= 0, "random_seed must be a positive integer"),
    }
    for name, (type_ok, range_ok, message) in checks.items():
        if name in body:
            value = body[name]
            if not type_ok(value) or not range_ok(value):
                raise RequestError(message)
            setattr(request, name, value)
    if request.tokens_to_generate == 0 and not request.logprobs:
        raise RequestError("tokens_to_generate=0 implies logprobs should be True")
    if any(len(p) == 0 for p in prompts) and not request.add_BOS:
        raise RequestError("Empty prompts require add_BOS=true")
    return request


def megatron_sampling(request: MegatronRequest) -> dict:
    """Megatron's settings in the engine's terms (top_p 0 means off there, 1 here)."""
    return {
        "temperature": float(request.temperature),
        "top_k": request.top_k,
        "top_p": float(request.top_p) if request.top_p > 0 else 1.0,
        "seed": request.random_seed,
    }
