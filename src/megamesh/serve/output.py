"""The output processor: what becomes of each token the model draws for a request. Its
text is detokenized incrementally and streamed (`Event`), stop strings and the
end-of-sequence token end the turn, a grammar (llguidance) is advanced by the token and
says which tokens may come next, and the requested log-probabilities are gathered. Pure
Python on the host (no jax)."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import numpy as np

from megamesh.serve.request import BadGrammar, Event, Request
from megamesh.serve.text import END, Detokenizer, StopMatcher

MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


@dataclass(frozen=True)
class Finish:
    """How a request ends: its stop reason, its last text, the stop sequence it met."""

    reason: str
    text: str = ""
    sequence: str | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_ids: Any, vocab_size: int, words: int,
                 stats: collections.Counter) -> None:
        """`words`: int32 words of a token bitmask (`serve.step.mask_words`)."""
        self.tokenizer, self.eos_ids, self.vocab_size, self.words = tokenizer, eos_ids, vocab_size, words
        self.stats = stats
        self._grammar_tokenizer: Any = None

    def matcher(self, grammar: str) -> Any:
        """An llguidance matcher of `grammar` over this model's vocabulary (BadGrammar if it
        does not compile). llguidance: constrained decoding for tool inputs; compared with
        outlines-core and xgrammar in bench/grammar_engines.py."""
        import llguidance

        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = llguidance.LLTokenizer(
                self.tokenizer.to_str(), n_vocab=self.vocab_size, eos_token=list(self.eos_ids) or None)
        m = llguidance.LLMatcher(self._grammar_tokenizer, grammar, log_level=0)
        if m.is_error():
            raise BadGrammar(f"the output constraint does not compile: {m.get_error()}")
        return m

    def mask(self, req: Request) -> np.ndarray:
        """The bitmask of tokens `req`'s grammar allows next."""
        import llguidance.numpy as lnp

        out = np.zeros((1, self.words), np.int32)
        lnp.fill_next_token_bitmask(req.matcher, out, 0)
        return out[0]

    def start(self, req: Request) -> None:
        """At a request's first admission (a preempted one keeps its state)."""
        if req.detok is None:
            req.detok = Detokenizer(self.tokenizer, req.prompt)
            req.stopper = StopMatcher(list(req.sampling.stop), () if req.sampling.ignore_eos else (END,))

    def accept(self, req: Request, tok: int, logprob: Any = None) -> Finish | None:
        """A new token for `req`: stream its text (through `req.emit`), or say how the
        request ends. `logprob`: the token's (log-probability, alternatives) when the
        request asked for them."""
        if req.sampling.max_tokens == 0:  # prefill only (pre-warming the prefix cache)
            return Finish("max_tokens")
        constrained = req.matcher is not None
        if constrained and tok not in self.eos_ids:
            req.matcher.consume_token(tok)
        if tok in self.eos_ids and (not req.sampling.ignore_eos or constrained):
            text, hit = req.stopper.push(req.detok.flush())
            if hit is not None:
                return Finish(hit.reason, hit.text, hit.sequence)
            return Finish("end_turn", text + req.stopper.flush())
        req.n_out += 1
        req.last = tok
        req.out_ids.append(tok)
        if logprob is not None:
            req.logprobs.append((tok, *logprob))
        self.stats["output_tokens"] += 1
        text, hit = req.stopper.push(req.detok.push(tok))
        if hit is not None:
            return Finish(hit.reason, hit.text, hit.sequence)
        if constrained and (req.matcher.is_stopped() or (
                # at max_tokens a whole answer ends the turn (only the template's end marker
                # could have followed it)
                req.n_out >= req.sampling.max_tokens and req.matcher.is_accepting())):
            return Finish("end_turn", text + req.stopper.push(req.detok.flush())[0] + req.stopper.flush())
        if req.n_out >= req.sampling.max_tokens:
            more, hit = req.stopper.push(req.detok.flush())
            if hit is not None:
                return Finish(hit.reason, text + hit.text, hit.sequence)
            return Finish("model_context_window_exceeded" if req.sampling.window_limited else "max_tokens",
                          text + more + req.stopper.flush())
        if text or req.logprobs:
            req.emit(Event(text=text, output_tokens=req.n_out, logprobs=req.take_logprobs()))
        return None

    @staticmethod
    def finished(req: Request, end: Finish, error: str | None = None) -> None:
        """The request's last event."""
        req.emit(Event(text=end.text, done=True, stop_reason=end.reason, stop_sequence=end.sequence,
                       output_tokens=req.n_out, error=error, logprobs=req.take_logprobs()))


def row_logprobs(lps: Any, row: int, req: Request) -> tuple[float, list[tuple[int, float]]] | None:
    """Row `row` of a step's `token_logprobs` (chosen, ids, log-probabilities) as `req`
    asked: its token's log-probability and its first `req.sampling.logprobs`
    alternatives (id, log-probability); None when the request asked for none or the step
    computed none."""
    if lps is None or req.sampling.logprobs is None:
        return None
    chosen, ids, lp = (np.asarray(x) for x in lps)  # (a device array is fetched here)
    k = req.sampling.logprobs
    return float(chosen[row]), [(int(i), float(v)) for i, v in zip(ids[row][:k], lp[row][:k])]
