"""Training data: the embedded default corpus, a byte-level BPE tokenizer, packing, batches.

With no `--data`, the corpus is the Python standard library's own source files (present
on every machine with Python, nothing downloaded). Documents are tokenized by a
byte-level BPE trained with the `tokenizers` library, separated by an end-of-text
token, and packed into one token stream cut into sequences of seq_len + 1 tokens
(inputs and shifted targets). A held-out share of documents forms the validation split.

This in-memory corpus suits the embedded default and tests; a corpus at scale is
prepared into shards (`megamesh data prepare`, `megamesh.data`) and streamed. Either way
`megamesh.data.batches` makes the batches: the batch of step s is a pure function of
(corpus, seed, s), so the pipeline position saved in a checkpoint is just the step.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megamesh.errors import ConfigError
from megamesh.rundir import EOS
from megamesh.train.checkpoint import file_crc32

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".parquet", ".c", ".h", ".html"}


def default_corpus_files() -> list[Path]:
    """The standard library's .py files; tests, IDLE and the codec tables left out (~10 MB on 3.11)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root).as_posix()
        if "site-packages" in rel or "test" in rel or rel.startswith(("idlelib", "encodings")):
            continue
        files.append(f)
    return sorted(files)


def _expand(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not found:
                raise ConfigError(f"--data {str(p)!r} holds no text files "
                                  f"({', '.join(sorted(TEXT_SUFFIXES))})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"--data {str(p)!r} does not exist")
    return files


def is_binary(f: Path) -> bool:
    """A file that is not text: a NUL byte in its first 8 KiB, or not UTF-8 there."""
    with open(f, "rb") as fh:
        head = fh.read(8192)
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 4  # a character cut at the 8 KiB boundary is fine
    return False


def read_documents(paths: list[str] | None) -> tuple[list[str], str]:
    """Documents from text, JSONL (`text` field) and Parquet (`text` column) files.

    Returns (documents, description). None reads the embedded default corpus. Binary
    files are skipped and counted in the description, never trained on.
    """
    files = default_corpus_files() if not paths else _expand(paths)
    docs: list[str] = []
    binary = [f for f in files if f.suffix != ".parquet" and is_binary(f)]
    for f in files:
        if f in binary:
            continue
        if f.suffix == ".jsonl":
            for i, line in enumerate(f.read_text(errors="replace").splitlines()):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f"{f}:{i + 1}: each JSONL line needs a string field "
                                      "'text'") from None
                if not isinstance(text, str):
                    raise ConfigError(f"{f}:{i + 1}: 'text' must be a string, not "
                                      f"{json.dumps(text)[:40]}")
                docs.append(text)
        elif f.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ConfigError("reading Parquet needs pyarrow: pip install pyarrow") from None
            table = pq.read_table(f)
            if "text" not in table.column_names:
                raise ConfigError(f"{f}: Parquet needs a 'text' column; it has "
                                  f"{', '.join(table.column_names)}")
            docs += [str(t) for t in table.column("text").to_pylist() if t]
        else:
            docs.append(f.read_text(errors="replace"))
    docs = [d for d in docs if d.strip()]
    skipped = f", {len(binary)} binary file(s) skipped (e.g. {binary[0]})" if binary else ""
    if not docs:
        raise ConfigError(f"--data {' '.join(paths or [])!r} holds no text: every document is "
                          f"empty{skipped}")
    what = "Python standard library source" if not paths else ", ".join(paths)
    return docs, f"{what} ({len(files) - len(binary)} files, {len(docs)} documents{skipped})"


def source_fingerprint(docs: list[str]) -> str:
    """Identifies the documents themselves (not how they were tokenized)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
    return h.hexdigest()[:16]


def train_tokenizer(docs: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style) trained on the documents, with EOS as token 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


@dataclass
class Corpus:
    """Packed token streams for training and validation."""

    train: np.ndarray  # int32 token ids, documents separated by EOS
    val: np.ndarray
    eos_id: int
    fingerprint: str  # identifies documents + tokenizer: a resumed run must see the same data
    description: str
    source: str = ""  # identifies the documents alone (`source_fingerprint`)
    history: list = field(default_factory=list)  # earlier corpora of this run (--new-data)
    tokenizer_sha256: str = ""  # data.tokenizer.tokenizer_sha256 of the tokenizer that cut it
    kind = "text"

    def sources(self, split: str) -> list:
        """The split as the one token stream `data.batches.Batches` reads."""
        from megamesh.data.batches import ArrayStore, Source

        return [Source("corpus", ArrayStore(self.train if split == "train" else self.val))]

    def save(self, directory: Path) -> None:
        """Write atomically: a new directory beside it, renamed into place once complete
        (a failure midway leaves the previous corpus, or none, never half of one)."""
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / "train.npy", self.train)
        np.save(tmp / "val.npy", self.val)
        sums = {n: file_crc32(tmp / n) for n in ("train.npy", "val.npy")}
        (tmp / "corpus.json").write_text(json.dumps(
            {"kind": self.kind, "eos_id": self.eos_id, "fingerprint": self.fingerprint,
             "description": self.description, "source": self.source, "history": self.history,
             "tokenizer_sha256": self.tokenizer_sha256, "checksums": sums}))
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def read_meta(directory: Path) -> dict:
        return json.loads((directory / "corpus.json").read_text())

    @classmethod
    def load(cls, directory: Path, vocab_size: int | None = None) -> Corpus:
        """The packed corpus, checked: each array against its checksum and every token id
        below the tokenizer's `vocab_size` (a damaged file is an error, never trained on)."""
        meta = cls.read_meta(directory)
        meta.pop("kind", None)
        for name, crc in meta.pop("checksums", {}).items():
            if file_crc32(directory / name) != crc:
                raise ConfigError(f"{directory / name} does not match its checksum: the packed "
                                  "corpus is damaged; rebuild it (remove it, or train with "
                                  "--data FILES --new-data)")
        corpus = cls(np.load(directory / "train.npy"), np.load(directory / "val.npy"), **meta)
        for name, arr in (("train.npy", corpus.train), ("val.npy", corpus.val)):
            if vocab_size is not None and arr.size and not 0 <= int(arr.min()) <= int(arr.max()) < vocab_size:
                raise ConfigError(f"{directory / name} holds token ids outside the tokenizer's "
                                  f"{vocab_size}: the packed corpus is damaged; rebuild it")
        return corpus


def check_split(tokens: np.ndarray, seq_len: int, name: str) -> None:
    if (len(tokens) - 1) // seq_len < 1:
        raise ConfigError(f"the {name} split has {len(tokens)} tokens, fewer than one sequence of "
                          f"seq_len+1={seq_len + 1}: use more data or a shorter --seq")


def build_corpus(docs: list[str], description: str, tokenizer, val_fraction: float,
                 eos_id: int | None = None) -> Corpus:
    """Tokenize, split by a stable hash of each document, and pack with EOS separators
    (`eos_id`: the tokenizer's end-of-text id; default megamesh's own EOS token)."""
    from megamesh.data.tokenizer import tokenizer_sha256

    eos = tokenizer.token_to_id(EOS) if eos_id is None else eos_id
    ids = [e.ids for e in tokenizer.encode_batch(docs)]
    is_val = [zlib.crc32(d.encode()) % 10_000 < val_fraction * 10_000 for d in docs]
    if val_fraction > 0 and not any(is_val):
        is_val[-1] = True  # at least one validation document
    if all(is_val):
        raise ConfigError("--data has too few documents to hold out a validation split")

    def pack(keep: bool) -> np.ndarray:
        parts = [np.asarray(i + [eos], np.int32) for i, v in zip(ids, is_val) if v == keep]
        return np.concatenate(parts) if parts else np.zeros((0,), np.int32)

    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
    h.update(tokenizer.to_str().encode())
    return Corpus(pack(False), pack(True), eos, h.hexdigest()[:16], description,
                  source=source_fingerprint(docs), tokenizer_sha256=tokenizer_sha256(tokenizer))
