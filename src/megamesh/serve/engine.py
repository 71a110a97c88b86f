"""The continuous-batching engine.

One thread owns the model and loops: free the slots of finished or cancelled requests,
admit waiting requests into free slots (a prefill each, which also draws their first
token), then run one decode step for all slots and hand every active request its next
token. Requests join and leave the running batch at every step.

KV memory is paged (`model.kvcache`): a pool of fixed-size pages (`page_size` positions
each) and a page table row per running request, so a request holds memory for the
positions it has, not for `max_len`. A request holds one slot (a row of the decode batch)
from admission to its last token, and pages as it grows: its prompt's at admission, one
more each time its decode crosses a page boundary. Admission needs a free slot and free
pages for the prompt, beyond a reserve for the running requests' next `reserve_tokens`
positions each (`--kv-reserve-tokens`). When a running request needs a page and none is
free, the request admitted last is preempted (vLLM's recompute preemption): its pages
are freed and it goes back to the front of the queue, to be prefilled again from its
prompt and the tokens it has generated (its stream just pauses). A bounded waiting queue
(past it, `QueueFull`); a request is refused up front when prompt + max_tokens exceeds
the context (`max_len`).

Prefix caching: every full page of a prompt is registered under a hash of its tokens and
of every token before it (a chain, as vLLM's), as soon as its prefill chunk has computed
it; a request whose prompt begins with pages already registered reuses them (a
reference count per page) and prefills only the rest. A page nobody references stays
cached until its memory is needed (least recently used first). `Request.cached_tokens`
says how many prompt tokens were read from the cache.

Chunked prefill: a step prefills at most `max_prefill_tokens` prompt tokens (continuing
prompts first, then new admissions), so a long prompt is prefilled over several steps,
each followed by a decode step for the running requests; rows whose prompt is still
being prefilled sit out the decode (their table row reads as scratch).

Fairness across tenants (API keys): waiting requests queue per tenant, and the next one
admitted is the head of the tenant with the fewest requests running (then the earliest
arrival). When no slot is free and that tenant runs at least two fewer requests than the
busiest tenant, the busiest tenant's last admitted request is preempted for it (the same
recompute preemption as for pages): one key's burst cannot hold every slot while others
wait.

Shapes are bucketed so nothing compiles per request: prefill per chunk-length bucket
(powers of two up to the chunk) and decode per batch bucket, all compiled and run once at
start-up (warm-up). Attention over the pages walks each step's real length (`paged=xla`
and `ragged`); only the reference `paged=gather` adds attention-length buckets. Tokens
reach the caller through `emit(Event)` as they are produced, from the engine thread: the
HTTP layer forwards them to its event loop.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import itertools
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from megamesh.errors import ConfigError, MegameshError
from megamesh.model.backend import DECODE_BATCH_MULTIPLE
from megamesh.model.kvcache import DEFAULT_PAGE, SCRATCH, init_pages, pages_per_seq
from megamesh.model.quant import quantize_params, weight_bytes
from megamesh.model.specs import WEIGHT_FORMATS
from megamesh.serve.load import ServedModel, load_model
from megamesh.serve.step import SlotSampling, build_decode_step, build_prefill_step, mask_words
from megamesh.serve.text import END, Detokenizer, StopMatcher
from megamesh.sharding.logical import batch_axes, parse_layout
from megamesh.sharding.mesh import make_mesh
from megamesh.sharding.rules import mesh_kernels, mesh_platform, param_shardings, strategy


class QueueFull(MegameshError):
    """The waiting queue is at its bound: the server is overloaded (HTTP 529)."""


class TooLong(MegameshError, ValueError):
    """prompt + max_tokens does not fit the context (HTTP 400)."""


class BadGrammar(MegameshError, ValueError):
    """A request's grammar (constrained decoding) does not compile (HTTP 400)."""


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation (both APIs map onto this)."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # None: a random one
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always generate max_tokens (vLLM's extension)
    grammar: str | None = None  # llguidance grammar the output must follow (tool calls, JSON)
    # max_tokens was cut to the context window (the Messages API accepts such a request):
    # reaching it ends with stop_reason model_context_window_exceeded, not max_tokens
    window_limited: bool = False
    # each output token's log-probability and this many alternatives (None: not asked;
    # at most the engine's max_logprobs)
    logprobs: int | None = None


@dataclass
class Event:
    text: str = ""  # new text (may be empty)
    done: bool = False
    # end_turn | max_tokens | model_context_window_exceeded | stop_sequence | cancelled | error
    stop_reason: str | None = None
    stop_sequence: str | None = None
    output_tokens: int = 0  # generated so far (the end-of-sequence token is not counted)
    error: str | None = None
    cached_tokens: int | None = None  # prompt tokens read from the prefix cache (set once admitted)
    # with SamplingParams.logprobs: the output tokens accepted since the last event, each
    # (token id, its log-probability, [(id, log-probability) of the most likely ones])
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


@dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    sampling: SamplingParams
    emit: Callable[[Event], None]
    seed: int
    tenant: str = ""  # whose request (the API key): the unit of fair scheduling
    priority: int = 0  # 0 interactive; 1 background (Message Batches): admitted after, preempted first
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    submitted_step: int = 0  # the engine's step count at submission
    first_token_step: int | None = None  # ... and when its first token was drawn
    slot: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)  # KV pages, in position order
    admitted: int = -1  # admission order (the last admitted is preempted first)
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # the prompt's full pages
    feed: list[int] = dataclasses.field(default_factory=list)  # what its prefill computes
    prefilled: int = 0  # ... of which this many positions are in its pages
    reused: int = 0  # ... and this many were found in the prefix cache at admission
    cached_tokens: int | None = None  # prompt tokens read from the prefix cache (first admission)
    pos: int = 0  # position of `last` (the token the next decode step feeds)
    last: int = 0
    n_out: int = 0
    out_ids: list[int] = dataclasses.field(default_factory=list)  # generated token ids
    # (token, log-probability, alternatives) of output tokens not yet in an event
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = dataclasses.field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    detok: Any = None
    stopper: Any = None
    matcher: Any = None  # llguidance.LLMatcher of `sampling.grammar`: which tokens may come next

    def take_logprobs(self) -> list[tuple[int, float, list[tuple[int, float]]]] | None:
        """The log-probabilities gathered since the last event (None if not asked for)."""
        if self.sampling.logprobs is None:
            return None
        out, self.logprobs = self.logprobs, []
        return out

    @property
    def draws(self) -> tuple[int, float, int, float]:
        """(seed, temperature, top_k, top_p): this request's row of `SlotSampling`."""
        s = self.sampling
        return self.seed, s.temperature, s.top_k, s.top_p


