"""The HTTP connection layer under the API: what a client can do before the app sees a
request, bounded.

uvicorn's h11 protocol, with (each a `megamesh serve` flag):
- a header timeout: a request's headers must be complete within `header_timeout` seconds
  of the connection opening (or of its first byte, on a kept-alive connection), else a
  408 and the connection is closed (slowloris);
- a body timeout with a minimum rate: no gap in the body longer than `body_timeout`, and
  the whole body within `body_timeout + bytes / body_min_rate` seconds (Apache
  mod_reqtimeout's rule), else a 408 and close (a declared 10 MB body that never comes);
- an idle keep-alive timeout (uvicorn's own);
- a cap on open connections, under the process's open-file limit: a connection past it
  first closes the one that has waited longest (over `evict_after` s) for a request: one
  whose headers are still incomplete or one kept alive and idle (an idle or slowloris
  flood yields its slots; a client between two quick requests keeps its connection); if
  there is none it may still ask for /health (and /health/live) for a few seconds, and
  any other request is a 503 with the connection closed; past the cap and its overflow
  margin a connection is closed at once.
Every answer from this layer (400 for malformed HTTP, 408, 503) has the API's error shape,
a request-id and a count in megamesh_http_requests_total; the connection events are
counted in megamesh_http_connections_closed_total by reason.
"""

from __future__ import annotations

import json
import logging
import resource
import secrets
import time
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from megamesh.serve.core import STATUS_TYPES, Metrics, route_of

OVERFLOW = 64  # connections past the cap that may still ask for /health
OVERFLOW_HEADER_S = 2.0  # how long such a connection has to send its request line
RESERVED_FDS = 256  # open files the rest of the process keeps (weights, jax, sqlite, logs)
HEALTH_PATHS = (b"/health", b"/health/live")


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 60.0  # nginx's client_header_timeout
    body_timeout: float = 60.0  # nginx's client_body_timeout (the longest gap)
    body_min_rate: float = 1024.0  # bytes per second a body must average past body_timeout
    keep_alive: float = 75.0  # nginx's keepalive_timeout
    max_connections: int = 1024
    evict_after: float = 2.0  # at the cap, a connection waiting this long for headers may go


def open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit (as servers do at start)
    and return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


def default_max_connections() -> int:
    """The connection cap that leaves room under the open-file limit for the overflow
    margin and the rest of the process."""
    return max(16, min(8192, open_file_limit() - RESERVED_FDS - OVERFLOW))


class _Counted(logging.Filter):
    """uvicorn logs a warning per malformed request; this layer answers and counts them
    (megamesh_http_connections_closed_total{reason="bad_request"}) instead: a flood of
    them must not flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Invalid HTTP request received."


_COUNTED = _Counted()


def protocol(limits: Limits, metrics: Metrics) -> type[H11Protocol]:
    """uvicorn's `http=` protocol class enforcing `limits`, counting into `metrics`."""
    logger = logging.getLogger("uvicorn.error")
    if _COUNTED not in logger.filters:
        logger.addFilter(_COUNTED)
    return type("GuardedH11", (GuardedH11,), {"limits": limits, "metrics": metrics})


def _error(status: int, message: str, extra: dict[str, str] | None = None) -> tuple[dict[str, str], bytes]:
    """(headers, body) of an answer in the API's error shape, with a request-id, that
    closes the connection."""
    rid = "req_" + secrets.token_hex(12)
    body = json.dumps({"type": "error", "error": {"type": STATUS_TYPES.get(status, "api_error"),
                                                  "message": message}, "request_id": rid}).encode()
    return {"content-type": "application/json", "content-length": str(len(body)),
            "connection": "close", "request-id": rid, **(extra or {})}, body


