"""The training loop: data, the jitted step, checkpoints, guards, metrics, preemption.

Everything a run writes lives under OUT: tokenizer.json, data/ (the packed corpus),
checkpoints/, metrics.jsonl, tensorboard/. A run never overwrites another: OUT with
checkpoints needs --resume, and a resumed run must be the same model on the same data.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from megamesh import __version__
from megamesh.config import ModelConfig
from megamesh.data.batches import Batches, PreparedData, check_rows, parse_data
from megamesh.data.shards import DataError
from megamesh.data.tokenizer import TokenizerInfo, tokenizer_sha256
from megamesh.errors import ConfigError, MegameshError
from megamesh.model import specs
from megamesh.pytree import unflatten
from megamesh.rundir import load_tokenizer
from megamesh.sharding.mesh import format_layout, global_array, make_mesh
from megamesh.sharding.rules import mesh_sizes, strategy
from megamesh.train import data as data_lib
from megamesh.train.checkpoint import Checkpointer, check_same_model, one_line, orbax_log_to
from megamesh.train.config import TrainConfig
from megamesh.train.diloco import Sync, dcn_bytes
from megamesh.train.memory_tier import MemoryTier, process_directory
from megamesh.train.metrics import Goodput, MetricsWriter, lost_work_seconds, peak_flops
from megamesh.train.progress import Progress
from megamesh.train.step import build_eval_step, build_train_step


class TrainingDiverged(MegameshError):
    exit_code = 3


@dataclass
class TrainResult:
    final_step: int
    losses: dict[int, float] = field(default_factory=dict)
    val_loss: float | None = None
    preempted: bool = False
    skipped: int = 0  # steps whose update was not applied (non-finite)
    out: Path = Path(".")
    params: Any = None  # the final parameters (sharded jax arrays)


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and stops at the step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Preemption:
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def data_parallel_size(tc: TrainConfig, mesh: Any) -> int:
    """Devices the batch is split over (the product of the strategy's batch axes)."""
    sizes = mesh_sizes(mesh)
    return int(np.prod([sizes[a] for a in dict(strategy(tc.run.strategy))["batch"]]))


def check_request(cfg: ModelConfig, tc: TrainConfig, mesh: Any) -> None:
    """Errors a user can fix before any work: sequence length, batch vs data axes."""
    if tc.seq_len > cfg.max_seq_len:
        raise ConfigError(f"--seq {tc.seq_len} is longer than model {cfg.name} allows "
                          f"(max_seq_len={cfg.max_seq_len})")
    sizes = mesh_sizes(mesh)
    batch_axes = dict(strategy(tc.run.strategy))["batch"]
    n = data_parallel_size(tc, mesh)
    micro = tc.global_batch // tc.microbatches
    if micro % n:
        raise ConfigError(
            f"--batch {tc.global_batch} (microbatch {micro}) is not divisible by the data-parallel "
            f"size {n} (mesh {format_layout(sizes)}, axes {'x'.join(batch_axes)}): use a multiple of {n}")


ELASTIC = "elastic.json"  # in OUT: the per-device microbatch the run began with


def fit_elastic(tc: TrainConfig, mesh: Any, out: Path, *, resume: bool, log: Any) -> TrainConfig:
    """An elastic run keeps its global batch (so its data order and its math) on whatever
    number of data-parallel groups a restart has: it takes the fewest microbatches that
    split the batch evenly over the data-parallel devices with no more sequences per device
    per microbatch than when the run began (OUT/elastic.json), i.e. more gradient
    accumulation on fewer devices, less when they return."""
    n, B = data_parallel_size(tc, mesh), tc.global_batch
    path = out / ELASTIC
    if resume and path.exists():
        base = int(json.loads(path.read_text())["per_device_microbatch"])
    else:
        base = max(1, B // tc.microbatches // n)
        if jax.process_index() == 0:
            tmp = path.with_name(ELASTIC + ".tmp")
            tmp.write_text(json.dumps({"per_device_microbatch": base, "global_batch": B}) + "\n")
            os.replace(tmp, path)
    fits = [m for m in range(tc.microbatches, B + 1)
            if B % m == 0 and (B // m) % n == 0 and B // m // n <= base]
    if not fits:
        raise ConfigError(f"--elastic: the global batch {B} cannot be split evenly over {n} "
                          f"data-parallel devices with at most {base} sequences per device per "
                          "microbatch; use a global batch with more divisors (e.g. a multiple "
                          f"of {n * base})")
    if fits[0] != tc.microbatches:
        log(f"elastic: {n} data-parallel devices, so {fits[0]} microbatch(es) of {B // fits[0]} "
            f"sequences ({B // fits[0] // n} per device) keep the global batch at {B}")
    return tc.replace(run=replace(tc.run, microbatches=fits[0]))


def prepare_data(out: Path, paths: list[str] | None, cfg: ModelConfig, tc: TrainConfig,
                 log: Any, *, trained: bool = False, new_data: bool = False,
                 tokenizer: TokenizerInfo | None = None) -> tuple[Any, Any]:
    """OUT's tokenizer and data: a packed corpus of text files, built (process 0) on
    first use, or prepared datasets (`megamesh data prepare`) streamed from where they
    are, mixed by weight (`data.batches.parse_data`); afterwards fixed.

    Once a checkpoint exists (`trained`), `--data` naming other data is refused unless
    `new_data`: then text is packed with the run's own tokenizer (the model's embedding is
    tied to it) and the switch is recorded in the data's history. Before any checkpoint
    (an earlier attempt failed), other `--data` simply rebuilds everything. `tokenizer`:
    the one the model came with (a Hugging Face directory's), used instead of training a
    BPE. A run records its tokenizer's SHA-256 and refuses data cut with another one.
    Nothing is saved until the corpus is complete and long enough for --seq."""
    data_dir, tok_path = out / "data", out / "tokenizer.json"
    exists = (data_dir / "corpus.json").exists() and tok_path.exists()
    stored = data_lib.Corpus.read_meta(data_dir) if exists else None
    entries = parse_data(paths)
    if entries is None and not paths and stored is not None and stored.get("kind") == "prepared":
        entries = [(src["path"], float(src["weight"])) for src in stored["sources"]]
    if entries is not None:
        return _prepared_data(out, entries, cfg, tc, log, trained=trained, new_data=new_data,
                              tokenizer=tokenizer, stored=stored)
    build = not exists
    if exists and paths:
        docs, desc = data_lib.read_documents(paths)
        if data_lib.source_fingerprint(docs) != stored.get("source"):
            if trained and not new_data:
                raise ConfigError(
                    f"--data is not the corpus this run was trained on ({stored['description']}, "
                    f"recorded in {data_dir}); pass --new-data to continue training on it "
                    "deliberately (packed with the run's tokenizer, the switch recorded)")
            build = True
    if build and jax.process_index() == 0:
        t0 = time.perf_counter()
        if not exists or not paths:
            docs, desc = data_lib.read_documents(paths)
        if exists and trained:  # --new-data: the run's tokenizer, the old data remembered
            tok, eos_id = load_tokenizer(tok_path), int(stored["eos_id"])
            history = _history(stored)
        elif tokenizer is not None:
            tok, eos_id, history = tokenizer.tok, tokenizer.eos_id, []
        else:
            tok = data_lib.train_tokenizer(docs, min(tc.data.tokenizer_vocab, cfg.vocab_size))
            eos_id, history = None, []
        corpus = data_lib.build_corpus(docs, desc, tok, tc.data.val_fraction, eos_id)
        corpus.history = history
        data_lib.check_split(corpus.train, tc.seq_len, "train")
        data_lib.check_split(corpus.val, tc.seq_len, "validation")
        _write_tokenizer(tok_path, tok.to_str())
        corpus.save(data_dir)
        switched = " (replacing the corpus this run trained on so far)" if history else ""
        what = f"{tokenizer.source}'s tokenizer" if tokenizer is not None and not history else "BPE"
        log(f"data: {desc}{switched}; {what} vocab {tok.get_vocab_size()}; {len(corpus.train):,} "
            f"train + {len(corpus.val):,} validation tokens ({time.perf_counter() - t0:.1f}s)")
    _barrier("data")
    tok = _run_tokenizer(out, cfg, tokenizer)
    return data_lib.Corpus.load(data_dir, tok.get_vocab_size()), tok


def _history(stored: dict[str, Any]) -> list[dict[str, Any]]:
    return [*stored.get("history", []), {
        "description": stored["description"], "fingerprint": stored["fingerprint"],
        "replaced": time.strftime("%Y-%m-%dT%H:%M:%S")}]


def _write_tokenizer(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _run_tokenizer(out: Path, cfg: ModelConfig, model_tok: TokenizerInfo | None) -> Any:
    """OUT/tokenizer.json, checked: the one the data records, within the model's vocabulary,
    and the model's own when it came with one."""
    tok_path = out / "tokenizer.json"
    tok = load_tokenizer(tok_path)
    have = tokenizer_sha256(tok)
    recorded = data_lib.Corpus.read_meta(out / "data").get("tokenizer_sha256")
    if recorded and recorded != have:
        raise DataError(f"{tok_path} is not the tokenizer this run's data was cut with (SHA-256 "
                        f"{have[:12]}..., recorded {recorded[:12]}...): restore it or use a new --out")
    if model_tok is not None and model_tok.sha256 != have:
        raise DataError(f"--model {model_tok.source}'s tokenizer (SHA-256 {model_tok.sha256[:12]}...) "
                        f"is not the one run {out} trained with ({have[:12]}...): the embedding is "
                        "tied to the tokenizer; use a new --out")
    if tok.get_vocab_size() > cfg.vocab_size:
        raise DataError(f"tokenizer in {out} has {tok.get_vocab_size()} tokens, more than model "
                        f"{cfg.name}'s vocab_size={cfg.vocab_size}")
    return tok


def _prepared_data(out: Path, entries: list[tuple[str, float]], cfg: ModelConfig, tc: TrainConfig,
                   log: Any, *, trained: bool, new_data: bool, tokenizer: TokenizerInfo | None,
                   stored: dict[str, Any] | None) -> tuple[Any, Any]:
    """Prepared datasets, streamed: OUT records which (data/corpus.json) and their tokenizer."""
    data = PreparedData(entries)
    what = " + ".join(s for s, _ in entries)
    if data.vocab_size > cfg.vocab_size:
        raise DataError(f"--data {what} was cut with a tokenizer of {data.vocab_size} tokens, more "
                        f"than model {cfg.name}'s vocab_size={cfg.vocab_size}")
    if tokenizer is not None and tokenizer.sha256 != data.tokenizer_sha256:
        raise DataError(f"--data {what} was cut with another tokenizer (SHA-256 "
                        f"{data.tokenizer_sha256[:12]}...) than --model {tokenizer.source}'s "
                        f"({tokenizer.sha256[:12]}...): prepare it with --tokenizer MODEL_DIR")
    for split, name in (("train", "train"), ("val", "validation")):  # before minutes of compiling
        check_rows(data.sources(split), tc.seq_len, name)
    changed = stored is None or stored.get("fingerprint") != data.fingerprint
    if stored is not None and trained:
        if stored.get("tokenizer_sha256") and stored["tokenizer_sha256"] != data.tokenizer_sha256:
            raise DataError(f"--data {what} was cut with another tokenizer (SHA-256 "
                            f"{data.tokenizer_sha256[:12]}...) than run {out} trained with "
                            f"({stored['tokenizer_sha256'][:12]}...): prepare it with --tokenizer {out}")
        if changed and not new_data:
            raise DataError(f"--data is not the data this run was trained on ({stored['description']}, "
                            f"recorded in {out / 'data'}); pass --new-data to continue training on it "
                            "deliberately (the switch recorded)")
    if changed and jax.process_index() == 0:
        record = {**data.record(), "history": _history(stored) if stored is not None and trained else []}
        tmp = out / "data.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "corpus.json").write_text(json.dumps(record, indent=1) + "\n")
        _write_tokenizer(out / "tokenizer.json", data.tokenizer_json())
        shutil.rmtree(out / "data", ignore_errors=True)
        os.replace(tmp, out / "data")
    _barrier("data")
    tok = _run_tokenizer(out, cfg, tokenizer)
    log(f"data: {data.description}, streamed; tokenizer vocab {tok.get_vocab_size()} "
        f"({data.tokenizer_sha256[:12]})")
    return data, tok


def _check_writable(out: Path) -> None:
    """Make OUT and prove a file can be written in it; else one line naming it and why."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".megamesh-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {str(out)!r} cannot be written: {e.strerror or e}") from None


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _any_process(flag: bool) -> bool:
    """True if `flag` is set on any process (a tiny all-gather; local when single-process)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


def agree_to_stop(flag: bool) -> bool:
    """Called once a step by every process: did a stop signal reach any of them? Every
    process must stop at the same step (a host preempted alone would leave the others
    waiting in the next collective). Tests patch this to signal a run at an exact step."""
    return _any_process(flag)


def train(cfg: ModelConfig, tc: TrainConfig, out: Path, **kw: Any) -> TrainResult:
    """Train `cfg` into OUT (`Trainer`'s keywords). Orbax's own warnings and error reports
    go to OUT/orbax.log: an I/O failure is one line on the terminal, details on disk."""
    with orbax_log_to(Path(out) / "orbax.log"):
        return Trainer(cfg, tc, Path(out), **kw).run()


class Prefetcher:
    """The batches of the coming steps, built on a background thread while the device runs
    the current one: item `step` of `ds` placed as a global array on `sharding`, `depth`
    steps ahead. Deterministic (a batch is a function of its step only); a failure to
    build one is raised by `get` for that step."""

    def __init__(self, ds: Any, sharding: Any, start: int, stop: int, depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.ds, self.sharding, self.stop, self.depth = ds, sharding, stop, depth
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="megamesh-prefetch")
        self.futures: dict[int, Any] = {}
        self.next = start

    def _build(self, step: int) -> jax.Array:
        if hasattr(self.ds, "array"):  # data.batches.Batches: only this process's rows
            return self.ds.array(step, self.sharding)
        return global_array(self.ds[step], self.sharding)

    def get(self, step: int) -> tuple[jax.Array, float]:
        """(the batch of `step`, seconds this call waited for it)."""
        while self.next < min(step + 1 + self.depth, self.stop):
            self.futures[self.next] = self.pool.submit(self._build, self.next)
            self.next += 1
        t0 = time.perf_counter()
        future = self.futures.pop(step, None)
        batch = future.result() if future is not None else self._build(step)
        return batch, time.perf_counter() - t0

    def close(self) -> None:
        for f in self.futures.values():
            f.cancel()
        self.pool.shutdown(wait=True)


class CheckpointPolicy:
    """When a run saves. Persistent: every `checkpoint.every` steps unless the step was
    non-finite (the last checkpoint stays a good one to return to), at the end (waited
    for), and at a stop (waited for; the RAM tier too, which a restart reads first). RAM
    tier: every `ram.every` finite steps between persistent saves."""

    def __init__(self, tc: TrainConfig, ckpt: Checkpointer, ram: MemoryTier | None,
                 meta: dict[str, Any]):
        self.every, self.ckpt, self.ram, self.meta = tc.checkpoint.every, ckpt, ram, meta
        self.consumed: Any = None  # step -> tokens of each data source used (Batches.consumed)

    def needs_state(self, n: int) -> bool:
        """Whether step `n` may save (so its state and metrics are needed before step n+1)."""
        return n % self.every == 0 or (self.ram is not None and n % self.ram.every == 0)

    def after_step(self, n: int, state: Any, *, finite: bool, done: bool, stop: bool) -> float:
        """Save what the policy says after step `n`; the seconds the loop waited."""
        waited = 0.0
        if stop and self.ram is not None:
            waited += self.ram.save(n, state)
        if (n % self.every == 0 and finite) or done or stop:
            meta = {**self.meta, "data_step": n}
            if self.consumed is not None:
                meta["data_consumed"] = self.consumed(n)
            waited += self.ckpt.save(n, state, meta, wait=done or stop)
        elif self.ram is not None and n % self.ram.every == 0 and finite:
            waited += self.ram.save(n, state)
        return waited


class Evaluator:
    """Validation loss every `eval.every` steps and at the end: the mean over
    `eval.batches` batches of the validation split."""

    def __init__(self, evaluate: Any, val_ds: Any, tc: TrainConfig, sharding: Any):
        self.evaluate, self.val_ds, self.sharding = evaluate, val_ds, sharding
        self.every, self.batches = tc.eval.every, tc.eval.batches

    def due(self, n: int, done: bool) -> bool:
        return n % self.every == 0 or done

    def __call__(self, params: Any) -> float:
        return float(np.mean([float(self.evaluate(params, self.val_ds.array(i, self.sharding)))
                              for i in range(self.batches)]))


@dataclass
class _Dispatched:
    """A step handed to the device whose metrics have not been read yet."""
    n: int  # the step's number (1-based: its record's "step")
    metrics: Any  # device arrays
    t_dispatch: float


class StepRecords:
    """Each step's metrics.jsonl record from its device metrics, read one step behind:
    step N's metrics are read after step N+1 is dispatched, so the device never waits
    for the host to log. A step's time is the interval between its metrics becoming
    readable and the later of its dispatch and the previous step's completion (compile
    included in the first step's, counted as compile badput)."""

    def __init__(self, tokens_per_step: int, flops_per_step: float, peak: float, goodput: Goodput):
        self.tokens, self.flops, self.peak, self.goodput = tokens_per_step, flops_per_step, peak, goodput
        self.last_ready: float | None = None
        self.first = True

    def read(self, d: _Dispatched) -> tuple[dict[str, Any], dict[str, Any]]:
        """(host metrics, record) of a dispatched step; blocks until the device has it."""
        m = jax.device_get(d.metrics)
        t_ready = time.perf_counter()
        dt = t_ready - max(d.t_dispatch, self.last_ready or d.t_dispatch)
        self.last_ready = t_ready
        if self.first:
            self.goodput.compile += dt
        elif m["finite"]:
            self.goodput.productive += dt
        record = {"step": d.n, "loss": float(m["loss"]), "nll": float(m["nll"]),
                  "aux_loss": float(m["aux"]), "lr": float(m["lr"]),
                  "grad_norm": float(m["grad_norm"]), "finite": bool(m["finite"]),
                  "skipped_steps": int(m["skipped"]),
                  "tokens_per_s": self.tokens / dt, "step_time_s": dt,
                  "mfu": self.flops / dt / self.peak, "compile_step": self.first}
        self.first = False
        return m, record


class Trainer:
    """One training run: set-up (`__init__`: checks, mesh, data, the jitted steps, the
    checkpoint tiers), `restore` (RAM tier, persistent tier, or a fresh or imported
    initialization; a DiLoCo island's join), and `run`, the step loop, with its parts as
    components: `Prefetcher` (batches on a background thread), `StepRecords` (metrics
    one step behind), `CheckpointPolicy`, `Evaluator`.

    The host never makes the device wait on the ordinary step: step N+1 is dispatched
    before step N's metrics are read and logged, and batches are built ahead. A step
    that may save, evaluate, average (DiLoCo) or stop is read at once, before the next
    is dispatched (the step donates its state, so a save must come first).

    Keywords: `initial_params` (flat {name: array}, e.g. an imported Hugging Face model)
    replaces the random initialization of a fresh run; `tokenizer` (data.tokenizer), the
    one the model came with, cuts the text instead of a BPE trained on it. The mesh, remat, microbatches and
    kernels come from the run spec `tc.run`. `new_data`: continue a run on documents
    other than those it was trained on (`prepare_data`). `elastic`: fit the microbatches
    to this restart's device count (`fit_elastic`). `island`: with `tc.diloco.islands`,
    which island of a DiLoCo run this job is (`train.diloco`): its run is OUT/island-I,
    the islands' outer state OUT/sync."""

    def __init__(self, cfg: ModelConfig, tc: TrainConfig, out: Path, *,
                 data_paths: list[str] | None = None, resume: bool = False, new_data: bool = False,
                 elastic: bool = False, island: int | None = None, progress: bool | None = None,
                 initial_params: dict[str, Any] | None = None, tokenizer: TokenizerInfo | None = None,
                 log: Any = print):
        self.is_main = jax.process_index() == 0
        self.log = log if self.is_main else (lambda *a, **k: None)
        self.cfg, self.resume, self.new_data = cfg, resume, new_data
        self.island, self.progress, self.initial_params = island, progress, initial_params
        out = Path(out)
        dc, self.sync_root = tc.diloco, None
        if dc.islands:
            if island is None or not 0 <= island < dc.islands:
                raise ConfigError(f"--island {island} is not allowed with --diloco islands={dc.islands}: "
                                  f"each island's job passes its own --island in [0, {dc.islands})")
            if out.exists() and not out.is_dir():
                raise ConfigError(f"--out {str(out)!r} is a file: choose a directory")
            if tc.global_batch % (dc.islands * tc.microbatches):
                raise ConfigError(f"--batch {tc.global_batch} is not allowed with {dc.islands} DiLoCo "
                                  f"islands: each takes an equal share, so it must be divisible by "
                                  f"{dc.islands} x {tc.microbatches} microbatch(es)")
            self.sync_root, out = out / "sync", out / f"island-{island}"
            tc = tc.replace(global_batch=tc.global_batch // dc.islands)  # this island's share
        elif island is not None:
            raise ConfigError("--island goes with --diloco islands=N,inner_steps=H")
        self.out, self.ckpt_dir = out, out / "checkpoints"
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} is a file: choose a directory")
        ckpt_dir = self.ckpt_dir
        self.has_ckpt = ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
        if self.has_ckpt and not resume:
            raise ConfigError(f"--out {str(out)!r} already holds checkpoints: pass --resume to continue "
                              "that run, or choose a new --out (nothing was overwritten)")
        self.mesh = make_mesh(tc.run.layout or None)
        self.layout = format_layout(mesh_sizes(self.mesh))
        if elastic:  # its record of the first layout lives in OUT
            if self.is_main:
                _check_writable(out)
            _barrier("elastic")
            tc = fit_elastic(tc, self.mesh, out, resume=resume, log=self.log)
        check_request(cfg, tc, self.mesh)
        if self.is_main:
            _check_writable(out)  # before minutes of tokenizing, not after
        _barrier("out")
        self.tc = tc
        self.corpus, _ = prepare_data(out, data_paths, cfg, tc, self.log, trained=self.has_ckpt,
                                      new_data=new_data, tokenizer=tokenizer)
        self.ts = build_train_step(cfg, tc, self.mesh, eos_id=self.corpus.eos_id)
        self.ckpt = Checkpointer(ckpt_dir, keep=tc.checkpoint.keep, use_async=tc.checkpoint.async_save,
                                 log=self._warn)
        self.meta = {"model": cfg.to_dict(), "train": tc.to_dict(), "corpus": self.corpus.fingerprint,
                     "megamesh": __version__}
        self.ram = None
        if tc.checkpoint.ram_every:
            self.ram = MemoryTier(process_directory(out, tc.checkpoint.ram_dir), self.mesh,
                                  self.ts.abstract_state(), every=tc.checkpoint.ram_every, fresh=not resume)
            self.log(f"in-memory checkpoints every {tc.checkpoint.ram_every} step(s) in {self.ram.directory}"
                     + (" (on disk, not under /dev/shm: slower than RAM)" if self.ram.on_disk else ""))
        self.policy = CheckpointPolicy(tc, self.ckpt, self.ram, self.meta)
        self.sync: Sync | None = None
        self.outer: Any = None

    def _warn(self, message: str) -> None:  # a line about the run's own state (skipped checkpoints)
        if self.is_main:
            print(message, file=sys.stderr, flush=True)

    # -- restore -----------------------------------------------------------------------

    def _restore_step(self, step: int) -> tuple[Any, dict[str, Any]]:
        saved = self.ckpt.read_meta(step)
        check_same_model(saved["model"], self.cfg.to_dict(), str(self.ckpt_dir))
        if saved["corpus"] != self.corpus.fingerprint and not self.new_data:
            raise ConfigError(f"checkpoint in {self.ckpt_dir} was trained on different data (corpus "
                              f"{saved['corpus']}, now {self.corpus.fingerprint})")
        return self.ckpt.restore(step, self.ts.abstract_state())

    def restore(self) -> tuple[int, Any]:
        """(first step to run, state): the in-memory tier, else the newest good persistent
        checkpoint, else a fresh (or imported) initialization; then a DiLoCo island joins
        the others' newest round."""
        ts, log, resume = self.ts, self.log, self.resume
        start, state = 0, None
        if resume and self.ram is not None:
            start, state = _restore_from_ram(self.ram, self.ckpt, log)
        restored = self.ckpt.restore_newest(self._restore_step) if resume and state is None else None
        if resume and state is None and restored is None:
            log(f"--resume: {self.ckpt_dir} holds no checkpoint yet; starting from step 0")
        if state is not None:
            log(f"resumed from step {start} onto mesh {self.layout}")
        elif restored is not None:
            step0, (state, saved) = restored
            start = int(saved["data_step"])
            log(f"resumed from step {start} ({self.ckpt_dir / str(step0)}) onto mesh {self.layout}")
        else:
            state = ts.init(jax.random.key(self.tc.seed))
            if self.initial_params is not None:
                shardings = ts.state_shardings["params"]
                params = unflatten({k: np.asarray(v, dtype=self.cfg.param_dtype)
                                    for k, v in self.initial_params.items()})
                state["params"] = jax.tree.map(global_array, params, shardings)
                log("initialized from the model directory's weights")
        if self.sync_root is not None:
            dc = self.tc.diloco
            self.sync = Sync(self.sync_root, self.island, dc, ts.abstract_state()["params"], log=log)
            start, state, self.outer = _join_islands(self.sync, start, state, log)
            param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["params"]))
            ours, dp = dcn_bytes(param_bytes, dc)
            log(f"DiLoCo island {self.island} of {dc.islands}: {self.tc.global_batch} of every "
                f"{self.tc.global_batch * dc.islands} sequences; an outer step every {dc.inner_steps} "
                f"steps (quorum {dc.needed}); across the DCN {ours / 1e6:,.1f} MB per step vs "
                f"{dp / 1e6:,.1f} MB for data parallel")
        return start, state

    # -- the step loop -----------------------------------------------------------------

    def _datasets(self) -> tuple[Any, Any]:
        tc, corpus, B = self.tc, self.corpus, self.tc.global_batch
        if self.sync is None:
            train_ds = Batches(corpus.sources("train"), tc.seq_len, B, tc.seed, split="train")
        else:  # the island's rows of the global batch
            train_ds = Batches(corpus.sources("train"), tc.seq_len, B * tc.diloco.islands, tc.seed,
                               split="train", rows=(self.island * B, B))
        val_ds = Batches(corpus.sources("val"), tc.seq_len, B, tc.seed + 1, split="validation")
        return train_ds, val_ds

    def run(self) -> TrainResult:
        cfg, tc, ts, log = self.cfg, self.tc, self.ts, self.log
        start, state = self.restore()
        goodput = Goodput(lost_work_seconds(self.out / "metrics.jsonl", start)
                          if self.is_main and start else 0.0)
        writer = MetricsWriter(self.out, enabled=self.is_main)
        train_ds, val_ds = self._datasets()
        self.policy.consumed = train_ds.consumed
        evaluator = Evaluator(build_eval_step(cfg, tc, ts), val_ds, tc, ts.batch_sharding)
        peak, peak_src = peak_flops(list(self.mesh.devices.flat))
        tokens_per_step = tc.global_batch * tc.seq_len
        flops_per_step = specs.flops_per_token(cfg, tc.seq_len, "train") * tokens_per_step
        records = StepRecords(tokens_per_step, flops_per_step, peak, goodput)
        log(f"training {cfg.name} ({specs.param_count(cfg):,} params) on {self.mesh.devices.size} "
            f"{self.mesh.devices.flat[0].platform} devices, mesh {self.layout}, "
            f"batch {tc.global_batch}x{tc.seq_len}, steps {start}->{tc.steps}, remat {ts.remat}; "
            f"kernels {ts.kernels.describe()}, loss in {ts.loss_chunks} slice(s); MFU vs {peak_src}"
            + ("" if ts.pipeline is None else "; " + ts.pipeline.describe())
            + ("" if ts.document_eos is None else "; attention within documents"
               + (" (positions restart per document)" if tc.data.document_positions else "")))

        result = TrainResult(final_step=start, out=self.out)
        bar = Progress(total=tc.steps, start=start, enabled=self.is_main, rich=self.progress,
                       every=tc.log_every)
        batches = Prefetcher(train_ds, ts.batch_sharding, start, tc.steps)
        H = tc.diloco.inner_steps if self.sync is not None else 0

        def read(d: _Dispatched) -> tuple[dict[str, Any], dict[str, Any]]:
            """Step d's metrics and record; a streak of non-finite steps ends the run."""
            m, record = records.read(d)
            result.losses[d.n] = record["loss"]
            result.final_step, result.skipped = d.n, int(m["skipped"])
            if int(m["bad_steps"]) >= tc.max_bad_steps:
                writer.write({**record, **goodput.fields()})
                self.ckpt.wait()
                good = self.ckpt.latest_good_step()
                where = (f"the last good checkpoint, {self.ckpt_dir / str(good)}, is intact"
                         if good is not None else f"no checkpoint was written to {self.ckpt_dir}")
                raise TrainingDiverged(
                    f"{int(m['bad_steps'])} consecutive steps had a non-finite loss, gradient or "
                    f"update (last: step {d.n}); stopped ({result.skipped} skipped in all); {where}")
            return m, record

        rates: dict[str, float] = {}

        def write(record: dict[str, Any]) -> None:
            record.update(goodput.fields())
            used = train_ds.consumed(record["step"])  # per source: tokens and the epoch reached
            record["data_tokens"] = {k: v["tokens"] for k, v in used.items()}
            record["data_epochs"] = {k: v["epoch"] for k, v in used.items()}
            if train_ds.read_s > 0:  # the loader alone, this process's rows
                record["loader_tokens_per_s"] = train_ds.tokens_read / train_ds.read_s
                rates.update(loader=record["loader_tokens_per_s"], step=record["tokens_per_s"])
            writer.write(record)
            bar.update(record["step"], record)

        pending: _Dispatched | None = None
        try:
            with _Preemption() as pre:
                for step in range(start, tc.steps):
                    n = step + 1
                    batch, waited = batches.get(step)
                    goodput.data += waited
                    dispatched = _Dispatched(n, None, time.perf_counter())
                    state, dispatched.metrics = ts.fn(state, batch)
                    if pending is not None:  # the previous step, read while this one runs
                        write(read(pending)[1])
                    pending = dispatched
                    t0 = time.perf_counter()
                    self.ckpt.poll()  # a failed background save stops the run now, in one line
                    goodput.checkpoint += time.perf_counter() - t0
                    done = n == tc.steps
                    outer_round = n // H if H and n % H == 0 else None
                    # read the signal flag once: a signal landing between the save decision
                    # and the stop would otherwise stop the run without the checkpoint it
                    # promised; every process agrees each step.
                    stop = agree_to_stop(pre.signum is not None)
                    if not (stop or done or outer_round or self.policy.needs_state(n)
                            or evaluator.due(n, done)):
                        continue
                    m, record = read(pending)  # this step's state is needed now
                    pending = None
                    if outer_round is not None:
                        self.outer, members, dt_sync = self.sync.outer_step(
                            outer_round, state["params"], self.outer)
                        state["params"] = _copy(self.outer["params"])
                        goodput.sync += dt_sync
                        record.update(diloco_round=outer_round, islands_reported=len(members),
                                      diloco_sync_s=dt_sync)
                    if evaluator.due(n, done):
                        record["val_loss"] = result.val_loss = evaluator(state["params"])
                    goodput.checkpoint += self.policy.after_step(n, state, finite=bool(m["finite"]),
                                                                 done=done, stop=stop)
                    write(record)
                    if stop:
                        result.preempted = True
                        why = (f"signal {pre.signum}" if pre.signum is not None
                               else "a signal to another process")
                        log(f"\nstopped by {why} after step {n}; checkpoint saved")
                        break
        finally:
            batches.close()
            bar.close()
            self.ckpt.close()
            writer.close()
            if self.sync is not None:
                self.sync.close()
            if self.ram is not None:  # a finished run frees its RAM; a stopped one keeps it
                self.ram.close(discard=result.final_step == tc.steps)
        result.params = state["params"]
        if self.is_main and not result.preempted:
            f = goodput.fields()
            last = result.losses.get(result.final_step, float("nan"))
            log(f"done: step {result.final_step}, loss {last:.4f}"
                + (f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else "")
                + f"; {result.skipped} non-finite step(s) skipped"
                + f"; goodput {f['goodput']:.1%} (compile {f['badput_compile_s']:.1f}s, data "
                f"{f['badput_data_s']:.1f}s, checkpoint {f['badput_checkpoint_s']:.1f}s, lost "
                f"{f['badput_lost_s']:.1f}s)"
                + (f"; data loader {rates['loader']:,.0f} tokens/s alone vs the step's "
                   f"{rates['step'] / jax.process_count():,.0f} per process" if rates else "")
                + f"; checkpoints in {self.ckpt_dir}")
        return result


_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))  # a new buffer: the step donates


def _join_islands(sync: Sync, start: int, state: Any, log: Any) -> tuple[int, Any, Any]:
    """(start step, state, outer state) of an island starting or resuming: when the other
    islands are rounds ahead, it adopts the newest outer state and skips to that round."""
    H = sync.dc.inner_steps
    newest, mine = sync.committed(), start // H
    like = sync.initial_outer(state["params"])
    if newest > mine:
        outer = sync.load_outer(newest, like)
        state["params"] = _copy(outer["params"])
        state["step"] = jax.device_put(np.int32(newest * H), state["step"].sharding)
        log(f"DiLoCo: the other islands are at round {newest}: joining there at step "
            f"{newest * H} (this island's share of steps {start + 1}-{newest * H} is skipped)")
        return newest * H, state, outer
    if mine > 0:
        return start, state, sync.load_outer(mine, like)
    return start, state, {"params": _copy(state["params"]), "opt": like["opt"]}


def _restore_from_ram(ram: MemoryTier, ckpt: Checkpointer, log: Any) -> tuple[int, Any]:
    """(step, state) from the in-memory tier when it holds a step no older than the newest
    persistent checkpoint; (0, None) otherwise. Own RAM first, else a peer's copy; if any
    process cannot read its copy, all of them use the persistent checkpoint instead."""
    step = ram.latest_step()
    persistent = ckpt.latest_step()
    if step is None or (persistent is not None and persistent > step):
        return 0, None  # (at the same step, RAM: the faster read)
    own = ram.holds(step)
    t0 = time.perf_counter()
    try:
        state, failed = ram.restore(step), ""
    except Exception as e:  # noqa: BLE001 -- any unreadable copy: the persistent tier
        state, failed = None, one_line(e)
    if jax.process_count() > 1:  # every process says where its shards came from
        log = lambda m: print(f"process {jax.process_index()}: {m}", flush=True)  # noqa: E731
    if _any_process(bool(failed)):
        log(f"in-memory checkpoint of step {step} could not be read everywhere"
            + (f" (here: {failed})" if failed else "") + "; using the persistent checkpoint")
        return 0, None
    log(f"restored step {step} from the in-memory checkpoint ("
        + ("this host's RAM" if own else "a peer's replica: this host's RAM copy was gone")
        + f") in {time.perf_counter() - t0:.2f}s")
    return step, state
