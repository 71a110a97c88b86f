"""`megamesh serve`: the continuous-batching engine behind the Anthropic Messages API and
the OpenAI chat-completions API."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from megamesh.errors import ConfigError
from megamesh.model.specs import WEIGHT_FORMATS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the Anthropic Messages API (and OpenAI's)",
                       description="Serve a megamesh training run (the --out of `megamesh train`) or a "
                       "Hugging Face directory on 127.0.0.1 by default.")
    p.add_argument("--model", required=True, help="training run directory or Hugging Face directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, "
                   "printed in the 'serving on' line)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept only these keys (x-api-key or Authorization: Bearer); repeatable")
    p.add_argument("--name", help="model id clients send (default: the model's name)")
    p.add_argument("--alias", action="append", default=[], metavar="ID",
                   help="another model id this model answers to (repeatable; e.g. the id a "
                   "client such as Claude Code sends); listed by /v1/models")
    p.add_argument("--any-model", action="store_true",
                   help="answer whatever model id a request names (a proxy in front of one "
                   "model); responses name the id the request used")
    p.add_argument("--max-logprobs", type=int, default=20,
                   help="OpenAI logprobs: each output token's log-probability and up to this many "
                   "alternatives (top_logprobs; default 20, OpenAI's most); 0 turns them off, and "
                   "the decode step then computes none")
    p.add_argument("--unknown-betas", choices=("reject", "ignore"), default="reject",
                   help="an anthropic-beta header value this server does not know: reject (a 400, "
                   "as the Messages API does; default) or ignore (counted in /metrics, logged once)")
    p.add_argument("--mesh", help="serving layout such as tensor=4 (default: all devices on tensor)")
    p.add_argument("--slots", type=int, default=16,
                   help="concurrent sequences (rows of the decode batch; default 16)")
    p.add_argument("--kv-pages", type=int,
                   help="KV cache pages to allocate (default: slots x max-len / page-size, the "
                   "memory of a full-length sequence per slot); requests hold pages for the "
                   "positions they have, so more slots fit in the same memory")
    p.add_argument("--page-size", type=int, default=16,
                   help="positions per KV page (a divisor of 64; default 16)")
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prompt tokens prefilled per engine step (default 2048): a longer prompt is "
                   "prefilled in chunks between the decode steps of the running requests")
    p.add_argument("--scheduling", default="fair", choices=("fair", "fcfs"),
                   help="fair (default): waiting requests are admitted from the API key with the "
                   "fewest running, and a key holding every slot is preempted for another; "
                   "fcfs: first come, first served (a flood from one key delays everyone)")
    p.add_argument("--kv-reserve-tokens", type=int, default=256,
                   help="positions of growth per running request that admitting new requests "
                   "leaves free in the KV pages (default 256; 0: admit into every free page and "
                   "preempt when a running request needs one)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not reuse the KV pages of prompt prefixes seen before")
    p.add_argument("--cache-min-tokens", type=int, default=1024,
                   help="the shortest prompt prefix a cache_control breakpoint writes to the "
                   "prompt cache, as the Messages API reports it (default 1024)")
    p.add_argument("--max-len", type=int, help="context in tokens: prompt + output (default: the model's)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting for a slot before 529 overloaded (default 256)")
    p.add_argument("--max-concurrent-per-key", type=int, default=256,
                   help="requests in flight per API key before 429 (default 256)")
    p.add_argument("--max-output-tokens", type=int, default=0,
                   help="cap every request's output at this many tokens, whatever its max_tokens "
                   "asks (it then ends with stop_reason max_tokens; default 0: no cap)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit (default 32 MB)")
    p.add_argument("--input-tpm", type=int, default=0,
                   help="input tokens per minute per API key before 429 (default 0: no limit)")
    p.add_argument("--output-tpm", type=int, default=0,
                   help="output tokens per minute per API key before 429, max_tokens reserved at "
                   "admission and the unused part given back (default 0: no limit)")
    p.add_argument("--batch-db", default=None,
                   help="SQLite file of the Message Batches API: batches and results survive a "
                   "restart (default: megamesh-batches.db in the served training run's directory; "
                   "for a Hugging Face directory, in the working directory)")
    p.add_argument("--batch-concurrency", type=int, default=0,
                   help="batch requests in the engine at once (default 0: --slots); they run at a "
                   "lower priority than interactive requests")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="weight dtype (default: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="bf16",
                   help="the layers' matmul weights: bf16 (as loaded, in --dtype) or quantized once "
                   "at load, per output channel, to fp8 (e4m3) or int8: each decode step reads "
                   "1 byte per weight instead of 2 (weight-only: activations stay in --dtype; "
                   "the embedding and output head are not quantized)")
    p.add_argument("--kv-dtype", choices=("float32", "bfloat16"),
                   help="KV page dtype (default: the weights'); bfloat16 under float32 weights "
                   "holds twice the positions in the same memory (keys and values rounded to "
                   "bf16; attention still computes in float32). Not for XLA:CPU: its bf16 "
                   "conversions made decode attention 16x slower (measured, BENCHMARKS.md)")
    ops = p.add_argument_group("operation", "shutting down and bounding connections")
    ops.add_argument("--drain-seconds", type=float, default=30,
                     help="on SIGTERM/SIGINT: /health turns 503 and new requests are refused at once, "
                     "running ones get this long to finish (default 30, Kubernetes' default "
                     "grace period) and what is left then ends with an overloaded_error; exit 0. "
                     "A second signal stops at once")
    ops.add_argument("--header-timeout", type=float, default=60,
                     help="seconds for a request's headers to arrive, else 408 and close (default 60)")
    ops.add_argument("--body-timeout", type=float, default=60,
                     help="the longest pause in a request body, else 408 and close (default 60)")
    ops.add_argument("--body-min-rate", type=float, default=1024,
                     help="bytes per second a body must average after --body-timeout (default 1024)")
    ops.add_argument("--keep-alive-timeout", type=float, default=75,
                     help="seconds an idle kept-alive connection stays open (default 75)")
    ops.add_argument("--max-connections", type=int, default=0,
                     help="open connections at most; past it an idle one is closed, /health is "
                     "still answered and other requests get a 503 (default 0: the open-file "
                     "limit less a reserve)")
    p.set_defaults(run=run)


def default_batch_db(model: str) -> str:
    """The Message Batches database beside the training run served (not wherever the server
    was started); for a Hugging Face directory, in the working directory."""
    from megamesh.rundir import run_dir

    out = run_dir(model)
    return str(out / "megamesh-batches.db") if out is not None else "megamesh-batches.db"


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    from megamesh.serve.engine import check_engine_flags

    # the engine's settings, checked where the engine checks them, before anything starts
    check_engine_flags(slots=args.slots, max_len=args.max_len, page_size=args.page_size,
                       kv_pages=args.kv_pages, reserve_tokens=args.kv_reserve_tokens,
                       scheduling=args.scheduling, weights=args.weights,
                       max_logprobs=args.max_logprobs, dtype=args.dtype, kv_dtype=args.kv_dtype,
                       max_queue=args.max_queue, prefill_chunk=args.prefill_chunk)
    for flag in ("max_concurrent_per_key", "cache_min_tokens"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not allowed: at least 1")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port {args.port} is not allowed: 0..65535 (0: any free port)")
    for flag in ("input_tpm", "output_tpm"):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not allowed: >= 0 "
                              "(0: no limit)")
    if args.max_output_tokens < 0:
        raise ConfigError(f"--max-output-tokens {args.max_output_tokens} is not allowed: >= 0 "
                          "(0: no cap)")
    if args.batch_concurrency < 0:
        raise ConfigError(f"--batch-concurrency {args.batch_concurrency} is not allowed: >= 0 "
                          "(0: --slots)")
    if args.batch_db is None:
        args.batch_db = default_batch_db(args.model)
    for alias in args.alias:
        if not alias.strip() or len(alias) > 256:
            raise ConfigError(f"--alias {alias!r} is not allowed: a model id of 1 to 256 characters")
    if args.max_body_mb <= 0:
        raise ConfigError(f"--max-body-mb {args.max_body_mb} is not allowed: > 0")
    if not 0 <= args.drain_seconds <= 86400:
        raise ConfigError(f"--drain-seconds {args.drain_seconds} is not allowed: 0..86400")
    for flag in ("header_timeout", "body_timeout", "body_min_rate", "keep_alive_timeout"):
        if not getattr(args, flag) > 0:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not allowed: > 0")
    if args.max_connections < 0:
        raise ConfigError(f"--max-connections {args.max_connections} is not allowed: >= 0 (0: "
                          "from the open-file limit)")
    from megamesh.serve.connections import Limits, default_max_connections

    limits = Limits(header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                    body_min_rate=args.body_min_rate, keep_alive=args.keep_alive_timeout,
                    max_connections=args.max_connections or default_max_connections())
    from megamesh.train.distributed import initialize_from_env

    # on several hosts (MEGAMESH_COORDINATOR/..._NUM_PROCESSES/..._PROCESS_ID): one model over
    # every host's devices; process 0 serves HTTP, the others follow (serve.multihost)
    multi = initialize_from_env()
    import jax

    from megamesh.serve.engine import build_engine
    from megamesh.serve.server import bind, serve

    leading = not multi or jax.process_index() == 0
    sock = bind(args.host, args.port) if leading else None  # held while the engine compiles
    port = sock.getsockname()[1] if sock else None
    from megamesh.serve.api import Settings, create_app

    engine = build_engine(args.model, mesh=args.mesh, slots=args.slots, max_len=args.max_len,
                          max_queue=args.max_queue, dtype=args.dtype, name=args.name,
                          page_size=args.page_size, kv_pages=args.kv_pages,
                          prefix_cache=args.prefix_cache, prefill_chunk=args.prefill_chunk,
                          reserve_tokens=args.kv_reserve_tokens, kv_dtype=args.kv_dtype,
                          scheduling=args.scheduling, weights=args.weights,
                          max_logprobs=args.max_logprobs)
    m, runner = engine.model, engine.runner
    print(f"model {m.name!r} from {m.source}: {engine.slots} slots, context {engine.max_len} "
          f"tokens (KV cache {engine.kv_pages:,} pages of {engine.page_size} = "
          f"{engine.kv_bytes / 2**20:,.1f} MiB of {engine.kv_dtype}, weights {engine.dtype}"
          f"{'' if engine.weights == 'bf16' else ', layers in ' + engine.weights}: "
          f"{engine.weight_bytes / 2**20:,.1f} MiB); "
          "compiling "
          f"prefill buckets {runner.buckets} and decode batches {runner.batch_buckets} "
          "(attention over each step's real length) ...",
          flush=True)
    if not leading:
        return _follow(engine)
    print(f"warm-up done in {engine.start():.1f}s", flush=True)
    leader, failure = _lead(engine) if multi else (None, None)
    settings = Settings(api_keys=frozenset(args.api_key), max_body_bytes=int(args.max_body_mb * 2**20),
                        max_concurrent_per_key=args.max_concurrent_per_key,
                        input_tokens_per_minute=args.input_tpm, output_tokens_per_minute=args.output_tpm,
                        cache_min_tokens=args.cache_min_tokens, batch_db=args.batch_db,
                        batch_concurrency=args.batch_concurrency, aliases=tuple(args.alias),
                        any_model=args.any_model, max_output_tokens=args.max_output_tokens,
                        unknown_betas=args.unknown_betas)
    app = create_app(engine, settings)
    if failure is not None:
        failure.core = app.state.core
    if engine.extrapolated:
        print(f"warning: --max-len {engine.max_len:,} is past the {engine.trained_len:,} tokens "
              f"{m.name!r} was trained on: positions past it are extrapolated (RoPE as its config "
              f"has it{', with its rope_scaling' if m.cfg.rope_scaling else ''}); quality there is "
              "not what the model was trained for", flush=True)
    print(f"Message Batches in {Path(args.batch_db).resolve()}", flush=True)
    print(f"connections: at most {limits.max_connections:,}; headers within "
          f"{limits.header_timeout:g} s, body pauses under {limits.body_timeout:g} s and at least "
          f"{limits.body_min_rate:g} B/s, idle keep-alive {limits.keep_alive:g} s; on SIGTERM, "
          f"{args.drain_seconds:g} s to drain", flush=True)
    print(f"serving on http://{args.host}:{port}  (POST /v1/messages, /v1/chat/completions; "
          "GET /v1/models, /health, /health/live, /metrics)", flush=True)
    try:
        serve(app, sock, limits, args.drain_seconds)
    finally:
        engine.stop()
        if leader is not None:
            leader.close()
    print("stopped", flush=True)
    return 0


def _follow(engine: Any) -> int:
    """A follower process of a multi-host server: warm up as the leader does, then make
    the leader's calls until it stops (exit 0) or goes away (LeaderLost: exit 1)."""
    import jax

    from megamesh.serve.multihost import control_address, follow

    t0 = time.perf_counter()
    engine.runner.warm_up()
    print(f"process {jax.process_index()}: warm-up done in {time.perf_counter() - t0:.1f}s", flush=True)
    try:
        follow(engine.runner, control_address(), jax.process_index())
    finally:
        engine.runner.stop()
    print(f"process {jax.process_index()}: stopped with the leader", flush=True)
    return 0


