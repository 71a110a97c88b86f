"""The batches of a run: which rows make step s's batch, and reading only the rows a
process needs.

A split is one or more token streams (`Source`: the packed in-memory corpus, or a
prepared dataset's `SplitReader`), each cut into rows of seq_len + 1 ids (inputs and
shifted targets). Row order comes from Grain: per source a `MapDataset.range` shuffled
from the seed and repeated (epoch after epoch), the sources mixed by weight with
`MapDataset.mix` (a deterministic interleave), batched. So the batch of step s is a pure
function of (data, seed, s), whatever the number of processes reading it, and a resumed
run needs only its step. `Batches.array` builds step s's global array reading only the
rows of this process's devices; `consumed` says how many tokens of each source the first
s steps used (closed form, the same interleave as Grain's mix).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megamesh.data.shards import DataError, Prepared


@dataclass
class Source:
    name: str
    store: Any  # len() ids; read(a, b) -> int32 ids
    weight: float = 1.0


class ArrayStore:
    """An in-memory token stream (the packed corpus of `train.data`)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, a: int, b: int) -> np.ndarray:
        return np.asarray(self.tokens[a:b], np.int32)


def _tag(source: int, i: Any) -> tuple[int, int]:
    return source, int(i)


def grain_proportions(weights: list[float]) -> list[int]:
    """The integer proportions Grain's `MapDataset.mix` turns float weights into."""
    scale = 100 / min(weights)
    return [int(w * scale) for w in weights]


def mixture_counts(n: int, weights: list[float]) -> list[int]:
    """How many of the first `n` elements of Grain's weighted mix come from each source:
    the closed form of its interleave (each source takes floor-proportional shares of
    what the sources before it left); `tests/test_data_stream.py` checks it against Grain."""
    props = grain_proportions(weights)
    remaining, cur, counts = sum(props), n, []
    for p in props:
        nxt = cur * (remaining - p) // remaining
        counts.append(cur - nxt)
        remaining -= p
        cur = nxt
    return counts


