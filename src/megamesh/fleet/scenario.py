"""A fleet scenario: capacity arriving over time, a power cap, workloads and failures.

Loaded from YAML/JSON (`megamesh fleet --scenario F`) or the built-in default for the
mission (`default_scenario()`, printed by `megamesh fleet --write-default F`). Every field
is checked; an error names the field (`jobs[1].model`, `failures.chip_per_hour`) and what
is allowed. Pure Python.

Time is in hours from `start` (a date); dates in the file are ISO (`2026-03-01`).

Failure defaults reproduce Llama 3's 419 unexpected interruptions in 54 days on 16,384
GPUs (arXiv 2407.21783; docs/sources.md: 4.7e-4 per
GPU-day, 1.97e-5 per accelerator-hour). TPU failure rates are not published: the split
between chip, host and pod failures is an assumption (parameters, marked unconfirmed).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megamesh.config import PRESETS
from megamesh.errors import ConfigError
from megamesh.fileio import read_json_or_yaml
from megamesh.hardware import CHIPS
from megamesh.runspec import PRECISIONS
from megamesh.settings import build, require, to_dict

LLAMA3_RATE_PER_CHIP_HOUR = 419 / (54 * 24 * 16384)  # 1.973e-5 unexpected interruptions
CHIPS_PER_HOST = 4  # TPU v4/v5p/tpu7x hosts drive 4 chips
CUBE_CHIPS = 64  # 3-D torus slices are built from 4x4x4 cubes
SPARE_MARGIN = 1.5  # default hot spares over their steady-state need (failures are bursty)


@dataclass
class Arrival:
    month: str  # "2026-03": pods arrive on the first of that month
    pods: int


@dataclass
class TrainingJob:
    name: str
    model: str  # a preset name
    tokens: float
    chips: int  # the fewest equal slices that fit a pod, each of whole 64-chip cubes
    priority: int = 1  # higher wins; may preempt lower-priority training
    start: str | None = None  # earliest start (date); default: the scenario start
    deadline: str | None = None  # reported against, not enforced
    seq: int = 8192
    batch: int | None = None  # sequences per step; default chips // 8 rounded to divide (sim.default_batch)
    checkpoint_interval_min: float | None = None  # default: Daly's optimum for this job
    recovery: str | None = None  # one of RECOVERY_MODES; default: the scenario's recovery.mode
    precision: str = "bf16"  # the layers' matmuls: bf16 or fp8 (its planned step times)


@dataclass
class ServingDemand:
    model: str
    tokens_per_day: float  # output tokens per day at `start`
    monthly_growth: float = 0.0  # 0.2 = +20% per month, compounded
    input_tokens: int = 2000
    output_tokens: int = 500
    slo_tpot_ms: float | None = 50.0
    slo_ttft_ms: float | None = None
    start: str | None = None


@dataclass
class Backfill:
    """Experiments that fill the capacity the named jobs and serving leave free, as a
    lab's research queue does: runs of `run_chips` on whatever cubes are free (within the
    power cap), yielding them at once to any job or serving replica that needs them (each
    run yielded loses `preempt_loss_min` of its work: a save and a restart elsewhere).
    Their failures cost what Daly's model says for a run of that size. Why a lab's fleet
    is not idle: Epoch AI estimates OpenAI's 2024 R&D compute at ~$5B, of which ~$0.5B
    (~10%) went to the final training runs of released models and the rest to
    experiments, research and unreleased models (Epoch AI, 2025; secondary)."""

    model: str = "llama3.1-8b"  # a typical experiment's model (its tokens/s per chip)
    run_chips: int = 4096  # one experiment run: whole cubes inside a pod
    preempt_loss_min: float = 10.0  # unconfirmed: work lost per run yielded


@dataclass
class Failures:
    """Rates per hour per unit. Defaults: Llama 3's per-accelerator rate split 75% chip,
    25% host, plus rare pod-level events (the split is an assumption; TPU rates are not
    published)."""

    chip_per_hour: float = LLAMA3_RATE_PER_CHIP_HOUR * 0.75
    host_per_hour: float = LLAMA3_RATE_PER_CHIP_HOUR * 0.25 * CHIPS_PER_HOST
    pod_per_hour: float = 1e-4
    repair_hours: float = 24.0  # a failed cube (chip or host) back in service
    pod_repair_hours: float = 8.0
    save_min: float = 1.0  # unconfirmed: training blocked per checkpoint (async Orbax saves)
    restart_min: float = 5.0  # unconfirmed: reschedule + restore + recompile
    serving_restart_min: float = 2.0  # a serving replica back after a failure

    def job_rates(self, chips: int, pod_chips: int) -> tuple[float, float, float]:
        """Failures per hour of a job of `chips` from its chips, its hosts and its pods."""
        return (chips * self.chip_per_hour, math.ceil(chips / CHIPS_PER_HOST) * self.host_per_hour,
                math.ceil(chips / pod_chips) * self.pod_per_hour)

    def steady_spares(self) -> float:
        """The hot-spare fraction repairs need at steady state (a cube's failure rate x
        repair hours) x SPARE_MARGIN, at most 45%."""
        cube_rate = CUBE_CHIPS * self.chip_per_hour + CUBE_CHIPS // CHIPS_PER_HOST * self.host_per_hour
        return min(0.45, cube_rate * self.repair_hours * SPARE_MARGIN)


RECOVERY_MODES = ("plain", "multi_tier", "elastic", "diloco")


@dataclass
class Recovery:
    """How training jobs survive failures, with megamesh train's own mechanisms:

    plain       persistent Orbax checkpoints (failures.save_min, failures.restart_min)
    multi_tier  + in-memory checkpoints (train.memory_tier): a save costs the state per
                host x ram_save_s_per_gb; a restart costs reschedule_min + the state per
                host restored from a peer replica (the slower of peer_restore_s_per_gb and
                the chip's DCN bandwidth). Needs data-parallel replicas across slices (the
                planner's layout has dcn > 1); without them a job recovers as plain.
    elastic     + with no replacement cube free, drop the failed slice and go on with the
                same global batch on fewer slices (--elastic), regrow when it is repaired
                (each resize: reschedule_min + the own-RAM restore, ram_restore_s_per_gb)
    diloco      each slice (pod) is an island (--diloco islands=N,inner_steps=H): a failure
                stops one island, the others go on; outer steps cost the parameter
                exchange; a restarted island loses its part of the current round

    The per-GB times are measured by bench/recovery.py (BENCHMARKS.md; this repository's
    2-core CPU, so slow for a TPU host with many cores: pessimistic); reschedule_min is an
    assumption (no TPU figure is published)."""

    mode: str = "elastic"  # for jobs without their own `recovery`
    ram_save_s_per_gb: float = 0.175  # measured: bench/recovery.py, Orbax P2P save to /dev/shm
    peer_restore_s_per_gb: float = 2.04  # measured: bench/recovery.py, a peer's copy over TCP
    ram_restore_s_per_gb: float = 2.34  # measured: bench/recovery.py, this host's own RAM copy
    reschedule_min: float = 1.0  # unconfirmed: processes restarted in place, compile cache warm
    diloco_inner_steps: int = 500  # H, as the DiLoCo paper's default (arXiv 2311.08105)
    diloco_wait_s: float = 60.0  # how long islands wait at a sync for a missing one
    diloco_quorum: float = 0.5  # fraction of islands an outer step needs


@dataclass
class Scenario:
    name: str = "mission-2026"
    start: str = "2026-01-01"
    end: str = "2026-12-31"
    chip: str = "tpu7x"
    arrivals: list[Arrival] = field(default_factory=list)
    power_cap_mw: float = 1000.0
    pue: float = 1.1  # Google fleet PUE (hardware.md)
    all_in_power_w: float | None = None  # default: the catalog's (tpu7x 1,090 W, unconfirmed)
    idle_power_fraction: float = 0.3  # unconfirmed: an allocated-but-idle chip's share
    energy_price_per_mwh: float = 80.0  # unconfirmed: US industrial average order of magnitude
    price_per_chip_hour: float | None = None  # default: the catalog's (none public for tpu7x)
    # of installed cubes held as hot spares; default (None): the steady-state need, cube
    # failures per hour x repair hours (~3% at 24 h), x SPARE_MARGIN
    spare_fraction: float | None = None
    recovery: Recovery = field(default_factory=Recovery)
    jobs: list[TrainingJob] = field(default_factory=list)
    serving: list[ServingDemand] = field(default_factory=list)
    backfill: Backfill | None = None  # experiments in the capacity left free (None: it idles)
    failures: Failures = field(default_factory=Failures)
    seed: int = 0

    # ------------------------------------------------------------------ derived

    @property
    def t_start(self) -> dt.date:
        return parse_date(self.start, "start")

    def hours(self, date: str | None, where: str) -> float:
        if date is None:
            return 0.0
        return (parse_date(date, where) - self.t_start).days * 24.0

    @property
    def horizon_h(self) -> float:
        return self.hours(self.end, "end") + 24.0

    @property
    def pod_chips(self) -> int:
        return CHIPS[self.chip].pod_chips

    @property
    def watts_per_chip(self) -> float:
        w = self.all_in_power_w or CHIPS[self.chip].all_in_power_w
        if not w:
            raise ConfigError(f"chip {self.chip!r} has no all-in power in the catalog: set all_in_power_w")
        return w * self.pue

    @property
    def spares(self) -> float:
        """The hot-spare fraction in effect: `spare_fraction`, else the steady-state need of
        repairs (a cube's failure rate x repair hours) x SPARE_MARGIN."""
        return self.failures.steady_spares() if self.spare_fraction is None else self.spare_fraction

    @property
    def chip_price(self) -> float | None:
        return self.price_per_chip_hour or CHIPS[self.chip].price_per_chip_hour

    def total_pods(self) -> int:
        return sum(a.pods for a in self.arrivals)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def parse_date(text: str, where: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(text))
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a date; use YYYY-MM-DD") from None


def month_date(text: str, where: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(text) + "-01")
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a month; use YYYY-MM") from None


# ---------------------------------------------------------------------- loading and checks


def _num(v: Any, where: str, *, lo: float | None = 0.0, strict: bool = False, integer: bool = False) -> None:
    """A number check in the engine's words (`where=value is not allowed: must be ...`);
    files are type-checked by `settings.build`, this also covers scenarios built in Python."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (not integer or float(v).is_integer())
    require(ok, where, v, "an integer" if integer else "a number")
    if lo is not None:
        require(not (v < lo or (strict and v == lo)), where, v, f"{'>' if strict else '>='} {lo:g}")


def validate(s: Scenario) -> Scenario:
    if s.chip not in CHIPS:
        raise ConfigError(f"chip: {s.chip!r} is unknown; one of {', '.join(CHIPS)}")
    if not CHIPS[s.chip].ici_topology.startswith("torus3d"):
        raise ConfigError(
            f"chip: {s.chip!r} is not allowed: the fleet model allocates 3-D torus TPU pods (tpu7x, v5p, v4)"
        )
    if parse_date(s.end, "end") <= s.t_start:
        raise ConfigError(f"end: {s.end} must be after start {s.start}")
    for name in ("power_cap_mw", "pue", "energy_price_per_mwh"):
        _num(getattr(s, name), name, strict=name != "energy_price_per_mwh")
    if s.pue < 1:
        raise ConfigError(f"pue: {s.pue} is not allowed: must be >= 1")
    if not 0 <= s.idle_power_fraction <= 1:
        raise ConfigError(f"idle_power_fraction: {s.idle_power_fraction} is not allowed: 0..1")
    if s.spare_fraction is not None and not 0 <= s.spare_fraction < 0.5:
        raise ConfigError(f"spare_fraction: {s.spare_fraction} is not allowed: 0 <= f < 0.5")
    r = s.recovery
    require(r.mode in RECOVERY_MODES, "recovery.mode", r.mode, f"one of {', '.join(RECOVERY_MODES)}")
    for k in ("ram_save_s_per_gb", "peer_restore_s_per_gb", "ram_restore_s_per_gb", "reschedule_min",
              "diloco_wait_s"):
        _num(getattr(r, k), f"recovery.{k}")
    _num(r.diloco_inner_steps, "recovery.diloco_inner_steps", lo=1, integer=True)
    require(0 < r.diloco_quorum <= 1, "recovery.diloco_quorum", r.diloco_quorum, "in (0, 1]")
    for opt in ("all_in_power_w", "price_per_chip_hour"):
        if getattr(s, opt) is not None:
            _num(getattr(s, opt), opt, strict=True)
    _num(s.seed, "seed", integer=True)
    if not s.arrivals:
        raise ConfigError("arrivals: at least one pod must arrive")
    for i, a in enumerate(s.arrivals):
        month_date(a.month, f"arrivals[{i}].month")
        _num(a.pods, f"arrivals[{i}].pods", integer=True)
    f = s.failures
    for k in (
        "chip_per_hour",
        "host_per_hour",
        "pod_per_hour",
        "repair_hours",
        "pod_repair_hours",
        "save_min",
        "restart_min",
        "serving_restart_min",
    ):
        _num(getattr(f, k), f"failures.{k}")
    fleet_chips = s.total_pods() * s.pod_chips
    for i, j in enumerate(s.jobs):
        w = f"jobs[{i}]"
        if j.model not in PRESETS:
            raise ConfigError(f"{w}.model: unknown model {j.model!r}; presets are {', '.join(PRESETS)}")
        _num(j.tokens, f"{w}.tokens", strict=True)
        _num(j.chips, f"{w}.chips", lo=1, integer=True)
        if j.chips > fleet_chips:
            raise ConfigError(
                f"{w}.chips: {j.chips:,} is larger than the fleet ({fleet_chips:,} chips "
                f"in {s.total_pods()} pods)"
            )
        n = -(-j.chips // s.pod_chips)
        if j.chips % (n * CUBE_CHIPS):
            raise ConfigError(
                f"{w}.chips: {j.chips:,} is not allowed: a job is {n} equal slice(s) of whole "
                f"{CUBE_CHIPS}-chip cubes, so chips must be a multiple of {n * CUBE_CHIPS}"
            )
        _num(j.priority, f"{w}.priority", lo=None, integer=True)
        _num(j.seq, f"{w}.seq", lo=1, integer=True)
        if j.batch is not None:
            _num(j.batch, f"{w}.batch", lo=1, integer=True)
        if j.checkpoint_interval_min is not None:
            _num(j.checkpoint_interval_min, f"{w}.checkpoint_interval_min", strict=True)
        s.hours(j.start, f"{w}.start")
        s.hours(j.deadline, f"{w}.deadline")
        require(j.precision in PRECISIONS, f"{w}.precision", j.precision, f"one of {', '.join(PRECISIONS)}")
        if j.recovery is not None:
            require(j.recovery in RECOVERY_MODES, f"{w}.recovery", j.recovery,
                    f"one of {', '.join(RECOVERY_MODES)} (or leave it out: recovery.mode)")
            if j.recovery == "diloco" and n < 2:
                raise ConfigError(f"{w}.recovery: 'diloco' needs islands: a job of at least 2 "
                                  f"slices (pods); {j.chips:,} chips is {n}")
    names = [j.name for j in s.jobs]
    if len(set(names)) != len(names):
        raise ConfigError("jobs: names must be unique")
    for i, d in enumerate(s.serving):
        w = f"serving[{i}]"
        if d.model not in PRESETS:
            raise ConfigError(f"{w}.model: unknown model {d.model!r}; presets are {', '.join(PRESETS)}")
        _num(d.tokens_per_day, f"{w}.tokens_per_day")
        _num(d.monthly_growth, f"{w}.monthly_growth", lo=-1, strict=True)
        _num(d.input_tokens, f"{w}.input_tokens", lo=1, integer=True)
        _num(d.output_tokens, f"{w}.output_tokens", lo=1, integer=True)
        for k in ("slo_tpot_ms", "slo_ttft_ms"):
            if getattr(d, k) is not None:
                _num(getattr(d, k), f"{w}.{k}", strict=True)
        s.hours(d.start, f"{w}.start")
    if s.backfill is not None:
        b = s.backfill
        if b.model not in PRESETS:
            raise ConfigError(f"backfill.model: unknown model {b.model!r}; presets are {', '.join(PRESETS)}")
        _num(b.run_chips, "backfill.run_chips", lo=1, integer=True)
        require(b.run_chips % CUBE_CHIPS == 0 and b.run_chips <= s.pod_chips, "backfill.run_chips",
                b.run_chips, f"whole {CUBE_CHIPS}-chip cubes inside one pod (<= {s.pod_chips:,})")
        _num(b.preempt_loss_min, "backfill.preempt_loss_min")
    return s


def from_dict(data: dict[str, Any]) -> Scenario:
    return validate(build(Scenario, data))


def load(path: str | Path) -> Scenario:
    data = read_json_or_yaml(path, "--scenario")
    return from_dict(data if data is not None else {})


def default_scenario() -> Scenario:
    """The mission: up to ~1M tpu7x chips (109 pods of 9,216) arriving through 2026 under
    a 1 GW cap; a frontier pre-training run on 72 pods, a 70B run, a 405B post-training
    run, experiments, and serving demand (2T output tokens/day from February) growing 25%
    a month; experiments (`Backfill`) in whatever capacity that leaves. Each job's recovery
    mode is the one with the best goodput at synchronous quality (all elastic today). The
    workloads are illustrative, not anyone's real plan."""
    per_month = [4, 5, 6, 7, 8, 9, 10, 10, 11, 12, 13, 14]  # 109 pods
    arrivals = [Arrival(f"2026-{m:02d}", n) for m, n in enumerate(per_month, start=1)]
    jobs = [
        TrainingJob(
            name="llama-70b",
            model="llama3.1-70b",
            tokens=15e12,
            chips=4 * 9216,
            priority=1,
            start="2026-01-15",
        ),
        TrainingJob(
            name="experiments-8b",
            model="llama3.1-8b",
            tokens=2e12,
            chips=4096,
            priority=0,
            start="2026-01-01",
        ),
        TrainingJob(
            name="post-train-405b",
            model="llama3.1-405b",
            tokens=5e12,
            chips=8 * 9216,
            priority=1,
            start="2026-04-01",
        ),
        TrainingJob(
            name="frontier-2t",
            model="frontier-2t",
            tokens=60e12,
            chips=72 * 9216,
            priority=2,
            start="2026-07-01",
            deadline="2026-12-31",
            # chosen by goodput at synchronous quality (questions.recovery_by_quality):
            # elastic 61.6%; 72 DiLoCo islands 88.8% of throughput but each token worth
            # ~50% of a synchronous one (plan.quality, extrapolated), so 44.2%
            recovery="elastic",
        ),
    ]
    serving = [
        ServingDemand(model="llama3.1-70b", tokens_per_day=2e12, monthly_growth=0.25, start="2026-02-01")
    ]
    return validate(Scenario(arrivals=arrivals, jobs=jobs, serving=serving, backfill=Backfill()))
