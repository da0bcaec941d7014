"""The serving load generator against a small OpenAI-style server on 127.0.0.1: what it counts and how it times.

The server streams a fixed number of text chunks with a fixed delay between them, then a usage chunk that reports
more tokens than chunks (as a server does when one chunk carries several tokens), so counts that come from usage and
counts that come from chunks tell themselves apart. A test may pick prompts the server answers 500 to, or whose
streams it holds open past the client's timeout."""

import json
import random
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jaxllm import bench

CHUNKS = 4  # text chunks per stream
TOKENS_PER_CHUNK = 2  # what usage reports per chunk
DELAY = 0.02  # seconds before each chunk
FIRST_DELAY = 0.05  # seconds before the first chunk (the "prefill")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    usage = True  # a subclass leaves usage out

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._json(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        if self.server.fail(body["prompt"]):
            self._json(500, {"error": {"message": "injected", "type": "server_error"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        time.sleep(FIRST_DELAY)
        for i in range(CHUNKS):
            if i:
                time.sleep(DELAY)
            self._event({"object": "text_completion", "choices": [{"index": 0, "text": f" w{i}"}]})
        if self.server.hang(body["prompt"]):
            time.sleep(3)  # past every timeout the tests set
        usage = {"prompt_tokens": 7, "completion_tokens": CHUNKS * TOKENS_PER_CHUNK, "total_tokens": 7 + 8}
        self._event({"object": "text_completion", "choices": [], "usage": usage if self.usage else None})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, data):
        self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()

    def _json(self, status, data):
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hung up mid-stream: the timeout tests do so on purpose


def start(handler=Handler, fail=lambda prompt: False, hang=lambda prompt: False, port=0):
    """The server on 127.0.0.1 in threads of this process; `fail` and `hang` pick the prompts it answers 500 to and
    the prompts whose streams it holds open after the text."""
    server = Server(("127.0.0.1", port), handler)
    server.bodies, server.fail, server.hang = [], fail, hang
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture
def server():
    s = start()
    yield s
    stop(s)


def url(server):
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_tokens_come_from_usage_and_timings_are_ordered(server):
    figures = bench.serve(url(server), requests=6, concurrency=(1, 3), prompt_tokens=12, output_tokens=8)
    assert [level["concurrency"] for level in figures["levels"]] == [1, 3]
    for level in figures["levels"]:
        assert (level["completed"], level["failed"]) == (6, 0)
        assert level["output_tokens"] == 6 * CHUNKS * TOKENS_PER_CHUNK  # usage's 8, not the 4 chunks
        assert level["output_tokens_from_usage"] == 6
        assert level["prompt_tokens_mean"] == 7
        # Each request's first chunk comes before its last, so each quantile of TTFT is below the same one of E2E
        # (a loaded machine can push one TTFT past the median E2E, so p99 is compared with p99).
        assert FIRST_DELAY * 1e3 <= level["ttft_ms_p50"] <= level["ttft_ms_p99"]
        assert level["ttft_ms_p50"] < level["e2e_ms_p50"] and level["ttft_ms_p99"] < level["e2e_ms_p99"]
        assert DELAY * 1e3 * 0.5 <= level["itl_ms_p50"] <= level["itl_ms_p99"]
        # TPOT spreads the time after the first chunk over usage's tokens: about 3 gaps / 7 tokens.
        assert 0 < level["tpot_ms_p50"] < level["itl_ms_p50"]
        assert level["output_tokens_per_s"] == pytest.approx(level["output_tokens"] / level["wall_s"], rel=1e-3)
        assert level["requests_per_s"] == pytest.approx(6 / level["wall_s"], rel=1e-3)
    serial, concurrent = figures["levels"]
    assert concurrent["wall_s"] < serial["wall_s"]  # three in flight at once on a threading server


def test_requests_are_streamed_greedy_completions_of_the_asked_size(server):
    bench.serve(url(server), requests=3, concurrency=(1,), prompt_tokens=20, output_tokens=5)
    assert len(server.bodies) == 1 + 3  # the untimed first request, then the level's
    for body in server.bodies:
        assert body["model"] == "tiny"  # the first the server lists
        assert (body["stream"], body["stream_options"], body["max_tokens"]) == (True, {"include_usage": True}, 5)
        assert (body["ignore_eos"], body["temperature"]) == (True, 0.0)
        assert len(body["prompt"].split()) == 19  # a word a token, one left for BOS
    assert len({body["prompt"] for body in server.bodies}) == 4


def test_failed_requests_are_counted_not_timed():
    prompts = bench.serve_prompts(9, 8)  # the level's 8, then the untimed first request's
    failing = {prompts[1], prompts[4], prompts[6]}
    server = start(fail=lambda prompt: prompt in failing)
    try:
        figures = bench.serve(url(server), requests=8, concurrency=(2,), prompt_tokens=8, output_tokens=8)
    finally:
        stop(server)
    level = figures["levels"][0]
    assert (level["failed"], level["completed"]) == (3, 5)
    assert level["output_tokens"] == 5 * CHUNKS * TOKENS_PER_CHUNK
    assert level["output_tokens_per_s"] == pytest.approx(level["output_tokens"] / level["wall_s"], rel=1e-3)
    [(error, count)] = level["errors"].items()
    assert count == 3 and error.startswith("HTTP 500") and "injected" in error
    assert "3 failed: HTTP 500" in bench.serve_table(figures)


def test_without_usage_the_chunks_are_counted():
    server = start(type("NoUsage", (Handler,), {"usage": False}))
    try:
        level = bench.serve(url(server), requests=2, concurrency=(2,), prompt_tokens=8, output_tokens=8)["levels"][0]
    finally:
        stop(server)
    assert level["output_tokens"] == 2 * CHUNKS and level["output_tokens_from_usage"] == 0
    assert level["prompt_tokens_mean"] is None


def test_streams_that_never_end_fail_at_the_timeout_and_the_run_ends():
    prompts = bench.serve_prompts(5, 8)
    server = start(hang=lambda prompt: prompt != prompts[-1])  # all but the untimed first request
    began = time.perf_counter()
    try:
        level = bench.serve(url(server), requests=4, concurrency=(2,), prompt_tokens=8, output_tokens=8,
                            timeout=0.5)["levels"][0]
    finally:
        stop(server)
    assert (level["failed"], level["errors"]) == (4, {"no complete answer within 0.5 s": 4})
    assert 1.0 <= level["wall_s"] < 2.0  # two rounds of two, each cut at 0.5 s
    assert time.perf_counter() - began < 3


def test_a_server_whose_first_request_fails_is_an_error():
    server = start(hang=lambda prompt: True)
    try:
        with pytest.raises(ConnectionError, match="first .*within 0.5 s"):
            bench.serve(url(server), requests=4, concurrency=(2,), prompt_tokens=8, output_tokens=8, timeout=0.5)
    finally:
        stop(server)


def test_poisson_arrivals_spread_the_requests(server):
    level = bench.serve(url(server), requests=6, concurrency=(6,), rate=20.0, prompt_tokens=8,
                        output_tokens=8)["levels"][0]
    assert level["completed"] == 6 and level["rate"] == 20.0
    draw = random.Random(0)  # the first level's arrivals: five exponential gaps, then the last request's stream
    last_arrival = sum(draw.expovariate(20.0) for _ in range(5))
    assert last_arrival + FIRST_DELAY + (CHUNKS - 1) * DELAY <= level["wall_s"] < last_arrival + 1.0


def test_side_by_side_starts_each_server_and_stops_it(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import sys\nprint('no model here', file=sys.stderr)\nsys.exit(3)\n")
    servers = [bench.Server("tiny", (sys.executable, __file__, "{port}"), ready_path="/v1/models"),
               bench.Server("broken", (sys.executable, str(broken), "{port}"))]
    began = time.perf_counter()
    figures = bench.compare(servers, start_timeout=20, requests=2, concurrency=(1, 2), prompt_tokens=8,
                            output_tokens=8)
    tiny, broken_run = figures["runs"]
    assert [level["completed"] for level in tiny["levels"]] == [2, 2]
    assert broken_run["skipped"] == "the server exited with status 3 before it was ready"
    assert "no model here" in broken_run["log"]
    table = bench.serve_table(figures)
    assert table.count("\ntiny ") == 2 and "broken: skipped" in table
    assert time.perf_counter() - began < 15  # the tiny server, which would serve for a minute, was stopped
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past its closed connections' TIME_WAIT
        s.bind(("127.0.0.1", int(tiny["url"].rsplit(":", 1)[1])))  # its port is free again


if __name__ == "__main__":  # the tiny server as a process of its own, on the port given, for a minute at most
    start(port=int(sys.argv[1]))
    time.sleep(60)