def check_rows(sources: list[Source], seq_len: int, split: str) -> list[int]:
    """Rows of seq_len + 1 ids in each source of a split; a source without one is an error
    (exit 1, as other unusable data)."""
    lengths = [max(0, (len(s.store) - 1) // seq_len) for s in sources]
    for s, n in zip(sources, lengths):
        if n < 1:
            raise DataError(f"the {split} split{'' if s.name == 'corpus' else ' of ' + s.name} has "
                            f"{len(s.store)} tokens, fewer than one sequence of seq_len+1="
                            f"{seq_len + 1}: use more data or a shorter --seq")
    return lengths


class Batches:
    """Item `step`: the (rows, seq_len + 1) int32 batch of that step; `rows` = (first,
    count) takes a slice of each global batch (a DiLoCo island's share). Reading
    statistics (`tokens_read`, `read_s`) measure the loader alone."""

    def __init__(self, sources: list[Source], seq_len: int, batch: int, seed: int, *, split: str,
                 rows: tuple[int, int] | None = None):
        import grain  # here: the step and benchmarks import this package on machines without it

        self.sources, self.T, self.batch = sources, seq_len, batch
        self.lengths = check_rows(sources, seq_len, split)
        parts = [grain.MapDataset.range(n).shuffle(seed=seed + 7919 * i).repeat()
                 .map(functools.partial(_tag, i)) for i, n in enumerate(self.lengths)]
        self.weights = [s.weight for s in sources]
        ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, self.weights)
        self.index = ds.batch(batch, drop_remainder=True, batch_fn=np.array)
        first, count = rows or (0, batch)
        self.lo, self.hi = first, first + count
        self._lock = threading.Lock()
        self.tokens_read, self.read_s = 0, 0.0

    def rows(self, step: int) -> np.ndarray:
        """(count, 2): (source, row) of each of this view's rows of step `step`."""
        return np.asarray(self.index[step])[self.lo:self.hi]

    def read_rows(self, pairs: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        T = self.T
        out = np.stack([self.sources[s].store.read(r * T, r * T + T + 1) for s, r in pairs])
        with self._lock:
            self.tokens_read += out.size
            self.read_s += time.perf_counter() - t0
        return out

    def __getitem__(self, step: int) -> np.ndarray:
        return self.read_rows(self.rows(int(step)))

    def array(self, step: int, sharding: Any) -> Any:
        """Step `step`'s batch as a global jax.Array on `sharding`; this process reads only
        the rows its own devices hold (each distinct row range once)."""
        import jax

        pairs = self.rows(int(step))
        cache: dict[tuple[int | None, int | None], np.ndarray] = {}

        def shard(index: tuple[slice, ...]) -> np.ndarray:
            r = index[0]
            key = (r.start, r.stop)
            if key not in cache:
                cache[key] = self.read_rows(pairs[r])
            return cache[key][(slice(None), *index[1:])]

        return jax.make_array_from_callback((len(pairs), self.T + 1), sharding, shard)

    def consumed(self, steps: int) -> dict[str, dict[str, int]]:
        """Per source: tokens (rows x seq_len) and the epoch reached after `steps` global
        batches (all rows, not only this view's)."""
        counts = mixture_counts(steps * self.batch, self.weights)
        return {s.name: {"tokens": c * self.T, "epoch": c // n}
                for s, c, n in zip(self.sources, counts, self.lengths)}


# -- --data: text, prepared datasets, mixtures -------------------------------------------


def _weight(text: str, entry: str) -> float:
    try:
        w = float(text)
    except ValueError:
        raise DataError(f"--data {entry!r}: the mixture weight {text!r} is not a number") from None
    if not (math.isfinite(w) and w > 0):
        raise DataError(f"--data {entry!r}: a mixture weight must be positive (got {text})")
    return w


def _is_prepared(spec: str) -> bool:
    if "://" in spec:
        return True
    p = Path(spec)
    return p.is_dir() and ((p / "manifest.json").is_file() or (p / ".prepare-state.json").is_file())


def parse_data(items: list[str] | None) -> list[tuple[str, float]] | None:
    """The prepared datasets and weights `--data` names, or None when it names text files
    (or nothing). Forms: `PREPARED`, `a:0.7,b:0.3` (one or several words), or a YAML file
    `{sources: [{path: a, weight: 0.7}, ...]}`."""
    if not items:
        return None
    if len(items) == 1 and items[0].endswith((".yaml", ".yml")) and Path(items[0]).is_file():
        from megamesh.fileio import read_json_or_yaml

        doc = read_json_or_yaml(items[0], "--data mixture")
        srcs = doc.get("sources") if isinstance(doc, dict) else doc
        if not (isinstance(srcs, list) and srcs
                and all(isinstance(s, dict) and "path" in s for s in srcs)):
            raise DataError(f"--data {items[0]!r}: a mixture file lists `sources:`, each with a "
                            "`path` and a `weight`")
        entries = [(str(s["path"]), _weight(str(s.get("weight", 1)), str(s["path"]))) for s in srcs]
        for spec, _ in entries:
            if not _is_prepared(spec):
                raise DataError(f"--data {items[0]!r}: {spec!r} is not a prepared dataset "
                                "(`megamesh data prepare` makes one)")
        return entries
    entries: list[tuple[str, float | None]] = []
    for word in items:
        for entry in filter(None, word.split(",")):
            spec, _, w = entry.rpartition(":")
            try:
                float(w)
                weighted = bool(spec)
            except ValueError:
                weighted = False
            entries.append((spec, _weight(w, entry)) if weighted else (entry, None))
    prepared = [_is_prepared(s) for s, _ in entries]
    if not any(prepared):
        if any(w is not None for _, w in entries):
            raise DataError("--data: mixture weights go with prepared datasets (`megamesh data "
                            "prepare` makes them), not text files")
        return None
    if not all(prepared):
        raw = next(s for (s, _), p in zip(entries, prepared) if not p)
        raise DataError(f"--data mixes prepared datasets with text ({raw!r}): prepare the text "
                        "first (`megamesh data prepare`)")
    if len(entries) > 1 and any(w is None for _, w in entries):
        raise DataError("--data: give every source of a mixture its weight (a:0.7,b:0.3)")
    return [(s, w if w is not None else 1.0) for s, w in entries]


class PreparedData:
    """The prepared datasets a run trains on, mixed by weight. All must share one
    tokenizer (the model's embedding is tied to it)."""

    kind = "prepared"

    def __init__(self, entries: list[tuple[str, float]]):
        self.entries = entries
        self.sets = [Prepared(spec) for spec, _ in entries]
        first = self.sets[0]
        for p in self.sets[1:]:
            if p.tokenizer_sha256 != first.tokenizer_sha256:
                raise DataError(f"--data {p.spec!r} was cut with another tokenizer than "
                                f"{first.spec!r} (SHA-256 {p.tokenizer_sha256[:12]}... vs "
                                f"{first.tokenizer_sha256[:12]}...): a mixture needs one tokenizer")
        names = [p.spec.rstrip("/").rsplit("/", 1)[-1] or p.spec for p in self.sets]
        self.names = [n if names.count(n) == 1 else p.spec for n, p in zip(names, self.sets)]
        self.eos_id = first.eos_id
        self.tokenizer_sha256 = first.tokenizer_sha256
        h = hashlib.sha256(json.dumps([(p.fingerprint, w) for p, (_, w) in zip(self.sets, entries)]).encode())
        self.fingerprint = h.hexdigest()[:16]
        self.description = "prepared " + ", ".join(
            f"{n} ({p.manifest['splits']['train']['tokens']:,} tokens)"
            + (f" x{w:g}" if len(entries) > 1 else "")
            for n, p, (_, w) in zip(self.names, self.sets, entries))

    @property
    def vocab_size(self) -> int:
        return int(self.sets[0].manifest["tokenizer"]["vocab_size"])

    def tokenizer_json(self) -> str:
        return self.sets[0].tokenizer_json()

    def sources(self, split: str) -> list[Source]:
        return [Source(n, p.split(split), w) for n, p, (_, w) in zip(self.names, self.sets, self.entries)]

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "sources": [{"path": s if "://" in s else str(Path(s).absolute()),
                                                "weight": w, "fingerprint": p.fingerprint}
                                               for (s, w), p in zip(self.entries, self.sets)],
                "fingerprint": self.fingerprint, "eos_id": self.eos_id,
                "tokenizer_sha256": self.tokenizer_sha256, "description": self.description}
