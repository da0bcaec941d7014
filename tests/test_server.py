"""`jaxllm serve`: the OpenAI-compatible server over the real default model and the real Engine, spoken to by
OpenAI's own client and by raw HTTP on 127.0.0.1.

One server runs in this process for the module (uvicorn in a background thread, a small engine); a few tests build
another app over the same engine (an API key, a not-yet-ready engine) or a tiny engine of their own (a full queue).
One test starts `python -m jaxllm serve` and stops it with SIGTERM while it streams.
"""

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from jaxllm.engine import Engine
from jaxllm.generation import generate
from jaxllm.server import build_app

MODEL = "smollm2-test"  # the served name: requests must say it
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
MAX_CONTEXT = 512
TIMEOUT = 120  # seconds any one request may take
SOAK_TIMEOUT = 300  # seconds the soak may take (about 40 on an idle 2-core machine)


class LiveServer:
    """An app served by uvicorn in a background thread, on 127.0.0.1 and a port the OS picked."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)


def wait_until(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds} s"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def engine(smollm2):
    engine = Engine(smollm2, slots=4, max_context=MAX_CONTEXT, decode_steps=4, max_waiting=64).start()
    yield engine
    engine.stop(drain=False)


@pytest.fixture(scope="module")
def server(engine):
    live = LiveServer(build_app(engine, MODEL))
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        yield http


@pytest.fixture(scope="module")
def greedy(smollm2):
    """PROMPT's greedy continuation by jaxllm.generate (24 tokens)."""
    return generate(smollm2, smollm2.tokenizer.encode(PROMPT), 24)


def events(lines) -> list:
    """The JSON payloads of a server-sent event stream, up to [DONE] (which must come last)."""
    out, done = [], False
    for line in lines:
        if not line:
            continue
        assert not done, f"an event after [DONE]: {line!r}"
        assert line.startswith("data: "), line
        if line == "data: [DONE]":
            done = True
        else:
            out.append(json.loads(line[len("data: "):]))
    assert done, "the stream did not end with [DONE]"
    return out


def metric(text: str, name: str) -> float:
    """The value of one sample in Prometheus' text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# ---- completions and chat --------------------------------------------------------------------------------------


def test_greedy_completion_equals_generate(client, smollm2, greedy):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                    # fields we do not use are ignored; null is the default
                                    extra_body={"frequency_penalty": 0, "user": "someone", "top_p": None})
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == MODEL
    [choice] = out.choices
    assert choice.text == greedy.text
    assert choice.index == 0 and choice.logprobs is None
    assert choice.finish_reason == ("stop" if greedy.finish_reason == "eos" else "length")
    assert out.usage.prompt_tokens == len(greedy.prompt_ids)
    assert out.usage.completion_tokens == len(greedy.tokens)
    assert out.usage.total_tokens == len(greedy.prompt_ids) + len(greedy.tokens)


def test_concurrent_greedy_completions_each_equal_generate(server, smollm2):
    """Batch invariance through the API: prompts decoded together in the engine's slots give what each gives
    alone through jaxllm.generate."""
    prompts = [PROMPT, "Once upon a time", "def fibonacci(n):", "The three primary colors are"]
    tokenizer = smollm2.tokenizer

    async def one(http, prompt):
        body = {"model": MODEL, "prompt": tokenizer.encode(prompt), "max_tokens": 24, "temperature": 0}
        response = await http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
            return await asyncio.gather(*(one(http, p) for p in prompts))

    texts = asyncio.run(all_at_once())
    assert texts == [generate(smollm2, tokenizer.encode(p), 24).text for p in prompts]


def test_completion_stream_carries_the_same_text_and_usage_last(client, greedy):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    *text_chunks, last = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == greedy.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    assert last.choices == [] and last.usage.completion_tokens == len(greedy.tokens)
    assert last.usage.prompt_tokens == len(greedy.prompt_ids)


def test_completion_stream_is_server_sent_events_ending_in_done(http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    payloads = events(raw.split("\n"))
    assert all(p["object"] == "text_completion" and "usage" not in p for p in payloads)


def test_chat_completion_renders_the_template_without_a_second_bos(client, smollm2):
    tokenizer = smollm2.tokenizer
    ids = tokenizer.encode(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True), add_special_tokens=False)
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0)
    as_completion = client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    [choice] = out.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == as_completion.choices[0].text != ""
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.completion_tokens == as_completion.usage.completion_tokens


def test_chat_stream_opens_with_the_role_and_ends_with_usage(client):
    reference = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in content) == reference.choices[0].message.content
    assert content[-1].choices[0].finish_reason == reference.choices[0].finish_reason
    assert last.choices == [] and last.usage.completion_tokens == reference.usage.completion_tokens


def test_chat_without_max_tokens_may_use_the_context_left(http, smollm2):
    body = {"model": MODEL, "messages": CHAT, "temperature": 0, "stop": ["."]}  # the stop keeps it short
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "stop"


# ---- stop strings, n, seeds ------------------------------------------------------------------------------------


def stop_across_tokens(tokenizer, tokens) -> tuple[str, str]:
    """(a stop string that begins in one generated token and ends in the next, the text before its first match)."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for i in range(1, len(tokens) - 1):
        before = tokenizer.decode(tokens[:i], skip_special_tokens=True)
        after = tokenizer.decode(tokens[:i + 1], skip_special_tokens=True)
        if len(before) >= 2 and len(after) - len(before) >= 2 and before[-2:].strip():
            stop = before[-2:] + after[len(before):len(before) + 2]
            if text.find(stop) == len(before) - 2:
                return stop, before[:-2]
    raise AssertionError(f"no stop string spans a token boundary in {text!r}")


