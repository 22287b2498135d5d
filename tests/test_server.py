"""The HTTP server through real clients (openai, Megatron's /api request, our client) against the engine's own output.

A tiny random Mixtral saved as an HF directory is served in-process on a free 127.0.0.1 port; greedy results
must equal Generator.generate on the same token ids (token-exact through /api's "tokens").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
from pathlib import Path

import httpx
import openai
import pytest
import requests
import torch

from mixtral.backend import get_backend
from mixtral.checkpoint.hf import load_hf_model, save_hf
from mixtral.data.tokenizer import Tokenizer
from mixtral.model import Mixtral
from mixtral.serve import client
from mixtral.serve.engine import Generator
from mixtral.serve.protocol import ChatEncoder, ChatMessage
from mixtral.serve.scheduler import Scheduler
from mixtral.serve.server import ServerSettings, build_server, create_app, start_in_thread

from conftest import single_thread, small_config

TIMEOUT = 30.0  # seconds any one request may take
CONFIG = dict(
    vocab_size=32000, hidden_size=32, intermediate_size=24, num_attention_heads=4, max_position_embeddings=128
)


def tiny_model_dir(path: Path) -> Path:
    """A random tiny Mixtral with Mixtral's vocabulary (weights std 0.2: peaked logits, no near-ties)."""
    torch.manual_seed(0)
    model = Mixtral(small_config(**CONFIG), get_backend("cpu"))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    save_hf(model, path)
    return path


class Served:
    """A server over one model directory, running on a thread; .url, .scheduler, .reference (a direct Generator)."""

    def __init__(self, model_dir: Path, apps: int = 1, **settings) -> None:
        self.tokenizer = Tokenizer(model_dir)
        self.scheduler = Scheduler(
            Generator(load_hf_model(model_dir, "cpu"), self.tokenizer),
            self.tokenizer,
            max_batch=settings.pop("max_batch", 8),
        ).start()
        self.reference = Generator(load_hf_model(model_dir, "cpu"), self.tokenizer)
        self.chat = ChatEncoder(self.tokenizer.path)
        self.settings = ServerSettings("tiny", **settings)
        self.server = build_server(create_app(self.scheduler, self.tokenizer, self.settings, self.chat), port=0)
        self.thread, port = start_in_thread(self.server)
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.scheduler.stop()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = Served(tiny_model_dir(tmp_path_factory.mktemp("tiny")), max_tokens_limit=100)
    yield served
    served.close()


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)


def greedy(served: Served, prompt: list[int], n: int) -> list[int]:
    return served.reference.generate([prompt], n)[0]