SCHEDULING = ("fair", "fcfs")


def _gather_tokens(prev: jax.Array, src: jax.Array, host: jax.Array) -> jax.Array:
    """A decode's input tokens: row i's is row src[i] of the previous decode's drawn
    tokens (still on the device), or the host's where src[i] < 0."""
    return jnp.where(src >= 0, prev[jnp.maximum(src, 0)], host)


@dataclass
class _Inflight:
    """A decode step on the device whose tokens the host has not read yet."""
    tokens: Any  # (B,) device array: each row's drawn token
    batch: int  # B
    rows: dict[Request, tuple[int, int]]  # request -> (its row, its admission number then)
    logprobs: Any = None  # the step's `token_logprobs` (device arrays), when it computes them


class FairQueue:
    """Waiting requests: one FIFO per tenant. `peek(running)` is the head of the tenant
    with the fewest requests running (ties: the earliest arrival), interactive requests
    before background ones; with `fair` False (first come, first served: the baseline
    bench/serve_fairness.py measures against), the earliest arrival whatever its tenant."""

    def __init__(self, fair: bool = True) -> None:
        self.queues: dict[str, collections.deque[Request]] = {}
        self.n = 0
        self.fair = fair

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return (r for q in list(self.queues.values()) for r in list(q))

    def append(self, req: Request, *, front: bool = False) -> None:
        q = self.queues.setdefault(req.tenant, collections.deque())
        q.appendleft(req) if front else q.append(req)
        self.n += 1

    def remove(self, req: Request) -> None:
        q = self.queues[req.tenant]
        q.remove(req)
        self.n -= 1
        if not q:
            del self.queues[req.tenant]

    def peek(self, running: collections.Counter) -> Request | None:
        heads = [q[0] for q in self.queues.values()]
        return min(heads, key=lambda r: (r.priority, running[r.tenant] if self.fair else 0, r.arrival),
                   default=None)


def buckets(max_len: int, smallest: int = 64) -> list[int]:
    """Prefill lengths: powers of two from `smallest` below max_len, then max_len itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return out + [max_len]


def decode_buckets(max_len: int, n: int = 16, smallest: int = 64) -> list[int]:
    """Attention lengths for decode: up to `n` evenly spaced steps (multiples of 64) up to
    max_len. Decode reads the cache up to the bucket every step, so a finer grid than
    powers of two saves memory traffic (measured: tiny, 32 slots, XLA:CPU: 23 ms at 256,
    50 ms at 512), at the price of more compiles at start-up."""
    step = max(smallest, -(-max_len // n // 64) * 64)
    return [b for b in range(step, max_len, step)] + [max_len]


def batch_buckets(slots: int, mesh: Any) -> list[int]:
    """Decode batch sizes: m, 2m, 4m, ... below `slots`, then `slots`, with m the backend's
    DECODE_BATCH_MULTIPLE (8: a request's tokens then never depend on the load). Decode
    time grows with the batch (measured, tiny, XLA:CPU, attention over 1024 slots: 75 ms
    at 32 rows, 16 ms at 8), so the engine runs the smallest bucket covering the busy
    slots (kept at the low rows). One bucket (all slots) when `slots` is not a multiple of
    m or the cache's batch dim is sharded (a serving batch axis > 1 in the mesh)."""
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape))
    m = DECODE_BATCH_MULTIPLE[mesh_platform(mesh)]
    if slots % m or math.prod(sizes.get(a, 1) for a in batch_axes("serve")) > 1:
        return [slots]
    out, b = [], m
    while b < slots:
        out.append(b)
        b *= 2
    return out + [slots]


