"""Test set-up and shared fixtures.

- 8 fake CPU devices, configured before anything imports jax.
- `corpus`: the small fixed training corpus shipped in tests/data/corpus (generated once
  by tests/data/make_corpus.py), the same on every machine and Python version.
- `cli`: the one way tests run `megamesh` as a real subprocess.
- `cli_server`: `megamesh serve --port 0` as a subprocess: the server binds its own free
  port and prints it, so no port is released between choosing and listening.
- `nan_at_steps`: fault injection for the train step's non-finite guard, from outside the
  product (no flag or branch in the jitted step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

CORPUS = Path(__file__).parent / "data" / "corpus"
MEGAMESH = [sys.executable, "-m", "megamesh.cli"]


@pytest.fixture(scope="session")
def corpus() -> Path:
    return CORPUS


# One persistent jax compilation cache for every `megamesh` subprocess of the session, on
# every xdist worker: the suite trains the same small model in dozens of processes, and a
# warm cache halves each start (the cache returns the same executable, so bit-for-bit
# comparisons still hold). A size limit turns on jax's file lock around each read and
# write: processes of several workers share it.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN:
    COMPILE_CACHE = os.path.join(tempfile.gettempdir(), f"megamesh-test-jax-cache-{_RUN}")
    os.makedirs(COMPILE_CACHE, exist_ok=True)
else:
    COMPILE_CACHE = tempfile.mkdtemp(prefix="megamesh-test-jax-cache-")
COMPILE_CACHE_MAX_SIZE = str(8 * 2**30)
# this process uses it too (compiles of a second or more; and in-process `megamesh train`
# runs leave a cache named in the environment alone instead of pointing jax's at their run
# directory for every later test)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", COMPILE_CACHE)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", COMPILE_CACHE_MAX_SIZE)


def cli_env(devices: int = 8, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = COMPILE_CACHE
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["JAX_COMPILATION_CACHE_MAX_SIZE"] = COMPILE_CACHE_MAX_SIZE
    env.update(extra)
    return env


def run_cli(*args: str, devices: int = 8, timeout: float = 300, cwd: str | Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`megamesh ARGS` in a subprocess on `devices` fake CPU devices."""
    return subprocess.run([*MEGAMESH, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env or cli_env(devices))


# Fault injection from outside the product: `[*SIGNALLED, "train", ...]` runs `megamesh`
# with the train loop's once-a-step agreement between processes (`agree_to_stop`, called
# by every process at every step, before the step's checkpoint decision) patched
# to send this process a signal at its Nth step, when its environment holds
# MEGAMESH_TEST_SIGNAL="KILL@8" (`signal_at("KILL", 8)`): a kill or preemption at an exact
# step whatever the machine's load, instead of a test racing a training process.
SIGNAL_AT = """
import os, runpy, signal, sys
import megamesh.train.loop as loop
name, at = os.environ.get("MEGAMESH_TEST_SIGNAL", "NONE@0").split("@")
real, steps = loop.agree_to_stop, [0]
def counting(flag):
    steps[0] += 1
    if steps[0] == int(at):
        os.kill(os.getpid(), getattr(signal, "SIG" + name))
    return real(flag)
loop.agree_to_stop = counting
sys.argv = ["megamesh", *sys.argv[1:]]
runpy.run_module("megamesh.cli", run_name="__main__")
"""
SIGNALLED = [sys.executable, "-c", SIGNAL_AT]


def signal_at(name: str, call: int) -> dict[str, str]:
    """The environment for a SIGNALLED run: signal SIG`name` at the `call`th step it runs
    (counted from its start or resume, 1 = the first)."""
    return {"MEGAMESH_TEST_SIGNAL": f"{name}@{call}"}


@pytest.fixture(scope="session")
def cli():
    return run_cli


def run_main(*args: str) -> subprocess.CompletedProcess:
    """`megamesh ARGS` through `megamesh.cli.main` in this process (no start-up of a new
    Python and jax): exit code, stdout and stderr as a subprocess would give them."""
    import contextlib
    import io

    from megamesh.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return subprocess.CompletedProcess(["megamesh", *map(str, args)], rc, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def hold_free_port():
    """A free port for a server a subprocess starts (e.g. jax.distributed's coordinator),
    held while the block runs: bound here with SO_REUSEPORT, which gRPC servers also set, so
    the subprocess can bind it while no other program can take it in between."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def held_port():
    """`hold_free_port` until the test ends."""
    with hold_free_port() as port:
        yield port


@dataclasses.dataclass
class CliServer:
    proc: subprocess.Popen
    url: str
    log: list[str]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_cli_server(*args: str, devices: int = 1, timeout: float = 240) -> CliServer:
    """`megamesh serve --port 0 ARGS`; returns once it prints its address (after warm-up).
    Its Message Batches database is a new temporary file unless ARGS name one."""
    if "--batch-db" not in args:
        args = (*args, "--batch-db", str(Path(tempfile.mkdtemp(prefix="megamesh-batches-")) / "b.db"))
    proc = subprocess.Popen([*MEGAMESH, "serve", "--port", "0", *map(str, args)], env=cli_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError("megamesh serve exited:\n" + "".join(log))
        log.append(line)
        m = re.search(r"serving on (http://\S+)", line)
        if m:
            return CliServer(proc, m.group(1), log)
    proc.kill()
    raise AssertionError("megamesh serve did not come up:\n" + "".join(log))


@pytest.fixture
def cli_server():
    """Start `megamesh serve` subprocesses (stopped at the end of the test)."""
    started: list[CliServer] = []

    def start(*args: str, **kw) -> CliServer:
        started.append(start_cli_server(*args, **kw))
        return started[-1]

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def nan_at_steps(monkeypatch):
    """`nan_at_steps(2, 5)`: in-process `megamesh train` runs take a NaN loss (and so NaN
    gradients) at those 0-based steps. The loop then runs, at those steps, the same train
    step built around a poisoned loss: the real guard sees a real non-finite step."""
    import jax.numpy as jnp

    import megamesh.train.loop as loop_mod
    import megamesh.train.step as step_mod

    def install(*steps: int) -> None:
        real_build, real_loss = step_mod.build_train_step, step_mod.loss_fn

        def poisoned_loss(*a, **k):
            loss, parts = real_loss(*a, **k)
            return loss * jnp.nan, parts

        def build(cfg, tc, mesh, **kw):
            good = real_build(cfg, tc, mesh, **kw)
            with monkeypatch.context() as m:
                m.setattr(step_mod, "loss_fn", poisoned_loss)
                bad = real_build(cfg, tc, mesh, **kw)

            def fn(state, batch):
                return (bad if int(state["step"]) in steps else good).fn(state, batch)

            return dataclasses.replace(good, fn=fn)

        monkeypatch.setattr(loop_mod, "build_train_step", build)

    return install


# ----------------------------------------------------------------------------- serving

SMALL = ["--model.d_model=128", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2",
         "--model.d_ff=256", "--model.vocab_size=1024", "--model.max_seq_len=512"]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, corpus, cli) -> Path:
    """A tiny model trained for 4 steps by `megamesh train`: a real checkpoint and tokenizer
    for the serving tests."""
    def train(out: Path) -> None:
        r = cli("train", "--model", "tiny", *SMALL, "--data", corpus, "--steps", "4", "--batch",
                "4", "--seq", "128", "--out", out, "--no-progress", devices=1)
        assert r.returncode == 0, r.stderr

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = tmp_path_factory.mktemp("serve") / "run"
        train(out)
        return out
    # xdist: one run for all workers of this session (their base directories' parent is
    # the session's), trained by the first worker to need it; the tests only read it
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent
    out, done = shared / "serve-run", shared / "serve-run.done"
    with FileLock(str(shared / "serve-run.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a worker that died mid-train
            train(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def engine(run_dir):
    """A serving engine on `run_dir` (16 slots, context 512; its decode and prefill steps
    also compute log-probabilities, up to 5 alternatives), shared by the serving tests."""
    from megamesh.serve.engine import build_engine

    eng = build_engine(str(run_dir), mesh="tensor=1", slots=16, max_len=512, max_queue=128,
                       dtype="float32", max_logprobs=5, log=lambda *_: None)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="session")
def server(engine):
    """The API on `engine`, served by uvicorn from a thread of this process."""
    from megamesh.serve.api import create_app
    from megamesh.serve.server import start_in_thread

    running = start_in_thread(create_app(engine))
    yield running
    running.stop()


@pytest.fixture
def client(server):
    import anthropic

    return anthropic.Anthropic(base_url=server.url, api_key="test", max_retries=0)


def drive(eng, reqs, limit: int = 5000) -> None:
    """Run `eng`'s steps in this thread (the caller holds `eng.paused()`) until every
    request in `reqs` is done: what happens in a step then depends only on the requests,
    not on when the engine's thread or the test's got the CPU."""
    for _ in range(limit):
        if all(r.done for r in reqs):
            return
        eng.step()
    raise AssertionError(f"not done after {limit} engine steps")


def wait_until(cond, what: str, seconds: float = 60) -> None:
    """Wait for another thread (a server's, a client's) to make `cond()` true. The bound
    only stops a test that would hang: no outcome depends on how soon it happens."""
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.01)


