"""A serving request and what passes between the engine's parts and its callers: what a
request asks (`SamplingParams`), what it is given (`Event`), its state while queued and
running (`Request`), and the errors a submission can meet. Pure Python (no jax): the
scheduler and the KV page pool work on these alone."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megamesh.errors import MegameshError

# (token id, its log-probability, [(id, log-probability) of the most likely ones])
Logprob = tuple[int, float, list[tuple[int, float]]]


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
    # with SamplingParams.logprobs: the output tokens accepted since the last event
    logprobs: list[Logprob] | None = None


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
    logprobs: list[Logprob] = dataclasses.field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    detok: Any = None
    stopper: Any = None
    matcher: Any = None  # llguidance.LLMatcher of `sampling.grammar`: which tokens may come next

    def take_logprobs(self) -> list[Logprob] | None:
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

    @property
    def context(self) -> list[int]:
        """What its prefill computes when admitted: the prompt and the tokens generated so
        far (a preempted request's)."""
        return self.prompt + self.out_ids

