"""Run the API on uvicorn (in the foreground for `megamesh serve`, in a background thread
for the quickstart, tests and benchmarks); the engine is built by `engine.build_engine`."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from megamesh.errors import ConfigError
from megamesh.serve import connections
from megamesh.serve.connections import Limits


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (0: any free port), held from start-up, before the
    minutes of compiling, until uvicorn serves on it: nothing can take the port meanwhile
    and a busy one fails at once with a clear error."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        s.listen(2048)
    except OSError as e:
        s.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port "
                          "or --host") from None
    s.set_inheritable(True)
    return s


class GracefulServer(uvicorn.Server):
    """uvicorn, shutting down as a served model must: the first SIGTERM or SIGINT starts the
    drain (`Core.drain`: /health not ready, new requests 503, running ones get
    `drain_seconds` to finish, then end with an overloaded_error); then uvicorn closes the
    listener and the connections, and `run` returns (the process exits 0: uvicorn would
    re-raise the signal). A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, core: Any, drain_seconds: float, log: Any = print):
        super().__init__(config)
        self.core, self.drain_seconds, self.log = core, drain_seconds, log
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_task: asyncio.Task | None = None
        self.drain_asked = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:  # the signal handler (main thread)
        if self.drain_asked:
            self.log("stopping now (a second signal)")
            self.force_exit = self.should_exit = True
        else:
            self.begin_drain()

    def begin_drain(self, seconds: float | None = None) -> None:
        """Start the graceful shutdown from any thread (a signal, or a test)."""
        self.drain_asked = True
        if self.loop is None:  # not serving yet: nothing to drain
            self.should_exit = True
            return
        self.loop.call_soon_threadsafe(self._drain, self.drain_seconds if seconds is None else seconds)

    def _drain(self, seconds: float) -> None:
        async def run() -> None:
            try:
                await self.core.drain(seconds, self.log)
            finally:
                self.should_exit = True

        self.drain_task = asyncio.get_running_loop().create_task(run())


def _server(app: Any, sock: socket.socket, limits: Limits | None, drain_seconds: float,
            log: Any) -> GracefulServer:
    core = app.state.core
    limits = limits or Limits()
    config = uvicorn.Config(app, host=sock.getsockname()[0], port=sock.getsockname()[1],
                            log_level="warning", timeout_graceful_shutdown=5,
                            http=connections.protocol(limits, core.metrics),
                            timeout_keep_alive=int(max(1, limits.keep_alive)))
    return GracefulServer(config, core, drain_seconds, log)


def serve(app: Any, sock: socket.socket, limits: Limits | None = None, drain_seconds: float = 30,
          log: Any = print) -> None:
    """Run `app` (from `api.create_app`) on uvicorn in the foreground, on the socket from
    `bind`, until a signal drains it."""
    _server(app, sock, limits, drain_seconds, log).run(sockets=[sock])


@dataclass
class Running:
    server: GracefulServer
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def drain(self, seconds: float) -> None:
        """What SIGTERM does to `megamesh serve`; returns at once (`stop` waits)."""
        self.server.begin_drain(seconds)

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)


def start_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 60,
                    limits: Limits | None = None, log: Any = print) -> Running:
    """Serve `app` from a background thread; returns once it accepts connections."""
    sock = bind(host, port)
    server = _server(app, sock, limits, 30, log)
    server.install_signal_handlers = lambda: None  # not the main thread
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="megamesh-http",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ConfigError(f"the HTTP server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return Running(server, thread, host, bound)
