"""The HTTP server: OpenAI-compatible /v1 endpoints, Megatron-LM's PUT /api, /health; FastAPI on uvicorn.

Handlers validate, turn each prompt into a scheduler Job and relay its events (JSON, or server-sent events
when streaming). Bodies are bounded (413 before reading past the limit); --api-key guards all but /health.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mixtral.errors import MixtralError
from mixtral.serve.protocol import (
    ChatEncoder,
    ChatRequest,
    CompletionRequest,
    RequestError,
    chat_chunk,
    check_limit,
    completion_chunk,
    megatron_sampling,
    new_id,
    openai_error,
    parse_megatron,
    prompt_ids,
    usage,
)
from mixtral.serve.scheduler import Job, Result, Scheduler

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any prompt the model's context can hold
MEGATRON_PATH = "/api"


@dataclass
class ServerSettings:
    model_name: str
    max_tokens_limit: int = 2048
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES


def error_response(path: str, status: int, message: str) -> JSONResponse:
    """Megatron's clients read {"message"}, OpenAI's read {"error": {"message"}}."""
    body = {"message": message} if path == MEGATRON_PATH else openai_error(message, status)
    return JSONResponse(body, status_code=status)


class BodyLimit:
    """ASGI middleware: 413 for a declared Content-Length over the limit (body unread), or as soon as a
    chunked body passes it (the app then sees a disconnect and its answer is dropped)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self.reject(path, send, declared)
        received, started, rejected = 0, False, False

        async def limited_receive():
            nonlocal received, started, rejected
            message = await receive()
            received += len(message.get("body", b""))
            if received <= self.max_bytes:
                return message
            if not started:
                started = rejected = True
                await self.reject(path, send, None)
            return {"type": "http.disconnect"}

        async def tracking_send(message):
            nonlocal started
            if not rejected:
                started = started or message["type"] == "http.response.start"
                await send(message)

        await self.app(scope, limited_receive, tracking_send)

    async def reject(self, path: str, send, declared: bytes | None) -> None:
        size = f"{declared.decode(errors='replace')} bytes" if declared else "the body"
        message = f"request body of {size} is over this server's limit of {self.max_bytes} bytes; send a smaller one"
        response = error_response(path, 413, message)
        response.headers["connection"] = "close"
        await response({"type": "http"}, None, send)


