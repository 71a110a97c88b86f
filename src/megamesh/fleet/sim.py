"""Discrete-event simulation of a fleet: pods arriving, jobs allocated, failures, restarts.

Events (a heap, deterministic for a seed): pod arrivals, job submissions, daily serving
re-sizing and samples, failures, restart completions, repairs, job completions. Nothing
iterates over chips: a job's failures are one Poisson process with rate chips x chip rate
+ hosts x host rate + pods x pod rate, and its progress between events is closed-form,
so the cost grows with the number of events, not with the fleet's size.

Model (each simplification is a parameter or stated here):
- Allocation: a pod is 9,216 chips = 144 cubes of 64 (4x4x4). A job is split into the
  fewest equal slices that fit a pod (16,384 chips: 2 x 8,192); each slice gets whole
  cubes inside one pod (best fit: the fullest powered pod with room), slices talk over
  DCN. Serving replicas take cubes anywhere. A pod with nothing allocated is powered
  off; allocated chips draw the all-in power x PUE, free chips in powered pods and hot
  spares draw `idle_power_fraction` of it. Nothing is allocated that would put the
  power above the cap.
- Training job: work = tokens / (planner tokens/s at its chip count); it runs segments
  of `tau` hours of work then a `save` (checkpoint); a failure loses the work since the
  last completed save (a failure during a save loses that segment), then a restart of
  `restart` hours (failures can strike during restarts too: Daly's model). tau defaults
  to Daly's optimum for the job's MTBF.
- Hot spares: `Scenario.spares` of installed cubes is held free (default: the steady-state
  repair need x 1.5). A failed cube is swapped at once (restart only) for a spare, else a
  free cube, else a cube of a lower-priority training job (preempted); it returns after
  `repair_hours`. With none, the job waits for its own repair. Spares are fungible across
  the fleet (where a spare sits in the torus is not modelled). A pod-level failure waits
  for the pod repair.
- Recovery (`Scenario.recovery`, per job `recovery`): plain (persistent checkpoints),
  multi_tier (in-memory saves and peer restores: times from bench/recovery.py's measured
  s/GB x the planner's state per host, the DCN bandwidth where slower), elastic (also,
  with no replacement, run at (slices - k)/slices speed until the repair, two short
  restarts instead of the wait), diloco (one island per slice: a failure stops one
  island for its restart, the others run at (up/slices) x the outer-step efficiency;
  each failure loses half an island checkpoint interval of that island's work and the
  others' wait at the next outer step; below the quorum the job waits). Approximations:
  a DiLoCo island's and an elastic job's dropped slice's chips stay allocated at full
  power; DiLoCo losses are charged at their expected value, not per island.
- Priorities: higher-priority training may preempt lower (graceful: the preempted job
  saves, losing no work, and re-queues); serving demand preempts any training.
- Serving: the chips the planner says are needed for the day's demand (tokens/day
  growing monthly), in whole replicas; replica failures are an availability factor
  1 / (1 + replica failure rate x serving restart time). Tokens served = min(demand,
  capacity x availability).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import heapq
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from megamesh.config import preset
from megamesh.errors import ConfigError
from megamesh.fleet.scenario import CHIPS_PER_HOST, CUBE_CHIPS, Scenario, TrainingJob, month_date
from megamesh.fleet.theory import daly_goodput, daly_interval
from megamesh.hardware import CHIPS
from megamesh.model.specs import param_count
from megamesh.plan.convergence import critical_batch
from megamesh.plan.cost import diloco_round_bytes
from megamesh.plan.layout import Workload
from megamesh.plan.memory import ADAM_BYTES
from megamesh.plan.quality import token_efficiency
from megamesh.plan.questions import serving_answer
from megamesh.plan.search import divisible_batch, search
from megamesh.plan.target import parse_target

BADPUT = ("checkpoint", "lost", "restart", "repair_wait", "queued", "preempt", "degraded")
STALLED = ("waiting", "restarting", "quorum")  # holding cubes without computing: idle power


@dataclass
class Job:
    name: str
    chips: int
    priority: int
    submit_h: float
    work_h: float  # productive hours needed
    tokens_per_h: float
    tau_h: float
    save_h: float
    restart_h: float
    rate_chip: float  # failures per hour from chips, hosts, pods
    rate_host: float
    rate_pod: float
    mtbf_h: float
    deadline_h: float | None = None
    state: str = "pending"  # pending, queued, restarting, running, waiting, done
    t_state: float = 0.0
    version: int = 0
    done_h: float = 0.0
    productive_h: float = 0.0
    first_start: float | None = None
    finish: float | None = None
    interruptions: int = 0
    preemptions: int = 0
    badput: Counter = field(default_factory=Counter)
    alloc: list[list[int]] = field(default_factory=list)  # [pod, cubes]
    most_free: int = 0  # the most allocatable cubes seen while it could not be placed
    stall_cubes: int = 0  # its cubes counted as stalled (held, waiting or restarting: idle power)
    max_swing_mw: float = 0.0  # the largest power drop when it stopped running
    recovery: str = "plain"  # RECOVERY_MODES: how it survives a failure (scenario.Recovery)
    slices: int = 1  # equal slices (one per pod at most); DiLoCo islands
    speed: float = 1.0  # work per running hour: < 1 on fewer slices or islands
    lost_slices: int = 0  # elastic: slices dropped, waiting for their repair
    down: int = 0  # diloco: islands restarting or waiting for a repair
    quorum: int = 1  # diloco: islands an outer step needs
    sync_eff: float = 1.0  # diloco: compute / (compute + outer-step exchange) per round
    island_restart_h: float = 0.0  # diloco: one island back from its own checkpoint
    island_loss_h: float = 0.0  # diloco: work (job-hours) lost per island failure
    regrow_h: float = 0.0  # elastic: restart onto fewer or more slices (own RAM restore)
    replaced_restart_h: float = 0.0  # a restart after a failed cube was replaced
    recovery_times: dict = field(default_factory=dict)  # the derived times, for the report
    # tokens of synchronous training each of its tokens is worth (plan.quality; 1 unless
    # diloco), with the loss increase behind it and what it extrapolates
    quality: dict = field(default_factory=lambda: {"efficiency": 1.0, "loss_increase": 0.0,
                                                   "extrapolated": None})
    batch: dict = field(default_factory=dict)  # sequences, critical, past_critical

    cubes: int = 0  # sum of `alloc`'s cubes (kept by `assign`: read at every event)

    def assign(self, alloc: list[list[int]]) -> None:
        self.alloc, self.cubes = alloc, sum(c for _, c in alloc)

    def not_placed(self) -> str | None:
        """Why a job that never started did not ("needs N cubes, at most M free"); None
        once it has run."""
        if self.first_start is not None:
            return None
        return (f"not placed: needs {self.chips // CUBE_CHIPS:,} cubes, at most "
                f"{self.most_free:,} were free at once (outside hot spares and repairs)")

    @property
    def rate(self) -> float:
        return self.rate_chip + self.rate_host + self.rate_pod


@dataclass
class Serving:
    name: str
    tokens_per_s_per_chip: float
    chips_per_replica: int
    availability: float
    demand0_per_s: float
    growth: float
    start_h: float
    cubes: list[list[int]] = field(default_factory=list)  # [pod, cubes]
    n_cubes: int = 0
    served: float = 0.0
    demanded: float = 0.0
    shortfall_h: float = 0.0

    def demand_per_s(self, t: float) -> float:
        if t < self.start_h:
            return 0.0
        months = (t - self.start_h) / (24 * 30.4375)
        return self.demand0_per_s * (1 + self.growth) ** months

    @property
    def chips(self) -> int:
        return self.n_cubes * CUBE_CHIPS


class Fleet:
    def __init__(
        self, scenario: Scenario, *, check: bool = False, planner: Any = None, samples_per_day: int = 1
    ):
        self.s = scenario
        self.check = check
        self.rng = random.Random(scenario.seed)
        self.cubes_per_pod = scenario.pod_chips // CUBE_CHIPS
        self.pod_used: list[int] = []
        self.spares = 0  # cubes held free as hot spares
        self.in_repair = 0  # cubes out of service (their spare took their place)
        self.stalled_cubes = 0  # cubes of jobs waiting for a repair or restarting
        self.max_swing_mw = 0.0  # the largest power drop when a running job stopped
        self.free_total = 0
        self.n_powered = 0
        self.used_total = 0
        self.training_cubes = 0  # cubes held by training jobs
        self.n_queued = 0  # training jobs waiting for an allocation
        self.heap: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self.t = 0.0
        self.jobs: dict[str, Job] = {}
        self.serving: list[Serving] = []
        self.planner = planner or planner_numbers
        self.integrals = Counter()
        self.peak_power_mw = 0.0
        self.series: list[dict[str, float]] = []
        self.sample_every_h = 24.0 / samples_per_day
        self.events = 0
        self.backfill: dict[str, float] | None = None  # experiments in the free capacity
        self.backfill_cubes = 0
        self.backfill_mw = 0.0  # what they add to the site's draw
        self._fill_state: tuple = ()
        self._setup()

    # ------------------------------------------------------------------ set-up

    def _push(self, t: float, kind: str, payload: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (t, self._seq, kind, payload))

    def _setup(self) -> None:
        s = self.s
        start = s.t_start
        for a in s.arrivals:
            d = month_date(a.month, "arrivals")
            t = max(0.0, (d - start).days * 24.0)
            if a.pods:
                self._push(t, "pods", a.pods)
        f = s.failures
        for spec in s.jobs:
            job = self._job(spec)
            self.jobs[job.name] = job
            self._push(job.submit_h, "submit", job.name)
        for i, d in enumerate(s.serving):
            n = self.planner("serve", d, s)
            rep_rate = n["chips_per_replica"] * (f.chip_per_hour + f.host_per_hour / CHIPS_PER_HOST)
            avail = 1 / (1 + rep_rate * f.serving_restart_min / 60)
            self.serving.append(
                Serving(
                    name=f"serving[{i}] {d.model}",
                    tokens_per_s_per_chip=n["tokens_per_s_per_chip"],
                    chips_per_replica=n["chips_per_replica"],
                    availability=avail,
                    demand0_per_s=d.tokens_per_day / 86400,
                    growth=d.monthly_growth,
                    start_h=s.hours(d.start, "start"),
                )
            )
        if s.backfill is not None:
            b = s.backfill
            spec = TrainingJob(name="backfill", model=b.model, tokens=1.0, chips=b.run_chips)
            n = self.planner("train", spec, s)
            rate = sum(f.job_rates(b.run_chips, s.pod_chips))
            save_h, restart_h = f.save_min / 60, f.restart_min / 60
            tau = daly_interval(save_h, 1 / rate) if rate > 0 else 24.0
            self.backfill = {"run_cubes": b.run_chips // CUBE_CHIPS, "mfu": n["mfu"],
                             "tokens_per_chip_h": n["tokens_per_h"] / b.run_chips,
                             "goodput": daly_goodput(tau, save_h, restart_h, 1 / rate if rate > 0
                                                     else math.inf),
                             "loss_h": b.preempt_loss_min / 60}
        t = 0.0
        while t <= s.horizon_h:
            self._push(t, "tick")
            t += self.sample_every_h

    def _job(self, spec: Any) -> Job:
        """A training job with its recovery mechanism's times (scenario.Recovery)."""
        s, f, rec = self.s, self.s.failures, self.s.recovery
        mode = spec.recovery or rec.mode
        slices = math.ceil(spec.chips / s.pod_chips)
        rc, rh, rp = f.job_rates(spec.chips, s.pod_chips)
        rate = rc + rh + rp
        mtbf = 1 / rate if rate > 0 else math.inf
        dcn_host = CHIPS[s.chip].dcn_bw * CHIPS_PER_HOST  # bytes/s a host moves across the DCN
        peer_s_per_gb = max(rec.peer_restore_s_per_gb, 1e9 / dcn_host)  # the slower of the two
        if mode == "diloco":  # islands: one per slice, each its own job of chips / slices
            island = dataclasses.replace(spec, chips=spec.chips // slices,
                                         batch=max(1, (spec.batch or spec.chips // 8) // slices),
                                         recovery="plain")
            n = self.planner("train", island, s)
            n = {**n, "tokens_per_h": n["tokens_per_h"] * slices}
        else:
            n = self.planner("train", spec, s)
        host_gb = n.get("state_bytes_per_chip", 0.0) * CHIPS_PER_HOST / 1e9
        replicas = n.get("replicas", 1)
        if mode in ("multi_tier", "elastic") and replicas < 2:
            mode = "plain"  # a lost host's shards exist nowhere else: persistent checkpoints
        save_h, restart_h = f.save_min / 60, f.restart_min / 60
        times: dict[str, float] = {}
        if mode in ("multi_tier", "elastic"):
            save_h = host_gb * rec.ram_save_s_per_gb / 3600
            restart_h = rec.reschedule_min / 60 + host_gb * peer_s_per_gb / 3600
            times = {"ram_save_s": save_h * 3600, "peer_restart_s": restart_h * 3600,
                     "state_gb_per_host": host_gb}
        if spec.checkpoint_interval_min:
            tau = spec.checkpoint_interval_min / 60
        else:
            tau = daly_interval(save_h, mtbf) if math.isfinite(mtbf) else 24.0
        job = Job(
            name=spec.name,
            chips=spec.chips,
            priority=spec.priority,
            submit_h=s.hours(spec.start, "start"),
            work_h=spec.tokens / n["tokens_per_h"],
            tokens_per_h=n["tokens_per_h"],
            tau_h=max(tau, 1e-6),
            save_h=save_h,
            restart_h=restart_h,
            rate_chip=rc,
            rate_host=rh,
            rate_pod=rp,
            mtbf_h=mtbf,
            deadline_h=s.hours(spec.deadline, "deadline") if spec.deadline else None,
            recovery=mode,
            slices=slices,
        )
        if mode == "diloco":
            job.quality = token_efficiency(param_count(preset(spec.model)), spec.tokens, slices,
                                           rec.diloco_inner_steps)
        if mode == "elastic":
            job.regrow_h = rec.reschedule_min / 60 + host_gb * rec.ram_restore_s_per_gb / 3600
            times["regrow_s"] = job.regrow_h * 3600
        if mode == "diloco":
            # each island checkpoints itself (plain, Daly's interval for its own MTBF); its
            # outer steps exchange ~3x its parameters per host (train.diloco.dcn_bytes)
            island_mtbf = mtbf * slices
            island_tau = daly_interval(f.save_min / 60, island_mtbf)
            params_gb = host_gb * 4 / (4 + ADAM_BYTES)  # f32 parameters of the state
            round_h = rec.diloco_inner_steps * n["step_time_s"] / 3600
            written, read = diloco_round_bytes(params_gb, slices)
            sync_h = (written * rec.ram_save_s_per_gb + read * peer_s_per_gb) / 3600
            job.sync_eff = round_h / (round_h + sync_h) * island_tau / (island_tau + f.save_min / 60)
            job.island_restart_h = f.restart_min / 60
            # lost per failure: the island's work since its last save (half an interval on
            # average), plus the others' wait at the next outer step if it is still down then
            wait_h = rec.diloco_wait_s / 3600 * min(1.0, job.island_restart_h / round_h)
            job.island_loss_h = (island_tau / 2) / slices + wait_h * (slices - 1) / slices
            job.quorum = max(1, math.ceil(rec.diloco_quorum * slices))
            job.tau_h, job.save_h = 1e9, 0.0  # no job-wide checkpoint: the outer state is on disk
            job.speed = job.sync_eff
            times = {"outer_step_s": sync_h * 3600, "round_s": round_h * 3600,
                     "island_checkpoint_interval_min": island_tau * 60,
                     "island_restart_s": job.island_restart_h * 3600,
                     "loss_per_failure_job_s": job.island_loss_h * 3600}
        job.recovery_times = times
        job.replaced_restart_h = job.restart_h
        batch = spec.batch or default_batch(spec.model, spec.chips, spec.seq, s.chip)
        crit = critical_batch(preset(spec.model), spec.seq, spec.tokens)
        job.batch = {"sequences": batch, "critical": crit["sequences"],
                     "past_critical": batch > crit["sequences"]}
        return job

    # ------------------------------------------------------------------ power and capacity

    def power_mw(self, used: int | None = None, powered: int | None = None, *,
                 drawn: bool = True) -> float:
        """The site's power. `drawn`: what it draws now, with the cubes of stalled jobs
        (waiting for a repair or restarting) at idle power; else the power if every
        allocated cube computed (the cap is checked against that: a stalled job restarts)."""
        used = self.used_total if used is None else used
        powered = self.n_powered if powered is None else powered
        idle = powered * self.cubes_per_pod - used + self.spares + self.in_repair
        idle = max(idle, 0)
        stalled = min(self.stalled_cubes, used) if drawn else 0
        return self.s.watts_per_chip * CUBE_CHIPS * (
            used - stalled + self.s.idle_power_fraction * (idle + stalled)) / 1e6

    def _track_stall(self, job: Job, state: str) -> None:
        """Before `job` enters `state`: count its cubes as stalled (idle power) or not."""
        new = job.cubes if state in STALLED else 0
        self.stalled_cubes += new - job.stall_cubes
        job.stall_cubes = new

    def _allocatable(self) -> int:
        return self.free_total - self.spares - self.in_repair

    def fill(self) -> None:
        """Backfill: experiment runs on the cubes nothing else holds, within the power the
        cap leaves (free cubes of powered pods first: full instead of idle power; then of
        dark pods: full power), in whole runs. Jobs and serving allocate as if these cubes
        were free: a run they displace loses `preempt_loss_min` of work."""
        if self.backfill is None:
            return
        state = (self.free_total, self.spares, self.in_repair, self.n_powered, self.used_total)
        if state == self._fill_state:
            return  # nothing it depends on changed since the last fill (most events)
        self._fill_state = state
        run = int(self.backfill["run_cubes"])
        full = self.s.watts_per_chip * CUBE_CHIPS / 1e6
        lit, dark = full * (1 - self.s.idle_power_fraction), full
        avail = max(0, self._allocatable())
        headroom = max(0.0, self.s.power_cap_mw - self.power_mw(drawn=False))
        in_lit = min(avail, max(0, self.n_powered * self.cubes_per_pod - self.used_total))
        take_lit = min(in_lit, int(headroom / lit + 1e-9))
        take_dark = min(avail - take_lit, int((headroom - take_lit * lit) / dark + 1e-9))
        cubes = (take_lit + take_dark) // run * run
        if cubes < self.backfill_cubes:
            yielded = self.backfill_cubes - cubes
            self.integrals["backfill_lost_chip_h"] += yielded * CUBE_CHIPS * self.backfill["loss_h"]
            self.integrals["backfill_runs_yielded"] += -(-yielded // run)
        self.backfill_cubes = cubes
        on_lit = min(cubes, take_lit)
        self.backfill_mw = on_lit * lit + (cubes - on_lit) * dark

    def _fits(self, slices: list[int], pod_used: list[int]) -> list[list[int]] | None:
        """Where a job's slices (cubes each) would go given per-pod usage (not committed):
        each slice inside one pod, best fit (the fullest powered pod that has room)."""
        used = list(pod_used)
        out: list[list[int]] = []
        for cubes in slices:
            best, best_key = None, None
            for p, u in enumerate(used):
                room = self.cubes_per_pod - u
                if room >= cubes:
                    key = (u == 0, room)
                    if best_key is None or key < best_key:
                        best, best_key = p, key
            if best is None:
                return None
            used[best] += cubes
            out.append([best, cubes])
        return out

    def _place(self, alloc: list[list[int]]) -> None:
        for p, c in alloc:
            if self.pod_used[p] == 0:
                self.n_powered += 1
            self.pod_used[p] += c
            self.used_total += c
            self.free_total -= c

    def _release(self, alloc: list[list[int]]) -> None:
        for p, c in alloc:
            self.pod_used[p] -= c
            self.used_total -= c
            self.free_total += c
            if self.pod_used[p] == 0:
                self.n_powered -= 1

    def _power_after(self, alloc: list[list[int]], freed: list[list[int]] = ()) -> float:
        used = self.used_total
        pod_delta: Counter = Counter()
        for p, c in freed:
            pod_delta[p] -= c
        for p, c in alloc:
            pod_delta[p] += c
        powered = self.n_powered
        for p, d in pod_delta.items():
            before, after = self.pod_used[p] > 0, self.pod_used[p] + d > 0
            powered += int(after) - int(before)
            used += d
        return self.power_mw(used, powered, drawn=False)

    def try_allocate(self, slices: list[int], freed: list[list[int]] = ()) -> list[list[int]] | None:
        pod_used = list(self.pod_used)
        for p, c in freed:
            pod_used[p] -= c
        if self._allocatable() + sum(c for _, c in freed) < sum(slices):
            return None
        alloc = self._fits(slices, pod_used)
        if alloc is None or self._power_after(alloc, freed) > self.s.power_cap_mw + 1e-9:
            return None
        return alloc

    # ------------------------------------------------------------------ integrals

    def advance(self, t: float) -> None:
        dt = t - self.t
        if dt < 0:
            raise AssertionError("time went backwards")
        if dt > 0:
            installed = len(self.pod_used) * self.s.pod_chips
            p = self.power_mw()
            self.integrals["installed_chip_h"] += installed * dt
            self.integrals["allocated_chip_h"] += self.used_total * CUBE_CHIPS * dt
            self.integrals["backfill_chip_h"] += self.backfill_cubes * CUBE_CHIPS * dt
            self.integrals["energy_mwh"] += (p + self.backfill_mw) * dt
            for sv in self.serving:
                demand = sv.demand_per_s(self.t)
                cap = sv.chips * sv.tokens_per_s_per_chip * sv.availability
                sv.demanded += demand * dt * 3600
                sv.served += min(demand, cap) * dt * 3600
                if cap < demand:
                    sv.shortfall_h += dt
                self.integrals["serving_chip_h"] += sv.chips * dt
                self.integrals["serving_good_chip_h"] += sv.chips * sv.availability * dt
            self.integrals["training_chip_h"] += self.training_cubes * CUBE_CHIPS * dt
        self.t = t

    # ------------------------------------------------------------------ jobs

    def _set_state(self, job: Job, state: str) -> None:
        self._track_stall(job, state)
        job.state, job.t_state = state, self.t
        job.version += 1
        if state == "running":
            remaining = (job.work_h - job.done_h) / job.speed  # running hours still needed
            k = max(1, math.ceil(remaining / job.tau_h - 1e-12))
            seg = job.tau_h + job.save_h
            finish = self.t + (k - 1) * seg + (remaining - (k - 1) * job.tau_h) + job.save_h
            self._push(finish, "finish", (job.name, job.version))
        if state == "restarting":
            self._push(self.t + job.restart_h, "restarted", (job.name, job.version))
        rate = job.rate * (job.slices - job.down) / job.slices  # islands down do not fail
        if state in ("running", "restarting") and rate > 0:
            self._push(self.t + self.rng.expovariate(rate), "failure", (job.name, job.version))

    def _account_running(self, job: Job, graceful: bool) -> None:
        """Leaving `running` at self.t: bank saved work, charge checkpoints and lost work."""
        e = self.t - job.t_state
        seg = job.tau_h + job.save_h
        n = int(e // seg)
        r = e - n * seg
        saved = n * job.tau_h
        job.badput["checkpoint"] += n * job.save_h
        if r <= job.tau_h:
            if graceful:
                saved += r
                job.badput["preempt"] += job.save_h  # the save it makes before leaving
            else:
                job.badput["lost"] += r
        else:
            if graceful:
                saved += job.tau_h
                job.badput["checkpoint"] += r - job.tau_h
            else:
                job.badput["lost"] += job.tau_h
                job.badput["checkpoint"] += r - job.tau_h
        work = min(saved * job.speed, job.work_h - job.done_h)
        job.badput["degraded"] += saved - work  # running on fewer slices or islands, syncing
        job.done_h += work
        job.productive_h += work

    def _swing(self, job: Job, cubes: float) -> None:
        """`cubes` of `job` stop computing: the site's draw drops by their full minus idle
        power; the largest such drop is kept per job and fleet-wide."""
        mw = self.s.watts_per_chip * CUBE_CHIPS * cubes * (1 - self.s.idle_power_fraction) / 1e6
        job.max_swing_mw = max(job.max_swing_mw, mw)
        self.max_swing_mw = max(self.max_swing_mw, mw)

    def _leave(self, job: Job, graceful: bool, stops: bool = True) -> None:
        """`job` leaves its state at self.t: its time there is accounted. `stops`: it stops
        computing (not so for a DiLoCo job whose other islands go on)."""
        if job.state == "running":
            self._account_running(job, graceful)
            if not stops:
                return
            self._swing(job, job.cubes)  # it stops computing (a failure, a preemption)
        elif job.state == "restarting":
            job.badput["restart"] += self.t - job.t_state
        elif job.state in ("waiting", "quorum"):
            job.badput["repair_wait"] += self.t - job.t_state
        elif job.state == "queued" and job.first_start is not None:
            job.badput["queued"] += self.t - job.t_state

    def _start(self, job: Job, alloc: list[list[int]]) -> None:
        self._leave(job, graceful=True)
        self._place(alloc)
        job.assign(alloc)
        self.training_cubes += job.cubes
        self.n_queued -= 1
        if job.first_start is None:
            job.first_start = self.t
        self._set_state(job, "restarting")

    def _preempt(self, job: Job) -> None:
        self._leave(job, graceful=True)
        job.preemptions += 1
        self._release(job.alloc)
        self.training_cubes -= job.cubes
        job.assign([])
        self.n_queued += 1
        self._set_state(job, "queued")

    def schedule(self) -> None:
        if self.n_queued == 0:
            return
        queue = sorted(
            (j for j in self.jobs.values() if j.state == "queued"),
            key=lambda j: (-j.priority, j.submit_h, j.name),
        )
        for job in queue:
            n = math.ceil(job.chips / self.s.pod_chips)
            slices = [job.chips // n // CUBE_CHIPS] * n
            alloc = self.try_allocate(slices)
            if alloc is None:
                victims = sorted(
                    (v for v in self.jobs.values() if v.alloc and v.priority < job.priority),
                    key=lambda v: (v.priority, -v.submit_h),
                )
                freed: list[list[int]] = []
                chosen = []
                for v in victims:
                    freed = freed + v.alloc
                    chosen.append(v)
                    alloc = self.try_allocate(slices, freed)
                    if alloc is not None:
                        break
                if alloc is None:
                    job.most_free = max(job.most_free, self._allocatable())
                    continue
                for v in chosen:
                    self._preempt(v)
                alloc = self.try_allocate(slices)
                if alloc is None:
                    continue
            self._start(job, alloc)

    # ------------------------------------------------------------------ serving

    def resize_serving(self) -> None:
        for sv in self.serving:
            # provision for the demand at the next re-sizing (demand grows in between)
            demand = sv.demand_per_s(self.t + self.sample_every_h)
            per_replica = sv.chips_per_replica * sv.tokens_per_s_per_chip * sv.availability
            replicas = math.ceil(demand / per_replica) if demand > 0 else 0
            want = math.ceil(replicas * sv.chips_per_replica / CUBE_CHIPS)
            have = sum(c for _, c in sv.cubes)
            while have > want and sv.cubes:
                p, c = sv.cubes[-1]
                give = min(c, have - want)
                self._release([[p, give]])
                if give == c:
                    sv.cubes.pop()
                else:
                    sv.cubes[-1][1] -= give
                have -= give
            while have < want:
                got = self._grab_cubes(want - have)
                if not got:
                    victims = sorted(
                        (v for v in self.jobs.values() if v.alloc), key=lambda v: (v.priority, -v.submit_h)
                    )
                    if not victims:
                        break
                    self._preempt(victims[0])
                    continue
                sv.cubes.extend(got)
                have += sum(c for _, c in got)
            sv.n_cubes = have

    def _grab_cubes(self, n: int) -> list[list[int]]:
        """Up to n cubes for serving, fullest powered pods first, within power."""
        out = []
        order = sorted(range(len(self.pod_used)), key=lambda p: (self.pod_used[p] == 0, -self.pod_used[p]))
        for p in order:
            room = min(self.cubes_per_pod - self.pod_used[p], n, self._allocatable())
            if room <= 0:
                continue
            # shrink to what the power cap allows
            while room > 0 and self._power_after([[p, room]]) > self.s.power_cap_mw + 1e-9:
                room = room // 2
            if room <= 0:
                continue
            self._place([[p, room]])
            out.append([p, room])
            n -= room
            if n <= 0:
                break
        return out

    # ------------------------------------------------------------------ events

    def _job_event(self, payload: Any) -> Job | None:
        name, version = payload
        job = self.jobs[name]
        return job if job.version == version else None

    # ------------------------------------------------------------------ events
    # One handler per event kind, (time, payload) -> None; `run` dispatches on the kind.

    @property
    def handlers(self) -> dict[str, Any]:
        return {"pods": self._on_pods, "submit": self._on_submit, "tick": self._on_tick,
                "restarted": self._on_restarted, "finish": self._on_finish,
                "failure": self._on_failure, "repaired": self._on_repaired,
                "island_back": self._on_island_back, "slice_back": self._on_slice_back}

    def _on_pods(self, t: float, n: int) -> None:
        for _ in range(n):
            self.pod_used.append(0)
            self.free_total += self.cubes_per_pod
        target = int(self.s.spares * len(self.pod_used) * self.cubes_per_pod)
        self.spares = max(0, target - self.in_repair)
        self.resize_serving()
        self.schedule()

    def _on_submit(self, t: float, name: str) -> None:
        job = self.jobs[name]
        self._track_stall(job, "queued")
        job.state, job.t_state = "queued", t
        self.n_queued += 1
        self.schedule()

    def _on_tick(self, t: float, _: Any) -> None:
        self.resize_serving()
        self.schedule()
        self.fill()
        self._sample()

    def _on_restarted(self, t: float, payload: Any) -> None:
        job = self._job_event(payload)
        if job is not None:
            job.badput["restart"] += t - job.t_state
            if job.recovery == "diloco":
                self._run_islands(job)
            else:
                self._set_state(job, "running")

    def _on_finish(self, t: float, payload: Any) -> None:
        job = self._job_event(payload)
        if job is None:
            return
        remaining = job.work_h - job.done_h
        k = max(1, math.ceil(remaining / job.speed / job.tau_h - 1e-12))
        job.badput["checkpoint"] += k * job.save_h
        job.badput["degraded"] += remaining / job.speed - remaining
        job.done_h = job.work_h
        job.productive_h += remaining
        job.finish = t
        self._release(job.alloc)
        self.training_cubes -= job.cubes
        job.assign([])
        self._track_stall(job, "done")
        job.state, job.version = "done", job.version + 1
        self.schedule()

    def _on_failure(self, t: float, payload: Any) -> None:
        job = self._job_event(payload)
        if job is not None:
            self._fail(job)

    def _on_repaired(self, t: float, payload: Any) -> None:
        what, name, version = payload
        if what in ("spare", "free"):  # back as a hot spare, or to the free pool it came from
            self.in_repair -= 1
            self.spares += what == "spare"
            self.schedule()
            return
        job = self.jobs[name]
        if job.version == version:
            job.badput["repair_wait"] += t - job.t_state
            self._set_state(job, "restarting")

    def run(self) -> dict[str, Any]:
        horizon = self.s.horizon_h
        handlers = self.handlers
        while self.heap:
            t, _, kind, payload = heapq.heappop(self.heap)
            if t > horizon:
                break
            self.advance(t)
            self.events += 1
            handlers[kind](t, payload)
            self.fill()
            if self.check:
                self.check_invariants()
        self.advance(max(self.t, horizon))  # integrate up to the horizon
        return self.summary()

    def _replacement(self, job: Job) -> bool:
        """A cube to take a failed one's place at once: a hot spare, else a free cube, else
        one of a lower-priority training job (preempted). The failed cube goes to repair
        and comes back as a spare (or free). False: none, the job must do without it."""
        f = self.s.failures
        if self.spares > 0:
            self.spares -= 1
            self.in_repair += 1
            self._push(self.t + f.repair_hours, "repaired", ("spare", job.name, 0))
            return True
        if self._allocatable() <= 0:
            victims = sorted((v for v in self.jobs.values() if v.alloc and v.priority < job.priority
                              and v is not job), key=lambda v: (v.priority, -v.submit_h))
            if not victims:
                return False
            self._preempt(victims[0])
        self.in_repair += 1  # a free cube stands in; the repaired one returns to the free pool
        self._push(self.t + f.repair_hours, "repaired", ("free", job.name, 0))
        return True

    def _fail(self, job: Job) -> None:
        f = self.s.failures
        job.interruptions += 1
        u = self.rng.random() * job.rate
        pod_level = u >= job.rate_chip + job.rate_host
        if job.recovery == "diloco" and job.state == "running":
            return self._island_fails(job, pod_level)
        self._leave(job, graceful=False)
        if not pod_level and self._replacement(job):
            job.restart_h = job.replaced_restart_h
            self._set_state(job, "restarting")
            return
        back = f.pod_repair_hours if pod_level else f.repair_hours
        if job.recovery == "elastic" and job.slices - job.lost_slices > 1:
            # go on without the failed slice (the same global batch on fewer slices); it
            # rejoins when repaired: two short restarts instead of waiting for the repair
            job.lost_slices += 1
            job.speed = (job.slices - job.lost_slices) / job.slices
            job.restart_h = job.regrow_h
            self._push(self.t + back, "slice_back", job.name)
            self._set_state(job, "restarting")
            return
        self._track_stall(job, "waiting")
        job.state, job.t_state = "waiting", self.t
        job.version += 1
        self._push(self.t + back, "repaired", ("job", job.name, job.version))

    def _island_fails(self, job: Job, pod_level: bool) -> None:
        """DiLoCo: one island stops; the others keep training (at a lower speed, or wait
        for a quorum); the island's unsaved work is lost; it rejoins after its restart
        (and its repair, without a replacement cube)."""
        f = self.s.failures
        self._leave(job, graceful=True, stops=False)  # the others' work is kept
        lost = min(job.island_loss_h, job.done_h)
        job.done_h -= lost
        job.productive_h -= lost
        job.badput["lost"] += lost
        self._swing(job, job.cubes / job.slices)  # one island stops computing
        wait = 0.0 if not pod_level and self._replacement(job) else (
            f.pod_repair_hours if pod_level else f.repair_hours)
        job.down += 1
        self._push(self.t + wait + job.island_restart_h, "island_back", job.name)
        self._run_islands(job)

    def _run_islands(self, job: Job) -> None:
        up = job.slices - job.down
        job.speed = job.sync_eff * up / job.slices
        if up >= job.quorum:
            self._set_state(job, "running")
        else:  # too few islands for an outer step: the rest wait for the quorum
            self._track_stall(job, "quorum")
            job.state, job.t_state = "quorum", self.t
            job.version += 1

    def _on_island_back(self, t: float, name: str) -> None:
        job = self.jobs[name]
        job.down -= 1
        if job.state == "running":
            self._leave(job, graceful=True, stops=False)
            self._run_islands(job)
        elif job.state == "quorum":
            job.badput["repair_wait"] += t - job.t_state
            self._run_islands(job)

    def _on_slice_back(self, t: float, name: str) -> None:
        """Elastic: a repaired slice rejoins (a restart onto more slices)."""
        job = self.jobs[name]
        job.lost_slices -= 1
        job.speed = (job.slices - job.lost_slices) / job.slices
        if job.state == "running":
            # a planned stop: the job saves (to RAM and persistent storage, as on SIGTERM)
            # and restarts on more slices from its RAM copies
            self._leave(job, graceful=True)
            job.restart_h = job.regrow_h + self.s.failures.save_min / 60
            self._set_state(job, "restarting")

    def _sample(self) -> None:
        p = self.power_mw() + self.backfill_mw
        self.peak_power_mw = max(self.peak_power_mw, p)
        training = sum(j.cubes for j in self.jobs.values()) * CUBE_CHIPS
        self.series.append(
            {
                "t_h": self.t,
                "installed_chips": len(self.pod_used) * self.s.pod_chips,
                "training_chips": training,
                "serving_chips": sum(s.chips for s in self.serving),
                "backfill_chips": self.backfill_cubes * CUBE_CHIPS,
                "power_mw": p,
                "spare_chips": self.spares * CUBE_CHIPS,
                "goodput": self._goodput_so_far(),
                "serving_demand_tok_s": sum(s.demand_per_s(self.t) for s in self.serving),
                "serving_capacity_tok_s": sum(
                    s.chips * s.tokens_per_s_per_chip * s.availability for s in self.serving
                ),
            }
        )

    def _backfill_good_chip_h(self) -> float:
        if self.backfill is None:
            return 0.0
        return max(0.0, self.integrals["backfill_chip_h"] * self.backfill["goodput"]
                   - self.integrals["backfill_lost_chip_h"])

    def _goodput_so_far(self) -> float:
        """Useful chip-hours (jobs' productive work, serving's available replicas,
        experiments' work) over the chip-hours held by any of them."""
        alloc = self.integrals["allocated_chip_h"] + self.integrals["backfill_chip_h"]
        good = (
            sum(j.productive_h * j.chips for j in self.jobs.values()) + self.integrals["serving_good_chip_h"]
            + self._backfill_good_chip_h()
        )
        return good / alloc if alloc else 0.0

    def check_invariants(self) -> None:
        used = [0] * len(self.pod_used)
        for j in self.jobs.values():
            for p, c in j.alloc:
                used[p] += c
        for sv in self.serving:
            for p, c in sv.cubes:
                used[p] += c
        for p, u in enumerate(used):
            if u != self.pod_used[p] or u > self.cubes_per_pod or u < 0:
                raise AssertionError(
                    f"pod {p}: {u} cubes allocated, books say {self.pod_used[p]} of {self.cubes_per_pod}"
                )
        if self.free_total != sum(self.cubes_per_pod - u for u in used):
            raise AssertionError("free cube count is off")
        if self.power_mw(drawn=False) + self.backfill_mw > self.s.power_cap_mw + 1e-6:
            raise AssertionError(f"power {self.power_mw(drawn=False) + self.backfill_mw:.1f} MW "
                                 f"(backfill {self.backfill_mw:.1f}) above the cap "
                                 f"{self.s.power_cap_mw} MW")
        if self.backfill_cubes > max(0, self._allocatable()):
            raise AssertionError(f"backfill holds {self.backfill_cubes} cubes, "
                                 f"{self._allocatable()} are free")
        stalled = sum(j.cubes for j in self.jobs.values() if j.state in STALLED)
        if stalled != self.stalled_cubes:
            raise AssertionError(f"stalled cubes: {self.stalled_cubes} counted, {stalled} held")

    # ------------------------------------------------------------------ results

    def summary(self) -> dict[str, Any]:
        s = self.s
        self.peak_power_mw = max(self.peak_power_mw, self.power_mw() + self.backfill_mw)
        jobs = []
        for j in self.jobs.values():
            wall_end = j.finish if j.finish is not None else self.t
            wall = (wall_end - j.first_start) if j.first_start is not None else 0.0
            jobs.append(
                {
                    "name": j.name,
                    "chips": j.chips,
                    "priority": j.priority,
                    # a job that never ran has no goodput: it says why it was not placed
                    "goodput": j.productive_h / wall if wall > 0 else None,
                    # useful tokens at synchronous quality per wall hour (plan.quality)
                    "quality_adjusted_goodput": (j.productive_h * j.quality["efficiency"] / wall
                                                 if wall > 0 else None),
                    "token_efficiency": j.quality["efficiency"],
                    "quality": j.quality,
                    "not_placed": j.not_placed(),
                    "finish_time": _date(s, j.finish),
                    "finished": j.finish is not None,
                    "first_start": _date(s, j.first_start),
                    "deadline": _date(s, j.deadline_h),
                    "met_deadline": (
                        None if j.deadline_h is None else (j.finish is not None and j.finish <= j.deadline_h)
                    ),
                    "progress": j.done_h / j.work_h if j.work_h else 1.0,
                    "tokens_trained": j.done_h * j.tokens_per_h,
                    "productive_hours": j.productive_h,
                    "wall_hours": wall,
                    "badput_hours": {k: j.badput[k] for k in BADPUT},
                    "interruptions": j.interruptions,
                    # the site's power drop when this job stops computing (failure,
                    # preemption): its chips fall from full to idle power
                    "power_swing_mw": j.max_swing_mw,
                    "preemptions": j.preemptions,
                    "mtbf_hours": j.mtbf_h,
                    "checkpoint_interval_min": j.recovery_times.get(
                        "island_checkpoint_interval_min", j.tau_h * 60),
                    "recovery": j.recovery,
                    "recovery_times": j.recovery_times,
                    "work_hours_at_full_speed": j.work_h,
                    # its batch vs the critical batch (plan.convergence): past it, the
                    # planner's speed overstates how fast the run converges
                    "batch": j.batch,
                }
            )
        installed = self.integrals["installed_chip_h"]
        energy_mwh = self.integrals["energy_mwh"]
        price = s.chip_price
        idle_h = max(0.0, installed - self.integrals["allocated_chip_h"] - self.integrals["backfill_chip_h"])
        cost_energy = energy_mwh * s.energy_price_per_mwh
        return {
            "scenario": s.name,
            "start": s.start,
            "end": s.end,
            "events": self.events,
            "chips_installed_at_end": len(self.pod_used) * s.pod_chips,
            "pods_at_end": len(self.pod_used),
            "goodput": self._goodput_so_far(),
            "training_goodput": (
                sum(j.productive_h * j.chips for j in self.jobs.values()) / self.integrals["training_chip_h"]
            )
            if self.integrals["training_chip_h"]
            else 0.0,
            "quality_adjusted_training_goodput": (
                sum(j.productive_h * j.chips * j.quality["efficiency"] for j in self.jobs.values())
                / self.integrals["training_chip_h"]
            )
            if self.integrals["training_chip_h"]
            else 0.0,
            "utilization": (self.integrals["allocated_chip_h"] + self.integrals["backfill_chip_h"])
            / installed if installed else 0.0,
            "utilization_without_backfill": self.integrals["allocated_chip_h"] / installed
            if installed else 0.0,
            # installed chip-hours nothing used: hot spares, cubes in repair, free cubes
            # (lit at idle power or dark), fragments too small for a run
            "installed_chip_hours": installed,
            "idle_chip_hours": idle_h,
            "idle_share": idle_h / installed if installed else 0.0,
            "idle_cost_usd": idle_h * price if price else None,
            "backfill": None if self.backfill is None else {
                "model": s.backfill.model, "run_chips": s.backfill.run_chips,
                "chip_hours": self.integrals["backfill_chip_h"],
                "productive_chip_hours": self._backfill_good_chip_h(),
                "goodput": self._backfill_good_chip_h() / self.integrals["backfill_chip_h"]
                if self.integrals["backfill_chip_h"] else 0.0,
                "runs_yielded": int(self.integrals["backfill_runs_yielded"]),
                "tokens_trained": self._backfill_good_chip_h() * self.backfill["tokens_per_chip_h"],
                "mfu": self.backfill["mfu"]},
            "energy_gwh": energy_mwh / 1e3,
            "average_power_mw": energy_mwh / self.t if self.t else 0.0,
            "peak_power_mw": self.peak_power_mw,
            # the largest drop in the site's draw when one job stopped computing (a
            # failure or preemption), as large jobs do every few minutes at this scale
            "largest_power_swing_mw": self.max_swing_mw,
            "power_cap_mw": s.power_cap_mw,
            "tokens_trained": sum(j["tokens_trained"] for j in jobs),
            "tokens_served": sum(sv.served for sv in self.serving),
            "tokens_demanded": sum(sv.demanded for sv in self.serving),
            "serving_shortfall_hours": max((sv.shortfall_h for sv in self.serving), default=0.0),
            "cost_usd": {
                "energy": cost_energy,
                "chips": installed * price if price else None,
                "note": "chip-hours x price_per_chip_hour (none public for tpu7x: set it)"
                if not price
                else "chip-hours x price_per_chip_hour",
            },
            "jobs": jobs,
            "approximate": "failure rates, idle power and energy price are parameters, "
            "not measured TPU figures",
            "power_basis": (
                f"{s.watts_per_chip / s.pue:,.0f} W per chip is IT power (chip, host and network "
                f"share; for tpu7x ~10 MW per 9,216-chip pod as reported from Google's Hot Chips "
                f"2025 talk, which does not say it covers cooling), so PUE {s.pue:g} is applied on "
                f"top: {s.watts_per_chip:,.0f} W per chip at the site; chips of jobs waiting for a "
                f"repair or restarting draw idle power ({s.idle_power_fraction:.0%})"),
        }


def _date(s: Scenario, t: float | None) -> str | None:
    if t is None:
        return None
    return (dt.datetime.combine(s.t_start, dt.time()) + dt.timedelta(hours=t)).strftime("%Y-%m-%dT%H:%M")


# ---------------------------------------------------------------------- planner numbers


@functools.lru_cache(maxsize=512)
def _train_numbers(model: str, chips: int, seq: int, batch: int, chip: str,
                   precision: str = "bf16") -> dict[str, float] | None:
    """The planner's best layout for one training job (None: none fits), at the job's
    matmul precision. Cached: a simulation asks for the same job at every (re)start;
    bounded across simulations."""
    w = Workload(preset(model), seq=seq, batch=batch, precision=precision)
    res = search(w, parse_target(f"{chip}:{chips}"))
    if not res.ranked:
        return None
    best = res.ranked[0]
    return {"tokens_per_h": w.tokens / best.step_time_s * 3600, "mfu": best.mfu,
            "step_time_s": best.step_time_s,
            # params + optimizer state per chip (what a checkpoint holds), and how many
            # data-parallel replicas of it the layout keeps across slices (dcn)
            "state_bytes_per_chip": best.memory.state,
            "replicas": best.layout.sizes.get("dcn", 1)}


@functools.lru_cache(maxsize=512)
def default_batch(model: str, chips: int, seq: int, chip: str) -> int:
    """A job's batch when its scenario gives none: 8 chips a sequence (chips // 8), rounded
    to the nearest batch the planner's layouts can split over the job's slices (1M chips
    are 109 pods: 125,000 sequences do not divide, 125,568 do)."""
    w = Workload(preset(model), seq=seq, batch=max(chips // 8, 1))
    return divisible_batch(w, parse_target(f"{chip}:{chips}"))


@functools.lru_cache(maxsize=512)
def _serve_numbers(model: str, input_tokens: int, output_tokens: int, slo_tpot_ms: float | None,
                   slo_ttft_ms: float | None, chip: str, pod_chips: int) -> dict[str, float]:
    a = serving_answer(preset(model), parse_target(f"{chip}:{pod_chips}"), qps=1.0,
                       input_tokens=input_tokens, output_tokens=output_tokens,
                       slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms)
    return {"tokens_per_s_per_chip": a["decode_tokens_per_s_per_chip"],
            "chips_per_replica": a["chips_per_replica"]}


def planner_numbers(kind: str, spec: Any, s: Scenario) -> dict[str, float]:
    """Throughput of a training job ("train": tokens_per_h, mfu, step_time_s) or of a
    serving replica ("serve": tokens_per_s_per_chip, chips_per_replica) from megamesh's
    planner."""
    if kind == "train":
        batch = spec.batch or default_batch(spec.model, spec.chips, spec.seq, s.chip)
        got = _train_numbers(spec.model, spec.chips, spec.seq, batch, s.chip, spec.precision)
        if got is None:
            raise ConfigError(
                f"job {spec.name!r}: {spec.model} does not fit {spec.chips:,} {s.chip} "
                f"chips at batch {batch} x {spec.seq} (megamesh plan finds no layout)"
            )
        return got
    return _serve_numbers(spec.model, spec.input_tokens, spec.output_tokens, spec.slo_tpot_ms,
                          spec.slo_ttft_ms, s.chip, s.pod_chips)


def simulate(scenario: Scenario, *, check: bool = False, planner: Any = None) -> tuple[dict[str, Any], Fleet]:
    fleet = Fleet(scenario, check=check, planner=planner)
    return fleet.run(), fleet