def _answer(status: int, message: str, extra: dict[str, str] | None = None) -> bytes:
    """`_error` as the bytes of a whole HTTP/1.1 response (written past the app)."""
    headers, body = _error(status, message, extra)
    reason = {400: "Bad Request", 408: "Request Timeout"}[status]
    head = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class GuardedH11(H11Protocol):
    limits: Limits
    metrics: Metrics

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keep_alive
        self.header_timer: Any = None
        self.body_timer: Any = None
        self.body_started = self.body_last = 0.0
        self.body_bytes = 0
        self.overflow = False
        self.waiting_since = 0.0  # when this connection began to wait for a request's headers

    # ------------------------------------------------------------------ connections

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._evict_one():
            if len(self.connections) > self.limits.max_connections + OVERFLOW:
                self._closed("over_cap")
                self.transport.abort()
                return
            self.overflow = True  # may ask for /health only
            self.app_within_cap, self.app = self.app, self._over_cap
        self.metrics.connections.set(len(self.connections))
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)
        self.metrics.connections.set(len(self.connections))

    def _evict_one(self) -> bool:
        """Make room: close the connection that has waited longest, over `evict_after` s,
        for a request (incomplete headers, or kept alive and idle: its client opens a new
        connection when it has a request); False when there is none."""
        now, victim = time.monotonic(), None
        for other in self.connections:
            if other is self or not isinstance(other, GuardedH11) or other.transport.is_closing():
                continue
            if (other.cycle is None or other.cycle.response_complete) and \
                    now - other.waiting_since >= self.limits.evict_after and \
                    (victim is None or other.waiting_since < victim.waiting_since):
                victim = other
        if victim is None:
            return False
        partial = victim.header_timer is not None
        self._closed("evicted_waiting" if partial else "idle_evicted")
        victim._unset_keepalive_if_required()
        victim._cancel_timers()
        victim.transport.close()
        self.connections.discard(victim)
        return True

    async def _over_cap(self, scope: Any, receive: Any, send: Any) -> None:
        """The app of a connection past the cap: /health as usual, anything else a 503."""
        if scope["raw_path"] in HEALTH_PATHS:
            await self.app_within_cap(scope, receive, send)
            return
        self._closed("over_cap")
        self.metrics.requests.labels(route_of(scope["path"]), "503").inc()
        headers, body = _error(503, f"this server holds its maximum of "
                                    f"{self.limits.max_connections:,} connections; retry",
                               {"retry-after": "1"})
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
        await send({"type": "http.response.body", "body": body})

    def _closed(self, reason: str) -> None:
        self.metrics.connections_closed.labels(reason).inc()

    # ------------------------------------------------------------------ reading

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        if self.header_timer is None and (before is None or before.response_complete):
            self._arm_header_timer()  # the first byte of the next request on this connection
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.cycle is not before and self.cycle is not None:  # a request's headers are in
            self._cancel(self.header_timer)
            self.header_timer = None
            if self.conn.their_state is h11.SEND_BODY:
                self.body_started = self.body_last = time.monotonic()
                self.body_bytes = len(self.cycle.body)  # what came with the headers
                self._arm_body_timer(self.limits.body_timeout)
        elif self.body_timer is not None:
            self.body_bytes += len(data)
            self.body_last = time.monotonic()
        if self.body_timer is not None and self.conn.their_state is not h11.SEND_BODY:
            self._cancel(self.body_timer)
            self.body_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.waiting_since = time.monotonic()  # idle until the next request begins

    def _arm_header_timer(self) -> None:
        self.waiting_since = time.monotonic()
        wait = OVERFLOW_HEADER_S if self.overflow else self.limits.header_timeout
        self.header_timer = self.loop.call_later(wait, self._header_timed_out)

    def _header_timed_out(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # still no whole request
            self._closed("header_timeout")
            self._http_answer(408, f"the request's headers did not arrive within "
                                   f"{self.limits.header_timeout:g} s")

    def _arm_body_timer(self, wait: float) -> None:
        self.body_timer = self.loop.call_later(max(wait, 0.01), self._body_check)

    def _body_check(self) -> None:
        self.body_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        now, lim = time.monotonic(), self.limits
        if self.flow.read_paused:  # this server stopped reading (the app is behind): not the client
            self.body_last = now
        deadline = min(self.body_last + lim.body_timeout,
                       self.body_started + lim.body_timeout + self.body_bytes / lim.body_min_rate)
        if now < deadline:
            self._arm_body_timer(deadline - now)
            return
        self._closed("body_timeout")
        self._http_answer(408, f"the request body stalled: {self.body_bytes:,} bytes in "
                               f"{now - self.body_started:.0f} s (this server waits {lim.body_timeout:g} s "
                               f"at most between reads and needs {lim.body_min_rate:g} bytes/s)")

    # ------------------------------------------------------------------ answering here

    def send_400_response(self, msg: str) -> None:  # uvicorn: malformed HTTP
        self._closed("bad_request")
        self._http_answer(400, "malformed HTTP request (" + msg.rstrip(".") + ")")

    def _http_answer(self, status: int, message: str, extra: dict[str, str] | None = None) -> None:
        """Answer at the HTTP layer (shaped, counted) unless the app's response has
        started, and close. The app, if it was reading the request, sees a disconnect
        and counts nothing more."""
        cycle = self.cycle
        route = "other"
        if cycle is not None and not cycle.response_complete:
            cycle.scope["state"]["answered_by_http_layer"] = True
            route = route_of(cycle.scope["path"])
        if cycle is None or not cycle.response_started:
            self.metrics.requests.labels(route, str(status)).inc()
            self.transport.write(_answer(status, message, extra))
        if cycle is not None:
            cycle.disconnected = True
            cycle.message_event.set()
        self._cancel_timers()
        self.transport.close()

    # ------------------------------------------------------------------ timers

    @staticmethod
    def _cancel(timer: Any) -> None:
        if timer is not None:
            timer.cancel()

    def _cancel_timers(self) -> None:
        self._cancel(self.header_timer)
        self._cancel(self.body_timer)
        self.header_timer = self.body_timer = None
