"""Request batching: one thread owns the model; requests queue; each round runs up to max_batch of them together.

Dynamic batching over engine.Generator: a round takes the waiting jobs that fit one batch (FIFO), runs one
generate() call with per-row sampling settings, and streams each row's text to its request's asyncio queue.
The engine has one max_new_tokens and EOS stop for the batch, so per-request limits, stop strings and
cancellation are applied here, and the round ends early (StopBatch from on_token) once every row is done.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from mixtral.errors import MixtralError
from mixtral.serve.engine import Generator, TextStream, inference_mode

log = logging.getLogger("mixtral.serve")

PRIME_TOKENS = 4  # prompt tokens a completion's text is decoded after, so its leading space survives


@dataclass
class Result:
    tokens: list[int]  # new token ids (an EOS that ended the row included)
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    logprobs: list[float] | None = None  # log p of prompt[1:] + tokens, when asked for


@dataclass
class Job:
    """One prompt to complete; events ("text", str), ("done", Result) or ("error", str) go to its queue."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    prime: bool = True  # decode the text after the prompt's last tokens (completions); chat replies start fresh
    cancelled: bool = False
    queue: asyncio.Queue | None = field(default=None, repr=False)
    loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    def post(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: nobody is listening
            self.cancelled = True


class StopBatch(Exception):
    """Raised from on_token to end a round once every row has finished or been cancelled."""


class Row:
    """A job's progress within a round: token count, decoded text, what was already sent, stop strings."""

    def __init__(self, job: Job, tokenizer) -> None:
        self.job, self.eos = job, tokenizer.eos_id
        self.stream = TextStream(tokenizer)
        if job.prime:
            for token in job.prompt[-PRIME_TOKENS:]:
                self.stream.push(token)
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.finish: str | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None or self.job.cancelled

    def push(self, token: int) -> None:
        """Account one new token: text, stop strings, limits; post what is safe to show."""
        self.tokens.append(token)
        if token == self.eos:
            self.finish = "stop"
        else:
            self.text += self.stream.push(token)
            cut = min((i for i in (self.text.find(s) for s in self.job.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish = self.text[:cut], "stop"
            elif len(self.tokens) >= self.job.max_tokens:
                self.finish = "length"
        end = len(self.text) if self.finish else len(self.text) - self.held_back()
        if end > self.sent:
            self.job.post("text", self.text[self.sent : end])
            self.sent = end

    def held_back(self) -> int:
        """Characters at the end of the text that may start a stop string (not shown until decided)."""
        for size in range(min(len(self.text), max(map(len, self.job.stop), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-size:]) for s in self.job.stop):
                return size
        return 0


class Scheduler:
    """Owns the Generator on one thread; submit() from the event loop, events come back on job.queue."""

    def __init__(self, generator: Generator, tokenizer, max_batch: int = 8) -> None:
        self.generator, self.tokenizer, self.max_batch = generator, tokenizer, max_batch
        self.waiting: deque[Job] = deque()
        self.ready = threading.Condition()
        self.running = False
        self.thread = threading.Thread(target=self.loop, name="mixtral-scheduler", daemon=True)
        # counters for /health, tests and the benchmark: rounds, rows they carried, tokens generated,
        # rows given up because their client went away
        self.batches = self.rows = self.generated = self.dropped = 0

    def start(self) -> Scheduler:
        self.running = True
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.ready:
            self.running = False
            self.ready.notify_all()
        self.thread.join(timeout=30)

    def check(self, job: Job) -> None:
        """Raise MixtralError now for a job the model cannot run alone (empty or too long)."""
        self.generator.check([job.prompt], max(job.max_tokens, 1))

    def submit(self, job: Job) -> Job:
        """Queue a job (called on the event loop); its events arrive on job.queue."""
        job.loop, job.queue = asyncio.get_running_loop(), asyncio.Queue()
        with self.ready:
            self.waiting.append(job)
            self.ready.notify()
        return job

    def take(self) -> list[Job]:
        """The next round: waiting jobs in order that fit one batch (prompt + new tokens within the model)."""
        with self.ready:
            while self.running and not self.waiting:
                self.ready.wait()
            batch: list[Job] = []
            kept: deque[Job] = deque()
            while self.waiting:
                job = self.waiting.popleft()
                if job.cancelled:
                    continue
                longest = max([len(job.prompt)] + [len(j.prompt) for j in batch])
                most = max([job.max_tokens] + [j.max_tokens for j in batch])
                if len(batch) < self.max_batch and longest + most <= self.generator.max_positions:
                    batch.append(job)
                else:
                    kept.append(job)
            self.waiting = kept
            return batch

    def loop(self) -> None:
        while self.running:
            batch = self.take()
            if not batch:
                continue
            try:
                self.run(batch)
            except Exception as exc:  # a failed round fails its requests, never the server
                if not isinstance(exc, MixtralError):
                    log.exception("generation failed")
                for job in batch:
                    job.post("error", str(exc))

    def run(self, batch: list[Job]) -> None:
        """One round: generate for the jobs that want new tokens, score those that want logprobs, post results."""
        rows = [Row(job, self.tokenizer) for job in batch]
        generating = [row for row in rows if row.job.max_tokens > 0]
        if generating:
            self.generate(generating)
        self.dropped += sum(row.job.cancelled and row.finish is None for row in rows)
        for row in rows:
            if row.finish is None:
                row.finish = "length"
        scored = [row for row in rows if row.job.logprobs and not row.job.cancelled]
        scores = score(self.generator.model, [r.job.prompt + r.tokens for r in scored]) if scored else []
        logprobs = {id(row): s for row, s in zip(scored, scores)}
        self.batches += 1
        self.rows += len(batch)
        self.generated += sum(len(row.tokens) for row in rows)
        for row in rows:
            if not row.job.cancelled:
                row.job.post("done", Result(row.tokens, row.text, row.finish, logprobs.get(id(row))))

    def generate(self, rows: list[Row]) -> None:
        jobs = [row.job for row in rows]
        seeds = None if all(j.seed is None for j in jobs) else [j.seed for j in jobs]

        def on_token(index: int, token: int) -> None:
            if not rows[index].done:
                rows[index].push(token)
            if all(row.done for row in rows):
                raise StopBatch

        try:
            self.generator.generate(
                [j.prompt for j in jobs],
                max(j.max_tokens for j in jobs),
                temperature=[j.temperature for j in jobs],
                top_k=[j.top_k for j in jobs],
                top_p=[j.top_p for j in jobs],
                seed=seeds,
                on_token=on_token,
            )
        except StopBatch:
            pass


def score(model, sequences: list[list[int]]) -> list[list[float]]:
    """log p(token t | tokens < t) for t >= 1 of each sequence: one cache-free forward over the batch.

    The engine returns no logprobs, so they are recomputed here. The KV caches are dropped first (the next
    generate allocates them again) through model calls only, so ranks following a leader stay in step.
    """
    model.clear_caches()
    longest = max(len(s) for s in sequences)
    pads = [longest - len(s) for s in sequences]
    device = model.embed_tokens.weight.device
    tokens = torch.tensor([[0] * p + s for p, s in zip(pads, sequences)], dtype=torch.long, device=device)
    pad = torch.tensor(pads, device=device) if any(pads) else None
    with inference_mode(device):
        logp = model(tokens, pad=pad).logits.float().log_softmax(dim=-1)
    picked = logp[:, :-1].gather(2, tokens[:, 1:].unsqueeze(2)).squeeze(2)
    return [picked[b, p:].tolist() for b, p in enumerate(pads)]
