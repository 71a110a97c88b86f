"""Text around the engine: the chat template, incremental detokenization and stop strings.

Chat template (documented in the README, the same for the Messages and OpenAI APIs):

    <|system|>
    {system text}<|end|>
    <|user|>
    {user text}<|end|>
    <|assistant|>
    {assistant text}<|end|>
    ...
    <|assistant|>
    {a trailing assistant turn, continued without <|end|>}

The system turn is left out when there is no system prompt. The markers are plain text
to the tokenizer (the embedded BPE has only <|endoftext|> as a special token), so the
template works for any checkpoint. Generation ends the turn (stop_reason `end_turn`) when
the model emits its end-of-sequence token or writes the `<|end|>` marker.
"""

from __future__ import annotations

from dataclasses import dataclass

END = "<|end|>"
ROLES = ("system", "user", "assistant")


def render_chat(system: str | None, turns: list[tuple[str, str]]) -> str:
    """The prompt for a conversation. `turns` are (role, text) with role user/assistant,
    consecutive same-role turns already merged; a trailing assistant turn is continued."""
    parts = []
    if system:
        parts.append(f"<|system|>\n{system}{END}\n")
    for i, (role, text) in enumerate(turns):
        last = i == len(turns) - 1
        if role == "assistant" and last:
            parts.append(f"<|assistant|>\n{text}")
            return "".join(parts)
        parts.append(f"<|{role}|>\n{text}{END}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def merge_turns(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Consecutive turns of the same role become one (joined by a blank line)."""
    out: list[tuple[str, str]] = []
    for role, text in turns:
        if out and out[-1][0] == role:
            out[-1] = (role, out[-1][1] + "\n\n" + text)
        else:
            out.append((role, text))
    return out


class Detokenizer:
    """Turns a growing list of token ids into text deltas, holding back bytes that do not
    yet form a whole UTF-8 character (byte-level BPE splits characters across tokens).

    Decodes only a short window of recent tokens per step (the approach of Hugging Face's
    text-generation-inference), so the cost per token does not grow with the output."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tok = tokenizer
        self.ids = list(prompt_ids[-4:])  # context so the first tokens decode as in a sequence
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=False)
        new_text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=False)
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
            return ""  # an incomplete character: wait for the next token
        delta = new_text[len(prefix_text):]
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def flush(self) -> str:
        """Whatever is still held back (at the end of a request)."""
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=False)
        new_text = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=False)
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):]


@dataclass
class StopHit:
    text: str  # text to emit before stopping
    reason: str  # "end_turn" | "stop_sequence"
    sequence: str | None


class StopMatcher:
    """Finds stop strings in streamed text; holds back any tail that could start one, so
    no part of a stop string is ever emitted."""

    def __init__(self, stop_sequences: list[str], end_markers: tuple[str, ...] = (END,)):
        self.stops = [(s, "stop_sequence") for s in stop_sequences if s] + \
                     [(m, "end_turn") for m in end_markers]
        self.pending = ""

    def push(self, delta: str) -> tuple[str, StopHit | None]:
        """Returns (text safe to emit now, a hit or None)."""
        self.pending += delta
        best = None
        for s, reason in self.stops:
            i = self.pending.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s, reason)
        if best is not None:
            i, s, reason = best
            text, self.pending = self.pending[:i], ""
            return "", StopHit(text, reason, s if reason == "stop_sequence" else None)
        hold = 0
        for s, _ in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