def create_app(scheduler: Scheduler, tokenizer, settings: ServerSettings, chat: ChatEncoder | None = None) -> FastAPI:
    """The FastAPI app over a started Scheduler."""

    async def authorize(request: Request) -> None:
        if settings.api_key and request.url.path != "/health":
            expected = f"Bearer {settings.api_key}".encode()
            if not secrets.compare_digest(request.headers.get("authorization", "").encode(), expected):
                raise RequestError(
                    "missing or wrong API key; send the header 'Authorization: Bearer KEY' with the server's --api-key",
                    401,
                )

    app = FastAPI(
        title="mixtral-run serve", docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(authorize)]
    )
    limit = settings.max_tokens_limit

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"] if part != "body")
            problems.append(f"{where}: {error['msg']}" if where else error["msg"])
        return error_response(request.url.path, 400, "invalid request: " + "; ".join(problems))

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return error_response(request.url.path, exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(request.url.path, exc.status_code, str(exc.detail))

    def submit(prompts: list[list[int]], max_tokens: int, sampling: dict, **extra) -> list[Job]:
        """Queue one job per prompt once all of them are known to fit the model."""
        jobs = [Job(prompt, max_tokens, **sampling, **extra) for prompt in prompts]
        try:
            for job in jobs:
                scheduler.check(job)
        except MixtralError as exc:
            raise RequestError(str(exc)) from None
        return [scheduler.submit(job) for job in jobs]

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "waiting": len(scheduler.waiting),
            "batches": scheduler.batches,
            "rows": scheduler.rows,
            "generated_tokens": scheduler.generated,
            "dropped": scheduler.dropped,
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "mixtral-run"}],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        body.check_unsupported()
        check_limit("max_tokens", body.max_tokens, limit)
        prompts = prompt_ids(body.prompt, tokenizer)
        jobs = submit(prompts, body.max_tokens, body.sampling(), stop=body.stops())
        request_id = new_id("cmpl")
        echoes = [tokenizer.decode(p) if body.echo else "" for p in prompts]
        if body.stream:

            async def chunks():
                for index, echo in enumerate(echoes):
                    if echo:
                        yield completion_chunk(request_id, settings.model_name, index, echo, None)
                async for index, kind, value in merged(jobs):
                    text, finish = (value, None) if kind == "text" else ("", value.finish_reason)
                    yield completion_chunk(request_id, settings.model_name, index, text, finish)

            return sse(chunks(), jobs)
        results = await gather(jobs)
        return {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": settings.model_name,
            "choices": [
                {"index": i, "text": echo + r.text, "logprobs": None, "finish_reason": r.finish_reason}
                for i, (echo, r) in enumerate(zip(echoes, results))
            ],
            "usage": usage(sum(map(len, prompts)), sum(len(r.tokens) for r in results)),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        body.check_unsupported()
        if chat is None:
            raise RequestError(
                "chat needs a Mistral SentencePiece tokenizer, which this model directory "
                "does not have; use /v1/completions",
                400,
            )
        prompt = chat.encode(body.messages)
        room = scheduler.generator.max_positions - len(prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, min(limit, room))
        check_limit("max_tokens", max_tokens, limit)
        jobs = submit([prompt], max_tokens, body.sampling(), stop=body.stops(), prime=False)
        request_id = new_id("chatcmpl")
        if body.stream:

            async def chunks():
                yield chat_chunk(request_id, settings.model_name, {"role": "assistant", "content": ""}, None)
                async for _, kind, value in merged(jobs):
                    if kind == "text":
                        yield chat_chunk(request_id, settings.model_name, {"content": value}, None)
                    else:
                        yield chat_chunk(request_id, settings.model_name, {}, value.finish_reason)

            return sse(chunks(), jobs)
        result = (await gather(jobs))[0]
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": settings.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": usage(len(prompt), len(result.tokens)),
        }

    @app.put(MEGATRON_PATH)
    async def megatron(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the body is not valid JSON ({exc}); send a JSON object") from None
        req = parse_megatron(body)
        check_limit("tokens_to_generate", req.tokens_to_generate, limit)
        prompts = [tokenizer.encode(p, bos=req.add_BOS) for p in req.prompts]
        jobs = submit(prompts, req.tokens_to_generate, megatron_sampling(req), logprobs=req.logprobs)
        results = await gather(jobs)
        response = {
            "text": [p + r.text for p, r in zip(req.prompts, results)],
            "segments": [[tokenizer.piece(t) for t in p + r.tokens] for p, r in zip(prompts, results)],
            "tokens": [p + r.tokens for p, r in zip(prompts, results)],
        }
        if req.logprobs:
            response["logprobs"] = [r.logprobs for r in results]
        return response

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # added last: outermost, runs first
    return app


async def next_event(job: Job) -> tuple[str, object]:
    kind, value = await job.queue.get()
    if kind == "error":
        raise RequestError(f"generation failed: {value}", 500)
    return kind, value


async def gather(jobs: list[Job]) -> list[Result]:
    """Every job's Result (text events are skipped: the Result has the whole text)."""
    try:
        results = []
        for job in jobs:
            kind, value = await next_event(job)
            while kind != "done":
                kind, value = await next_event(job)
            results.append(value)
        return results
    finally:
        for job in jobs:
            job.cancelled = True  # nothing listens any more (also when the handler was cancelled)


async def merged(jobs: list[Job]) -> AsyncIterator[tuple[int, str, object]]:
    """(job index, kind, value) from all jobs as events arrive, until every job is done."""
    pending = {asyncio.ensure_future(next_event(job)): i for i, job in enumerate(jobs)}
    try:
        while pending:
            finished, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                index = pending.pop(task)
                kind, value = task.result()
                yield index, kind, value
                if kind != "done":
                    pending[asyncio.ensure_future(next_event(jobs[index]))] = index
    finally:
        for task in pending:
            task.cancel()


def sse(chunks: AsyncIterator[dict], jobs: list[Job]) -> StreamingResponse:
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`; a disconnect cancels the jobs."""

    async def events():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except RequestError as exc:
            yield f"data: {json.dumps(openai_error(exc.message, exc.status))}\n\n"
        finally:
            for job in jobs:
                job.cancelled = True
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


def build_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> uvicorn.Server:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def start_in_thread(server: uvicorn.Server, timeout: float = 30.0) -> tuple[threading.Thread, int]:
    """Run a uvicorn server on a daemon thread (tests, benchmarks); returns the thread and the bound port."""
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise MixtralError(
                f"the server did not start on {server.config.host}:{server.config.port}; is the port free?"
            )
        time.sleep(0.01)
    return thread, server.servers[0].sockets[0].getsockname()[1]
