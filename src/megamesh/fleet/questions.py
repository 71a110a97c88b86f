"""The questions `megamesh fleet` answers beyond one simulation.

- largest_model: the largest dense model trainable compute-optimally (Chinchilla: ~20
  tokens per parameter, C = 6 N D; Hoffmann et al. 2022) by a date, from the chip-hours
  the fleet has for training (installed, minus serving, minus spares, within the power
  cap; from a simulation of the scenario without its training jobs) x peak x the
  planner's MFU x Daly goodput.
- serving_reserve: chips to hold back month by month for the serving demand curve.
- checkpoint_and_spares: goodput of one job over a grid of checkpoint intervals and hot
  spare fractions for each recovery mode (plain, multi_tier, elastic, diloco; simulated),
  and the best setting of each.
- sync_vs_replicas: one job over N pods under each recovery mode versus N independent
  pod-level replicas (simulated; Daly's closed form for plain).
- recovery_by_quality: one job of the scenario under each recovery mode, the rest as they
  are: its throughput goodput and its goodput at synchronous quality (plan.quality), the
  figure the mission's choice of mode per job follows.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import math
from typing import Any

from megamesh.errors import ConfigError
from megamesh.fleet.scenario import RECOVERY_MODES, Scenario, TrainingJob, parse_date, validate
from megamesh.fleet.sim import Fleet, planner_numbers, simulate
from megamesh.fleet.theory import daly_goodput, daly_interval
from megamesh.hardware import CHIPS
from megamesh.plan.target import parse_target

TOKENS_PER_PARAM = 20.0  # Chinchilla compute-optimal (Hoffmann et al. 2022)


def job_size(s: Scenario, chips: int) -> tuple[int, str]:
    """A job of about `chips` as the planner lays it out: whole pods past one pod (1M
    tpu7x chips are 109 pods, 1,004,544 chips), else one slice of whole cubes; and the note
    saying how it was rounded ("" when it was not)."""
    t = parse_target(f"{s.chip}:{chips}")
    return t.chips, t.note


def pods_for(s: Scenario, chips: int) -> int:
    """`--chips` as whole pods of the scenario's chip (nearest, at least one)."""
    if chips < 1:
        raise ConfigError(f"--chips {chips} is not allowed: at least 1")
    return max(1, round(chips / s.pod_chips))


def scale_fleet(s: Scenario, chips: int) -> tuple[Scenario, str]:
    """The scenario with its build-out scaled to about `chips` chips in whole pods (the
    arrivals in proportion, largest remainders first), and a line saying so. Its jobs keep
    their sizes: one larger than the new fleet is an error naming it."""
    pods = pods_for(s, chips)
    total = s.total_pods()
    shares = [a.pods * pods / total for a in s.arrivals]
    got = [math.floor(x) for x in shares]
    for i in sorted(range(len(shares)), key=lambda i: got[i] - shares[i])[:pods - sum(got)]:
        got[i] += 1
    out = copy.deepcopy(s)
    out.arrivals = [dataclasses.replace(a, pods=n) for a, n in zip(s.arrivals, got) if n]
    validate(out)
    line = (f"fleet: --chips {chips:,} = {pods} pods of {s.pod_chips:,} ({pods * s.pod_chips:,} chips), "
            f"arriving as the scenario's {total} pods do")
    return out, line


def _job_rate(s: Scenario, chips: int) -> float:
    return sum(s.failures.job_rates(chips, s.pod_chips))


def largest_model(s: Scenario, by: str, reference_model: str = "llama3.1-405b") -> dict[str, Any]:
    t_by = s.hours(by, "--by")
    if t_by <= 0:
        raise ConfigError(f"--by {by} must be after the scenario start {s.start}")
    bare = copy.deepcopy(s)
    bare.jobs = []
    bare.end = by
    _, fleet = simulate(bare)
    watts = s.watts_per_chip
    chip_h = 0.0
    prev = None
    for p in fleet.series:
        if prev is not None:
            dt = p["t_h"] - prev["t_h"]
            free = prev["installed_chips"] - prev["serving_chips"] - prev["spare_chips"]
            headroom = (s.power_cap_mw - prev["power_mw"]) * 1e6 / (watts * (1 - s.idle_power_fraction))
            chip_h += max(0.0, min(free, headroom)) * dt
        prev = p
    ref = TrainingJob(name="reference", model=reference_model, tokens=1.0, chips=s.pod_chips)
    mfu = planner_numbers("train", ref, s)["mfu"]
    avg_chips = chip_h / t_by
    rate = _job_rate(s, int(avg_chips))
    mtbf = 1 / rate if rate > 0 else math.inf
    f = s.failures
    delta, restart = f.save_min / 60, f.restart_min / 60
    tau = daly_interval(delta, mtbf) if math.isfinite(mtbf) else 24.0
    goodput = daly_goodput(tau, delta, restart, mtbf)
    flops = chip_h * 3600 * CHIPS[s.chip].bf16_flops * mfu * goodput
    n = math.sqrt(flops / (6 * TOKENS_PER_PARAM))
    return {
        "by": by,
        "training_chip_hours": chip_h,
        "average_training_chips": avg_chips,
        "mfu": mfu,
        "mfu_source": f"megamesh plan: {reference_model} on one {s.chip} pod",
        "goodput": goodput,
        "goodput_source": f"Daly, one job of {avg_chips:,.0f} chips, MTBF "
        f"{mtbf * 60:.1f} min, save {f.save_min} min, restart {f.restart_min} min",
        "compute_flops": flops,
        "params": n,
        "tokens": TOKENS_PER_PARAM * n,
        "approximate": "Chinchilla's 20 tokens/parameter; dense model; MFU of the reference model",
    }


