"""megamesh serve as it is operated (issue 31): graceful drain on SIGTERM, nothing heavy on
the event loop, connection timeouts and a connection cap, honest error accounting.

Servers run on 127.0.0.1, in a thread of this process (on the shared engine, which a test
pauses so that what is in flight does not depend on timing) or as `megamesh serve`
subprocesses where the process itself (signals, exit status, log) is what is tested.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import socket
import sqlite3
import threading
import time

import anthropic
import httpx
import pytest

from conftest import drive, wait_until
from megamesh.serve.api import Settings, create_app
from megamesh.serve.connections import Limits
from megamesh.serve.server import start_in_thread

HELLO = [{"role": "user", "content": "hello"}]
LONG = {"model": "tiny", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "messages": HELLO}


def sse_events(url: str, body: dict, started: threading.Event | None = None) -> list[tuple[str, dict]]:
    """A streamed Messages request read to its end: [(event, data), ...]."""
    out = []
    with httpx.stream("POST", url + "/v1/messages", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[6:])))
                if started is not None and event == "message_start":
                    started.set()
    return out


def status_count(url: str, status: str, route: str | None = None) -> float:
    text = httpx.get(url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("megamesh_http_requests_total{") and f'status="{status}"' in line and \
                (route is None or f'route="{route}"' in line):
            total += float(line.split()[-1])
    return total


def closed_count(url: str, reason: str) -> float:
    """megamesh_http_connections_closed_total for `reason` (0 when never counted)."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'megamesh_http_connections_closed_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


# ----------------------------------------------------------------------------- drain


def test_drain_refuses_new_work_and_lets_running_requests_finish(engine, tmp_path):
    """SIGTERM's drain (issue 31 point 1), in-process with the engine paused so the three
    requests are surely in flight when it starts: /health turns 503 at once (liveness
    stays 200), a new request is a 503 overloaded_error with retry-after, the running
    streams and the non-streamed request finish normally (message_stop), and then the
    server stops by itself."""
    running = start_in_thread(create_app(engine, Settings(batch_db=str(tmp_path / "b.db"))),
                              log=lambda *_: None)
    url = running.url
    try:
        with engine.paused(), cf.ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(sse_events, url, LONG) for _ in range(2)]
            plain = pool.submit(httpx.post, url + "/v1/messages", json=LONG, timeout=120)
            wait_until(lambda: engine.waiting == 3, "3 requests in the engine's queue")
            reqs = list(engine.scheduler.waiting)
            running.drain(600)
            wait_until(lambda: httpx.get(url + "/health").status_code == 503, "/health not ready")
            assert httpx.get(url + "/health").json()["status"] == "draining"
            assert httpx.get(url + "/health/live").status_code == 200
            r = httpx.post(url + "/v1/messages", json=LONG)
            assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
            assert r.headers["retry-after"] == "1" and r.headers["request-id"] == r.json()["request_id"]
            with pytest.raises(anthropic.InternalServerError):  # what the SDK makes of a 503
                anthropic.Anthropic(base_url=url, api_key="k", max_retries=0).messages.create(
                    model="tiny", max_tokens=3, messages=HELLO)
            drive(engine, reqs)
            for f in streams:
                events = f.result(timeout=120)
                assert [e for e, _ in events][-1] == "message_stop"
                assert "error" not in [e for e, _ in events]
            assert plain.result(timeout=120).json()["usage"]["output_tokens"] == 40
        running.thread.join(timeout=60)
        assert not running.thread.is_alive()  # it stopped by itself once drained
    finally:
        running.stop()