def test_stop_string_split_across_tokens(client, engine, smollm2, greedy):
    stop, expected = stop_across_tokens(smollm2.tokenizer, greedy.tokens)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "@@@"])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < len(greedy.tokens)
    pieces = [c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=stop, stream=True)]
    assert "".join(pieces) == expected  # nothing of the stop string was shown, even while it was incomplete


def test_stop_string_frees_the_slot_at_once(client, engine, smollm2, greedy):
    """The engine request is cancelled when a stop string matches: the slot frees long before the 400 tokens
    the request could still make."""
    stop, _ = stop_across_tokens(smollm2.tokenizer, greedy.tokens)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, temperature=0, stop=stop,
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "stop"
    wait_until(lambda: engine.running == 0, 3, "the slot is freed")


def test_n_greedy_choices_are_equal(client, greedy):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [greedy.text] * 2
    assert out.usage.completion_tokens == 2 * len(greedy.tokens)
    assert out.usage.prompt_tokens == len(greedy.prompt_ids)


def test_a_seed_reproduces_a_sample_and_n_choices_take_the_next_seeds(client):
    def sample(seed, n=1):
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.2, seed=seed, n=n)
        return [c.text for c in out.choices]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    assert sample(7, n=2) == first + sample(8)


def test_list_prompts_give_n_choices_each_in_order(client, smollm2, greedy):
    out = client.completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time"], max_tokens=6, temperature=0,
                                    n=2)
    texts = [c.text for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert texts[0] == texts[1] and texts[2] == texts[3]
    assert texts[0] == smollm2.tokenizer.decode(greedy.tokens[:6], skip_special_tokens=True)
    assert out.usage.prompt_tokens == sum(len(smollm2.tokenizer.encode(p)) for p in (PROMPT, "Once upon a time"))


# ---- errors ----------------------------------------------------------------------------------------------------

COMPLETION = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4}
CHAT_BODY = {"model": MODEL, "messages": CHAT, "max_tokens": 4}
ERRORS = {  # name: (route, body, status, param, code)
    "invalid JSON": ("/v1/completions", b'{"model": "smollm2-test", "prompt": ', 400, None, None),
    "a body that is not an object": ("/v1/completions", [1, 2], 400, None, None),
    "a wrong-typed field": ("/v1/completions", {**COMPLETION, "max_tokens": "many"}, 400, "max_tokens", None),
    "temperature out of range": ("/v1/completions", {**COMPLETION, "temperature": 3.5}, 400, "temperature", None),
    "top_p out of range": ("/v1/chat/completions", {**CHAT_BODY, "top_p": 0}, 400, "top_p", None),
    "no model": ("/v1/completions", {"prompt": PROMPT}, 400, "model", None),
    "a prompt of the wrong shape": ("/v1/completions", {**COMPLETION, "prompt": [1, "a"]}, 400, "prompt", None),
    "five stop strings": ("/v1/completions", {**COMPLETION, "stop": list("abcde")}, 400, "stop", None),
    "a message without a role": ("/v1/chat/completions", {**CHAT_BODY, "messages": [{"content": "hi"}]}, 400,
                                 "messages[0].role", None),
    "an unknown model": ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, 404, "model", "model_not_found"),
    "an unknown model in chat": ("/v1/chat/completions", {**CHAT_BODY, "model": "gpt-4"}, 404, "model",
                                 "model_not_found"),
    "prompt + max_tokens past the context": ("/v1/completions", {**COMPLETION, "prompt": [1] * 500,
                                                                 "max_tokens": 20}, 400, "prompt",
                                             "context_length_exceeded"),
    "a chat past the context": ("/v1/chat/completions", {**CHAT_BODY, "max_tokens": MAX_CONTEXT}, 400, "messages",
                                "context_length_exceeded"),
    "a token id outside the vocabulary": ("/v1/completions", {**COMPLETION, "prompt": [1, 2, 98765]}, 400, "prompt",
                                          None),
    "an unknown route": ("/v1/embeddings", COMPLETION, 404, None, None),
}


