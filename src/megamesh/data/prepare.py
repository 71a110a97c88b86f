"""`megamesh data prepare`: a corpus tokenized into the shards of `data.shards`.

The inputs (text files and folders, JSONL and Parquet with the text in a named field) are
planned as units of about `UNIT_BYTES` (a run of small files, a byte range of a JSONL file
cut at line starts, a Parquet row group); worker processes tokenize units in parallel and
the main process appends their documents, in input order, to one stream per split (a
document goes to validation by a stable hash of its text, as `train.data` does) and writes
each complete shard. The result is a pure function of the inputs and options, whatever
the number of workers.

Restartable: after every unit that completed a shard, the position (next unit, the shards
written, the ids not yet in a shard) is saved in OUT/.prepare-state.json; a killed
prepare run again with the same inputs and options resumes there, rewriting at most the
shard it was writing. manifest.json is written last: without it OUT is not a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megamesh.data import shards as sh
from megamesh.data.tokenizer import TokenizerInfo
from megamesh.errors import ConfigError

UNIT_BYTES = 8 << 20
STATE = ".prepare-state.json"


@dataclass(frozen=True)
class Part:
    """A piece of one input file: a whole text file, a JSONL byte range, a Parquet row group."""
    file: str
    kind: str  # text | jsonl | parquet
    a: int = 0  # jsonl: byte range [a, b); parquet: row group a
    b: int = 0
    size: int = 0  # bytes, for progress


def _jsonl_parts(f: Path, unit: int) -> list[Part]:
    size = f.stat().st_size
    return [Part(str(f), "jsonl", a, min(a + unit, size), min(a + unit, size) - a)
            for a in range(0, max(size, 1), unit)]


def _parquet_parts(f: Path, field: str) -> list[Part]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("reading Parquet needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(f)
    if field not in pf.schema_arrow.names:
        raise ConfigError(f"{f}: Parquet has no {field!r} column (it has "
                          f"{', '.join(pf.schema_arrow.names)}); name the text column with --text-field")
    md = pf.metadata
    return [Part(str(f), "parquet", g, 0, md.row_group(g).total_byte_size) for g in range(md.num_row_groups)]


def plan_units(files: list[Path], field: str, unit: int = UNIT_BYTES) -> tuple[list[list[Part]], list[Path]]:
    """(units, binary files skipped): consecutive parts grouped up to `unit` bytes each."""
    from megamesh.train.data import is_binary

    parts: list[Part] = []
    binary: list[Path] = []
    for f in files:
        if f.suffix == ".parquet":
            parts += _parquet_parts(f, field)
        elif is_binary(f):
            binary.append(f)
        elif f.suffix == ".jsonl":
            parts += _jsonl_parts(f, unit)
        else:
            parts.append(Part(str(f), "text", size=f.stat().st_size))
    units: list[list[Part]] = []
    size = unit
    for p in parts:
        if size + p.size > unit and (not units or units[-1]):
            units.append([])
            size = 0
        units[-1].append(p)
        size += p.size
    return units, binary


def _jsonl_docs(p: Part, field: str) -> list[str]:
    docs = []
    with open(p.file, "rb") as fh:
        pos = p.a
        if p.a > 0:  # the line holding byte a-1 belongs to the range before
            fh.seek(p.a - 1)
            pos = p.a - 1 + len(fh.readline())
        while pos < p.b:
            line = fh.readline()
            if not line:
                break
            pos += len(line)
            if not line.strip():
                continue
            try:
                text = json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{p.file}: a JSONL line near byte {pos - len(line)} has no string "
                                  f"field {field!r} (name the text field with --text-field)") from None
            if not isinstance(text, str):
                raise ConfigError(f"{p.file}: field {field!r} near byte {pos - len(line)} is not a string")
            docs.append(text)
    return docs


def part_documents(p: Part, field: str) -> list[str]:
    if p.kind == "jsonl":
        docs = _jsonl_docs(p, field)
    elif p.kind == "parquet":
        import pyarrow.parquet as pq

        col = pq.ParquetFile(p.file).read_row_group(p.a, columns=[field]).column(field)
        docs = [str(t) for t in col.to_pylist() if t]
    else:
        docs = [Path(p.file).read_text(errors="replace")]
    return [d for d in docs if d.strip()]


_TOK: Any = None


def _init_worker(tok_json: str) -> None:
    global _TOK
    # two tokenizing threads per worker process (workers default to half the cores): on
    # 2 cores one process with encode_batch's two threads beat two single-threaded
    # worker processes (BENCHMARKS.md); processes add parallel reading and parsing
    os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_CPUS"] = "2"
    from tokenizers import Tokenizer

    _TOK = Tokenizer.from_str(tok_json)


def tokenize_unit(unit: list[Part], field: str, eos_id: int, val_fraction: float,
                  tok: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(ids of every document with EOS appended, concatenated; each document's length;
    whether it is held out for validation; input bytes)."""
    tok = tok or _TOK
    docs = [d for p in unit for d in part_documents(p, field)]
    enc = tok.encode_batch(docs) if docs else []
    lens = np.array([len(e.ids) + 1 for e in enc], np.int64)
    ids = np.empty(int(lens.sum()), np.uint32)
    pos = 0
    for e in enc:
        n = len(e.ids)
        ids[pos:pos + n] = e.ids
        ids[pos + n] = eos_id
        pos += n + 1
    val = np.array([zlib.crc32(d.encode()) % 10_000 < val_fraction * 10_000 for d in docs], bool)
    return ids, lens, val, sum(p.size for p in unit)