def test_drain_deadline_ends_what_is_left_with_an_overloaded_error(engine, tmp_path):
    """At the drain deadline (here 0 s) what is still running ends properly: a stream with
    an `error` event of type overloaded_error, a non-streamed request with a 503
    overloaded_error; a Message Batch's requests are not lost: they stay pending in the
    database and run to the end after a restart on it."""
    db = str(tmp_path / "b.db")
    running = start_in_thread(create_app(engine, Settings(batch_db=db)), log=lambda *_: None)
    url = running.url
    sdk = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
    try:
        with engine.paused(), cf.ThreadPoolExecutor(3) as pool:
            batch = sdk.messages.batches.create(requests=[{"custom_id": f"b-{i}", "params": {
                **{k: v for k, v in LONG.items()}}} for i in range(2)])
            wait_until(lambda: engine.waiting == 2, "the batch's 2 requests in the engine")
            stream = pool.submit(sse_events, url, LONG)
            plain = pool.submit(httpx.post, url + "/v1/messages", json=LONG, timeout=120)
            wait_until(lambda: engine.waiting == 4, "4 requests in the engine's queue")
            reqs = list(engine.scheduler.waiting)
            running.drain(0)
            wait_until(lambda: all(r.cancelled for r in reqs), "the drain ends all 4")
            drive(engine, reqs)
            events = stream.result(timeout=120)
            assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "overloaded_error"
            assert "drain period" in events[-1][1]["error"]["message"]
            r = plain.result(timeout=120)
            assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
        running.thread.join(timeout=60)
        assert not running.thread.is_alive()
    finally:
        running.stop()
    with sqlite3.connect(db) as con:  # interrupted, not canceled or errored: still to do
        states = [s for (s,) in con.execute("SELECT state FROM requests")]
    assert states == ["pending", "pending"], states

    again = start_in_thread(create_app(engine, Settings(batch_db=db)), log=lambda *_: None)
    try:
        sdk = anthropic.Anthropic(base_url=again.url, api_key="k", max_retries=0)
        wait_until(lambda: sdk.messages.batches.retrieve(batch.id).processing_status == "ended",
                   "the batch ends after the restart", 120)
        assert sdk.messages.batches.retrieve(batch.id).request_counts.succeeded == 2
    finally:
        again.stop()


def test_sigterm_lets_streams_finish_and_exits_zero(run_dir, cli_server):
    """`megamesh serve` itself: SIGTERM with streams in flight (and a long drain period):
    every stream ends with message_stop, the process exits 0 (uvicorn alone re-raised the
    signal: -15, and cut every stream after 5 s), and its log holds no traceback."""
    server = cli_server("--model", run_dir, "--max-len", "512", "--dtype", "float32",
                        "--drain-seconds", "300")
    body = {**LONG, "max_tokens": 200}
    with cf.ThreadPoolExecutor(4) as pool:
        started = [threading.Event() for _ in range(4)]
        streams = [pool.submit(sse_events, server.url, body, s) for s in started]
        for s in started:
            assert s.wait(120)
        server.proc.send_signal(signal.SIGTERM)
        for f in streams:
            events = f.result(timeout=240)
            assert events[-1][0] == "message_stop", events[-3:]
    assert server.proc.wait(timeout=120) == 0
    log = "".join(server.log) + server.proc.stdout.read()
    assert "draining: " in log and "drained in" in log and "stopped" in log
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]


# ----------------------------------------------------------------------------- the event loop