def serving_reserve(s: Scenario) -> dict[str, Any]:
    if not s.serving:
        raise ConfigError("the scenario has no serving demand (serving: [...])")
    bare = copy.deepcopy(s)
    bare.jobs = []
    _, fleet = simulate(bare)
    months: dict[str, dict[str, float]] = {}
    start = parse_date(s.start, "start")
    end_h = s.hours(s.end, "end") + 24.0
    for p in fleet.series:
        if p["t_h"] >= end_h - 1e-9:
            continue
        m = (dt.datetime.combine(start, dt.time()) + dt.timedelta(hours=p["t_h"])).strftime("%Y-%m")
        row = months.setdefault(m, {"serving_chips": 0, "installed_chips": 0, "demand_tok_s": 0.0})
        row["serving_chips"] = max(row["serving_chips"], p["serving_chips"])
        row["installed_chips"] = max(row["installed_chips"], p["installed_chips"])
        row["demand_tok_s"] = max(row["demand_tok_s"], p["serving_demand_tok_s"])
    rows = [
        {
            "month": m,
            **v,
            "fraction_of_installed": v["serving_chips"] / v["installed_chips"]
            if v["installed_chips"]
            else None,
        }
        for m, v in months.items()
    ]
    return {"months": rows, "peak_serving_chips": max(r["serving_chips"] for r in rows)}


def _single_job(
    s: Scenario,
    chips: int,
    work_days: float,
    interval_min: float | None,
    spare_fraction: float,
    seed: int,
    model: str = "llama3.1-405b",
    recovery: str = "plain",
) -> Scenario:
    # enough pods for the job and its hot spares, and one more
    pods = math.ceil(chips / s.pod_chips / (1 - spare_fraction)) + 1
    one = dataclasses.replace(
        s,
        name="single-job",
        arrivals=[type(s.arrivals[0])(s.start[:7], pods)],
        serving=[],
        backfill=None,  # one job's own question: nothing else on its pods
        spare_fraction=spare_fraction,
        seed=seed,
        power_cap_mw=1e9,
        end=str(parse_date(s.start, "start") + dt.timedelta(days=int(work_days * 20) + 30)),
        jobs=[
            TrainingJob(
                name="job", model=model, tokens=1.0, chips=chips, checkpoint_interval_min=interval_min,
                recovery=recovery,
            )
        ],
    )
    return one


def _run_single(s: Scenario, chips: int, work_days: float, interval_factor: float,
                spare_fraction: float, seed: int, recovery: str = "plain") -> dict[str, Any]:
    """One job alone on enough pods: its report. `interval_factor` scales its checkpoint
    interval (Daly's for its mode's save cost and MTBF)."""
    one = _single_job(s, chips, work_days, None, spare_fraction, seed, recovery=recovery)

    def planner(kind: str, spec: Any, sc: Scenario) -> dict[str, float]:
        # the planner's memory, layout and step time; 1 "token" = the whole job's work
        real = planner_numbers(kind, spec, sc)
        return {**real, "tokens_per_h": spec.chips / chips / (work_days * 24)}

    fleet = Fleet(one, planner=planner)
    fleet.jobs["job"].tau_h *= interval_factor
    return fleet.run()["jobs"][0]


def checkpoint_and_spares(
    s: Scenario,
    chips: int,
    work_days: float = 14.0,
    spare_fractions: tuple[float, ...] = (0.0, 0.005, 0.01, 0.02, 0.05),
    interval_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0),
    seed: int = 0,
    recoveries: tuple[str, ...] = RECOVERY_MODES,
) -> dict[str, Any]:
    """Goodput of one job over a grid of hot-spare fractions x checkpoint intervals (as
    multiples of Daly's, for the mode's own save cost), for each recovery mode side by side
    (DiLoCo islands checkpoint at their own Daly interval: one row per spare fraction)."""
    rate = _job_rate(s, chips)
    mtbf = 1 / rate if rate > 0 else math.inf
    f = s.failures
    delta, restart = f.save_min / 60, f.restart_min / 60
    tau = daly_interval(delta, mtbf)
    rows = []
    for mode in recoveries:
        if mode == "diloco" and chips <= s.pod_chips:
            continue  # islands need at least 2 slices
        for frac in spare_fractions:
            for k in (interval_factors if mode != "diloco" else (1.0,)):
                j = _run_single(s, chips, work_days, k, frac, seed, mode)
                rows.append(
                    {
                        "recovery": mode,
                        "recovery_used": j["recovery"],  # multi_tier without replicas: plain
                        "spare_fraction": frac,
                        "interval_min": j["checkpoint_interval_min"],
                        "interval_vs_daly": k,
                        "goodput": j["goodput"],  # None: never placed (see not_placed)
                        "not_placed": j["not_placed"],
                        "finished": j["finished"],
                        "repair_wait_hours": j["badput_hours"]["repair_wait"],
                    }
                )
    placed = [r for r in rows if r["goodput"] is not None]
    best = max(placed, key=lambda r: r["goodput"]) if placed else None
    by_mode = {m: max((r for r in placed if r["recovery"] == m), key=lambda r: r["goodput"], default=None)
               for m in recoveries}
    return {
        "chips": chips,
        "mtbf_min": mtbf * 60,
        "daly_interval_min": tau * 60,
        "daly_goodput": daly_goodput(tau, delta, restart, mtbf),
        "work_days": work_days,
        "grid": rows,
        "best": best,
        "best_by_recovery": by_mode,
    }


