"""The model runner: the serving engine's device side. It holds the weights (quantized
at load when asked), the KV pages on the devices, and the compiled steps, shapes
bucketed so that nothing compiles per request: a prefill per chunk-length bucket (powers
of two up to the prefill chunk) and a decode per batch bucket, all compiled and run once
at start-up (warm-up; the smaller decode batches compile in the background after it).
Attention over the pages walks each step's real length, so one shape serves every
length. It knows nothing of requests: the engine gives it page tables, tokens,
positions and sampling rows (`step.SlotSampling`), and it gives back drawn tokens.

A decode's input tokens can come from the previous decode's output still on the device
(`_gather_tokens`), so the host need not wait for one decode before dispatching the
next (`decode(..., prev=...)`).

On several hosts (`serve.multihost`) every process holds a runner over the same global
mesh and makes the same calls in the same order; host inputs then become global arrays
(each process keeps its own shards), and a step a process has not compiled yet (the
small batches compile in the background, at each process's own pace) is compiled when
first called."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from megamesh.model.backend import DECODE_BATCH_MULTIPLE
from megamesh.model.kvcache import init_pages, pages_per_seq
from megamesh.model.quant import quantize_params, weight_bytes
from megamesh.serve.load import ServedModel
from megamesh.serve.step import SlotSampling, build_decode_step, build_prefill_step, mask_words
from megamesh.sharding.logical import batch_axes
from megamesh.sharding.rules import mesh_platform, param_shardings, strategy


def buckets(max_len: int, smallest: int = 64) -> list[int]:
    """Prefill lengths: powers of two from `smallest` below max_len, then max_len itself."""
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        b *= 2
    return out + [max_len]


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


def _gather_tokens(prev: jax.Array, src: jax.Array, host: jax.Array) -> jax.Array:
    """A decode's input tokens: row i's is row src[i] of the previous decode's drawn
    tokens (still on the device), or the host's where src[i] < 0."""
    return jnp.where(src >= 0, prev[jnp.maximum(src, 0)], host)


@dataclasses.dataclass
class Drawn:
    """A decode step's output on the device: each row's token, and its `token_logprobs`
    when the step computes them."""

    tokens: Any
    batch: int
    logprobs: Any = None