@pytest.mark.parametrize("what", ["top-level keys", "keys of a message", "list items"])
def test_a_huge_hostile_body_is_a_400_that_does_not_freeze_the_server(server, what):
    """Issue 31 point 2: a body of 500,000 unknown keys (8.8 MB, under the 32 MB limit)
    used to hold the event loop for 6.3 s (pydantic built 500,000 errors, formatted twice).
    Now validation stops at the first problem and runs in a worker thread: the request
    gets its 400 naming the first problem, and a /health asked meanwhile answers within
    3 s (it was 6.4 s frozen; well under 1 s on a quiet 2-core machine, 1.9 s once with
    the suite's two workers and their subprocesses on the same 2 cores)."""
    keys = {f"k{i:06d}": 1 for i in range(500_000)}
    body = {"top-level keys": {"model": "tiny", "max_tokens": 3, "messages": HELLO, **keys},
            "keys of a message": {"model": "tiny", "max_tokens": 3,
                                  "messages": [{"role": "user", "content": "x", **keys}]},
            "list items": {"model": "tiny", "max_tokens": 3, "messages": list(range(500_000))}}[what]
    raw = json.dumps(body).encode()
    needle = {"top-level keys": "k000000: this field is not supported",
              "keys of a message": "messages.0.k000000: this field is not supported",
              "list items": "messages.0"}[what]
    with httpx.Client(base_url=server.url, timeout=120) as c:
        c.get("/health")  # a kept-alive connection, as a load balancer's probe has
        with cf.ThreadPoolExecutor(1) as pool:
            sent = pool.submit(httpx.post, server.url + "/v1/messages", content=raw,
                               headers={"content-type": "application/json"}, timeout=120)
            worst = 0.0
            while not sent.done():
                t0 = time.perf_counter()
                assert c.get("/health").status_code == 200
                worst = max(worst, time.perf_counter() - t0)
                time.sleep(0.01)
        r = sent.result()
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text[:300]
    assert worst < 3.0, f"/health took {worst:.2f} s while the body was refused"


# ----------------------------------------------------------------------------- connections