@pytest.mark.parametrize("name", ERRORS)
def test_errors_come_in_openais_envelope(http, name):
    route, body, status, param, code = ERRORS[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(route, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    if name == "a token id outside the vocabulary":
        assert "98765" in error["message"]


def test_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|context"):
        client.completions.create(model=MODEL, prompt=[1] * 500, max_tokens=20)


def test_api_key_guards_every_route_but_health(engine):
    live = LiveServer(build_app(engine, MODEL, api_key="sekret"))
    try:
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
            assert http.get("/health").status_code == 200
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                for response in (http.get("/v1/models", headers=headers), http.get("/metrics", headers=headers),
                                 http.post("/v1/completions", content=b"{oops", headers=headers)):
                    assert response.status_code == 401, response.text
                    assert response.json()["error"]["code"] == "invalid_api_key"
        keyed = openai.OpenAI(base_url=f"{live.url}/v1", api_key="sekret", max_retries=0, timeout=TIMEOUT)
        assert [m.id for m in keyed.models.list()] == [MODEL]
        assert keyed.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{live.url}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        live.close()


def test_health_is_503_until_the_engine_is_ready(engine):
    ready = threading.Event()
    live = LiveServer(build_app(engine, MODEL, ready=ready))
    try:
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
            assert http.get("/health").status_code == 503
            refused = http.post("/v1/completions", json=COMPLETION)
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
            ready.set()
            assert http.get("/health").status_code == 200
            assert http.post("/v1/completions", json=COMPLETION).status_code == 200
    finally:
        live.close()


def test_models_lists_the_served_name(client, engine):
    [model] = client.models.list().data
    assert model.id == MODEL and model.object == "model"


# ---- capacity, disconnects, metrics ----------------------------------------------------------------------------


def test_full_queue_answers_429_with_retry_after(smollm2):
    tiny = Engine(smollm2, slots=1, max_context=128, decode_steps=4, max_waiting=1).start()
    live = LiveServer(build_app(tiny, MODEL))
    long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True}
    try:
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:
            with http.stream("POST", "/v1/completions", json=long) as running:
                next(running.iter_lines())  # its first token: it holds the one slot
                with http.stream("POST", "/v1/completions", json=long) as waiting:
                    assert waiting.status_code == 200
                    wait_until(lambda: tiny.waiting == 1, 10, "the second request waits")
                    full = http.post("/v1/completions", json={**long, "stream": False})
                    assert full.status_code == 429
                    assert int(full.headers["Retry-After"]) >= 1
                    assert full.json()["error"]["code"] == "queue_full"
                    with pytest.raises(openai.RateLimitError):
                        openai.OpenAI(base_url=f"{live.url}/v1", api_key="-", max_retries=0).completions.create(
                            model=MODEL, prompt=PROMPT, max_tokens=4)
        wait_until(lambda: tiny.running == tiny.waiting == 0, 10, "the closed streams are cancelled")
    finally:
        live.close()
        tiny.stop(drain=False)


def test_client_gone_mid_stream_frees_its_slot(server, engine, http):
    before = metric(http.get("/metrics").text, 'jaxllm_requests_finished_total{finish_reason="cancelled"}')
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as own:
        with own.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(lines)
    wait_until(lambda: engine.running == 0, 10, "the slot is freed")
    after = metric(http.get("/metrics").text, 'jaxllm_requests_finished_total{finish_reason="cancelled"}')
    assert after == before + 1


def test_client_gone_mid_request_frees_its_slot(server, engine, http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(TIMEOUT, read=0.3))
    wait_until(lambda: engine.running == 0, 10, "the slot is freed")


def test_metrics_are_prometheus_text(client, http, engine):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    wait_until(lambda: engine.running == engine.waiting == 0, 10, "the engine is idle")
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("jaxllm_requests_running", "jaxllm_requests_waiting", "jaxllm_generation_tokens_total",
                 "jaxllm_prompt_tokens_total", "jaxllm_time_to_first_token_seconds_bucket",
                 "jaxllm_inter_token_latency_seconds_bucket", "jaxllm_requests_finished_total"):
        assert name in text, name
    assert "jaxllm_requests_running 0.0" in text.splitlines()
    assert "jaxllm_requests_waiting 0.0" in text.splitlines()
    assert metric(text, "jaxllm_generation_tokens_total") >= 8
    assert metric(text, "jaxllm_time_to_first_token_seconds_count") >= 1
    assert metric(text, 'jaxllm_requests_finished_total{finish_reason="length"}') >= 1


# ---- a soak ----------------------------------------------------------------------------------------------------


def test_soak_of_mixed_requests_matches_each_alone(server, engine, smollm2, http):
    """~120 requests at random times (at most 16 at once): random prompts of 5-60 tokens, max_tokens 1-24, streamed
    or not, about 1 in 10 dropped midway. Every greedy request that ran to its end says what the same prompt says
    alone; afterwards the engine is idle."""
    rng = random.Random(0)
    tokenizer = smollm2.tokenizer
    vocab = smollm2.params.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(5, 60))] for _ in range(8)]
    alone = [engine.generate([p], 24, stop_ids=engine.eos_ids, timeout=TIMEOUT)[0].tokens for p in prompts]

    def expected(p: int, max_tokens: int) -> tuple[str, int, str]:
        tokens = alone[p][:max_tokens]
        stopped = tokens[-1] in engine.eos_ids
        return tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), "stop" if stopped else "length"

    plan = [(rng.randrange(len(prompts)), rng.randint(1, 24), rng.choice(("stream", "whole")) if rng.random() > 0.1
             else "drop", rng.uniform(0, 0.06)) for _ in range(120)]

    async def one(client, limit, p, max_tokens, mode):
        body = {"model": MODEL, "prompt": prompts[p], "max_tokens": max_tokens, "temperature": 0}
        async with limit:
            if mode == "whole":
                response = await client.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                out = response.json()
                return out["choices"][0]["text"], out["usage"]["completion_tokens"], out["choices"][0]["finish_reason"]
            body.update(stream=True, stream_options={"include_usage": True})
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                lines = []
                async for line in response.aiter_lines():
                    if mode == "drop":
                        return None  # closing the stream midway
                    lines.append(line)
            *chunks, usage = events(lines)
            finish = [c["choices"][0]["finish_reason"] for c in chunks][-1]
            return "".join(c["choices"][0]["text"] for c in chunks), usage["usage"]["completion_tokens"], finish

    async def soak():
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT,
                                     limits=httpx.Limits(max_connections=32)) as client:
            tasks = []
            for p, max_tokens, mode, pause in plan:
                tasks.append(asyncio.create_task(one(client, limit, p, max_tokens, mode)))
                await asyncio.sleep(pause)
            return await asyncio.wait_for(asyncio.gather(*tasks), SOAK_TIMEOUT)

    results = asyncio.run(soak())
    checked = 0
    for (p, max_tokens, mode, _), result in zip(plan, results):
        if mode != "drop":
            assert result == expected(p, max_tokens), (p, max_tokens, mode)
            checked += 1
    assert checked >= 90
    wait_until(lambda: engine.running == engine.waiting == 0, 30, "the engine is idle after the soak")
    assert metric(http.get("/metrics").text, "jaxllm_requests_running") == 0


