"""`megamesh serve` on several hosts (serve.multihost), as processes on localhost: 2
processes x 4 CPU devices, one model over a data x tensor mesh spanning both, against one
process on 8 devices with the same mesh. Real subprocesses, real jax.distributed (gloo
collectives), real HTTP."""

from __future__ import annotations

import concurrent.futures as cf
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import MEGAMESH, cli_env, hold_free_port, start_cli_server, wait_until
from megamesh.serve.multihost import decode, encode

MESH = ["--mesh", "data=2,tensor=4", "--slots", "8", "--max-len", "256"]
PROMPTS = ["def fibonacci(n):", "import numpy as np\n", "class Stack:", "for i in range(10):"]


def ask(url: str, prompt: str, max_tokens: int = 24, timeout: float = 120) -> str:
    r = httpx.post(url + "/v1/messages", timeout=timeout, json={
        "model": "tiny", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200, r.text
    return r.json()["content"][0]["text"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_group(run_dir: Path, coordinator: int) -> tuple[subprocess.Popen, subprocess.Popen, str, list[str]]:
    """A 2-process server: (leader, follower, the leader's URL, the leader's log)."""
    env = {"MEGAMESH_COORDINATOR": f"127.0.0.1:{coordinator}", "MEGAMESH_NUM_PROCESSES": "2",
           "MEGAMESH_SERVE_CONTROL": f"127.0.0.1:{free_port()}"}
    db = str(Path(tempfile.mkdtemp(prefix="megamesh-batches-")) / "b.db")
    cmd = [*MEGAMESH, "serve", "--model", str(run_dir), *MESH, "--port", "0", "--batch-db", db]
    follower = subprocess.Popen(cmd, env=cli_env(4, **env, MEGAMESH_PROCESS_ID="1"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    leader = subprocess.Popen(cmd, env=cli_env(4, **env, MEGAMESH_PROCESS_ID="0"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = leader.stdout.readline()
        if not line and leader.poll() is not None:
            follower.kill()
            raise AssertionError("the leader exited:\n" + "".join(log) + follower.stdout.read())
        log.append(line)
        m = re.search(r"serving on (http://\S+)", line)
        if m:
            # the rest of the leader's output, read on (a full pipe would block it)
            threading.Thread(target=lambda: log.extend(leader.stdout), daemon=True).start()
            return leader, follower, m.group(1), log
    leader.kill()
    follower.kill()
    raise AssertionError("the 2-process server did not come up:\n" + "".join(log))


def test_messages_carry_arrays_and_numbers_only():
    import numpy as np

    args = {"table": np.arange(6, dtype=np.int32).reshape(2, 3), "start": 5, "draws": [1, 0.5, 0, 1.0],
            "masks": {3: np.full(4, -1, np.int32)}, "mask": None, "scalar": np.int32(7)}
    op, back = decode(encode("prefill", args))
    assert op == "prefill" and back["start"] == 5 and back["draws"] == [1, 0.5, 0, 1.0]
    assert (back["table"] == args["table"]).all() and back["table"].dtype == np.int32
    assert list(back["masks"]) == [3] and (back["masks"][3] == -1).all() and back["mask"] is None
    assert back["scalar"] == 7


@pytest.mark.timeout(900)
def test_two_processes_serve_one_model_and_stop_when_a_host_dies(run_dir):
    """Greedy tokens from 2 processes x 4 devices equal one process's on 8 devices (one at a
    time and 4 at once: rows over the data axis, split across the processes); a client that
    goes away (a non-streamed request timing out, a stream closed mid-way) leaves the group
    serving; a follower killed with SIGKILL makes the leader fail /health (503, naming the
    lost process) and exit 1 within seconds, never hang."""
    single = start_cli_server("--model", run_dir, *MESH, devices=8)
    try:
        with hold_free_port() as coordinator:
            leader, follower, url, log = start_group(run_dir, coordinator)
        try:
            want = [ask(single.url, p) for p in PROMPTS]
            assert [ask(url, p) for p in PROMPTS] == want
            with cf.ThreadPoolExecutor(4) as pool:
                assert list(pool.map(lambda p: ask(url, p), PROMPTS)) == want
            # a client gone while its request runs, and a stream closed after a few tokens
            with pytest.raises(httpx.TimeoutException):
                ask(url, "while True:", max_tokens=200, timeout=0.5)
            with httpx.stream("POST", url + "/v1/messages", timeout=120, json={
                    "model": "tiny", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                    "stream": True, "messages": [{"role": "user", "content": "while True:"}]}) as r:
                deltas = 0
                for line in r.iter_lines():
                    deltas += line.startswith("event: content_block_delta")
                    if deltas == 3:
                        break
            wait_until(lambda: httpx.get(url + "/health").json()["active_slots"] == 0,
                       "the cancelled requests' slots freed")
            assert ask(url, PROMPTS[0]) == want[0]
            # a follower dies: the leader fails its probes at once, then exits non-zero
            follower.send_signal(signal.SIGKILL)
            follower.wait(timeout=30)
            seen = []

            def failed() -> bool:
                try:
                    r = httpx.get(url + "/health", timeout=2)
                except httpx.TransportError:
                    return leader.poll() is not None
                seen.append((r.status_code, r.json()))
                return r.status_code == 503

            wait_until(failed, "the leader's /health failing", seconds=30)
            assert leader.wait(timeout=30) == 1
            assert seen and seen[-1][0] == 503 and "process 1 of 2" in seen[-1][1]["error"]
            assert "process 1 of 2 (a host of this model's replica) is gone" in "".join(log)
        finally:
            for p in (leader, follower):
                if p.poll() is None:
                    p.kill()
                    p.wait()
    finally:
        single.stop()


@pytest.mark.slow
def test_a_follower_whose_leader_dies_exits_non_zero(run_dir):
    """The other way round: the leader killed, its follower ends (exit 1) with a clear
    error instead of waiting for steps that will never come."""
    with hold_free_port() as coordinator:
        leader, follower, url, _ = start_group(run_dir, coordinator)
    try:
        assert ask(url, PROMPTS[1], max_tokens=4)
        leader.send_signal(signal.SIGKILL)
        leader.wait(timeout=30)
        rc = follower.wait(timeout=150)  # its own error, or jax's heartbeat on the lost peer
        out = follower.stdout.read()
        assert rc != 0, out
        assert "leader (process 0) went away" in out or "heartbeat" in out.lower(), out[-3000:]
    finally:
        for p in (leader, follower):
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_sigterm_to_the_leader_stops_the_group_cleanly(run_dir):
    """A clean stop: SIGTERM to the leader drains it, then it tells its follower to stop;
    both exit 0 (the follower's closing connection is not taken for a lost host)."""
    with hold_free_port() as coordinator:
        leader, follower, url, log = start_group(run_dir, coordinator)
    try:
        assert ask(url, PROMPTS[2], max_tokens=4)
        leader.send_signal(signal.SIGTERM)
        assert leader.wait(timeout=120) == 0, "".join(log)
        assert follower.wait(timeout=60) == 0
        assert "is gone" not in "".join(log)
        assert "stopped with the leader" in follower.stdout.read()
    finally:
        for p in (leader, follower):
            if p.poll() is None:
                p.kill()
                p.wait()
