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
links OUT/sync/round-R/members.json into place (atomically, and only if no other island
did first; the others read it). A failed or
slow island therefore does not stop the rest: they go on without its report. The island
that decided also writes the outer state (OUT/sync/round-R/outer); every island computes
the same update from the same files, in the same order. A restarted island resumes from
its own checkpoint and, when the others are rounds ahead, adopts the newest outer state
and skips to that round (its share of the rounds it missed is not trained: the staleness
a quorum trades for not waiting).

The average is a reduce-scatter and an all-gather through storage (`Sync.outer_step`):
per round an island writes its parameters and its part of the mean and reads its part of
every report and every other part: about 3 x the parameter bytes per H steps whatever N,
against data parallelism's gradient all-reduce of 2 (N-1)/N x the parameter bytes every
step (`dcn_bytes`).
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
from megamesh.plan.cost import diloco_round_bytes
from megamesh.pytree import flatten, unflatten
from megamesh.train.checkpoint import from_process0
from megamesh.train.config import DilocoConfig

MEMBERS = "members.json"
OUTER = "outer"


class QuorumLost(MegameshError):
    """Too few islands reported for too long: the job stops (and is restarted)."""

    exit_code = 4


def dcn_bytes(param_bytes: float, dc: DilocoConfig) -> tuple[float, float]:
    """(DiLoCo, data parallel) bytes one island sends and receives across the DCN per
    inner step: one outer step's (`plan.cost.diloco_round_bytes`) per H steps, vs a ring
    all-reduce of the gradient (2 (N-1)/N P) every step."""
    n = dc.islands
    return sum(diloco_round_bytes(param_bytes, n)) / dc.inner_steps, 2 * (n - 1) / n * param_bytes


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
        self.ckpt = ocp.StandardCheckpointer()  # the outer state
        self.pytree = ocp.PyTreeCheckpointer()  # reports and mean parts: flat {name: array}
        self.flat_abstract = flatten(abstract_params)
        self._add = jax.jit(lambda a, b: jax.tree.map(lambda x, y: x + y, a, b))
        self._div = jax.jit(lambda a, n: jax.tree.map(lambda x: x / n, a))

        def update(outer: Any, mean: Any) -> Any:
            delta = jax.tree.map(lambda o, m: o - m, outer["params"], mean)
            updates, opt_state = self.opt.update(delta, outer["opt"], outer["params"])
            return {"params": optax.apply_updates(outer["params"], updates), "opt": opt_state}

        self._update = jax.jit(update)

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
            if len(present) == self.dc.islands or (waited >= self.dc.wait_s
                                                and len(present) >= self.dc.needed):
                # written whole under a name of its own, then linked into place: the link
                # is atomic and fails if another island decided first (readers never see
                # a members.json without its content)
                tmp = d / f".{MEMBERS}.{self.island}.{os.getpid()}"
                tmp.write_text(json.dumps({"islands": present, "decided_by": self.island,
                                           "waited_s": round(waited, 3)}))
                try:
                    os.link(tmp, d / MEMBERS)
                except FileExistsError:
                    continue  # another island decided first: read its decision
                finally:
                    tmp.unlink()
                return present, True
            if waited >= self.dc.wait_s and not warned:
                self.log(f"DiLoCo round {rnd}: {len(present)} of {self.dc.islands} islands reported "
                         f"after {waited:.0f}s; waiting for {self.dc.needed} (the quorum)")
                warned = True
            if waited >= 10 * self.dc.wait_s:
                raise QuorumLost(f"DiLoCo round {rnd}: only {len(present)} of {self.dc.islands} "
                                 f"islands reported in {waited:.0f}s, fewer than the quorum "
                                 f"{self.dc.needed}; stopping (restart to rejoin)")
            time.sleep(0.1)

    def _read(self, path: Path, names: list[str]) -> dict[str, Any]:
        """These parameters (flat names) of a report or mean part, on this island's shardings."""
        item = {n: self.flat_abstract[n] for n in names}
        args = {n: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype, global_shape=a.shape)
                for n, a in item.items()}
        return self.pytree.restore(path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=args, partial_restore=True))

    def _parts(self, members: list[int]) -> dict[int, list[str]]:
        """Which member averages which parameters: whole arrays, largest first to the least
        loaded member, so each averages about 1/len(members) of the bytes."""
        load, parts = {m: 0 for m in members}, {m: [] for m in members}
        sizes = {n: a.size * a.dtype.itemsize for n, a in self.flat_abstract.items()}
        for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
            m = min(members, key=lambda k: (load[k], k))
            parts[m].append(name)
            load[m] += sizes[name]
        return parts

    def _mean_part(self, d: Path, members: list[int], names: list[str], own: dict[str, Any]) -> Any:
        """The members' mean of these parameters (added in member order, then divided)."""
        total = None
        for i in members:
            p = {n: own[n] for n in names} if i == self.island else self._read(d / f"island-{i}", names)
            total = p if total is None else self._add(total, p)
        return self._div(total, np.float32(len(members)))

    def outer_step(self, rnd: int, params: Any, outer: Any) -> tuple[Any, list[int], float]:
        """Report `params` for round `rnd`, agree on the members, average them, take the
        outer step. Returns (new outer state, members, seconds spent).

        The average is a reduce-scatter then an all-gather through storage: each member
        averages its part of the parameters over every member's report (`_parts`) and
        writes it as mean-<member>; each island then reads every part. An island reads
        about 2x and writes about 1x the parameters per round, whatever the number of
        islands. A part whose member stopped before writing it is computed by whoever
        waited `wait_s` for it."""
        t0 = time.perf_counter()
        d = self.round_dir(rnd)
        own = flatten(params)
        if jax.process_index() == 0:
            d.mkdir(parents=True, exist_ok=True)
        if not (d / f"island-{self.island}").exists():
            self.pytree.save(d / f"island-{self.island}", own)
        members, decided = self._members(rnd) if jax.process_index() == 0 else ([], False)
        members, decided = from_process0(members), bool(_one(np.int32(decided)))
        if not members:
            raise QuorumLost(f"DiLoCo round {rnd}: no island reported")
        parts = self._parts(members)
        mean: dict[str, Any] = {}
        if self.island in members:
            mine = self._mean_part(d, members, parts[self.island], own)
            if not (d / f"mean-{self.island}").exists():
                self.pytree.save(d / f"mean-{self.island}", mine)
            mean.update(mine)
        for m in members:
            if m == self.island:
                continue
            path = d / f"mean-{m}"
            deadline = time.monotonic() + self.dc.wait_s
            # process 0 decides when to stop waiting, so every process of the island runs
            # the same number of broadcasts
            while not _one(np.int32(path.is_dir() or time.monotonic() >= deadline)):
                time.sleep(0.05)
            if _one(np.int32(path.is_dir())):
                mean.update(self._read(path, parts[m]))
            else:  # its member stopped after reporting: average that part here
                mean.update(self._mean_part(d, members, parts[m], own))
        new = self._update(outer, unflatten(mean))
        if decided:
            self.ckpt.save(d / OUTER, new)
            self.ckpt.wait_until_finished()
            old = self.round_dir(rnd - 2)  # kept one round back for islands reading late
            if jax.process_index() == 0 and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        return new, members, time.perf_counter() - t0

    def close(self) -> None:
        self.ckpt.close()
        self.pytree.close()