def _options_hash(opts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:16]


def _save_state(out: Path, opts_hash: str, next_unit: int, writers: dict[str, sh.ShardWriter],
                counts: dict[str, int]) -> None:
    gen = next_unit
    tails = {}
    for split, w in writers.items():
        ids, starts = w.tail()
        name = f".prepare-tail-{split}-{gen}.npz"
        sh.fsync_write(out / name, lambda f, ids=ids, starts=starts: np.savez(f, ids=ids, starts=starts))
        tails[split] = name
    state = {"options": opts_hash, "next_unit": next_unit, "counts": counts,
             "splits": {s: {"shards": w.shards, "tail": tails[s]} for s, w in writers.items()}}
    tmp = out / (STATE + ".tmp")
    sh.fsync_write(tmp, lambda f: f.write(json.dumps(state).encode()))
    os.replace(tmp, out / STATE)
    for f in out.glob(".prepare-tail-*.npz"):
        if f.name not in tails.values():
            f.unlink()


def _clean_temporaries(out: Path) -> None:
    for f in out.glob(".*.tmp"):
        f.unlink()


class _Bar:
    """A rich progress bar over input bytes in a terminal; a log line every 10 s otherwise."""

    def __init__(self, total: int, done: int, enabled: bool, log: Any):
        self.total, self.log, self.last = total, log, time.perf_counter()
        self.rich = None
        if enabled and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.rich = Progress(TextColumn("prepare"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"),
                                 transient=True)
            self.rich.start()
            self.task = self.rich.add_task("prepare", total=total, completed=done, info="")
        self.enabled = enabled

    def update(self, done: int, info: str) -> None:
        if self.rich is not None:
            self.rich.update(self.task, completed=done, info=info)
        elif self.enabled and time.perf_counter() - self.last > 10:
            self.last = time.perf_counter()
            self.log(f"prepare: {done / max(self.total, 1):.0%} of {self.total / 1e6:,.1f} MB; {info}")

    def close(self) -> None:
        if self.rich is not None:
            self.rich.stop()


def prepare(inputs: list[str] | None, out: Path, tokenizer: TokenizerInfo, *, text_field: str = "text",
            val_fraction: float = 0.02, shard_tokens: int = 1 << 26, block_tokens: int = sh.BLOCK_TOKENS,
            workers: int = 0, unit_bytes: int = UNIT_BYTES, progress: bool = True,
            log: Any = print) -> dict[str, Any]:
    """Tokenize `inputs` (None: the embedded default corpus) into a prepared dataset at
    `out`; returns its manifest. `workers` 0: half the cores (1: in this process)."""
    from megamesh.train.data import _expand, default_corpus_files

    out = Path(out)
    if (out / sh.MANIFEST).exists():
        raise ConfigError(f"--out {str(out)!r} already holds a prepared dataset: megamesh does not "
                          "overwrite it; choose another --out or remove it")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / STATE).exists())):
        raise ConfigError(f"--out {str(out)!r} exists and is not an unfinished prepare: choose a new "
                          "folder (nothing was written)")
    if not 0 <= val_fraction < 0.5:
        raise ConfigError(f"--val-fraction {val_fraction} must be in [0, 0.5)")
    if shard_tokens < 1 or block_tokens < 1:
        raise ConfigError("--shard-tokens must be positive")
    files = default_corpus_files() if not inputs else _expand(inputs)
    units, binary = plan_units(files, text_field, unit_bytes)
    dtype = sh.token_dtype(tokenizer.vocab_size)
    tok_json = tokenizer.tok.to_str()
    opts = {"files": [(str(f), f.stat().st_size) for f in files], "field": text_field,
            "val_fraction": val_fraction, "shard_tokens": shard_tokens, "block_tokens": block_tokens,
            "tokenizer": tokenizer.sha256, "eos": tokenizer.eos_id, "unit_bytes": unit_bytes}
    opts_hash = _options_hash(opts)
    created = not out.exists()
    try:
        return _prepare(out, opts_hash, units, files, binary, inputs, tokenizer, dtype, tok_json,
                        text_field=text_field, val_fraction=val_fraction, shard_tokens=shard_tokens,
                        block_tokens=block_tokens, workers=workers, progress=progress, log=log)
    except BaseException:
        if created and not (out / STATE).exists():  # nothing worth resuming: leave nothing
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare(out: Path, opts_hash: str, units: list[list[Part]], files: list[Path], binary: list[Path],
             inputs: list[str] | None, tokenizer: TokenizerInfo, dtype: np.dtype, tok_json: str, *,
             text_field: str, val_fraction: float, shard_tokens: int, block_tokens: int, workers: int,
             progress: bool, log: Any) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(out)
    start_unit, counts = 0, {"documents": 0, "bytes": 0}
    tails: dict[str, Any] = {}
    prior: dict[str, list] = {}
    if (out / STATE).exists():
        state = json.loads((out / STATE).read_text())
        if state["options"] != opts_hash:
            raise ConfigError(f"--out {str(out)!r} holds an unfinished prepare of other inputs or "
                              "options: run it again with the same ones, or choose a new --out")
        start_unit, counts = int(state["next_unit"]), state["counts"]
        for split, s in state["splits"].items():
            with np.load(out / s["tail"]) as z:
                tails[split] = (z["ids"], z["starts"])
            prior[split] = s["shards"]
        log(f"prepare: resuming at unit {start_unit} of {len(units)} "
            f"({sum(len(v) for v in prior.values())} shard(s) already written)")
    writers = {s: sh.ShardWriter(out, s, shard_tokens, dtype, block_tokens=block_tokens,
                                 shards=prior.get(s), tail=tails.get(s)) for s in ("train", "val")}
    total_bytes = sum(p.size for u in units for p in u)
    done_bytes = sum(p.size for u in units[:start_unit] for p in u)
    n_workers = workers or max(1, (os.cpu_count() or 1) // 2)
    bar = _Bar(total_bytes, done_bytes, progress, log)
    t0, tokens0 = time.perf_counter(), sum(w.tokens for w in writers.values())

    def consume(u: int, result: tuple[np.ndarray, np.ndarray, np.ndarray, int]) -> None:
        nonlocal done_bytes
        ids, lens, val, nbytes = result
        if u == len(units) - 1 and val_fraction > 0 and len(val) and not val.any() \
                and writers["val"].tokens == 0:
            val[-1] = True  # at least one validation document, as train.data.build_corpus
        wrote = 0
        ends = np.cumsum(lens)
        for i, (end, n) in enumerate(zip(ends, lens)):
            wrote += writers["val" if val[i] else "train"].add(ids[end - n:end])
        counts["documents"] += len(lens)
        counts["bytes"] += nbytes
        done_bytes += nbytes
        if wrote:
            _save_state(out, opts_hash, u + 1, writers, counts)
        made = sum(w.tokens for w in writers.values()) - tokens0
        bar.update(done_bytes, f"{made / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s, "
                   f"{sum(len(w.shards) for w in writers.values())} shards")

    try:
        if n_workers == 1 or len(units) - start_unit <= 1:
            for u in range(start_unit, len(units)):
                consume(u, tokenize_unit(units[u], text_field, tokenizer.eos_id, val_fraction,
                                         tok=tokenizer.tok))
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(n_workers, mp_context=mp.get_context("spawn"),
                                     initializer=_init_worker, initargs=(tok_json,)) as pool:
                ahead: dict[int, Any] = {}
                nxt = start_unit
                for u in range(start_unit, len(units)):
                    while nxt < len(units) and nxt < u + 2 * n_workers:
                        ahead[nxt] = pool.submit(tokenize_unit, units[nxt], text_field,
                                                 tokenizer.eos_id, val_fraction)
                        nxt += 1
                    consume(u, ahead.pop(u).result())
    finally:
        bar.close()
    for w in writers.values():
        w.finish()
    splits = {s: w.summary() for s, w in writers.items()}
    if splits["train"]["tokens"] == 0:
        raise ConfigError(f"{' '.join(inputs or [])!r} holds no text to train on"
                          + (f" ({len(binary)} binary file(s) skipped)" if binary else ""))
    tok_file = out / sh.TOKENIZER
    tokenizer.tok.save(str(tok_file))
    manifest = {
        "format": sh.FORMAT, "version": sh.VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "sources": {"inputs": list(inputs or ["<the Python standard library's source>"]),
                    "files": len(files) - len(binary), "binary_skipped": [str(b) for b in binary],
                    "bytes": counts["bytes"], "documents": counts["documents"], "text_field": text_field},
        "tokenizer": {**tokenizer.describe(), "file_sha256": sh.file_sha256(tok_file)},
        "dtype": dtype.name, "shard_tokens": shard_tokens, "block_tokens": block_tokens,
        "val_fraction": val_fraction, "splits": splits,
        "fingerprint": sh.fingerprint(splits, tokenizer.sha256),
    }
    tmp = out / (sh.MANIFEST + ".tmp")
    sh.fsync_write(tmp, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    os.replace(tmp, out / sh.MANIFEST)
    (out / STATE).unlink(missing_ok=True)
    for f in out.glob(".prepare-tail-*.npz"):
        f.unlink()
    dt = time.perf_counter() - t0
    made = sum(s["tokens"] for s in splits.values()) - tokens0
    manifest["_run"] = {"seconds": dt, "tokens_per_s": made / max(dt, 1e-9), "workers": n_workers}
    return manifest