# ---- the command ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_drains_a_stream_on_sigterm_and_exits_0(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    command = [sys.executable, "-m", "jaxllm", "serve", "--port", str(port), "--slots", "2", "--max-context", "256",
               "--decode-steps", "4"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, "the server exited before it was ready"
            assert time.monotonic() < deadline, "the server was not ready within 180 s"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        body = {"model": "smollm2-135m", "prompt": PROMPT, "max_tokens": 80, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=TIMEOUT) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(lines)
            process.send_signal(signal.SIGTERM)
            payloads = events([first, *lines])
        assert payloads[-1]["usage"]["completion_tokens"] == 80
        assert payloads[-2]["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        log.seek(0)
        print(log.read())
        log.close()


# ---- jaxllm serve --speculate lookup | --self-draft N ----------------------------------------------------------------


@pytest.mark.parametrize("proposer, fewer", [("lookup", 0.8), ("draft", 0.3)])
def test_a_speculating_server_answers_what_the_plain_one_does(smollm2, client, proposer, fewer):
    """`serve --speculate lookup`, or a draft model (here the model itself, which proposes what it will accept): a
    chat, a completion and a streamed completion through the API, concurrently on two slots, carry the greedy text
    of the server without speculation, in fewer decode steps than tokens."""
    how = dict(speculate="lookup") if proposer == "lookup" else dict(draft=smollm2)
    spec = Engine(smollm2, slots=2, max_context=120, decode_steps=4, prefill_chunk=64, max_waiting=8,
                  **how).start()  # 128 cache slots: one attention window to compile
    live = LiveServer(build_app(spec, MODEL))
    try:
        speculating = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
        chat = [{"role": "user", "content": "Repeat this sentence exactly: The committee approved the budget for the "
                                            "new library on Tuesday, after a long debate about parking."}]
        rendered = smollm2.tokenizer.apply_chat_template(chat)  # the same ids as a completion prompt
        want = client.completions.create(model=MODEL, prompt=rendered, max_tokens=40, temperature=0)
        results = {}

        def ask_chat():
            results["chat"] = speculating.chat.completions.create(model=MODEL, messages=chat, max_tokens=40, temperature=0)

        out = speculating.completions.create(model=MODEL, prompt=rendered, max_tokens=40, temperature=0)  # alone
        steps = spec.decode_forwards
        thread = threading.Thread(target=ask_chat)
        thread.start()
        stream = speculating.completions.create(model=MODEL, prompt=rendered, max_tokens=40, temperature=0, stream=True)
        streamed = "".join(c.choices[0].text for c in stream if c.choices)
        thread.join(TIMEOUT)
    finally:
        live.close()
        spec.stop(drain=False)
    assert out.choices[0].text == streamed == results["chat"].choices[0].message.content == want.choices[0].text
    made = out.usage.completion_tokens - 1  # the first token is the prefill's
    print(f"{made} decode tokens in {steps} decode steps")
    assert steps < fewer * made
