"""`qatune serve` on 127.0.0.1, spoken to by the official `openai` client and by raw HTTP: greedy
answers streamed and not streamed equal `qatune generate`; seeds, n, stop strings; 32 requests from
8 concurrent clients; every bad request gets its status and message; queue bound; disconnects."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai
import pytest
from tests.serve_helpers import ServerThread, one_thread, wait_for

from qatune.cli import main
from qatune.data.encode import tokenize_with_eos
from qatune.data.templates import get_template
from qatune.generation.sampling import SamplingConfig, generate_ids
from qatune.model.hf_io import from_pretrained

EOS = 50256
QUESTION = "What is the boiling point of water?"


@pytest.fixture(scope="module", autouse=True)
def _threads():
    yield from one_thread()


@pytest.fixture(scope="module")
def run(make_tiny_run):
    return make_tiny_run("plain")


@pytest.fixture(scope="module")
def server(run):
    with ServerThread(run) as s:
        yield s


@pytest.fixture(scope="module")
def model(run):
    return from_pretrained(run / "export")


def ids_of(text, tokenizer):
    return tokenize_with_eos([text], tokenizer)[0]


def request(url: str, method: str, path: str, body: bytes | None = None, headers=None):
    """Raw HTTP: (status, parsed JSON body)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data)


def test_streamed_and_not_streamed_answers_equal_qatune_generate(server, run, gpt2_tokenizer, capsys):
    client, name = server.client(), server.served.name
    messages = [{"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=name,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    rendered = get_template("plain").render_prompt(QUESTION)  # the run's template, as in training
    completion = client.completions.create(model=name, prompt=rendered, max_tokens=20, temperature=0)
    completion_streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=name, prompt=rendered, max_tokens=20, temperature=0, stream=True)
    )

    assert main(["generate", str(run), "--prompt", QUESTION, "--max-new-tokens", "20"]) == 0
    printed = capsys.readouterr().out.removesuffix("\n")
    cut = "\n[no EOS within 20 tokens]"
    generated = printed.removesuffix(cut)[len(rendered) :]

    answer = chat.choices[0].message.content
    assert answer and answer == streamed == completion.choices[0].text == completion_streamed == generated
    assert chat.choices[0].finish_reason == ("length" if printed.endswith(cut) else "stop")
    assert chat.usage.prompt_tokens == len(ids_of(rendered, server.served.tokenizer))
    assert chat.usage.completion_tokens == 20 and chat.usage.total_tokens == chat.usage.prompt_tokens + 20
    # the stream: the role first, text over several chunks, the finish reason, then the usage alone
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == chat.usage
    assert completion.usage == chat.usage


def test_seeded_sampling_n_choices_and_stop_strings(server, model, gpt2_tokenizer):
    client, name = server.client(), server.served.name
    prompt = "Once upon a time"
    kw = dict(model=name, prompt=prompt, max_tokens=12, temperature=0.9, top_p=0.95, seed=11, n=2)
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    ids = ids_of(prompt, gpt2_tokenizer)
    expected_tokens = 0
    for i, choice in enumerate(first.choices):  # choice i samples with seed + i
        [g] = generate_ids(
            model, [ids], EOS, SamplingConfig(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=11 + i)
        )
        assert choice.text == gpt2_tokenizer.decode(g.ids)
        expected_tokens += len(g.ids) + g.stopped_at_eos  # EOS is a generated token too
    assert first.choices[0].text != first.choices[1].text
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (len(ids), expected_tokens)

    full = client.completions.create(model=name, prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    stop = full[8:12]
    kw = dict(model=name, prompt=prompt, max_tokens=30, temperature=0, stop=["never", stop])
    cut = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert cut.choices[0].text == streamed == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 30


def test_32_requests_from_8_concurrent_clients(server, model, gpt2_tokenizer):
    client, name = server.client(), server.served.name
    template = get_template("plain")
    questions = [f"Question {i}: what is {i} times {i + 3}?" for i in range(32)]
    max_tokens = [6 + i % 11 for i in range(32)]

    def ask(i: int) -> str:
        messages = [{"role": "user", "content": questions[i]}]
        kw = dict(model=name, messages=messages, max_tokens=max_tokens[i], temperature=0)
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True))
        return client.chat.completions.create(**kw).choices[0].message.content

    before = dict(server.batcher.stats)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(32)))
    for i, answer in enumerate(answers):
        prompt = ids_of(template.render_prompt(questions[i]), gpt2_tokenizer)
        [alone] = generate_ids(model, [prompt], EOS, SamplingConfig(max_new_tokens=max_tokens[i]))
        assert answer == gpt2_tokenizer.decode(alone.ids), f"request {i}"
    status, health = request(server.url, "GET", "/health")
    assert status == 200 and health["running"] == 0 and health["waiting"] == 0 and health["errors"] == 0
    decoded = (server.batcher.stats["tokens"] - before["tokens"]) - (
        server.batcher.stats["prefills"] - before["prefills"]
    )
    assert decoded / (server.batcher.stats["steps"] - before["steps"]) > 2  # rows per decode step: batched


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
BAD = [
    (CHAT, b'{"messages": [', 400, "We could not parse the JSON body", None),
    (CHAT, b"[1, 2]", 400, "must be a JSON object", None),
    (
        CHAT,
        {"messages": USER, "frequency_penalty": 0.5},
        400,
        "Unrecognized request argument supplied: frequency_penalty",
        "frequency_penalty",
    ),
    (CHAT, {"messages": USER, "temperature": "hot"}, 400, "Invalid value for 'temperature'", "temperature"),
    (CHAT, {"messages": USER, "max_tokens": 1.5}, 400, "Invalid value for 'max_tokens'", "max_tokens"),
    (CHAT, {"messages": USER, "stream": "yes"}, 400, "Invalid value for 'stream'", "stream"),
    (CHAT, {"messages": USER, "temperature": 3}, 400, "less than or equal to 2", "temperature"),
    (CHAT, {"messages": USER, "max_tokens": 0}, 400, "greater than or equal to 1", "max_tokens"),
    (CHAT, {"messages": []}, 400, "Invalid value for 'messages'", "messages"),
    (CHAT, {}, 400, "Missing required parameter: 'messages'", "messages"),
    (
        CHAT,
        {"messages": [{"role": "robot", "content": "hi"}]},
        400,
        "Invalid value for 'messages.0.role'",
        "messages.0.role",
    ),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "expected a string or an array", "messages.0.content"),
    (
        CHAT,
        {"messages": [*USER, {"role": "assistant", "content": "x"}]},
        400,
        "last message must have role 'user'",
        "messages",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "word " * 200}]},
        400,
        "maximum context length is 128 tokens",
        "messages",
    ),
    (
        CHAT,
        {"messages": USER, "max_tokens": 123},  # plain renders "hi" in 6 tokens: "Question: hi\nAnswer:"
        400,
        "you requested 129 tokens (6 in the messages, 123 in the completion)",
        "max_tokens",
    ),
    (CHAT, {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop strings", "stop"),
    (CHAT, {"messages": USER, "n": 100}, 400, "the server queues at most 64", "n"),
    (CHAT, {"messages": USER, "model": "gpt-4"}, 404, "The model 'gpt-4' does not exist", "model"),
    (COMPLETIONS, {"prompt": ""}, 400, "the prompt is empty", "prompt"),
    (COMPLETIONS, {"prompt": [1, 2, 99999]}, 400, "token id 99999 is outside the vocabulary", "prompt"),
    (COMPLETIONS, {"prompt": [[1], "a", 3]}, 400, "expected a string, an array of strings", "prompt"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 128}, 400, "maximum context length is 128 tokens", "max_tokens"),
]


