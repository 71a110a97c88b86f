"""`megamesh data`: prepare a corpus as checksummed token shards, verify a prepared dataset."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megamesh.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare a corpus as token shards for training at scale",
                       description="Tokenize a corpus into checksummed shards that `megamesh train "
                       "--data PREPARED` streams (see megamesh/data/shards.py for the format).")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    pr = verbs.add_parser("prepare", help="tokenize text files, JSONL or Parquet into shards",
                          description="Tokenize INPUTs (files or folders of .txt/.md/.py/..., .jsonl, "
                          ".parquet; none: the Python standard library's source) into OUT: shards of "
                          "token ids, their indexes, manifest.json and tokenizer.json. Parallel over "
                          "--workers processes; a killed run, started again with the same arguments, "
                          "resumes at the shard it was writing.")
    pr.add_argument("inputs", nargs="*", help="files or folders (default: the Python standard library)")
    pr.add_argument("--out", required=True, help="a new folder for the prepared dataset")
    pr.add_argument("--tokenizer", help="a tokenizer.json, a Hugging Face model directory (its own "
                    "tokenizer, e.g. Llama 3's), a training run or a prepared dataset; default: train a "
                    "byte-level BPE of --vocab tokens on a sample of the inputs")
    pr.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary when training one (default 8192)")
    pr.add_argument("--sample-mb", type=float, default=256,
                    help="MB of input text the BPE is trained on (default 256)")
    pr.add_argument("--eos", help="the end-of-text token, when the tokenizer's files do not name it")
    pr.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    pr.add_argument("--val-fraction", type=float, default=0.02,
                    help="share of documents held out for validation (default 0.02)")
    pr.add_argument("--shard-tokens", type=int, default=1 << 26, help="ids per shard (default 2^26)")
    pr.add_argument("--workers", type=int, default=0,
                    help="tokenizing processes of two threads each (default: half the cores; 1: "
                    "in this process)")
    pr.add_argument("--unit-mb", type=float, default=8,
                    help="MB of input per work unit (default 8): the granularity of parallelism")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--json", action="store_true", help="print the manifest as JSON")
    pr.set_defaults(run=run_prepare)
    ve = verbs.add_parser("verify", help="check every shard of a prepared dataset against its SHA-256",
                          description="Read every file of a prepared dataset (a folder or a URL) and "
                          "check it against the manifest; exit 1 naming each damaged or missing file.")
    ve.add_argument("dataset", help="a prepared dataset: folder or URL (gs://, file://, ...)")
    ve.set_defaults(run=run_verify)


def _no_extra(extra: list[str]) -> None:
    if extra:
        raise ConfigError(f"unknown argument(s): {' '.join(extra)}")


def _sample_documents(inputs: list[str] | None, field: str, mb: float) -> list[str]:
    from megamesh.data.prepare import part_documents, plan_units
    from megamesh.train.data import _expand, default_corpus_files

    files = default_corpus_files() if not inputs else _expand(inputs)
    units, _ = plan_units(files, field)
    docs, size = [], 0
    for unit in units:
        for part in unit:
            for d in part_documents(part, field):
                docs.append(d)
                size += len(d)
                if size >= mb * 1e6:
                    return docs
    return docs


def run_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    _no_extra(extra)
    from megamesh.data.prepare import prepare
    from megamesh.data.tokenizer import TokenizerInfo, load_tokenizer_spec

    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers} must be >= 0 (0: half the cores)")
    if args.shard_tokens < 1024:
        raise ConfigError(f"--shard-tokens {args.shard_tokens} must be >= 1024")
    out = Path(args.out)
    if (out / "manifest.json").exists():
        raise ConfigError(f"--out {str(out)!r} already holds a prepared dataset: megamesh does not "
                          "overwrite it; choose another --out or remove it")
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    if args.tokenizer:
        tok = load_tokenizer_spec(args.tokenizer, args.eos)
    else:
        from megamesh.train.data import train_tokenizer

        if args.vocab < 300:
            raise ConfigError(f"--vocab {args.vocab} must be >= 300 (256 bytes + merges)")
        t0 = time.perf_counter()
        docs = _sample_documents(args.inputs, args.text_field, args.sample_mb)
        if not docs:
            raise ConfigError(f"{' '.join(args.inputs)!r} holds no text")
        tok = TokenizerInfo(train_tokenizer(docs, args.vocab), 0, "byte-level BPE trained on "
                            f"{sum(map(len, docs)) / 1e6:,.1f} MB of the inputs")
        log(f"prepare: {tok.source}: vocab {tok.vocab_size} ({time.perf_counter() - t0:.1f}s)")
    m = prepare(args.inputs or None, out, tok, text_field=args.text_field, val_fraction=args.val_fraction,
                shard_tokens=args.shard_tokens, workers=args.workers, progress=not args.no_progress,
                unit_bytes=max(1, int(args.unit_mb * 1e6)),
                log=log)
    run = m.pop("_run")
    if args.json:
        print(json.dumps(m, indent=1))
    tr, va = m["splits"]["train"], m["splits"]["val"]
    print(f"prepared {tr['tokens'] + va['tokens']:,} tokens ({tr['tokens']:,} train + {va['tokens']:,} "
          f"validation) from {m['sources']['documents']:,} documents in "
          f"{len(tr['shards']) + len(va['shards'])} shards -> {out}; {run['tokens_per_s']:,.0f} tokens/s "
          f"with {run['workers']} worker(s); tokenizer {m['tokenizer']['sha256'][:12]} "
          f"(vocab {m['tokenizer']['vocab_size']}, EOS {m['tokenizer']['eos_token']!r})",
          file=sys.stderr if args.json else sys.stdout)
    return 0


def run_verify(args: argparse.Namespace, extra: list[str]) -> int:
    _no_extra(extra)
    from megamesh.data.shards import Prepared

    p = Prepared(args.dataset)
    problems = p.verify()
    n = sum(len(s["shards"]) for s in p.manifest["splits"].values())
    for line in problems:
        print(f"megamesh data verify: {line}", file=sys.stderr)
    if problems:
        print(f"megamesh data verify: error: {len(problems)} problem(s) in {n} shards of {args.dataset}",
              file=sys.stderr)
        return 1
    toks = sum(s["tokens"] for s in p.manifest["splits"].values())
    print(f"{args.dataset}: {n} shards, {toks:,} tokens, every checksum matches")
    return 0
