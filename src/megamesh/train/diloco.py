"""Decoupled training across islands: DiLoCo with a quorum (`megamesh train --diloco`).

An island is a separate training job (one slice or pod, any number of processes) started
with `--diloco islands=N,inner_steps=H --island I` and the same --out. Island I keeps its
own run in OUT/island-I (checkpoints, metrics, data) and trains on its share of every
global batch (rows I*B/N .. (I+1)*B/N, so N islands see the tokens one data-parallel job
with batch B would). Every H steps it reports its parameters to OUT/sync/round-R/island-I
and takes the outer step (Douillard et al., *DiLoCo*, arXiv 2311.08105):

    delta  = outer_params - mean(reported island params)      (the outer gradient)
    outer  = Nesterov SGD(outer_lr, outer_momentum) step on delta   (optax.sgd)
    island params <- outer params; each island keeps its own AdamW state

Which islands an outer step averages is decided once per round, by whichever island first
sees every report, or, after `wait_s`, at least `quorum` (default a majority) of them: it
creates OUT/sync/round-R/members.json (exclusively; the others read it). A failed or
slow island therefore does not stop the rest: they go on without its report. The island
that decided also writes the outer state (OUT/sync/round-R/outer); every island computes
the same update from the same files, in the same order. A restarted island resumes from
its own checkpoint and, when the others are rounds ahead, adopts the newest outer state
and skips to that round (its share of the rounds it missed is not trained: the staleness
a quorum trades for not waiting).

What crosses the data-center network per round and island: its parameters out, the
other members' in (N x params bytes / H per step), against data parallelism's gradient
all-reduce of 2 (N-1)/N x params bytes every step (`dcn_bytes`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from megamesh.errors import MegameshError
from megamesh.train.config import DilocoConfig

MEMBERS = "members.json"
OUTER = "outer"


class QuorumLost(MegameshError):
    """Too few islands reported for too long: the job stops (and is restarted)."""

    exit_code = 4


def dcn_bytes(param_bytes: float, dc: DilocoConfig) -> tuple[float, float]:
    """(DiLoCo, data parallel) bytes one island sends and receives across the DCN per
    inner step: N param copies per H steps, vs a ring all-reduce of the gradient."""
    n = dc.islands
    return n * param_bytes / dc.inner_steps, 2 * (n - 1) / n * param_bytes


def outer_optimizer(dc: DilocoConfig) -> optax.GradientTransformation:
    return optax.sgd(dc.outer_lr, momentum=dc.outer_momentum, nesterov=True)


def _one(value: Any) -> Any:
    """The value process 0 of this island has, on every process of it."""
    if jax.process_count() == 1:
        return value
    return multihost_utils.broadcast_one_to_all(value)


class Sync:
    """The outer loop of one island: reports, membership, the outer state on disk."""

    def __init__(self, root: Path, island: int, dc: DilocoConfig, abstract_params: Any,
                 log: Any = print):
        self.root, self.island, self.dc, self.log = Path(root), island, dc, log
        self.abstract_params = abstract_params
        self.opt = outer_optimizer(dc)
        self.ckpt = ocp.StandardCheckpointer()
        self._add = jax.jit(lambda a, b: jax.tree.map(lambda x, y: x + y, a, b))
        n = dc.islands

        def update(outer: Any, total: Any, count: jax.Array) -> Any:
            delta = jax.tree.map(lambda o, s: o - s / count, outer["params"], total)
            updates, opt_state = self.opt.update(delta, outer["opt"], outer["params"])
            return {"params": optax.apply_updates(outer["params"], updates), "opt": opt_state}

        self._update = jax.jit(update)
        self.islands = n

    # ------------------------------------------------------------------ on disk

    def round_dir(self, rnd: int) -> Path:
        return self.root / f"round-{rnd}"

    def committed(self) -> int:
        """The newest round whose members were decided (0: none yet)."""
        if not self.root.is_dir():
            return 0
        rounds = [int(p.name[6:]) for p in self.root.iterdir()
                  if p.name.startswith("round-") and p.name[6:].isdigit()
                  and (p / MEMBERS).is_file()]
        return max(rounds, default=0)

    def initial_outer(self, params: Any) -> Any:
        return {"params": params, "opt": self.opt.init(params)}

    def load_outer(self, rnd: int, like: Any) -> Any:
        """The outer state after round `rnd`, as the deciding island wrote it."""
        path = self.round_dir(rnd) / OUTER
        deadline = time.monotonic() + self.dc.wait_s
        while not path.is_dir():  # the decider writes it right after deciding
            if time.monotonic() > deadline:
                raise QuorumLost(f"DiLoCo round {rnd}: no outer state in {path} after "
                                 f"{self.dc.wait_s:g}s (the island that decided it stopped?)")
            time.sleep(0.2)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                like)
        return self.ckpt.restore(path, abstract)

    # ------------------------------------------------------------------ one round

    def _members(self, rnd: int) -> tuple[list[int], bool]:
        """(the islands round `rnd` averages, whether this island decided it)."""
        d = self.round_dir(rnd)
        t0, warned = time.monotonic(), False
        while True:
            if (d / MEMBERS).is_file():
                return json.loads((d / MEMBERS).read_text())["islands"], False
            present = sorted(int(p.name[7:]) for p in d.glob("island-*") if p.is_dir()
                             and p.name[7:].isdigit())
            waited = time.monotonic() - t0
            if len(present) == self.islands or (waited >= self.dc.wait_s
                                                and len(present) >= self.dc.needed):
                try:
                    fd = os.open(d / MEMBERS, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                except FileExistsError:
                    continue  # another island decided first: read its decision
                with os.fdopen(fd, "w") as f:
                    json.dump({"islands": present, "decided_by": self.island,
                               "waited_s": round(waited, 3)}, f)
                return present, True
            if waited >= self.dc.wait_s and not warned:
                self.log(f"DiLoCo round {rnd}: {len(present)} of {self.islands} islands reported "
                         f"after {waited:.0f}s; waiting for {self.dc.needed} (the quorum)")
                warned = True
            if waited >= 10 * self.dc.wait_s:
                raise QuorumLost(f"DiLoCo round {rnd}: only {len(present)} of {self.islands} "
                                 f"islands reported in {waited:.0f}s, fewer than the quorum "
                                 f"{self.dc.needed}; stopping (restart to rejoin)")
            time.sleep(0.1)

    def outer_step(self, rnd: int, params: Any, outer: Any) -> tuple[Any, list[int], float]:
        """Report `params` for round `rnd`, agree on the members, take the outer step.
        Returns (new outer state, members, seconds spent)."""
        t0 = time.perf_counter()
        d = self.round_dir(rnd)
        mine = d / f"island-{self.island}"
        if jax.process_index() == 0:
            d.mkdir(parents=True, exist_ok=True)
        if not mine.exists():
            self.ckpt.save(mine, params)
            self.ckpt.wait_until_finished()
        members, decided = self._members(rnd) if jax.process_index() == 0 else ([], False)
        members, decided = _one(np.asarray(members, np.int32)).tolist(), bool(_one(np.int32(decided)))
        if not members:
            raise QuorumLost(f"DiLoCo round {rnd}: no island reported")
        total = None
        for i in members:  # in island order: every island adds in the same order
            p = params if i == self.island else self.ckpt.restore(d / f"island-{i}",
                                                                  self.abstract_params)
            total = p if total is None else self._add(total, p)
        new = self._update(outer, total, np.float32(len(members)))
        if decided:
            self.ckpt.save(d / OUTER, new)
            self.ckpt.wait_until_finished()
            old = self.round_dir(rnd - 2)  # kept one round back for islands reading late
            if jax.process_index() == 0 and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        return new, members, time.perf_counter() - t0

    def close(self) -> None:
        self.ckpt.close()
