"""`megamesh serve` on several hosts: one model sharded over every host's devices.

The same command runs on every host with `jax.distributed`'s environment
(MEGAMESH_COORDINATOR=host:port, MEGAMESH_NUM_PROCESSES=N, MEGAMESH_PROCESS_ID=i, as
`megamesh train` reads it; `megamesh launch --serve` writes it from LeaderWorkerSet's
variables). Every process loads its shards of the weights and holds the KV pages'
shards on its devices, over one global mesh, and runs the same compiled steps.

Process 0, the leader, is the whole server as on one host: HTTP, the scheduler, the
output processor. Each step its engine decides what runs (a prefill chunk of a request,
a decode of the batch: page tables, tokens, positions, sampling rows) and, before
running it, sends that call to every follower over a control connection (TCP, the
coordinator's host at its port + 1, or MEGAMESH_SERVE_CONTROL=host:port); a follower
makes the same runner call, so every process enters the same collectives in the same
order. Only the leader reads the drawn tokens (they come out replicated).

Failures never hang: when a follower's connection closes (its process died: the kernel
closes its socket, SIGKILL included), the leader stops serving at once (/health and
/health/live 503, new requests 503, an error naming the host) and exits non-zero a
moment later, for the orchestrator to recreate the group (LeaderWorkerSet:
RecreateGroupOnPodRestart); a step stuck in a collective with the dead peer does not
keep it alive. A follower whose leader goes away exits non-zero too.

Messages carry numpy arrays and plain numbers only (a JSON header and raw array bytes;
nothing is unpickled).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from megamesh.errors import ConfigError, MegameshError

CONNECT_TIMEOUT_S = 600.0  # followers load and compile at their own pace


class LeaderLost(MegameshError):
    """A follower's leader went away: the group is over."""

    exit_code = 1


def control_address(env: dict[str, str] | None = None) -> tuple[str, int]:
    """Where the leader listens for its followers: MEGAMESH_SERVE_CONTROL=host:port, else the
    jax coordinator's host at its port + 1."""
    env = os.environ if env is None else env
    text = env.get("MEGAMESH_SERVE_CONTROL") or env.get("MEGAMESH_COORDINATOR") or \
        env.get("JAX_COORDINATOR_ADDRESS") or ""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"serving on several hosts needs MEGAMESH_COORDINATOR=host:port (got {text!r})")
    return host, int(port) + (0 if env.get("MEGAMESH_SERVE_CONTROL") else 1)


# ----------------------------------------------------------------------------- messages