class Runner:
    def __init__(self, model: ServedModel, mesh: Any, *, slots: int, max_len: int, max_prefill_tokens: int,
                 page_size: int, kv_pages: int, dtype: str, kv_dtype: str, weights: str,
                 max_logprobs: int, stats: Any, log: Callable[[str], None] = print) -> None:
        """`kv_pages` pages of `page_size` positions (and the scratch page), of
        `kv_dtype`; `weights`: "bf16" (the parameters as loaded, in `dtype`) or "fp8" /
        "int8" (the layers' matmul weights quantized once here, per output channel:
        `model.quant`); `max_logprobs`: alternatives the steps return log-probabilities
        of (0: the decode step computes none)."""
        cfg = model.cfg
        self.slots = slots
        self.stats, self.log = stats, log
        self.pages_per_seq = pages_per_seq(max_len, page_size)
        # prefill lengths up to the one a full chunk uses (no longer chunk ever runs)
        every = buckets(max_len)
        self.buckets = every[:next((i + 1 for i, b in enumerate(every) if b >= max_prefill_tokens),
                                   len(every))]
        self.batch_buckets = batch_buckets(slots, mesh)
        self.decode_steps = {b: build_decode_step(cfg, mesh, b, max_len, dtype, attend_len=max_len,
                                            n_pages=kv_pages + 1, page_size=page_size, kv_dtype=kv_dtype,
                                            weights=weights, logprobs=max_logprobs)
                       for b in self.batch_buckets}
        full = self.decode_steps[slots]
        # a prompt's chunk at any start (after cached pages or earlier chunks too): it
        # attends to every position up to its last one
        self.prefill_steps = {b: build_prefill_step(cfg, full, b, attend_len=max_len) for b in self.buckets}
        # compiled decodes by batch: the full batch at warm-up, the smaller ones in the
        # background after start-up
        self._exec: dict[int, Any] = {}
        self._feeds: dict[tuple[int, int], Any] = {}  # compiled `_gather_tokens` by (prev, batch)
        self.compiled_all = threading.Event()
        self._compiler: threading.Thread | None = None
        self._stop = False
        # quantized in place of the loaded weights (the loaded copy is not kept beside them)
        self.params = quantize_params(model.params, param_shardings(cfg, mesh, strategy("serve")),
                                      cfg, weights)
        self.weight_bytes = weight_bytes(self.params)
        # made on their devices (on several hosts each process makes its own shards)
        self.pages = jax.jit(lambda: init_pages(cfg, kv_pages + 1, page_size, jnp.dtype(kv_dtype),
                                                full.kv_heads), out_shardings=full.page_shardings)()
        self.multiprocess = jax.process_count() > 1
        self._rep = full.token_sharding
        self.kv_bytes = sum(x.nbytes for x in jax.tree.leaves(self.pages))
        self.words = mask_words(cfg.vocab_size)  # of a row's token bitmask

    # ------------------------------------------------------------------ compiling

    def warm_up(self) -> None:
        """Every prefill and the full-batch decode once, on the scratch page only; then the
        smaller decode batches compile on a background thread (`compiled_all` is set when
        they are ready)."""
        row = np.zeros((1, self.pages_per_seq), np.int32)
        for b, step in self.prefill_steps.items():
            _, _, self.pages = step(self.params, self.pages, *self._host(
                (row, np.zeros((1, b), np.int32), np.int32(0), np.int32(1),
                 SlotSampling.one(0, 0.0, 0, 1.0, self.words)), self._rep))
        b = self.slots
        zeros = np.zeros((b,), np.int32)
        params, pages = self._abstract_args()
        # compiled ahead for its shardings: it takes the host's tokens and the device's
        # (`_gather_tokens`) alike, without compiling again
        self._exec[b] = self._compile_decode(b, params, pages)
        table = np.zeros((b, self.pages_per_seq), np.int32)
        out = self._exec[b](self.params, self.pages,
                            *self._rows(b, table, zeros, zeros, SlotSampling.rows([], b, self.words)))
        self.pages = out[2]
        self._compile_feed(b, b)
        jax.block_until_ready(self.pages)
        small = [k for k in self.decode_steps if k < self.slots]
        if small:
            self._compiler = threading.Thread(target=self._compile_small, args=(small, (params, pages)),
                                              name="megamesh-compile", daemon=True)
            self._compiler.start()
        else:
            self.compiled_all.set()

    def stop(self) -> None:
        # a compile still running in the background when the process exits is killed inside
        # XLA, which aborts the process: it stops after the executable in hand
        self._stop = True
        if self._compiler is not None:
            self._compiler.join(timeout=300)

    def _abstract_args(self) -> tuple[Any, Any]:
        like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)  # noqa: E731
        return jax.tree.map(like, self.params), jax.tree.map(like, self.pages)

    def _compile_small(self, batches: list[int], abstract: tuple[Any, Any]) -> None:
        params, pages = abstract
        t0 = time.perf_counter()
        try:
            for b in sorted(batches):
                if self._stop:
                    return
                self._exec[b] = self._compile_decode(b, params, pages)
            for prev in self.batch_buckets:  # the token gathers between every two batch sizes
                for b in self.batch_buckets:
                    if (prev, b) not in self._feeds and not self._stop:
                        self._compile_feed(prev, b)
            self.log(f"compiled {len(batches)} smaller decode batches in the background in "
                     f"{time.perf_counter() - t0:.1f}s")
        except Exception as e:  # noqa: BLE001 -- the full-batch steps still serve
            self.log(f"background compile of small decode batches failed: {type(e).__name__}: {e}")
        finally:
            self.compiled_all.set()

    def _compile_decode(self, b: int, params: Any, pages: Any) -> Any:
        step = self.decode_steps[b]
        return step.fn.lower(params, pages, *step.row_args()).compile()

    def _compile_feed(self, prev: int, batch: int) -> None:
        """Compile the gather of a `batch`-row decode's input tokens from a `prev`-row
        decode's output (replicated: `DecodeStep.token_sharding`) on the decode's row
        sharding (`_gather_tokens`)."""
        row = self.decode_steps[batch].slot_sharding
        like = lambda n, sh: jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sh)  # noqa: E731
        fn = jax.jit(_gather_tokens, in_shardings=(self._rep, row, row), out_shardings=row)
        self._feeds[(prev, batch)] = fn.lower(like(prev, self._rep), like(batch, row),
                                              like(batch, row)).compile()

    def _host(self, args: Any, sharding: Any) -> Any:
        """Host (numpy) arguments of a step as it takes them: as they are on one process; on
        several, global arrays of `sharding` (every process holds the same values)."""
        if not self.multiprocess:
            return args
        return jax.tree.map(lambda x: jax.make_array_from_callback(
            np.shape(x), sharding, lambda idx: np.asarray(x)[idx]), args)

    def _rows(self, b: int, table: np.ndarray, tokens: Any, positions: np.ndarray,
              sampling: SlotSampling) -> tuple:
        """A `b`-row decode's per-row arguments (`_host` on their shardings)."""
        step = self.decode_steps[b]
        if not self.multiprocess:
            return table, tokens, positions, sampling
        rows = lambda x: x if isinstance(x, jax.Array) else self._host(x, step.slot_sharding)  # noqa: E731
        return (self._host(table, step.table_sharding), rows(tokens), rows(positions),
                jax.tree.map(rows, sampling))

    # ------------------------------------------------------------------ steps

    def batch_for(self, rows: int) -> int:
        """The smallest compiled decode batch with at least `rows` rows."""
        return next(b for b in self.batch_buckets if b >= rows and b in self._exec)

    def can_feed(self, prev: Drawn | None, batch: int) -> bool:
        """Whether a `batch`-row decode can take its tokens from `prev` on the device (that
        gather is compiled)."""
        return prev is None or (prev.batch, batch) in self._feeds

    def prefill(self, table_row: np.ndarray, tokens: list[int], start: int, draws: tuple,
                mask: np.ndarray | None = None) -> tuple[int, Any]:
        """Run `tokens` at positions start.. into the pages of `table_row` (1,
        pages_per_seq) and draw the next token with `draws` (seed, temperature, top_k,
        top_p) under `mask`. Returns (the token, its `token_logprobs` on the device or
        None); waits for the step."""
        n = len(tokens)
        b = next(x for x in self.buckets if x >= n)
        padded = np.zeros((1, b), np.int32)
        padded[0, :n] = tokens
        t0 = time.perf_counter()
        tok, lps, self.pages = self.prefill_steps[b](self.params, self.pages, *self._host(
            (table_row, padded, np.int32(start), np.int32(n), SlotSampling.one(*draws, self.words, mask)),
            self._rep))
        tok = int(tok)  # (waits for the step: its time is counted here)
        self.stats["prefill_seconds"] += time.perf_counter() - t0
        return tok, lps

    def decode(self, table: np.ndarray, tokens: np.ndarray, positions: np.ndarray, rows: list[tuple],
               masks: dict[int, np.ndarray], prev: Drawn | None = None, src: np.ndarray | None = None,
               want_logprobs: bool = False) -> Drawn:
        """Dispatch one decode of `len(tokens)` rows (a compiled batch): row i feeds
        tokens[i], or row src[i] of `prev`'s tokens where src[i] >= 0, at positions[i],
        through its page table row; returns without waiting (`fetch` reads the result)."""
        B = len(tokens)
        t0 = time.perf_counter()
        if B not in self._exec:  # (another process's choice, compiled here in the background)
            self._exec[B] = self._compile_decode(B, *self._abstract_args())
        fed = tokens
        if src is not None and (src >= 0).any():
            if (prev.batch, B) not in self._feeds:
                self._compile_feed(prev.batch, B)
            slot = self.decode_steps[B].slot_sharding
            fed = self._feeds[(prev.batch, B)](prev.tokens, *self._host((src, tokens), slot))
            self.stats["decode_steps_fed_on_device"] += 1
        nxt, lps, self.pages = self._exec[B](self.params, self.pages, *self._rows(
            B, table, fed, positions, SlotSampling.rows(rows, B, self.words, masks)))
        self.stats["decode_seconds"] += time.perf_counter() - t0
        self.stats["decode_steps"] += 1
        self.stats[f"decode_steps_{B}"] += 1
        return Drawn(nxt, B, lps if want_logprobs else None)

    def fetch(self, drawn: Drawn) -> tuple[np.ndarray, Any]:
        """A dispatched decode's tokens and log-probabilities on the host (waits for it)."""
        t0 = time.perf_counter()
        nxt = np.asarray(drawn.tokens)
        lps = jax.device_get(drawn.logprobs)
        self.stats["decode_seconds"] += time.perf_counter() - t0
        return nxt, lps
