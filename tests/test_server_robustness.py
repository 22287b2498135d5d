"""The server under bad input and load: each case gets the right 4xx or a clean close, and serving goes on."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import subprocess

import httpx
import openai
import pytest
from test_server import TIMEOUT, Served, one_thread, tiny_model_dir  # noqa: F401  (one_thread: autouse fixture)

from mixtral.cli import build_parser

from conftest import serve_process

KEY = "s3cret-key"
LIMIT = 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def served(model_dir):
    served = Served(model_dir, max_tokens_limit=LIMIT, max_body_bytes=64 * 1024)
    yield served
    served.close()


def still_serving(served: Served) -> None:
    reply = httpx.post(served.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=TIMEOUT)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1


def error(response: httpx.Response) -> str:
    body = response.json()
    return body["message"] if "message" in body else body["error"]["message"]


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": ', 400, "JSON"),
        ("/v1/completions", b"[1, 2]", 400, "invalid request"),
        ("/v1/completions", {"max_tokens": 5}, 400, "prompt: Field required"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens: Input should be a valid integer"),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"prompt": 5}, 400, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": LIMIT + 1}, 400, f"limit of {LIMIT}"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "greater than or equal to 1"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n=2 is not supported"),
        ("/v1/completions", {"prompt": "word " * 200, "max_tokens": 5}, 400, "max_position_embeddings of 128"),
        ("/v1/completions", {"prompt": [[]]}, 400, "empty prompt"),
        ("/v1/completions", {"prompt": [[40000]]}, 400, "outside the model's vocabulary"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "assistant", "content": "hi"}]},
            400,
            "do not form a Mixtral conversation",
        ),
    ],
)
def test_bad_openai_requests_get_400(served, path, body, status, words):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(served.url + path, timeout=TIMEOUT, headers={"content-type": "application/json"}, **kwargs)
    assert response.status_code == status
    assert words in error(response)
    assert "error" in response.json()  # OpenAI's error shape


@pytest.mark.parametrize(
    "body, words",
    [
        (b"{not json", "not valid JSON"),
        ({"tokens_to_generate": 5}, "prompts argument required"),
        ({"prompts": "hi"}, "prompts is not a list of strings"),
        ({"prompts": []}, "prompts is empty"),
        ({"prompts": ["hi"], "tokens_to_generate": "5"}, "tokens_to_generate must be an integer"),
        ({"prompts": ["hi"], "tokens_to_generate": LIMIT + 1}, f"limit of {LIMIT}"),
        ({"prompts": ["hi"], "tokens_to_generate": 0}, "tokens_to_generate=0 implies logprobs should be True"),
        ({"prompts": ["hi"], "temperature": -1}, "temperature must be"),
        ({"prompts": ["hi"], "top_k": True}, "top_k must be"),
        ({"prompts": ["hi"], "max_len": 5}, "max_len is no longer used"),
        ({"prompts": [""], "add_BOS": False}, "Empty prompts require add_BOS=true"),
    ],
)
def test_bad_megatron_requests_get_400(served, body, words):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.put(served.url + "/api", content=data, timeout=TIMEOUT)
    assert response.status_code == 400
    assert words in response.json()["message"]


def test_large_bodies_get_413_before_being_read(served):
    # a declared 10 MB body: the answer comes after the first 64 KiB, the rest is never sent
    with socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1])), timeout=TIMEOUT) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10485760\r\n\r\n" + b" " * 65536
        )
        answer = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"over this server's limit of 65536 bytes" in answer
    # a chunked 10 MB body (no Content-Length) is cut off once it passes the limit
    chunks = (b"x" * 65536 for _ in range(160))
    response = httpx.put(served.url + "/api", content=chunks, timeout=TIMEOUT)
    assert response.status_code == 413 and "limit" in response.json()["message"]
    still_serving(served)


def test_64_concurrent_clients(served):
    def one(i: int) -> tuple[int, int]:
        body = {
            "prompt": f"Client {i} says",
            "max_tokens": 5 + i % 7,
            "temperature": 0.5,
            "seed": i,
            "stream": i % 2 == 0,
        }
        response = httpx.post(served.url + "/v1/completions", json=body, timeout=120)
        if body["stream"]:
            return response.status_code, int(response.text.endswith("data: [DONE]\n\n"))
        return response.status_code, int(1 <= response.json()["usage"]["completion_tokens"] <= body["max_tokens"])

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert results == [(200, 1)] * 64
    still_serving(served)


def test_client_disconnecting_mid_stream(served):
    dropped = served.scheduler.dropped
    body = {"prompt": "Tell me a long story", "max_tokens": LIMIT, "temperature": 0, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=TIMEOUT) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the first event, then hang up
    still_serving(served)
    # the server noticed: rows whose client left were given up before their max_tokens
    health = httpx.get(served.url + "/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["dropped"] > dropped


def test_api_key(model_dir):
    guarded = Served(model_dir, api_key=KEY)
    try:
        body = {"prompt": "hi", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.post(guarded.url + "/v1/completions", json=body, headers=headers, timeout=TIMEOUT)
            assert response.status_code == 401 and "API key" in error(response)
        response = httpx.put(guarded.url + "/api", json={"prompts": ["hi"]}, timeout=TIMEOUT)
        assert response.status_code == 401 and "API key" in response.json()["message"]
        assert httpx.get(guarded.url + "/health", timeout=TIMEOUT).status_code == 200
        oai = openai.OpenAI(base_url=guarded.url + "/v1", api_key=KEY, timeout=TIMEOUT, max_retries=0)
        assert oai.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=guarded.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        guarded.close()


def test_serve_command_binds_localhost_by_default(model_dir):
    assert build_parser().parse_args(["serve", "--model", "m"]).host == "127.0.0.1"
    with serve_process(model_dir, start_s=60) as (url, process):
        health = httpx.get(f"{url}/health", timeout=2)
        assert health.json()["status"] == "ok"
        reply = httpx.put(
            f"{url}/api",
            json={"prompts": ["Hello"], "tokens_to_generate": 3, "temperature": 0.0},
            timeout=TIMEOUT,
        )
        assert reply.status_code == 200 and reply.json()["text"][0].startswith("Hello")
        # bound to the loopback address only
        port = url.rsplit(":", 1)[1]
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
    assert "serving" in process.stdout.read()