def continuation(tokenizer: Tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text new tokens add after the prompt (with its leading space), EOS not shown."""
    new = new[:-1] if new and new[-1] == tokenizer.eos_id else new
    return tokenizer.decode(prompt + new)[len(tokenizer.decode(prompt)) :]


PROMPTS = ["The capital of France is", "Once upon a time", "def main():"]


def test_completions_equal_the_engine(served, oai):
    tok = served.tokenizer
    for text in PROMPTS:
        ids = tok.encode(text)
        expected = greedy(served, ids, 20)
        reply = oai.completions.create(model="tiny", prompt=text, max_tokens=20, temperature=0)
        choice = reply.choices[0]
        assert choice.text == continuation(tok, ids, expected)
        assert choice.finish_reason == ("stop" if expected[-1] == tok.eos_id else "length")
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(expected))
    # several prompts (texts, or token ids) in one request come back as indexed choices
    ids = [tok.encode(p) for p in PROMPTS[:2]]
    expected = [continuation(tok, p, greedy(served, p, 8)) for p in ids]
    for prompt in (PROMPTS[:2], ids):
        reply = oai.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        assert [c.index for c in reply.choices] == [0, 1]
        assert [c.text for c in reply.choices] == expected


def test_streaming_completion_joins_to_the_whole(served, oai):
    whole = oai.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=30, temperature=0)
    stream = oai.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=30, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    # the wire format: `data: {json}` events and a final `data: [DONE]`
    body = {"prompt": PROMPTS[1], "max_tokens": 5, "temperature": 0, "stream": True}
    raw = httpx.post(served.url + "/v1/completions", json=body, timeout=TIMEOUT)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_chat_format_is_mixtral_instruct():
    """mistral-common's encoding, token for token, equals the documented <s>[INST] u [/INST] a</s>[INST] ... format."""
    tok = Tokenizer()
    chat = ChatEncoder(tok.path)

    def inst(text: str) -> list[int]:
        return tok.encode(f"[INST] {text} [/INST]", bos=False)

    messages = [
        ChatMessage(role="user", content="Hi there"),
        ChatMessage(role="assistant", content="Hello!"),
        ChatMessage(role="user", content="What is 2+2?"),
    ]
    expected = [tok.bos_id] + inst("Hi there") + tok.encode("Hello!", bos=False) + [tok.eos_id] + inst("What is 2+2?")
    assert chat.encode(messages) == expected
    system = [ChatMessage(role="system", content="Be brief."), messages[0]]
    assert chat.encode(system) == [tok.bos_id] + inst("Be brief.\n\nHi there")


def test_chat_equals_the_engine(served, oai):
    tok = served.tokenizer
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
    ]
    prompt = served.chat.encode([ChatMessage(**m) for m in messages])
    expected = greedy(served, prompt, 24)
    reply = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
    text = tok.decode(expected[:-1] if expected[-1] == tok.eos_id else expected)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == len(prompt)
    stream = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_megatron_api(served):
    """PUT /api as Megatron's text_generation_cli sends it (requests, data=json.dumps), and logprobs."""
    tok = served.tokenizer
    data = {"prompts": PROMPTS[:2], "tokens_to_generate": 12, "temperature": 0.0, "logprobs": True}
    response = requests.put(
        served.url + "/api", data=json.dumps(data), headers={"Content-Type": "application/json"}, timeout=TIMEOUT
    )
    assert response.status_code == 200
    out = response.json()
    model = served.reference.model
    for i, text in enumerate(PROMPTS[:2]):
        ids = tok.encode(text)
        new = greedy(served, ids, 12)
        assert out["tokens"][i] == ids + new
        assert out["text"][i] == text + continuation(tok, ids, new)
        assert out["segments"][i] == [tok.piece(t) for t in ids + new]
        # logprobs of every token after the first, as one unbatched forward computes them (fp32)
        with torch.no_grad():
            model.clear_caches()
            tokens = torch.tensor([ids + new])
            logp = model(tokens).logits.log_softmax(-1)[0, :-1].gather(1, tokens[0, 1:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(out["logprobs"][i]), logp, rtol=1e-4, atol=1e-4)
    # tokens_to_generate=0 with logprobs scores the prompt only
    scored = requests.put(
        served.url + "/api", json={"prompts": [PROMPTS[0]], "tokens_to_generate": 0, "logprobs": True}, timeout=TIMEOUT
    ).json()
    assert scored["text"] == [PROMPTS[0]]
    assert len(scored["logprobs"][0]) == len(tok.encode(PROMPTS[0])) - 1
    # errors come back as {"message"}, which text_generation_cli prints
    bad = requests.put(served.url + "/api", data=json.dumps({"prompts": "x"}), timeout=TIMEOUT)
    assert (bad.status_code, bad.json()["message"]) == (400, "prompts is not a list of strings")
    for field, value in (("beam_width", 2), ("stop_token", 13), ("top_p_decay", 0.5), ("length_penalty", 1.0)):
        refused = requests.put(served.url + "/api", json={"prompts": ["x"], field: value}, timeout=TIMEOUT)
        assert refused.status_code == 400, field
        assert refused.json()["message"].startswith(f"{field} is not supported by this server; remove it")


def test_seeds_stops_and_limits_per_request(served, oai):
    kwargs = dict(model="tiny", prompt=PROMPTS[2], max_tokens=20, temperature=1.0, top_p=0.9)
    first = oai.completions.create(seed=7, **kwargs).choices[0].text
    assert oai.completions.create(seed=7, **kwargs).choices[0].text == first
    whole = oai.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=0).choices[0].text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    cut = oai.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop])
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (whole[: whole.index(stop)], "stop")
    streamed = oai.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == whole[: whole.index(stop)]


def test_concurrent_requests_are_batched_and_equal_alone(served, oai):
    """Requests with different prompts, lengths and max_tokens share rounds; each gets what it gets alone."""
    jobs = [(PROMPTS[i % 3] + " x" * i, 4 + 3 * i) for i in range(8)]
    alone = [
        oai.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0).choices[0].text for p, n in jobs
    ]
    before = (served.scheduler.batches, served.scheduler.rows)
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(
            pool.map(
                lambda job: (
                    oai.completions.create(model="tiny", prompt=job[0], max_tokens=job[1], temperature=0)
                    .choices[0]
                    .text
                ),
                jobs,
            )
        )
    assert together == alone
    batches, rows = served.scheduler.batches - before[0], served.scheduler.rows - before[1]
    assert rows == len(jobs) and batches < rows  # at least one round carried several requests


def test_models_health_and_client(served, oai):
    assert [m.id for m in oai.models.list().data] == ["tiny"]
    assert httpx.get(served.url + "/health", timeout=TIMEOUT).json()["status"] == "ok"
    expected = oai.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0).choices[0].text
    for openai_api in (False, True):
        args = argparse.Namespace(
            url=served.url.removeprefix("http://"),
            tokens=6,
            temperature=0.0,
            openai=openai_api,
            api_key=None,
            timeout=TIMEOUT,
        )
        out = io.StringIO()
        assert client.run(args, io.StringIO(PROMPTS[0] + "\n\n"), out) == 0
        reply = out.getvalue().split("Enter prompt: ")[1].rstrip("\n")
        assert reply == (expected if openai_api else PROMPTS[0] + expected)