def test_every_bad_request_gets_its_status_and_message(server):
    for path, body, status, message, param in BAD:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, answer = request(server.url, "POST", path, raw)
        assert "error" in answer, (body, got, answer)
        error = answer["error"]
        assert (got, param) == (status, error["param"]) and message in error["message"], (body, answer)
        assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    status, answer = request(server.url, "GET", CHAT)
    assert status == 405 and answer["error"]["message"] == f"Method not allowed: GET {CHAT}"
    status, answer = request(server.url, "GET", "/v1/nothing")
    assert status == 404 and answer["error"]["message"] == "Unknown URL: GET /v1/nothing"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):  # the client sees the same
        server.client().chat.completions.create(model=server.served.name, messages=USER, max_tokens=500)
    status, health = request(server.url, "GET", "/health")
    assert status == 200 and health["errors"] == 0 and health["running"] == 0


def test_a_full_queue_answers_429_and_the_queued_requests_are_served(run):
    with ServerThread(run, "--max-batch", "1", "--max-queue", "2", start_engine=False) as s:
        client, kw = s.client(), dict(model=s.served.name, messages=USER, max_tokens=5, temperature=0)
        with ThreadPoolExecutor(2) as pool:
            queued = [pool.submit(client.chat.completions.create, **kw) for _ in range(2)]
            wait_for(lambda: len(s.batcher.waiting) == 2, "two queued requests")
            with pytest.raises(openai.RateLimitError, match="The server is busy") as e:
                client.chat.completions.create(**kw)
            assert e.value.status_code == 429
            s.engine.start()
            answers = [f.result(timeout=60) for f in queued]
        assert all(a.choices[0].finish_reason == "length" and a.usage.completion_tokens == 5 for a in answers)


def test_a_client_that_leaves_frees_its_row_and_the_server_goes_on(run):
    with ServerThread(run) as s:
        decode = s.batcher._decode
        s.batcher._decode = lambda: (time.sleep(0.02), decode())  # 100 tokens take 2 s or more
        body = json.dumps({"prompt": "Hello there", "max_tokens": 100, "temperature": 0, "stream": True})
        u = urlparse(s.url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("POST", COMPLETIONS, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: {")
        response.close()  # mid-stream
        conn.close()
        wait_for(lambda: s.batcher.load()["running"] == 0, "the row to be freed", timeout=5)
        assert s.batcher.stats["tokens"] < 50

        slow = s.client(timeout=0.3)  # a non-streaming client that gives up
        with pytest.raises(openai.APITimeoutError):
            slow.completions.create(model=s.served.name, prompt="Hello there", max_tokens=100, temperature=0)
        wait_for(lambda: s.batcher.load()["running"] == 0, "the row to be freed", timeout=5)
        assert s.batcher.stats["tokens"] < 100

        s.batcher._decode = decode
        done = s.client().completions.create(model=s.served.name, prompt="Hello there", max_tokens=10, temperature=0)
        assert done.usage.completion_tokens == 10 and s.batcher.stats["errors"] == 0


def test_cli_serve_checks_the_api_key_and_stops_on_ctrl_c(run):
    env = {**os.environ, "QATUNE_API_KEY": ""}
    cmd = [sys.executable, "-m", "qatune", "serve", str(run), "--port", "0", "--api-key", "s3cret", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()
        assert first.startswith(f"serving {run.name} ") and "on http://127.0.0.1:" in first, proc.stderr.read()
        url = first.split(" on ")[1].strip()
        assert request(url, "GET", "/health")[0] == 200  # open: for load balancers and probes
        status, answer = request(url, "GET", "/v1/models")
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
        assert request(url, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list()] == [run.name]
        reply = client.chat.completions.create(model=run.name, messages=USER, max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "server stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