class Engine:
    def __init__(self, model: ServedModel, mesh: Any, *, slots: int = 16, max_len: int | None = None,
                 max_queue: int = 256, dtype: str = "bfloat16", max_prefill_tokens: int = 2048,
                 page_size: int = DEFAULT_PAGE, kv_pages: int | None = None,
                 prefix_cache: bool = True, reserve_tokens: int = 256, kv_dtype: str | None = None,
                 scheduling: str = "fair", weights: str = "bf16", max_logprobs: int = 0,
                 log: Callable[[str], None] = print):
        """`kv_pages`: KV pages (of `page_size` positions) to allocate, default slots x
        max_len / page_size (the memory of a dense cache with a row per slot);
        `reserve_tokens`: positions of growth per running request that admission leaves
        free (`_reserve`); `kv_dtype`: of the KV pages (default: `dtype`, the weights');
        `scheduling`: "fair" across tenants (`FairQueue`, preempting for fairness) or
        "fcfs" (first come, first served; background work still yields); `weights`: "bf16"
        (the model's parameters as loaded) or "fp8" / "int8" (its layers' matmul weights
        quantized once here, per output channel: `model.quant`); `max_logprobs`: the most
        alternatives a request may ask log-probabilities of (0: none; the decode step then
        computes no log-probabilities at all)."""
        cfg = model.cfg
        self.model, self.cfg, self.mesh, self.log = model, cfg, mesh, log
        self.slots = slots
        # past the trained length positions are extrapolated (RoPE as the config has it):
        # the operator's choice, said at start-up (`extrapolated`)
        self.max_len = max_len or cfg.max_seq_len
        self.trained_len = cfg.max_seq_len
        if slots < 1:
            raise MegameshError(f"--slots {slots} is not allowed: at least 1")
        if self.max_len < 2:
            raise MegameshError(f"--max-len {self.max_len} is not allowed: at least 2")
        if page_size < 1 or 64 % page_size:
            raise MegameshError(f"--page-size {page_size} is not allowed: a divisor of 64 "
                                "(1, 2, 4, 8, 16, 32 or 64)")
        self.page_size = page_size
        self.pages_per_seq = pages_per_seq(self.max_len, page_size)
        kv_pages = slots * self.pages_per_seq if kv_pages is None else kv_pages
        if kv_pages < self.pages_per_seq:
            raise MegameshError(f"--kv-pages {kv_pages} is not allowed: at least "
                                f"{self.pages_per_seq} (one request of --max-len {self.max_len} "
                                f"tokens in pages of {page_size})")
        self.kv_pages = kv_pages
        self.prefix_cache = prefix_cache
        if reserve_tokens < 0:
            raise MegameshError(f"--kv-reserve-tokens {reserve_tokens} is not allowed: at least 0")
        self.reserve_tokens = reserve_tokens
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        # prefill lengths up to the one a full chunk uses (no longer chunk ever runs)
        every = buckets(self.max_len)
        self.buckets = every[:next((i + 1 for i, b in enumerate(every) if b >= max_prefill_tokens),
                                   len(every))]
        # only the reference kernel reads a static attention length
        self.length_buckets = mesh_kernels(mesh).paged == "gather"
        if self.length_buckets:
            self.after_buckets = [a for a in every if a >= min(2048, self.max_len)]
            self.decode_buckets = decode_buckets(self.max_len)
        else:  # attention reads each batch's real length: one shape for every length
            self.after_buckets = self.decode_buckets = [self.max_len]
        self.batch_buckets = batch_buckets(slots, mesh)
        self.weights = weights
        if not 0 <= max_logprobs <= MAX_LOGPROBS:
            raise MegameshError(f"--max-logprobs {max_logprobs} is not allowed: 0 to {MAX_LOGPROBS}")
        self.max_logprobs = max_logprobs
        self.decode = {(b, a): build_decode_step(cfg, mesh, b, self.max_len, dtype, attend_len=a,
                                                 n_pages=kv_pages + 1, page_size=page_size,
                                                 kv_dtype=self.kv_dtype, weights=weights,
                                                 logprobs=max_logprobs)
                       for b in self.batch_buckets for a in self.decode_buckets}
        any_step = self.decode[(slots, self.max_len)]
        # the rest of a prompt after cached pages or earlier chunks, by (chunk bucket,
        # attention bucket): it attends to the positions before it too. Attention buckets
        # (`gather` only) from 2048 up (fewer steps to compile: at an 11k context a short
        # prompt after a cached prefix attends to 2k positions, not 11k)
        self.prefill_after = {(b, a): build_prefill_step(cfg, any_step, b, attend_len=a)
                              for a in self.after_buckets for b in self.buckets if b <= a}
        # a whole prompt at once (`gather`: attending within its own bucket); the other
        # kernels read the real length, so the same steps serve
        self.prefill = {b: (build_prefill_step(cfg, any_step, b) if self.length_buckets
                            else self.prefill_after[(b, self.max_len)]) for b in self.buckets}
        # compiled decode variants by (batch, attention length): the full-batch ones at
        # warm-up, the smaller batches in the background after start-up
        self._exec: dict[tuple[int, int], Any] = {}
        self.compiled_all = threading.Event()
        # quantized in place of the loaded weights (model.params is not kept beside them)
        self.params = quantize_params(model.params, param_shardings(cfg, mesh, strategy("serve")),
                                      cfg, weights)
        if weights != "bf16":
            self.model = model = dataclasses.replace(model, params=self.params)
        self.weight_bytes = weight_bytes(self.params)
        self.pages = jax.device_put(init_pages(cfg, kv_pages + 1, page_size, jnp.dtype(self.kv_dtype)),
                                    any_step.page_shardings)
        self.table = np.zeros((slots, self.pages_per_seq), np.int32)  # a row per slot
        self._free_pages = list(range(kv_pages, SCRATCH, -1))  # pop() gives the lowest page
        self._refs = np.zeros(kv_pages + 1, np.int32)  # requests holding each page
        self._hash_of: dict[int, bytes] = {}  # cached page -> its prefix hash
        self._by_hash: dict[bytes, int] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU
        self._admissions = itertools.count()
        self._free = list(range(slots))[::-1]  # pop() gives the lowest slot
        self._active: dict[int, Request] = {}
        if scheduling not in SCHEDULING:
            raise MegameshError(f"--scheduling {scheduling!r} is not allowed: one of {', '.join(SCHEDULING)}")
        self.scheduling = scheduling
        self._waiting = FairQueue(fair=scheduling == "fair")
        self._prefilling: list[Request] = []  # admitted, prompt not yet all prefilled
        self._running: collections.Counter[str] = collections.Counter()  # tenant -> running
        self.steps = 0  # engine loop iterations so far
        self._cv = threading.Condition()
        self._step_lock = threading.Lock()  # held for each step: `paused`
        self._ids = itertools.count()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._compiler: threading.Thread | None = None  # compiles small decode batches
        self.stats = collections.Counter()
        # the decode step dispatched last whose tokens are not handed over yet (`_decode`);
        # `overlap` False: the engine's thread waits for each decode's tokens before the
        # next step (as a caller of `step()` does)
        self.overlap = True
        self._inflight: _Inflight | None = None
        self._feeds: dict[int, Any] = {}
        self.kv_bytes = sum(x.nbytes for x in jax.tree.leaves(self.pages))
        self.words = mask_words(cfg.vocab_size)  # of a row's token bitmask
        self._grammar_tokenizer: Any = None

    # ------------------------------------------------------------------ public API

    def start(self) -> float:
        """Compile and run every prefill bucket and full-batch decode bucket once (warm-up),
        then start the loop; the smaller decode batches compile in the background (they
        are used once ready: `compiled_all` is set then). Returns the warm-up seconds."""
        t0 = time.perf_counter()
        self._warm_up()
        self._thread = threading.Thread(target=self._loop, name="megamesh-engine", daemon=True)
        self._thread.start()
        small = [k for k in self.decode if k[0] < self.slots]
        if small:
            abstract = self._abstract_args()
            self._compiler = threading.Thread(target=self._compile_small, args=(small, abstract),
                                              name="megamesh-compile", daemon=True)
            self._compiler.start()
        else:
            self.compiled_all.set()
        return time.perf_counter() - t0

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        # a compile still running in the background when the process exits is killed inside
        # XLA, which aborts the process: it stops after the executable in hand
        if self._compiler is not None:
            self._compiler.join(timeout=300)

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
            req.matcher = self.matcher(sampling.grammar)
        req.hashes = self.page_hashes(req.prompt)
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull(f"the server is overloaded: {len(self._waiting)} requests are waiting "
                                f"(the bound is {self.max_queue}); retry later")
            self._waiting.append(req)
            self.stats["requests"] += 1
            self._cv.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request (its client went away): its slot is freed before the next step."""
        with self._cv:
            if not req.done:
                req.cancelled = True
                self._cv.notify_all()

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def matcher(self, grammar: str) -> Any:
        """An llguidance matcher of `grammar` over this model's vocabulary (BadGrammar if it
        does not compile). llguidance: constrained decoding for tool inputs; compared with
        outlines-core and xgrammar in bench/grammar_engines.py."""
        import llguidance

        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = llguidance.LLTokenizer(
                self.model.tokenizer.to_str(), n_vocab=self.cfg.vocab_size,
                eos_token=list(self.model.eos_ids) or None)
        m = llguidance.LLMatcher(self._grammar_tokenizer, grammar, log_level=0)
        if m.is_error():
            raise BadGrammar(f"the output constraint does not compile: {m.get_error()}")
        return m

    def _mask(self, req: Request) -> np.ndarray:
        """The bitmask of tokens `req`'s grammar allows next."""
        import llguidance.numpy as lnp

        out = np.zeros((1, self.words), np.int32)
        lnp.fill_next_token_bitmask(req.matcher, out, 0)
        return out[0]

    @property
    def pages_used(self) -> int:
        """KV pages held by requests (of `kv_pages`)."""
        return self.kv_pages - len(self._free_pages) - len(self._evictable)

    def page_hashes(self, tokens: list[int]) -> list[bytes]:
        """The prefix hash of each full page of `tokens`: page i's covers tokens
        [0, (i + 1) * page_size)."""
        out, h, P = [], b"", self.page_size
        arr = np.asarray(tokens, np.int32)
        for i in range(len(tokens) // P):
            h = hashlib.blake2b(h + arr[i * P:(i + 1) * P].tobytes(), digest_size=16).digest()
            out.append(h)
        return out

    # ------------------------------------------------------------------ the loop

    def _warm_up(self) -> None:
        """Every prefill and full-batch decode once, on the scratch page only."""
        row = np.zeros((1, self.pages_per_seq), np.int32)
        steps = {id(step): (b, step) for b, step in self.prefill.items()}
        steps.update({id(step): (b, step) for (b, _), step in self.prefill_after.items()})
        for b, step in steps.values():
            _, _, self.pages = step(self.params, self.pages, row, jnp.zeros((1, b), jnp.int32),
                                    np.int32(0), np.int32(1), SlotSampling.one(0, 0.0, 0, 1.0, self.words))
        b = self.slots
        zeros = np.zeros((b,), np.int32)
        params, pages = self._abstract_args()
        for a in self.decode_buckets:
            # compiled ahead for its shardings: it takes the host's tokens and the device's
            # (`_gather_tokens`) alike, without compiling again
            step = self.decode[(b, a)]
            self._exec[(b, a)] = step.fn.lower(params, pages, *step.row_args()).compile()
            out = self._exec[(b, a)](self.params, self.pages, self.table, zeros, zeros,
                                     SlotSampling.rows([], b, self.words))
            self.pages = out[2]
        self._compile_feed(b, b)
        jax.block_until_ready(self.pages)

    def _abstract_args(self) -> tuple[Any, Any]:
        like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return jax.tree.map(like, self.params), jax.tree.map(like, self.pages)

    def _compile_small(self, keys: list[tuple[int, int]], abstract: tuple[Any, Any]) -> None:
        params, pages = abstract
        t0 = time.perf_counter()
        try:
            for b, a in sorted(keys, key=lambda k: (k[1], k[0])):  # short attention first
                if self._stop:
                    return
                step = self.decode[(b, a)]
                self._exec[(b, a)] = step.fn.lower(params, pages, *step.row_args()).compile()
            for prev in self.batch_buckets:  # the token gathers between every two batch sizes
                for b in self.batch_buckets:
                    if (prev, b) not in self._feeds and not self._stop:
                        self._compile_feed(prev, b)
            self.log(f"compiled {len(keys)} smaller decode batches in the background in "
                     f"{time.perf_counter() - t0:.1f}s")
        except Exception as e:  # noqa: BLE001 -- the full-batch steps still serve
            self.log(f"background compile of small decode batches failed: {type(e).__name__}: {e}")
        finally:
            self.compiled_all.set()

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
            self._reap()
            self._admit()
            if self._active:
                self._decode()
            if flush:
                self._collect()
        except Exception as e:  # noqa: BLE001 -- never let one bad step stop the server
            self.log(f"engine step failed: {type(e).__name__}: {e}")
            self.stats["step_errors"] += 1
            self._inflight = None
            for req in list(self._active.values()):
                self._finish(req, "error", error=f"{type(e).__name__}: {e}")

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._active:
                    self._cv.wait()
                if self._stop:
                    break
            with self._step_lock:
                self.step(flush=not self.overlap)
        for req in list(self._active.values()) + list(self._waiting):
            self._finish(req, "cancelled")

    def _reap(self) -> None:
        with self._cv:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self.stats["cancelled"] += 1
            self._finish(r, "cancelled")
        for req in [r for r in self._active.values() if r.cancelled]:
            self.stats["cancelled"] += 1
            self._finish(req, "cancelled")

    def _admit(self) -> None:
        """Prefill, within one step's budget of `max_prefill_tokens`: first the next chunks
        of prompts already being prefilled, then waiting requests admitted into free slots
        (fairly, preempting for fairness) while their prompts' pages are free."""
        budget = self.max_prefill_tokens
        for req in list(self._prefilling):
            if budget <= 0:
                return
            budget -= self._prefill(req)
        while budget > 0:
            with self._cv:
                req = self._waiting.peek(self._running)
                if req is None:
                    return
                if not self._free and not req.cancelled:
                    victim = self._unfair(req)
                    if victim is None:
                        return  # every slot busy, fairly shared
                    self._preempt(victim)
                    self.stats["preempted_for_fairness"] += 1
                tokens = req.prompt + req.out_ids  # out_ids: a preempted request's so far
                hit = self._match(req.hashes, len(tokens))
                # pages for the prompt and the first decode's position (a request admitted
                # is not preempted by its own next step), and its next reserve_tokens
                reach = min(len(tokens) + self.reserve_tokens, len(req.prompt) + req.sampling.max_tokens)
                need = max(len(tokens), reach) // self.page_size + 1 - len(hit)
                spare = self._available() - sum(1 for p in hit if p in self._evictable)
                if not req.cancelled and need + self._reserve() > spare:
                    return  # wait for pages (a running request's end frees some)
                self._waiting.remove(req)
            if req.cancelled:
                self.stats["cancelled"] += 1
                self._finish(req, "cancelled")
                continue
            req.slot = self._free.pop()
            req.admitted = next(self._admissions)
            self._active[req.slot] = req
            self._running[req.tenant] += 1
            for page in hit:  # shared with whoever else holds them
                self._evictable.pop(page, None)
                self._refs[page] += 1
                self.table[req.slot, len(req.pages)] = page
                req.pages.append(page)
            self._grow(req, len(tokens))
            if req.detok is None:  # first admission (a preempted request keeps its state)
                req.detok = Detokenizer(self.model.tokenizer, req.prompt)
                req.stopper = StopMatcher(list(req.sampling.stop),
                                          () if req.sampling.ignore_eos else (END,))
            req.feed = tokens
            req.prefilled = req.reused = len(hit) * self.page_size
            self.stats["prefix_hit_tokens"] += req.prefilled
            if req.cached_tokens is None:
                req.cached_tokens = req.prefilled
                req.emit(Event(cached_tokens=req.prefilled))
            self._prefilling.append(req)
            budget -= self._prefill(req)

    def _prefill(self, req: Request) -> int:
        """Prefill the next chunk of `req.feed` (at most `max_prefill_tokens`); after the
        last one, register its full pages in the prefix cache and draw its first token.
        Returns the chunk's length."""
        tokens, start = req.feed, req.prefilled
        n = min(len(tokens) - start, self.max_prefill_tokens)
        last = start + n == len(tokens) and req.matcher is not None  # it draws a token: masked
        b = next(x for x in self.buckets if x >= n)
        padded = np.zeros((1, b), np.int32)
        padded[0, :n] = tokens[start:start + n]
        # a whole prompt at once attends within its bucket (as before pages); the rest of
        # one (after cached pages or earlier chunks) attends to the whole context
        if start == 0:
            step = self.prefill[b]
        else:  # attends to every position up to its last real token's
            step = self.prefill_after[(b, next(x for x in self.after_buckets if x >= start + n))]
        t0 = time.perf_counter()
        tok, lps, self.pages = step(self.params, self.pages, self.table[req.slot:req.slot + 1], padded,
                                    np.int32(start), np.int32(n),
                                    SlotSampling.one(*req.draws, self.words,
                                                     self._mask(req) if last else None))
        tok = int(tok)  # (waits for the step: its time is counted here)
        self.stats["prefill_seconds"] += time.perf_counter() - t0
        self._register(req, start, start + n)
        req.prefilled += n
        self.stats["prompt_tokens"] += n
        if req.prefilled < len(tokens):
            self.stats["prefill_chunks"] += 1
            return n
        self._prefilling.remove(req)
        req.pos = len(tokens)
        self._accept(req, tok, _row_logprobs(lps, 0, req))
        return n

    def _register(self, req: Request, start: int, end: int) -> None:
        """Put the pages a prefill chunk completed (all of positions [.., end) computed, none
        written again) in the prefix cache, as each chunk ends: a request of the same
        tenant arriving meanwhile reuses them, and a request preempted mid-prompt leaves
        them cached for its own readmission."""
        if not self.prefix_cache:
            return
        for i in range(max(start, req.reused) // self.page_size, end // self.page_size):
            if req.hashes[i] not in self._by_hash:
                self._by_hash[req.hashes[i]] = req.pages[i]
                self._hash_of[req.pages[i]] = req.hashes[i]

    def _match(self, hashes: list[bytes], n: int) -> list[int]:
        """The cached pages that begin a sequence of n tokens with these page hashes (at
        least its last token is left to compute: its logits draw the next token)."""
        hit = []
        for h in hashes[:(n - 1) // self.page_size] if self.prefix_cache else []:
            page = self._by_hash.get(h)
            if page is None:
                break
            hit.append(page)
        return hit

    def _reserve(self) -> int:
        """Pages held back from admission for the running requests' next tokens: each one's
        next `reserve_tokens` positions (or up to its max_tokens, if sooner). Admitting
        into the pages they are about to need would preempt one of them within steps,
        and a preemption recomputes a prompt. (A reserve of at least every request's
        max_tokens rules preemption out.)"""
        total = 0
        for r in self._active.values():
            at = len(r.feed) if r in self._prefilling else r.pos
            end = min(at + self.reserve_tokens, len(r.prompt) + r.sampling.max_tokens)
            total += max(0, end // self.page_size + 1 - len(r.pages))
        return total

    def _available(self) -> int:
        """Pages that can be handed out: free ones and cached ones nobody holds."""
        return len(self._free_pages) + len(self._evictable)

    def _take(self) -> int:
        """A page for new contents: a free one, else the least recently used cached one."""
        if self._free_pages:
            page = self._free_pages.pop()
        else:
            page, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash_of.pop(page)]
            self.stats["prefix_evictions"] += 1
        self._refs[page] = 1
        return page

    def _grow(self, req: Request, pos: int) -> None:
        """Give `req` the pages for positions up to `pos` (pages must be available)."""
        while len(req.pages) <= pos // self.page_size:
            page = self._take()
            self.table[req.slot, len(req.pages)] = page
            req.pages.append(page)

    def _make_room(self) -> None:
        """Every running request gets the page its next decode writes to; while none is free,
        the request admitted last is preempted (recompute: back to the queue's front)."""
        for req in sorted(self._active.values(), key=lambda r: r.admitted):
            if req.done or self._active.get(req.slot) is not req or req in self._prefilling:
                continue  # (a prompt being prefilled has its pages)
            while len(req.pages) <= req.pos // self.page_size and not self._available():
                self._preempt(max(self._active.values(), key=lambda r: r.admitted))
            if self._active.get(req.slot) is req:
                self._grow(req, req.pos)

    def _unfair(self, req: Request) -> Request | None:
        """The request to preempt so that `req` gets a slot: for an interactive request, the
        last admitted background one if any runs; else the last admitted of the busiest
        tenant, when that runs at least two more requests than `req`'s."""
        background = [r for r in self._active.values() if r.priority > req.priority]
        if background:
            return max(background, key=lambda r: r.admitted)
        if self.scheduling != "fair":
            return None
        peers = collections.Counter(r.tenant for r in self._active.values()
                                    if r.priority == req.priority)
        busiest = max(peers, key=lambda t: peers[t], default=None)
        if busiest is None or peers[busiest] < peers[req.tenant] + 2:
            return None
        return max((r for r in self._active.values() if r.tenant == busiest), key=lambda r: r.admitted)

    def _preempt(self, req: Request) -> None:
        self._release(req)
        req.slot, req.pos = -1, 0
        req.hashes = self.page_hashes(req.prompt + req.out_ids)  # what it will prefill
        with self._cv:
            self._waiting.append(req, front=True)
        self.stats["preempted"] += 1

    def _release(self, req: Request) -> None:
        """Free the slot and pages of a running request."""
        if req in self._prefilling:
            self._prefilling.remove(req)
        if req.slot >= 0 and self._active.get(req.slot) is req:
            del self._active[req.slot]
            self._running[req.tenant] -= 1
            if not self._running[req.tenant]:
                del self._running[req.tenant]
            self._free.append(req.slot)
            self._free.sort(reverse=True)
            self.table[req.slot] = SCRATCH
        for page in reversed(req.pages):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._evictable[page] = None  # the most recently used end
                else:
                    self._free_pages.append(page)
        req.pages = []

    def _compact(self) -> None:
        """Keep the busy slots at the low rows (decode runs the smallest batch bucket that
        covers them): move the highest busy row's page table into the lowest free row."""
        while self._active and self._free:
            low, high = min(self._free), max(self._active)
            if low > high:
                return
            req = self._active.pop(high)
            self.table[low], self.table[high] = self.table[high], SCRATCH
            self._free.remove(low)
            self._free.append(high)
            self._free.sort(reverse=True)
            req.slot = low
            self._active[low] = req
            self.stats["slot_moves"] += 1

    def _decode(self) -> None:
        """Dispatch one decode step for every running request whose prompt is prefilled
        (rows of prompts still being prefilled, and free rows, write to the scratch page
        only), then hand over the tokens of the decode in flight before it.

        A request whose last token is still on the device (drawn by the decode in flight)
        is fed it there (`_gather_tokens`: the step's input tokens gathered from that decode's
        output), so this decode needs nothing from the host that the last one computed;
        except a request that its token in flight will end by max_tokens (it sits out),
        and requests under a grammar (the next token's mask depends on the last token:
        the decode in flight is handed over first). A request that its token in flight
        ends otherwise (end of sequence, a stop sequence) had one more token drawn in
        this step, which is dropped, and its KV write went to pages it no longer holds
        (any later owner's writes come after it on the device)."""
        self._make_room()
        if len(self.batch_buckets) > 1:
            self._compact()
        if self._inflight is not None and any(r.matcher is not None for r in self._active.values()
                                              if r not in self._prefilling):
            self._collect()  # (may end requests)
        inflight = self._inflight
        pending = inflight.rows if inflight is not None else {}

        def in_flight(r: Request) -> bool:  # its last token is the decode in flight's
            return pending.get(r, (0, -1))[1] == r.admitted

        decoding = {slot: r for slot, r in self._active.items() if r not in self._prefilling
                    and (not in_flight(r) or r.n_out + 1 < r.sampling.max_tokens)}
        if not decoding:
            self._collect()
            return
        hi = max(decoding) + 1
        positions_max = max(r.pos for r in decoding.values())
        a = next(x for x in self.decode_buckets if x >= positions_max + 1)
        B = next(b for b in self.batch_buckets if b >= hi and (b, a) in self._exec)
        if inflight is not None and (inflight.batch, B) not in self._feeds:
            self._collect()  # that gather is not compiled yet (start-up): tokens via the host
            inflight, pending = None, {}
            decoding = {slot: r for slot, r in decoding.items() if not r.done and self._active.get(slot) is r}
            if not decoding:
                return
        tokens, positions = np.zeros(B, np.int32), np.zeros(B, np.int32)
        src = np.full(B, -1, np.int32)  # the row of the decode in flight with this row's token
        table = self.table[:B].copy()
        rows = [(0, 0.0, 0, 1.0)] * B  # free rows: greedy, their tokens unused
        masks = {}
        for slot in range(B):
            r = self._active.get(slot)
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
                masks[slot] = self._mask(r)
        t0 = time.perf_counter()
        fed = tokens
        if (src >= 0).any():
            fed = self._feeds[(inflight.batch, B)](inflight.tokens, src, tokens)
            self.stats["decode_steps_fed_on_device"] += 1
        nxt, lps, self.pages = self._exec[(B, a)](self.params, self.pages, table, fed,
                                                  positions, SlotSampling.rows(rows, B, self.words, masks))
        self.stats["decode_seconds"] += time.perf_counter() - t0
        self.stats["decode_steps"] += 1
        self.stats[f"decode_steps_{B}"] += 1
        for r in decoding.values():
            r.pos += 1  # the position its next token will be fed at
        self._collect()  # the last decode's tokens, while this one runs
        self._inflight = _Inflight(nxt, B, {r: (slot, r.admitted) for slot, r in decoding.items()},
                                   lps if any(r.sampling.logprobs is not None for r in decoding.values())
                                   else None)

    def _compile_feed(self, prev: int, batch: int) -> None:
        """Compile the gather of a `batch`-row decode's input tokens from a `prev`-row
        decode's output (`_gather_tokens`) on the decode steps' row shardings."""
        sh = {n: self.decode[(n, self.decode_buckets[0])].slot_sharding for n in (prev, batch)}
        like = lambda n: jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sh[n])  # noqa: E731
        fn = jax.jit(_gather_tokens, in_shardings=(sh[prev], sh[batch], sh[batch]),
                     out_shardings=sh[batch])
        self._feeds[(prev, batch)] = fn.lower(like(prev), like(batch), like(batch)).compile()

    def _collect(self) -> None:
        """Hand over the tokens of the decode in flight (waits for it). A request that has
        ended or was preempted since (re-admitted or not) drops its token: a preempted
        one draws the same token again after its recompute (draws are keyed by position)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        t0 = time.perf_counter()
        nxt = np.asarray(inflight.tokens)
        lps = jax.device_get(inflight.logprobs)
        self.stats["decode_seconds"] += time.perf_counter() - t0
        for r, (row, admitted) in inflight.rows.items():
            if r.done or r.admitted != admitted or self._active.get(r.slot) is not r:
                continue
            self._accept(r, int(nxt[row]), _row_logprobs(lps, row, r))

    def _accept(self, req: Request, tok: int, logprob: Any = None) -> None:
        """A new token for `req`: stream its text, or finish the request. `logprob`: the
        token's (id, log-probability, alternatives) when the request asked for them."""
        if req.first_token_step is None:
            req.first_token_step = self.steps
        if req.cancelled:
            self.stats["cancelled"] += 1
            self._finish(req, "cancelled")
            return
        if req.sampling.max_tokens == 0:  # prefill only (pre-warming the prefix cache)
            self._finish(req, "max_tokens")
            return
        constrained = req.matcher is not None
        if constrained and tok not in self.model.eos_ids:
            req.matcher.consume_token(tok)
        if tok in self.model.eos_ids and (not req.sampling.ignore_eos or constrained):
            text, hit = req.stopper.push(req.detok.flush())
            if hit is not None:
                self._finish(req, hit.reason, text=hit.text, sequence=hit.sequence)
            else:
                self._finish(req, "end_turn", text=text + req.stopper.flush())
            return
        req.n_out += 1
        req.last = tok
        req.out_ids.append(tok)
        if logprob is not None:
            req.logprobs.append((tok, *logprob))
        self.stats["output_tokens"] += 1
        text, hit = req.stopper.push(req.detok.push(tok))
        if hit is not None:
            self._finish(req, hit.reason, text=hit.text, sequence=hit.sequence)
        elif constrained and (req.matcher.is_stopped() or (
                # at max_tokens a whole answer ends the turn (only the template's end marker
                # could have followed it)
                req.n_out >= req.sampling.max_tokens and req.matcher.is_accepting())):
            self._finish(req, "end_turn", text=text + req.stopper.push(req.detok.flush())[0]
                         + req.stopper.flush())
        elif req.n_out >= req.sampling.max_tokens:
            more, hit = req.stopper.push(req.detok.flush())
            if hit is not None:
                self._finish(req, hit.reason, text=text + hit.text, sequence=hit.sequence)
            else:
                self._finish(req, "model_context_window_exceeded" if req.sampling.window_limited
                             else "max_tokens", text=text + more + req.stopper.flush())
        elif text or req.logprobs:
            req.emit(Event(text=text, output_tokens=req.n_out, logprobs=req.take_logprobs()))

    def _finish(self, req: Request, reason: str, *, text: str = "", sequence: str | None = None,
                error: str | None = None) -> None:
        if req.done:
            return
        req.done = True
        self._release(req)
        self.stats["finished_" + reason] += 1
        req.emit(Event(text=text, done=True, stop_reason=reason, stop_sequence=sequence,
                       output_tokens=req.n_out, error=error, logprobs=req.take_logprobs()))


MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


def _row_logprobs(lps: Any, row: int, req: Request) -> tuple[float, list[tuple[int, float]]] | None:
    """Row `row` of a step's `token_logprobs` as `req` asked: its token's log-probability
    and its first `req.sampling.logprobs` alternatives (id, log-probability); None when the
    request asked for none or the step computed none."""
    if lps is None or req.sampling.logprobs is None:
        return None
    # the decode's arrays were fetched once for all its rows (a no-op here); the prefill's
    # come from the device
    chosen, ids, lp = jax.device_get(lps)
    k = req.sampling.logprobs
    return float(chosen[row]), [(int(i), float(v)) for i, v in zip(ids[row][:k], lp[row][:k])]


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
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"--weights {weights!r} is not allowed: one of {', '.join(WEIGHT_FORMATS)}")
    for flag, value in (("--dtype", dtype), ("--kv-dtype", kv_dtype or dtype)):
        if value not in ("float32", "bfloat16"):
            raise ConfigError(f"{flag} {value!r} is not allowed: float32 or bfloat16")
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