def _lead(engine: Any) -> tuple[Any, SimpleNamespace]:
    """Process 0 of a multi-host server: wait for the followers, then send them every step
    (`serve.multihost.BroadcastRunner`). A follower gone stops this server: /health fails
    at once, and the process exits 1 a moment later (never a hang on the dead peer)."""
    import jax

    from megamesh.serve.multihost import BroadcastRunner, Leader, control_address

    failure = SimpleNamespace(core=None)  # the request core, once the app exists

    def lost(pid: int) -> None:
        why = (f"process {pid} of {jax.process_count()} (a host of this model's replica) is gone; "
               "this server cannot run a step without it")
        print(f"megamesh serve: error: {why}: stopping", file=sys.stderr, flush=True)
        if failure.core is not None:
            failure.core.failed = why
        # /health says so for a moment (probes, load balancers), then the process ends
        threading.Timer(LOST_EXIT_AFTER_S, os._exit, args=(1,)).start()

    address = control_address()
    print(f"waiting for {jax.process_count() - 1} follower process(es) on port {address[1]} ...",
          flush=True)
    leader = Leader(address, jax.process_count() - 1, lost)
    engine.runner = BroadcastRunner(engine.runner, leader)
    print(f"{jax.process_count()} processes, {len(jax.devices())} devices: serving one model", flush=True)
    return leader, failure


LOST_EXIT_AFTER_S = 2.0  # /health fails this long before a server that lost a host exits