def encode(op: str, args: dict[str, Any]) -> bytes:
    """A call as bytes: a JSON header (numbers, lists; arrays by index) and the arrays'
    raw bytes."""
    arrays: list[np.ndarray] = []

    def walk(x: Any) -> Any:
        if isinstance(x, np.ndarray | np.generic):
            arrays.append(np.ascontiguousarray(x))
            return {"__nd__": len(arrays) - 1}
        if isinstance(x, dict):
            return {"__map__": [[walk(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, list | tuple):
            return [walk(v) for v in x]
        return x

    head = json.dumps({"op": op, "args": walk(args),
                       "arrays": [[a.dtype.str, a.shape] for a in arrays]}).encode()
    return b"".join([struct.pack("!I", len(head)), head, *(a.tobytes() for a in arrays)])


def decode(data: bytes) -> tuple[str, dict[str, Any]]:
    (n,) = struct.unpack_from("!I", data)
    head = json.loads(data[4:4 + n])
    arrays, at = [], 4 + n
    for dtype, shape in head["arrays"]:
        dt = np.dtype(dtype)
        size = dt.itemsize * int(np.prod(shape, dtype=np.int64))
        arrays.append(np.frombuffer(data, dt, count=size // dt.itemsize, offset=at).reshape(shape)
                      if shape else np.frombuffer(data, dt, count=1, offset=at)[0])
        at += size

    def walk(x: Any) -> Any:
        if isinstance(x, dict) and "__nd__" in x:
            return arrays[x["__nd__"]]
        if isinstance(x, dict) and "__map__" in x:
            return {walk(k): walk(v) for k, v in x["__map__"]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return head["op"], walk(head["args"])


def _send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack("!Q", len(data)) + data)


def _recv(sock: socket.socket) -> bytes | None:
    """One message, or None when the other side closed the connection."""
    head = _exactly(sock, 8)
    if head is None:
        return None
    return _exactly(sock, struct.unpack("!Q", head)[0])


def _exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


# ----------------------------------------------------------------------------- the leader


class Leader:
    """Process 0's side: accepts the followers' connections, sends each runner call to all
    of them, and watches them (`on_lost(process id)` when one's connection closes)."""

    def __init__(self, address: tuple[str, int], followers: int, on_lost: Callable[[int], None],
                 timeout: float = CONNECT_TIMEOUT_S, log: Callable[[str], None] = print) -> None:
        self.on_lost, self.log = on_lost, log
        self.conns: dict[int, socket.socket] = {}
        self.lost: int | None = None
        self.closing = False  # a clean stop: connections closing are not losses
        self._lock = threading.Lock()
        server = socket.create_server(("", address[1]))
        try:
            deadline = time.monotonic() + timeout
            while len(self.conns) < followers:
                server.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    raise MegameshError(f"{followers - len(self.conns)} of {followers} follower "
                                        f"process(es) did not connect to port {address[1]} within "
                                        f"{timeout:g} s") from None
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                hello = _recv(conn)
                pid = int(hello or b"0")
                if not hello or not 0 < pid <= followers or pid in self.conns:
                    conn.close()  # not one of ours
                    continue
                self.conns[pid] = conn
        finally:
            server.close()
        for pid, conn in self.conns.items():
            threading.Thread(target=self._watch, args=(pid, conn), name=f"megamesh-follower-{pid}",
                             daemon=True).start()

    def _watch(self, pid: int, conn: socket.socket) -> None:
        try:
            while _recv(conn) is not None:  # followers send nothing after their hello
                pass
        except OSError:
            pass
        self._lose(pid)

    def _lose(self, pid: int) -> None:
        with self._lock:
            if self.lost is not None or self.closing:
                return
            self.lost = pid
        self.on_lost(pid)

    def send(self, op: str, **args: Any) -> None:
        data = encode(op, args)
        for pid, conn in list(self.conns.items()):
            try:
                _send(conn, data)
            except OSError:
                self._lose(pid)
        if self.lost is not None:
            raise MegameshError(f"process {self.lost} of this server is gone: serving stopped")

    def close(self) -> None:
        """Tell the followers to stop (a clean shutdown of the group)."""
        self.closing = True
        for conn in self.conns.values():
            try:
                _send(conn, encode("stop", {}))
                conn.close()
            except OSError:
                pass


class BroadcastRunner:
    """The leader's runner: each prefill and decode is sent to the followers, then run
    here (the same calls in the same order on every process). Everything else is the
    local runner's."""

    def __init__(self, runner: Any, leader: Leader) -> None:
        self._runner, self._leader = runner, leader
        self._last: Any = None  # the last decode's output (a follower holds its own)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def prefill(self, table_row, tokens, start, draws, mask=None):
        self._leader.send("prefill", table_row=table_row, tokens=np.asarray(tokens, np.int32),
                          start=int(start), draws=list(draws), mask=mask)
        return self._runner.prefill(table_row, tokens, start, draws, mask)

    def decode(self, table, tokens, positions, rows, masks, prev=None, src=None, want_logprobs=False):
        if prev is not None and prev is not self._last:
            raise MegameshError("a decode fed from an older decode's tokens: the followers hold the "
                                "last one only")
        self._leader.send("decode", table=table, tokens=tokens, positions=positions,
                          rows=[list(r) for r in rows], masks=masks, prev=prev is not None, src=src,
                          want_logprobs=bool(want_logprobs))
        self._last = self._runner.decode(table, tokens, positions, rows, masks, prev=prev, src=src,
                                         want_logprobs=want_logprobs)
        return self._last


# ----------------------------------------------------------------------------- a follower


def follow(runner: Any, address: tuple[str, int], process_id: int,
           timeout: float = CONNECT_TIMEOUT_S, log: Callable[[str], None] = print) -> None:
    """A follower's whole life after warm-up: connect to the leader and make each call it
    sends until it says stop (returns) or goes away (LeaderLost)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection(address, timeout=10)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise LeaderLost(f"the leader's control port {address[0]}:{address[1]} did not answer "
                                 f"within {timeout:g} s ({e})") from None
            time.sleep(0.5)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _send(sock, str(process_id).encode())
    log(f"process {process_id}: following the leader at {address[0]}:{address[1]}")
    last = None
    with sock:
        while True:
            data = _recv(sock)
            if data is None:
                raise LeaderLost("the leader (process 0) went away: this replica's group is over")
            op, a = decode(data)
            if op == "stop":
                return
            if op == "prefill":
                runner.prefill(a["table_row"], a["tokens"], a["start"], tuple(a["draws"]), a["mask"])
            elif op == "decode":
                last = runner.decode(a["table"], a["tokens"], a["positions"], [tuple(r) for r in a["rows"]],
                                     a["masks"], prev=last if a["prev"] else None, src=a["src"],
                                     want_logprobs=a["want_logprobs"])
            else:
                raise MegameshError(f"unknown call {op!r} from the leader")