def sync_vs_replicas(s: Scenario, pods: int, work_days: float = 14.0, seed: int = 0) -> dict[str, Any]:
    """One job over `pods` pods under each recovery mode, and `pods` independent pod-sized
    replicas (plain), simulated with the scenario's spares; Daly's closed form for plain."""
    chips = pods * s.pod_chips
    f = s.failures
    delta, restart = f.save_min / 60, f.restart_min / 60
    out: dict[str, Any] = {"pods": pods, "chips": chips, "modes": {}}
    mtbf = 1 / _job_rate(s, chips)
    for mode in RECOVERY_MODES:
        if mode == "diloco" and pods < 2:
            continue
        sim = _run_single(s, chips, work_days, 1.0, s.spares, seed, mode)
        out["modes"][mode] = {
            "jobs": 1,
            "chips_per_job": chips,
            "mtbf_min": mtbf * 60,
            "recovery_used": sim["recovery"],
            "checkpoint_interval_min": sim["checkpoint_interval_min"],
            "recovery_times": sim["recovery_times"],
            "goodput_simulated": sim["goodput"],  # None: never placed
            "not_placed": sim["not_placed"],
        }
    out["modes"]["plain"]["goodput_closed_form"] = daly_goodput(
        daly_interval(delta, mtbf), delta, restart, mtbf)
    rate = _job_rate(s, s.pod_chips)
    sim = _run_single(s, s.pod_chips, work_days, 1.0, s.spares, seed, "plain")
    tau = daly_interval(delta, 1 / rate)
    out["pod_replicas"] = {
        "jobs": pods,
        "chips_per_job": s.pod_chips,
        "mtbf_min": 60 / rate,
        "checkpoint_interval_min": tau * 60,
        "goodput_closed_form": daly_goodput(tau, delta, restart, 1 / rate),
        "goodput_simulated": sim["goodput"],
        "not_placed": sim["not_placed"],
    }
    out["synchronous"] = out["modes"]["plain"]  # the plain synchronous job (earlier name)
    out["spare_fraction"] = s.spares
    out["note"] = (
        "plain: persistent checkpoints; multi_tier: in-memory checkpoints restored from a "
        "data-parallel peer; elastic: also goes on without a failed slice; diloco: one island "
        "per pod, a failure stops one island (megamesh train --diloco); pod replicas are "
        "independent jobs (no model averaging at all)"
    )
    return out


def recovery_by_quality(s: Scenario, job: str) -> dict[str, Any]:
    """The whole scenario simulated with job `job` under each recovery mode in turn: per
    mode its goodput (throughput), its goodput at synchronous quality (a DiLoCo token is
    worth `plan.quality.token_efficiency` of a synchronous one), when it finished, and the
    fleet's training goodput both ways; `best`: the mode with the highest quality-adjusted
    goodput for the job."""
    names = [j.name for j in s.jobs]
    if job not in names:
        raise ConfigError(f"no job {job!r} in the scenario; its jobs are {', '.join(names)}")
    modes: dict[str, Any] = {}
    for mode in RECOVERY_MODES:
        one = copy.deepcopy(s)
        spec = next(j for j in one.jobs if j.name == job)
        if mode == "diloco" and spec.chips <= one.pod_chips:
            continue  # islands need at least 2 slices
        spec.recovery = mode
        res, _ = simulate(validate(one))
        j = next(x for x in res["jobs"] if x["name"] == job)
        modes[mode] = {"goodput": j["goodput"], "quality_adjusted_goodput": j["quality_adjusted_goodput"],
                       "token_efficiency": j["token_efficiency"], "finish_time": j["finish_time"],
                       "extrapolated": j["quality"]["extrapolated"],
                       "fleet_training_goodput": res["training_goodput"],
                       "fleet_quality_adjusted_training_goodput": res["quality_adjusted_training_goodput"]}
    placed = {m: v for m, v in modes.items() if v["quality_adjusted_goodput"] is not None}
    best = max(placed, key=lambda m: placed[m]["quality_adjusted_goodput"]) if placed else None
    return {"job": job, "modes": modes, "best": best}
