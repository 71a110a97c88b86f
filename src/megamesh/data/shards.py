"""A prepared dataset: fixed-size, checksummed shards of token ids, written by
`megamesh data prepare` and read by training, block by block with ranged reads, from a
local folder or from any URL an fsspec filesystem handles (gs:// with gcsfs, s3://,
file://, memory://), retried on transient errors.

    manifest.json               written last: sources, tokenizer (hash, EOS), dtype, the
                                shards of each split with their token and document counts
                                and SHA-256 checksums
    tokenizer.json              the tokenizer the ids come from
    {split}-{k:05d}.npy         token ids (uint16 when the vocabulary fits, else uint32):
                                exactly `shard_tokens` per shard, the last one fewer
    {split}-{k:05d}.index.npz   doc_starts: where in the shard a document begins;
                                block_crc32: the CRC-32 of every block of `block_tokens` ids

Each split (train, val) is one stream of documents, each ended by the tokenizer's EOS; a
document may run on into the next shard. Why .npy shards (numpy's own format) rather than
Parquet or ArrayRecord: token ids are fixed-width, so the window a training row needs is
one byte range of one (or two) files, locally or remotely; the sequence length is chosen
at training time, not baked into records; and any byte reader (a file, fsspec) serves
them. Parquet would decode a whole compressed row group per window; ArrayRecord stores
records (a document or a fixed sequence each) and reads paths through its own C++ file
layer, not fsspec.

Integrity without reading 60 TB at start-up: a reader checks each block's CRC-32 the first
time it reads it (`DataError` naming the shard and block on a mismatch); the whole-file
SHA-256s in the manifest are checked by `megamesh data verify` and by the index files'
loads (small).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from megamesh.errors import ConfigError

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT = "megamesh-tokens"
VERSION = 1
# ids per checksummed block (16-32 KiB): about a training row, so a random row reads
# little more than itself (65,536 read 64x the bytes of a 2,048-token row)
BLOCK_TOKENS = 1 << 13


class DataError(ConfigError):
    """Prepared data that cannot be used: missing, damaged, or unreachable. One line."""

    exit_code = 1


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.npy"


def index_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.index.npz"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def block_crcs(tokens: np.ndarray, block: int) -> np.ndarray:
    return np.array([zlib.crc32(tokens[i:i + block].tobytes()) for i in range(0, len(tokens), block)],
                    np.uint32)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# -- where the data lives --------------------------------------------------------------

_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class Location:
    """A prepared dataset's folder or URL. Plain paths are read with the OS's file calls;
    URLs (any scheme, file:// included) through fsspec; each read retried on a transient error
    (`attempts` tries, exponential back-off from `backoff_s`); a permanent one (missing,
    forbidden) or the last failed try is a `DataError` naming the file."""

    def __init__(self, spec: str, *, attempts: int = 5, backoff_s: float = 0.05):
        self.spec, self.attempts, self.backoff_s = spec, attempts, backoff_s
        self.fs: Any = None
        self.local: Path | None = None
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._fd_lock = threading.Lock()
        if "://" in spec:
            scheme = spec.split("://", 1)[0]
            try:
                import fsspec

                self.fs, self.root = fsspec.core.url_to_fs(spec)
            except (ImportError, ValueError) as e:
                raise DataError(f"--data {spec!r}: no installed library reads {scheme}:// URLs "
                                f"({str(e).splitlines()[0]}); gs:// needs `pip install gcsfs`, "
                                "s3:// `pip install s3fs`") from None
            self.root = self.root.rstrip("/")
        else:
            self.local = Path(spec)

    def __str__(self) -> str:
        return self.spec

    def where(self, name: str) -> str:
        return f"{self.spec.rstrip('/')}/{name}"

    def path(self, name: str) -> Path:
        assert self.local is not None
        return self.local / name

    def _retry(self, name: str, fn: Any) -> Any:
        for k in range(self.attempts):
            try:
                return fn()
            except FileNotFoundError:
                raise DataError(f"{self.where(name)}: the file is missing") from None
            except _PERMANENT as e:
                raise DataError(f"{self.where(name)}: {type(e).__name__}: {e.strerror or e}") from None
            except (OSError, TimeoutError, ConnectionError) as e:  # transient: try again
                if k == self.attempts - 1:
                    raise DataError(f"{self.where(name)}: still failing after {self.attempts} "
                                    f"attempts: {type(e).__name__}: {e}") from None
                time.sleep(self.backoff_s * 2 ** k)
        raise AssertionError("unreachable")

    def _pread(self, name: str, start: int, n: int) -> bytes:
        """`n` bytes at `start` of a local file, through a small LRU of open descriptors."""
        with self._fd_lock:
            fd = self._fds.get(name)
            if fd is None:
                fd = os.open(self.local / name, os.O_RDONLY)
                self._fds[name] = fd
                while len(self._fds) > 32:
                    os.close(self._fds.popitem(last=False)[1])
            else:
                self._fds.move_to_end(name)
            return os.pread(fd, n, start)

    def exists(self, name: str) -> bool:
        if self.local is not None:
            return (self.local / name).is_file()
        return bool(self._retry(name, lambda: self.fs.exists(f"{self.root}/{name}")))

    def read_bytes(self, name: str) -> bytes:
        if self.local is not None:
            return self._retry(name, (self.local / name).read_bytes)
        return self._retry(name, lambda: self.fs.cat_file(f"{self.root}/{name}"))

    def read_range(self, name: str, start: int, stop: int) -> bytes:
        def read() -> bytes:
            if self.local is not None:
                data = self._pread(name, start, stop - start)
            else:
                data = self.fs.cat_file(f"{self.root}/{name}", start=start, end=stop)
            if len(data) != stop - start:
                raise DataError(f"{self.where(name)} is shorter than its manifest says (wanted "
                                f"bytes {start}-{stop}, got {len(data)}): the shard is damaged")
            return data
        return self._retry(name, read)


def read_manifest(loc: Location) -> dict[str, Any]:
    if not loc.exists(MANIFEST):
        if loc.local is not None and not loc.local.exists():
            raise DataError(f"--data {loc.spec!r} does not exist")
        hint = (" (an unfinished `megamesh data prepare`: run it again to finish)"
                if loc.local is not None and (loc.local / ".prepare-state.json").exists() else "")
        raise DataError(f"--data {loc.spec!r} holds no {MANIFEST}: not a prepared dataset{hint}")
    try:
        m = json.loads(loc.read_bytes(MANIFEST))
    except json.JSONDecodeError as e:
        raise DataError(f"{loc.where(MANIFEST)} is not valid JSON ({e})") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise DataError(f"{loc.where(MANIFEST)} is not a {FORMAT} v{VERSION} manifest "
                        f"(format {m.get('format')!r}, version {m.get('version')!r})")
    return m


# -- reading a split -------------------------------------------------------------------


class SplitReader:
    """One split of a prepared dataset as a random-access token stream: `read(a, b)` is
    the int32 ids at stream positions [a, b), which may span shards. Shards are read a
    block at a time by byte range (a local file and a URL alike: no memory map, so the
    process's memory does not grow with the corpus it touches), each block checked
    against its CRC-32 and kept in an LRU of `cache_blocks`. Thread-safe (the prefetch
    thread and the evaluator share readers)."""

    def __init__(self, loc: Location, manifest: dict[str, Any], split: str, cache_blocks: int = 512):
        self.loc, self.split = loc, split
        meta = manifest["splits"][split]
        self.shards: list[dict[str, Any]] = meta["shards"]
        self.tokens, self.documents = int(meta["tokens"]), int(meta["documents"])
        self.S, self.BT = int(manifest["shard_tokens"]), int(manifest["block_tokens"])
        self.dtype = np.dtype(manifest["dtype"])
        self.cache_blocks = cache_blocks
        self._lock = threading.Lock()
        self._index: dict[int, dict[str, np.ndarray]] = {}
        self._offsets: dict[int, int] = {}
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.bytes_read = 0

    def __len__(self) -> int:
        return self.tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside the {self.split} split's {self.tokens}")
        parts, pos = [], start
        while pos < stop:
            k = pos // self.S
            a = pos - k * self.S
            b = min(stop - pos, int(self.shards[k]["tokens"]) - a) + a
            parts.append(self._read_shard(k, a, b))
            pos += b - a
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

    def doc_starts(self, start: int, stop: int) -> np.ndarray:
        """Stream positions in [start, stop) where a document begins."""
        out, pos = [], start
        while pos < stop:
            k = pos // self.S
            a, end = pos - k * self.S, min(stop, k * self.S + int(self.shards[k]["tokens"]))
            ds = self._index_of(k)["doc_starts"].astype(np.int64)
            sel = ds[(ds >= a) & (ds < end - k * self.S)]
            out.append(sel + k * self.S)
            pos = end
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _read_shard(self, k: int, a: int, b: int) -> np.ndarray:
        """Ids [a, b) of shard k: the blocks holding them, from the cache or (the missing
        ones, in one ranged read) from the file, each checked against its CRC-32."""
        j0, j1 = a // self.BT, (b - 1) // self.BT
        with self._lock:
            have = {j: self._blocks.get((k, j)) for j in range(j0, j1 + 1)}
            for j, blk in have.items():
                if blk is not None:
                    self._blocks.move_to_end((k, j))
        missing = [j for j, blk in have.items() if blk is None]
        if missing:
            lo, hi = missing[0], missing[-1]
            end = min((hi + 1) * self.BT, int(self.shards[k]["tokens"]))
            off, size = self._data_offset(k), self.dtype.itemsize
            raw = self.loc.read_range(self.shards[k]["name"], off + lo * self.BT * size, off + end * size)
            ids = np.frombuffer(raw, self.dtype)
            for j in range(lo, hi + 1):
                blk = ids[(j - lo) * self.BT:(j - lo + 1) * self.BT]
                self._check(k, j, blk)
                have[j] = blk
            with self._lock:
                self.bytes_read += len(raw)
                for j in range(lo, hi + 1):
                    self._blocks[(k, j)] = have[j]
                while len(self._blocks) > self.cache_blocks:
                    self._blocks.popitem(last=False)
        blocks = [have[j] for j in range(j0, j1 + 1)]
        data = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        return data[a - j0 * self.BT:b - j0 * self.BT]

    def _index_of(self, k: int) -> dict[str, np.ndarray]:
        with self._lock:
            if k in self._index:
                return self._index[k]
        name = self.shards[k]["index"]
        raw = self.loc.read_bytes(name)
        if hashlib.sha256(raw).hexdigest() != self.shards[k]["index_sha256"]:
            raise DataError(f"{self.loc.where(name)} does not match its checksum in the manifest: "
                            "the index is damaged; prepare the data again or restore the file")
        with np.load(io.BytesIO(raw)) as z:
            idx = {"doc_starts": z["doc_starts"], "block_crc32": z["block_crc32"]}
        with self._lock:
            self._index[k] = idx
        return idx

    def _data_offset(self, k: int) -> int:
        """Byte offset of the ids in a shard's .npy file (after its header)."""
        with self._lock:
            if k in self._offsets:
                return self._offsets[k]
        name = self.shards[k]["name"]
        head = io.BytesIO(self.loc.read_range(name, 0, 128))
        try:
            major, _ = np.lib.format.read_magic(head)
            if major != 1:
                raise ValueError(f"npy version {major}")
            shape, _, dtype = np.lib.format.read_array_header_1_0(head)
        except ValueError as e:
            raise DataError(f"{self.loc.where(name)} is not a .npy shard ({e}): it is damaged") from None
        if dtype != self.dtype or shape != (int(self.shards[k]["tokens"]),):
            raise DataError(f"{self.loc.where(name)} holds {shape} {dtype} ids, the manifest says "
                            f"{self.shards[k]['tokens']} {self.dtype}: the shard is damaged")
        with self._lock:
            self._offsets[k] = head.tell()
        return head.tell()

    def _check(self, k: int, j: int, blk: np.ndarray) -> None:
        want = int(self._index_of(k)["block_crc32"][j])
        if zlib.crc32(blk) != want:
            raise DataError(f"{self.loc.where(self.shards[k]['name'])}: block {j} (ids "
                            f"{j * self.BT}-{j * self.BT + len(blk) - 1}) does not match its checksum: "
                            "the shard is damaged; prepare the data again or restore the file")


class Prepared:
    """An opened prepared dataset: its manifest, tokenizer and split readers."""

    def __init__(self, spec: str, **location: Any):
        self.loc = Location(spec, **location)
        self.manifest = read_manifest(self.loc)
        self.spec = spec
        self._readers: dict[str, SplitReader] = {}

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def tokenizer_sha256(self) -> str:
        return str(self.manifest["tokenizer"]["sha256"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    def tokenizer_json(self) -> str:
        raw = self.loc.read_bytes(TOKENIZER)
        if hashlib.sha256(raw).hexdigest() != self.manifest["tokenizer"]["file_sha256"]:
            raise DataError(f"{self.loc.where(TOKENIZER)} does not match the manifest's checksum: "
                            "the ids were made with another tokenizer file")
        return raw.decode()

    def split(self, name: str) -> SplitReader:
        if name not in self.manifest["splits"]:
            raise DataError(f"{self.spec}: no {name!r} split (it has "
                            f"{', '.join(self.manifest['splits'])})")
        if name not in self._readers:
            self._readers[name] = SplitReader(self.loc, self.manifest, name)
        return self._readers[name]

    def verify(self, progress: Any = None) -> list[str]:
        """Every file against its SHA-256 (the whole dataset is read): the problems found."""
        problems = []
        for split, meta in self.manifest["splits"].items():
            for sh in meta["shards"]:
                for name, want in ((sh["name"], sh["sha256"]), (sh["index"], sh["index_sha256"])):
                    try:
                        got = (file_sha256(self.loc.path(name)) if self.loc.local is not None
                               else hashlib.sha256(self.loc.read_bytes(name)).hexdigest())
                    except (DataError, FileNotFoundError) as e:
                        problems.append(f"{self.loc.where(name)}: missing or unreadable ({e})")
                        continue
                    if got != want:
                        problems.append(f"{self.loc.where(name)}: SHA-256 {got[:12]}... does not "
                                        f"match the manifest's {want[:12]}...")
                if progress is not None:
                    progress(split, sh)
        return problems


# -- writing a split -------------------------------------------------------------------


def fsync_write(path: Path, write: Any) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


class ShardWriter:
    """One split's stream cut into shards of exactly `shard_tokens` ids: documents are
    appended with `add`, each complete shard is written under a temporary name, synced and
    renamed into place (a killed writer never leaves half a shard under its final name).
    `tail()`/`ShardWriter(..., tail=...)` carry the ids not yet in a shard across a restart."""

    def __init__(self, out: Path, split: str, shard_tokens: int, dtype: np.dtype, *,
                 block_tokens: int = BLOCK_TOKENS, shards: list[dict[str, Any]] | None = None,
                 tail: tuple[np.ndarray, np.ndarray] | None = None):
        self.out, self.split, self.S, self.dtype, self.BT = out, split, shard_tokens, dtype, block_tokens
        self.shards: list[dict[str, Any]] = list(shards or [])
        self._parts: list[np.ndarray] = []
        self._starts: list[int] = []  # document starts, relative to the unwritten ids
        self._pending = 0
        self.documents = sum(int(s["documents"]) for s in self.shards)
        if tail is not None and len(tail[0]):
            self._parts, self._starts = [tail[0].astype(dtype)], list(map(int, tail[1]))
            self._pending = len(tail[0])

    @property
    def tokens(self) -> int:
        return sum(int(s["tokens"]) for s in self.shards) + self._pending

    def add(self, ids: np.ndarray) -> int:
        """Append one document's ids (EOS included); returns the number of shards written."""
        self._starts.append(self._pending)
        self._parts.append(ids.astype(self.dtype, copy=False))
        self._pending += len(ids)
        written = 0
        while self._pending >= self.S:
            self._write(self.S)
            written += 1
        return written

    def finish(self) -> None:
        if self._pending:
            self._write(self._pending)

    def tail(self) -> tuple[np.ndarray, np.ndarray]:
        ids = np.concatenate(self._parts) if self._parts else np.zeros(0, self.dtype)
        return ids, np.asarray(self._starts, np.int64)

    def _write(self, n: int) -> None:
        ids, starts = self.tail()
        shard, rest = ids[:n], ids[n:]
        k = len(self.shards)
        name, index = shard_name(self.split, k), index_name(self.split, k)
        in_shard = starts[starts < n]
        tmp = self.out / f".{name}.tmp"
        fsync_write(tmp, lambda f: np.save(f, shard))
        tmp_idx = self.out / f".{index}.tmp"
        fsync_write(tmp_idx, lambda f: np.savez(f, doc_starts=in_shard.astype(np.uint32),
                                                  block_crc32=block_crcs(shard, self.BT)))
        meta = {"name": name, "index": index, "tokens": int(n), "documents": int(len(in_shard)),
                "sha256": file_sha256(tmp), "index_sha256": file_sha256(tmp_idx)}
        os.replace(tmp_idx, self.out / index)
        os.replace(tmp, self.out / name)
        self.shards.append(meta)
        self.documents += len(in_shard)
        self._parts = [rest] if len(rest) else []
        self._starts = [int(s - n) for s in starts if s >= n]
        self._pending = len(rest)

    def summary(self) -> dict[str, Any]:
        return {"tokens": sum(int(s["tokens"]) for s in self.shards),
                "documents": sum(int(s["documents"]) for s in self.shards), "shards": self.shards}


def fingerprint(splits: dict[str, Any], tokenizer_sha: str) -> str:
    h = hashlib.sha256(tokenizer_sha.encode())
    for split in sorted(splits):
        for s in splits[split]["shards"]:
            h.update(f"{split}/{s['name']}/{s['sha256']}/{s['index_sha256']}".encode())
    return h.hexdigest()[:16]