def _raw(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Send `data` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return _read_to_close(s)


def _read_to_close(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _error_of(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(x.lower().split(": ", 1) for x in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.fixture
def guarded(engine):
    """A server with short timeouts: 1 s for headers, 1 s of body pause at 1,000 B/s."""
    running = start_in_thread(create_app(engine), log=lambda *_: None, limits=Limits(
        header_timeout=1, body_timeout=1, body_min_rate=1000))
    yield running
    running.stop()


@pytest.fixture
def capped(engine):
    """A server that holds 4 connections at most (and long timeouts: nothing in these
    tests closes by a timer)."""
    running = start_in_thread(create_app(engine), log=lambda *_: None, limits=Limits(
        header_timeout=300, body_timeout=300, keep_alive=300, max_connections=4, evict_after=300))
    yield running
    running.stop()


def test_slow_headers_and_stalled_bodies_are_closed_by_their_timeouts(guarded):
    """Slowloris (headers that never end), a connection that sends nothing, a declared 10 MB
    body that stops after 100 bytes: each gets a 408 timeout_error with a request-id and
    its connection closed, and is counted."""
    port = guarded.port
    before = status_count(guarded.url, "408")
    cases = [b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-slow: ",
             b"",
             b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
             b"content-length: 10000000\r\n\r\n" + b"{" * 100]
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda d: _raw(port, d), cases))
    for raw in answers:
        status, headers, body = _error_of(raw)
        assert status == 408 and body["error"]["type"] == "timeout_error", raw
        assert headers["connection"] == "close" and headers["request-id"] == body["request_id"]
    assert "headers did not arrive" in _error_of(answers[0])[2]["error"]["message"]
    assert "body stalled: 100 bytes" in _error_of(answers[2])[2]["error"]["message"]
    assert status_count(guarded.url, "408") == before + 3
    assert closed_count(guarded.url, "header_timeout") == 2
    assert closed_count(guarded.url, "body_timeout") == 1
    assert status_count(guarded.url, "500") == 0  # the app saw a disconnect, not an error


def test_at_the_connection_cap_health_answers_and_a_request_completes_once_a_slot_frees(capped):
    """4 connections that hold their slot (headers half sent); a 5th may still ask for
    /health, any other request gets a 503 overloaded_error at once with the connection
    closed; once the held connections go, a normal request completes. (The server accepts
    connections in the order they were made, so the 5th finds the 4 there.)"""
    url, port = capped.url, capped.port
    held = []
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")  # and no more
        held.append(s)
    health = _raw(port, b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert health.startswith(b"HTTP/1.1 200"), health
    over = _raw(port, b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
    status, headers, body = _error_of(over)
    assert status == 503 and body["error"]["type"] == "overloaded_error"
    assert "maximum of 4 connections" in body["error"]["message"] and headers["connection"] == "close"
    for s in held:
        s.close()
    sdk = anthropic.Anthropic(base_url=url, api_key="k", max_retries=8)  # retries 503s
    assert sdk.messages.create(model="tiny", max_tokens=3, messages=HELLO).usage.output_tokens >= 1
    assert closed_count(url, "over_cap") >= 1  # (the SDK's first try may have been one too)


def test_an_idle_kept_alive_connection_yields_its_slot_at_the_cap(engine):
    """At the cap, a new connection closes an idle kept-alive one (here idle for any
    time) rather than being refused: 4 clients that each made a request and keep their
    connection open, then a 5th client's request is answered."""
    running = start_in_thread(create_app(engine), log=lambda *_: None, limits=Limits(
        header_timeout=300, keep_alive=300, max_connections=4, evict_after=0))
    url = running.url
    clients = [httpx.Client(base_url=url, timeout=30) for _ in range(4)]
    try:
        for c in clients:
            assert c.get("/health").status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 200
        assert closed_count(url, "idle_evicted") >= 1
        assert closed_count(url, "over_cap") == 0  # nobody was refused
    finally:
        for c in clients:
            c.close()
        running.stop()


def test_http_layer_errors_are_shaped_counted_and_honest(server):
    """Malformed HTTP is a 400 in the API's shape with a request-id, counted; a body with
    both Content-Length and chunked framing is refused and its connection closed; a
    client that leaves mid-body is a 499 (client_closed), not a 500; 405 carries Allow;
    HEAD works where GET does; a 100 KB model id is not echoed back whole."""
    port, url = server.port, server.url
    before_500 = status_count(url, "500")
    status, headers, body = _error_of(_raw(port, b"NOT HTTP AT ALL\r\n\r\n"))
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert headers["request-id"] == body["request_id"] and "malformed HTTP" in body["error"]["message"]

    smuggle = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n"
               b"transfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n0\r\n\r\n")
    status, headers, body = _error_of(_raw(port, smuggle))
    assert status == 400 and "both Content-Length and Transfer-Encoding" in body["error"]["message"]
    assert headers["connection"] == "close"  # and _raw returned: the server closed it

    before_499 = status_count(url, "499", "/v1/messages")
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 1000\r\n\r\n" + b'{"model": ')  # and leaves
    wait_until(lambda: status_count(url, "499", "/v1/messages") == before_499 + 1, "a 499 counted")
    bad_chunk = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                 b"zz\r\nnot a chunk\r\n")
    status, _, body = _error_of(_raw(port, bad_chunk))
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert status_count(url, "500") == before_500  # none of that is a server error

    r = httpx.delete(url + "/health")
    assert r.status_code == 405 and "GET" in r.headers["allow"]
    r = httpx.head(url + "/health")
    assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0
    r = httpx.post(url + "/v1/messages", json={"model": "m" * 100_000, "max_tokens": 3,
                                               "messages": HELLO})
    assert r.status_code == 404 and len(r.text) < 1000 and "100,002 characters" in r.text


def test_at_the_cap_the_longest_wait_for_headers_yields_its_slot(engine):
    """An idle or slowloris flood does not hold the cap: a new connection past it closes
    the connection that has waited longest for whole headers (here any wait counts), so
    a normal request is served while 4 half-sent requests hold every slot."""
    running = start_in_thread(create_app(engine), log=lambda *_: None, limits=Limits(
        header_timeout=300, keep_alive=300, max_connections=4, evict_after=0))
    try:
        held = []
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", running.port))
            s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n")
            held.append(s)
        r = httpx.post(running.url + "/v1/messages", json={**LONG, "max_tokens": 3})
        assert r.status_code == 200, r.text
        held[0].settimeout(30)
        assert held[0].recv(100) == b""  # the oldest was closed (without a word: it sent none)
        assert closed_count(running.url, "evicted_waiting") >= 1
        for s in held:
            s.close()
    finally:
        running.stop()
