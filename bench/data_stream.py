"""Data at scale on this machine: prepare throughput, the streaming loader, and memory.

  python bench/data_stream.py [--gb 5] [--dir runs/data-bench] [--rounds 3] [--keep]

1. prepare: `megamesh data prepare` of a JSONL of the Python standard library's source
   four times over (~40 MB, a fixed 8192-token BPE) with 1 and with 2 worker processes,
   beside the peer: today's in-memory packing (`train.data.build_corpus`: `tokenizers`'
   own encode_batch, multi-threaded in Rust, one process). Units of 4 MB. Tokens/s,
   median of --rounds. (With 1 worker prepare runs in this process, encode_batch's
   threads on both cores; each worker process tokenizes on one thread.)
2. loader: reading the rows of 40 training batches (64 x 2048 tokens, random rows of
   the whole corpus) through `data.batches.Batches` from a synthetic prepared dataset of
   --gb GB of token ids (random ids, random document lengths, the real format, written by
   the real ShardWriter), beside the peer: numpy memory maps of the same shard files
   sliced directly (no checksums, no block cache: the floor a reader can reach).
3. memory: peak RSS (`/usr/bin/time -v`) of `megamesh train` (the tiny model, 20 steps,
   batch 8 x 256) streaming the --gb dataset vs streaming the 3.6M-token prepared
   stdlib: the corpus is ~1,400x larger, the memory should not be. The in-memory path
   (`np.load` of the whole packed stream) would hold the whole --gb in RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from megamesh.data import shards as sh  # noqa: E402
from megamesh.data.batches import Batches  # noqa: E402
from megamesh.data.prepare import prepare  # noqa: E402
from megamesh.data.tokenizer import TokenizerInfo  # noqa: E402
from megamesh.train.data import build_corpus, read_documents, train_tokenizer  # noqa: E402


def synthetic(out: Path, gb: float, tok: TokenizerInfo, shard_tokens: int = 1 << 27) -> dict:
    """A prepared dataset of `gb` GB of random ids in the real format (documents of
    geometric lengths, mean 3,000 ids), written by the real ShardWriter."""
    if (out / sh.MANIFEST).exists():
        return json.loads((out / sh.MANIFEST).read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    dtype = sh.token_dtype(tok.vocab_size)
    total = int(gb * 1e9 / dtype.itemsize)
    rng = np.random.default_rng(0)
    writers = {s: sh.ShardWriter(out, s, shard_tokens, dtype) for s in ("train", "val")}
    made, docs, t0 = 0, 0, time.perf_counter()
    while made < total:
        ids = rng.integers(1, tok.vocab_size, 1 << 24, dtype=dtype)
        lens = rng.geometric(1 / 3000, 8000)
        ends = np.minimum(np.cumsum(lens), len(ids))
        starts = np.concatenate([[0], ends[:-1]])
        for a, b in zip(starts, ends):
            if b <= a:
                break
            doc = ids[a:b].copy()
            doc[-1] = tok.eos_id
            writers["val" if docs % 100 == 0 else "train"].add(doc)
            docs += 1
        made += int(ends[-1])
        print(f"  synthetic: {min(made / total, 1):.0%}", end="\r", file=sys.stderr, flush=True)
    for w in writers.values():
        w.finish()
    tok.tok.save(str(out / sh.TOKENIZER))
    splits = {s: w.summary() for s, w in writers.items()}
    manifest = {"format": sh.FORMAT, "version": sh.VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "sources": {"inputs": ["synthetic random ids"], "documents": docs},
                "tokenizer": {**tok.describe(), "file_sha256": sh.file_sha256(out / sh.TOKENIZER)},
                "dtype": dtype.name, "shard_tokens": shard_tokens, "block_tokens": sh.BLOCK_TOKENS,
                "val_fraction": 0.01, "splits": splits, "fingerprint": sh.fingerprint(splits, tok.sha256)}
    (out / sh.MANIFEST).write_text(json.dumps(manifest, indent=1))
    print(f"  synthetic: {made:,} ids in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return manifest


def bench_prepare(tmp: Path, tok: TokenizerInfo, rounds: int, copies: int = 4) -> dict:
    docs, desc = read_documents(None)
    docs = [f"# copy {c}\n{d}" for c in range(copies) for d in docs]  # distinct documents
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    rows: dict[str, list[float]] = {"in-memory build_corpus (peer)": [], "prepare, 1 worker": [],
                                    "prepare, 2 workers": []}
    tokens = 0
    for r in range(rounds):
        t0 = time.perf_counter()
        c = build_corpus(docs, desc, tok.tok, 0.02)
        tokens = len(c.train) + len(c.val)
        rows["in-memory build_corpus (peer)"].append(tokens / (time.perf_counter() - t0))
        for w in (1, 2):
            out = tmp / f"prep-{w}-{r}"
            m = prepare([str(corpus)], out, tok, workers=w, unit_bytes=4 << 20, progress=False,
                        log=lambda m: None)
            rows[f"prepare, {w} worker{'s' if w > 1 else ''}"].append(m["_run"]["tokens_per_s"])
            shutil.rmtree(out)
    return {"tokens": tokens, "mb": round(corpus.stat().st_size / 1e6, 1),
            "tokens_per_s": {k: statistics.median(v) for k, v in rows.items()}}


def bench_loader(ds: Path, rounds: int, batch: int = 64, seq: int = 2048, steps: int = 40) -> dict:
    from megamesh.data.batches import PreparedData

    data = PreparedData([(str(ds), 1.0)])
    m = data.sets[0].manifest
    maps = [np.load(ds / s["name"], mmap_mode="r") for s in m["splits"]["train"]["shards"]]
    S = m["shard_tokens"]

    def floor_read(pairs: np.ndarray) -> np.ndarray:
        out = np.empty((len(pairs), seq + 1), np.int32)
        for i, (_, r) in enumerate(pairs):
            a = int(r) * seq
            k, off = divmod(a, S)
            part = maps[k][off:off + seq + 1]
            if len(part) < seq + 1:
                part = np.concatenate([part, maps[k + 1][:seq + 1 - len(part)]])
            out[i] = part
        return out

    res: dict[str, list[float]] = {"megamesh Batches (checked blocks)": [], "numpy memmap slices (floor)": []}
    for r in range(rounds):
        b = Batches(data.sources("train"), seq, batch, seed=100 + r, split="train")
        t0 = time.perf_counter()
        for s in range(steps):
            b[s]
        dt = time.perf_counter() - t0
        res["megamesh Batches (checked blocks)"].append(steps * batch * (seq + 1) / dt)
        t0 = time.perf_counter()
        for s in range(steps):
            floor_read(b.rows(s))
        res["numpy memmap slices (floor)"].append(steps * batch * (seq + 1) / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in res.items()}


def peak_rss(out: Path, data: Path) -> tuple[float, float]:
    """(peak RSS in GB, seconds) of `megamesh train` on `data`."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "megamesh.cli", "train", "--out", str(out),
           "--data", str(data), "--steps", "20", "--batch", "8", "--seq", "256", "--no-progress",
           "--train.eval.batches=2", "--train.eval.every=1000", "--train.checkpoint.every=1000"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return kb / 1e6, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=5.0)
    ap.add_argument("--dir", default=str(ROOT / "runs" / "data-bench"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic dataset")
    args = ap.parse_args()
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    docs, _ = read_documents(None)
    tok = TokenizerInfo(train_tokenizer(docs[:200], 8192), 0, "BPE on 200 stdlib files")
    results: dict = {"versions": {"python": sys.version.split()[0], "numpy": np.__version__}}
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        results["prepare"] = bench_prepare(Path(tmp), tok, args.rounds)
        print(json.dumps(results["prepare"], indent=1), flush=True)
        small = Path(tmp) / "stdlib"
        prepare(None, small, tok, workers=2, progress=False, log=lambda m: None)
        big = work / f"synthetic-{args.gb:g}gb"
        m = synthetic(big, args.gb, tok)
        ids = sum(s["tokens"] for s in m["splits"].values())
        results["synthetic"] = {"ids": ids, "bytes": ids * np.dtype(m["dtype"]).itemsize}
        results["loader_tokens_per_s"] = bench_loader(big, args.rounds)
        print(json.dumps(results["loader_tokens_per_s"], indent=1), flush=True)
        rss = {}
        for name, data in (("stdlib (3.6M tokens)", small), (f"synthetic ({ids / 1e9:.2f}G tokens)", big)):
            gb, s = peak_rss(Path(tmp) / "run", data)
            rss[name] = {"peak_rss_gb": round(gb, 3), "seconds": round(s, 1)}
        results["train_peak_rss"] = rss
        print(json.dumps(rss, indent=1), flush=True)
    if not args.keep:
        shutil.rmtree(big, ignore_errors=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
