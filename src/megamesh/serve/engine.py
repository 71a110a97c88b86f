"""The continuous-batching engine: one thread that owns the model and loops. Each step
frees the slots of finished or cancelled requests, admits waiting requests into free
slots and prefills them within a token budget (which also draws their first token), then
dispatches one decode step for every running request and hands each its next token.
Requests join and leave the running batch at every step.

The engine is the coordinator of four parts (as vLLM keeps scheduler, KV cache manager,
model runner and output processor apart):

- `kvpool.PagePool`: the KV pages' bookkeeping and the prefix cache (reference counts,
  a hash chain per page of a prompt, LRU eviction of cached pages nobody holds);
- `scheduler.Scheduler`: the fair queue per tenant, admission with the reserve,
  preemption (recompute) for pages or fairness, the slots and their page tables;
- `runner.Runner`: the weights, the KV pages on the devices and the compiled prefill and
  decode steps (bucketed shapes, warm-up, the device-side token feed);
- `output.OutputProcessor`: detokenizing, stop strings, grammar matchers,
  log-probabilities, the events a caller receives.

The pool, the scheduler and the output processor are pure Python (no jax).

Chunked prefill: a step prefills at most `max_prefill_tokens` prompt tokens (continuing
prompts first, then new admissions), so a long prompt is prefilled over several steps,
each followed by a decode step for the running requests; rows whose prompt is still
being prefilled sit out the decode (their table row reads as scratch). Prefix caching:
a request whose prompt begins with pages already cached reuses them and prefills only the
rest; `Request.cached_tokens` says how many prompt tokens were read from the cache.

Overlap: the decode step dispatched last is left in flight (`_Inflight`) while the host
streams the tokens of the one before it; the next decode feeds a row the token still on
the device. Tokens reach the caller through `emit(Event)` as they are produced, from the
engine thread: the HTTP layer forwards them to its event loop.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from megamesh.errors import ConfigError, MegameshError
from megamesh.model.kvcache import DEFAULT_PAGE, SCRATCH, pages_per_seq
from megamesh.model.specs import WEIGHT_FORMATS
from megamesh.serve.kvpool import PagePool
from megamesh.serve.load import ServedModel, load_model
from megamesh.serve.output import MAX_LOGPROBS, Finish, OutputProcessor, row_logprobs
from megamesh.serve.request import (  # noqa: F401 -- the engine's API: callers import them here
    BadGrammar,
    Event,
    QueueFull,
    Request,
    SamplingParams,
    TooLong,
)
from megamesh.serve.runner import Drawn, Runner
from megamesh.serve.scheduler import SCHEDULING, Scheduler
from megamesh.sharding.logical import parse_layout
from megamesh.sharding.mesh import make_mesh
from megamesh.sharding.rules import param_shardings, strategy


@dataclass
class _Inflight:
    """A decode step on the device whose tokens the host has not read yet."""
    drawn: Drawn
    rows: dict[Request, tuple[int, int]]  # request -> (its row, its admission number then)


def check_engine_flags(*, slots: int, max_len: int | None, page_size: int, kv_pages: int | None,
                       reserve_tokens: int, scheduling: str, weights: str, max_logprobs: int,
                       dtype: str | None, kv_dtype: str | None, max_queue: int,
                       prefill_chunk: int) -> int | None:
    """Every engine setting checked in one place (ConfigError naming the flag and what is
    allowed): by `megamesh serve` before it binds or loads anything, by `build_engine`
    before a model is loaded (`max_len` None when it is the model's; `dtype` None: the
    platform's default) and again once the context is known (`Engine`). Returns the KV
    pages to allocate (default: slots x max_len / page_size, the memory of a dense cache
    with a row per slot; None while max_len is not known)."""
    for flag, value in (("--slots", slots), ("--max-queue", max_queue), ("--prefill-chunk", prefill_chunk)):
        if value < 1:
            raise ConfigError(f"{flag} {value} is not allowed: at least 1")
    if max_len is not None and max_len < 2:
        raise ConfigError(f"--max-len {max_len} is not allowed: at least 2")
    if page_size < 1 or 64 % page_size:
        raise ConfigError(f"--page-size {page_size} is not allowed: a divisor of 64 "
                          "(1, 2, 4, 8, 16, 32 or 64)")
    if max_len is not None:
        per_seq = pages_per_seq(max_len, page_size)
        kv_pages = slots * per_seq if kv_pages is None else kv_pages
        if kv_pages < per_seq:
            raise ConfigError(f"--kv-pages {kv_pages} is not allowed: at least {per_seq} (one request "
                              f"of --max-len {max_len} tokens in pages of {page_size})")
    if reserve_tokens < 0:
        raise ConfigError(f"--kv-reserve-tokens {reserve_tokens} is not allowed: at least 0")
    if scheduling not in SCHEDULING:
        raise ConfigError(f"--scheduling {scheduling!r} is not allowed: one of {', '.join(SCHEDULING)}")
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"--weights {weights!r} is not allowed: one of {', '.join(WEIGHT_FORMATS)}")
    if not 0 <= max_logprobs <= MAX_LOGPROBS:
        raise ConfigError(f"--max-logprobs {max_logprobs} is not allowed: 0 to {MAX_LOGPROBS}")
    for flag, value in (("--dtype", dtype), ("--kv-dtype", kv_dtype or dtype)):
        if value is not None and value not in ("float32", "bfloat16"):
            raise ConfigError(f"{flag} {value!r} is not allowed: float32 or bfloat16")
    return kv_pages


class Engine:
    def __init__(self, model: ServedModel, mesh: Any, *, slots: int = 16, max_len: int | None = None,
                 max_queue: int = 256, dtype: str = "bfloat16", max_prefill_tokens: int = 2048,
                 page_size: int = DEFAULT_PAGE, kv_pages: int | None = None,
                 prefix_cache: bool = True, reserve_tokens: int = 256, kv_dtype: str | None = None,
                 scheduling: str = "fair", weights: str = "bf16", max_logprobs: int = 0,
                 log: Callable[[str], None] = print):
        """`kv_pages`: KV pages (of `page_size` positions) to allocate, default slots x
        max_len / page_size; `reserve_tokens`: positions of growth per running request
        that admission leaves free (`Scheduler.reserve`); `kv_dtype`: of the KV pages
        (default: `dtype`, the weights'); `scheduling`: "fair" across tenants or "fcfs";
        `weights`: "bf16" or "fp8" / "int8" (`Runner`); `max_logprobs`: the most
        alternatives a request may ask log-probabilities of (0: none; the decode step then
        computes no log-probabilities at all)."""
        cfg = model.cfg
        # past the trained length positions are extrapolated (RoPE as the config has it):
        # the operator's choice, said at start-up (`extrapolated`)
        self.max_len = max_len or cfg.max_seq_len
        self.trained_len = cfg.max_seq_len
        self.kv_pages = check_engine_flags(slots=slots, max_len=self.max_len, page_size=page_size,
                                           kv_pages=kv_pages, reserve_tokens=reserve_tokens,
                                           scheduling=scheduling, weights=weights,
                                           max_logprobs=max_logprobs, dtype=dtype, kv_dtype=kv_dtype,
                                           max_queue=max_queue, prefill_chunk=max_prefill_tokens)
        self.cfg, self.mesh, self.log, self.slots, self.page_size = cfg, mesh, log, slots, page_size
        self.max_prefill_tokens, self.weights = max_prefill_tokens, weights
        self.dtype, self.kv_dtype, self.max_logprobs = dtype, kv_dtype or dtype, max_logprobs
        self.stats: collections.Counter = collections.Counter()
        self.pool = PagePool(self.kv_pages, page_size, prefix_cache=prefix_cache, stats=self.stats)
        self.scheduler = Scheduler(self.pool, slots=slots,
                                   pages_per_seq=pages_per_seq(self.max_len, page_size),
                                   reserve_tokens=reserve_tokens, max_queue=max_queue,
                                   scheduling=scheduling, stats=self.stats)
        self.runner = Runner(model, mesh, slots=slots, max_len=self.max_len,
                             max_prefill_tokens=max_prefill_tokens, page_size=page_size,
                             kv_pages=self.kv_pages, dtype=dtype, kv_dtype=self.kv_dtype, weights=weights,
                             max_logprobs=max_logprobs, stats=self.stats, log=log)
        # the quantized weights in place of the loaded ones (not kept beside them)
        self.model = model if weights == "bf16" else dataclasses.replace(model, params=self.runner.params)
        self.output = OutputProcessor(model.tokenizer, model.eos_ids, cfg.vocab_size, self.runner.words,
                                      self.stats)
        self.steps = 0  # engine loop iterations so far
        self._step_lock = threading.Lock()  # held for each step: `paused`
        self._ids = itertools.count()
        self._stop = False
        self._thread: threading.Thread | None = None
        # the decode step dispatched last whose tokens are not handed over yet (`_decode`);
        # `overlap` False: the engine's thread waits for each decode's tokens before the
        # next step (as a caller of `step()` does)
        self.overlap = True
        self._inflight: _Inflight | None = None

    # ------------------------------------------------------------------ public API

    def start(self) -> float:
        """Compile and run every prefill bucket and the full-batch decode once (warm-up),
        then start the loop; the smaller decode batches compile in the background (they
        are used once ready: `compiled_all` is set then). Returns the warm-up seconds."""
        t0 = time.perf_counter()
        self.runner.warm_up()
        self._thread = threading.Thread(target=self._loop, name="megamesh-engine", daemon=True)
        self._thread.start()
        return time.perf_counter() - t0

    def stop(self) -> None:
        with self.scheduler.cv:
            self._stop = True
            self.scheduler.cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.runner.stop()

    @property
    def max_queue(self) -> int:
        return self.scheduler.max_queue

    @property
    def compiled_all(self) -> threading.Event:
        return self.runner.compiled_all

    @property
    def params(self) -> Any:
        return self.runner.params

    @property
    def weight_bytes(self) -> int:
        return self.runner.weight_bytes

    @property
    def kv_bytes(self) -> int:
        return self.runner.kv_bytes

    @property
    def extrapolated(self) -> bool:
        """The context is longer than the model was trained for."""
        return self.max_len > self.trained_len

    def check(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt + max_tokens > self.max_len:
            raise TooLong(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = "
                          f"{n_prompt + max_tokens} exceeds this server's context of {self.max_len} "
                          f"tokens: at most {max(self.max_len - n_prompt, 0)} new tokens fit after "
                          "this prompt")

    def submit(self, prompt: list[int], sampling: SamplingParams, emit: Callable[[Event], None],
               tenant: str = "", priority: int = 0) -> Request:
        """Queue a request of `tenant` (an API key; `priority` 1: background work, admitted
        after interactive requests and preempted for them); tokens arrive through `emit`.
        Raises TooLong or QueueFull."""
        if not prompt:
            raise TooLong("the prompt is empty: at least one token is needed")
        self.check(len(prompt), sampling.max_tokens)
        if sampling.logprobs is not None and (not self.max_logprobs
                                              or not 0 <= sampling.logprobs <= self.max_logprobs):
            raise MegameshError(f"logprobs {sampling.logprobs}: this engine gives at most "
                                f"{self.max_logprobs} (megamesh serve --max-logprobs)")
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(32)
        req = Request(next(self._ids), list(prompt), sampling, emit, seed & 0xFFFFFFFF, tenant,
                      priority, submitted_step=self.steps)
        if sampling.grammar is not None:
            req.matcher = self.output.matcher(sampling.grammar)
        req.hashes = self.pool.hashes(req.prompt)
        self.scheduler.enqueue(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (its client went away): its slot is freed before the next step."""
        self.scheduler.cancel(req)

    @property
    def active(self) -> int:
        return len(self.scheduler.active)

    @property
    def waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def pages_used(self) -> int:
        """KV pages held by requests (of `kv_pages`)."""
        return self.pool.used

    def matcher(self, grammar: str) -> Any:
        """An llguidance matcher of `grammar` over this model's vocabulary (`OutputProcessor`)."""
        return self.output.matcher(grammar)

    # ------------------------------------------------------------------ the loop

    @contextlib.contextmanager
    def paused(self):
        """No step of the engine's loop starts within the block (one in progress finishes
        first): requests submitted inside it are seen together by the next step, and the
        caller may run steps itself with `step` (the tests do: what a step does then
        depends on the requests, never on how threads were scheduled)."""
        with self._step_lock:
            yield

    def step(self, flush: bool = True) -> None:
        """One iteration of the loop: free finished and cancelled requests, admit and
        prefill within the step's budget, dispatch a decode of every running request,
        and hand over the tokens of the decode before it (`_Inflight`: the device runs
        this step's decode while the host streams the last one's tokens). `flush`: also
        wait for this step's own decode and hand its tokens over (a caller holding
        `paused` sees every token of the step when it returns; the engine's thread does
        not flush)."""
        self.steps += 1
        try:
            for req in self.scheduler.reap():
                self.stats["cancelled"] += 1
                self._finish(req, "cancelled")
            self._admit()
            if self.scheduler.active:
                self._decode()
            if flush:
                self._collect()
        except Exception as e:  # noqa: BLE001 -- never let one bad step stop the server
            self.log(f"engine step failed: {type(e).__name__}: {e}")
            self.stats["step_errors"] += 1
            self._inflight = None
            for req in list(self.scheduler.active.values()):
                self._finish(req, "error", error=f"{type(e).__name__}: {e}")

    def _loop(self) -> None:
        sched = self.scheduler
        while True:
            with sched.cv:
                while not self._stop and not sched.waiting and not sched.active:
                    sched.cv.wait()
                if self._stop:
                    break
            with self._step_lock:
                self.step(flush=not self.overlap)
        for req in list(sched.active.values()) + list(sched.waiting):
            self._finish(req, "cancelled")

    def _admit(self) -> None:
        """Prefill, within one step's budget of `max_prefill_tokens`: first the next chunks
        of prompts already being prefilled, then waiting requests admitted into free slots
        (fairly, preempting for fairness) while their prompts' pages are free."""
        budget = self.max_prefill_tokens
        for req in list(self.scheduler.prefilling):
            if budget <= 0:
                return
            budget -= self._prefill(req)
        while budget > 0:
            req = self.scheduler.admit()
            if req is None:
                return
            if req.cancelled:
                self.stats["cancelled"] += 1
                self._finish(req, "cancelled")
                continue
            self.output.start(req)
            if req.cached_tokens is None:  # first admission
                req.cached_tokens = req.prefilled
                req.emit(Event(cached_tokens=req.prefilled))
            budget -= self._prefill(req)

    def _prefill(self, req: Request) -> int:
        """Prefill the next chunk of `req.feed` (at most `max_prefill_tokens`); after the
        last one, draw its first token. Returns the chunk's length."""
        start = req.prefilled
        n = min(len(req.feed) - start, self.max_prefill_tokens)
        last = start + n == len(req.feed) and req.matcher is not None  # it draws a token: masked
        slot = req.slot
        tok, lps = self.runner.prefill(self.scheduler.table[slot:slot + 1], req.feed[start:start + n], start,
                                       req.draws, self.output.mask(req) if last else None)
        self.stats["prompt_tokens"] += n
        if not self.scheduler.prefilled(req, n):
            self.stats["prefill_chunks"] += 1
            return n
        self._accept(req, tok, row_logprobs(lps, 0, req))
        return n

    def _decode(self) -> None:
        """Dispatch one decode step for every running request whose prompt is prefilled
        (rows of prompts still being prefilled, and free rows, write to the scratch page
        only), then hand over the tokens of the decode in flight before it.

        A request whose last token is still on the device (drawn by the decode in flight)
        is fed it there (the step's input tokens gathered from that decode's output), so
        this decode needs nothing from the host that the last one computed; except a
        request that its token in flight will end by max_tokens (it sits out), and
        requests under a grammar (the next token's mask depends on the last token: the
        decode in flight is handed over first). A request that its token in flight ends
        otherwise (end of sequence, a stop sequence) had one more token drawn in this
        step, which is dropped, and its KV write went to pages it no longer holds (any
        later owner's writes come after it on the device)."""
        sched, runner = self.scheduler, self.runner
        sched.make_room()
        if len(runner.batch_buckets) > 1:
            sched.compact()
        if self._inflight is not None and any(r.matcher is not None for r in sched.decodable().values()):
            self._collect()  # (may end requests)
        inflight = self._inflight
        pending = inflight.rows if inflight is not None else {}

        def in_flight(r: Request) -> bool:  # its last token is the decode in flight's
            return pending.get(r, (0, -1))[1] == r.admitted

        decoding = {slot: r for slot, r in sched.decodable().items()
                    if not in_flight(r) or r.n_out + 1 < r.sampling.max_tokens}
        if not decoding:
            self._collect()
            return
        B = runner.batch_for(max(decoding) + 1)
        if inflight is not None and not runner.can_feed(inflight.drawn, B):
            self._collect()  # that gather is not compiled yet (start-up): tokens via the host
            inflight, pending = None, {}
            decoding = {slot: r for slot, r in decoding.items() if not r.done and sched.active.get(slot) is r}
            if not decoding:
                return
        tokens, positions = np.zeros(B, np.int32), np.zeros(B, np.int32)
        src = np.full(B, -1, np.int32)  # the row of the decode in flight with this row's token
        table = sched.table[:B].copy()
        rows = [(0, 0.0, 0, 1.0)] * B  # free rows: greedy, their tokens unused
        masks = {}
        for slot in range(B):
            r = sched.active.get(slot)
            if r is None:
                continue
            if slot not in decoding:
                table[slot] = SCRATCH
                continue
            positions[slot], rows[slot] = r.pos, r.draws
            if in_flight(r):
                src[slot] = pending[r][0]
            else:
                tokens[slot] = r.last
            if r.matcher is not None:
                masks[slot] = self.output.mask(r)
        drawn = runner.decode(table, tokens, positions, rows, masks,
                              prev=inflight.drawn if inflight is not None else None, src=src,
                              want_logprobs=any(r.sampling.logprobs is not None for r in decoding.values()))
        for r in decoding.values():
            r.pos += 1  # the position its next token will be fed at
        self._collect()  # the last decode's tokens, while this one runs
        self._inflight = _Inflight(drawn, {r: (slot, r.admitted) for slot, r in decoding.items()})

    def _collect(self) -> None:
        """Hand over the tokens of the decode in flight (waits for it). A request that has
        ended or was preempted since (re-admitted or not) drops its token: a preempted
        one draws the same token again after its recompute (draws are keyed by position)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        nxt, lps = self.runner.fetch(inflight.drawn)
        for r, (row, admitted) in inflight.rows.items():
            if r.done or r.admitted != admitted or self.scheduler.active.get(r.slot) is not r:
                continue
            self._accept(r, int(nxt[row]), row_logprobs(lps, row, r))

    def _accept(self, req: Request, tok: int, logprob: Any = None) -> None:
        """A new token for `req` (`OutputProcessor.accept`): streamed, or the request ends.
        `logprob`: the token's (log-probability, alternatives) when the request asked."""
        if req.first_token_step is None:
            req.first_token_step = self.steps
        if req.cancelled:
            self.stats["cancelled"] += 1
            self._finish(req, "cancelled")
            return
        end = self.output.accept(req, tok, logprob)
        if end is not None:
            self._finish(req, end.reason, text=end.text, sequence=end.sequence)

    def _finish(self, req: Request, reason: str, *, text: str = "", sequence: str | None = None,
                error: str | None = None) -> None:
        if req.done:
            return
        req.done = True
        self.scheduler.release(req)
        self.stats["finished_" + reason] += 1
        self.output.finished(req, Finish(reason, text, sequence), error)


def default_dtype() -> str:
    """bf16 weights on accelerators; f32 on CPU, where bf16 matmuls run slower (XLA:CPU)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def build_engine(model_spec: str, *, mesh: str | None = None, slots: int = 16, max_len: int | None = None,
                 max_queue: int = 256, dtype: str | None = None, name: str | None = None,
                 page_size: int = DEFAULT_PAGE, kv_pages: int | None = None,
                 prefix_cache: bool = True, prefill_chunk: int = 2048, reserve_tokens: int = 256,
                 kv_dtype: str | None = None, scheduling: str = "fair", weights: str = "bf16",
                 max_logprobs: int = 0, log: Any = print) -> Engine:
    dtype = dtype or default_dtype()
    check_engine_flags(slots=slots, max_len=max_len, page_size=page_size, kv_pages=kv_pages,
                       reserve_tokens=reserve_tokens, scheduling=scheduling, weights=weights,
                       max_logprobs=max_logprobs, dtype=dtype, kv_dtype=kv_dtype,
                       max_queue=max_queue, prefill_chunk=prefill_chunk)
    layout = parse_layout(mesh) if mesh else {"tensor": len(jax.devices())}
    n = math.prod(layout.values())
    if n > len(jax.devices()):
        raise ConfigError(f"--mesh {mesh} needs {n} devices; this host has {len(jax.devices())}")
    m = make_mesh(layout, jax.devices()[:n])
    model = load_model(model_spec, lambda cfg: param_shardings(cfg, m, strategy("serve")), dtype, name)
    return Engine(model, m, slots=slots, max_len=max_len, max_queue=max_queue, dtype=dtype,
                  page_size=page_size, kv_pages=kv_pages, prefix_cache=prefix_cache,
                  max_prefill_tokens=prefill_chunk, reserve_tokens=reserve_tokens, kv_dtype=kv_dtype,
                  scheduling=scheduling, weights=weights, max_logprobs=max_logprobs, log=log)
