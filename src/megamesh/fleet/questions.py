"""The questions `megamesh fleet` answers beyond one simulation.

- largest_model: the largest dense model trainable compute-optimally (Chinchilla: ~20
  tokens per parameter, C = 6 N D; Hoffmann et al. 2022) by a date, from the chip-hours
  the fleet has for training (installed, minus serving, minus spares, within the power
  cap; from a simulation of the scenario without its training jobs) x peak x the
  planner's MFU x Daly goodput.
- serving_reserve: chips to hold back month by month for the serving demand curve.
- checkpoint_and_spares: goodput of one job over a grid of checkpoint intervals and hot
  spare fractions (simulated), and the best setting.
- sync_vs_replicas: one synchronous job over N pods versus N independent pod-level
  replicas (simulated and closed form).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import math
from typing import Any

from megamesh.errors import ConfigError
from megamesh.fleet.scenario import CHIPS_PER_HOST, Scenario, TrainingJob, parse_date
from megamesh.fleet.sim import planner_numbers, simulate
from megamesh.fleet.theory import daly_goodput, daly_interval
from megamesh.hardware import CHIPS

TOKENS_PER_PARAM = 20.0  # Chinchilla compute-optimal (Hoffmann et al. 2022)


def _job_rate(s: Scenario, chips: int) -> float:
    f = s.failures
    return (
        chips * f.chip_per_hour
        + math.ceil(chips / CHIPS_PER_HOST) * f.host_per_hour
        + math.ceil(chips / s.pod_chips) * f.pod_per_hour
    )


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
) -> Scenario:
    pods = math.ceil(chips / s.pod_chips) + 1
    one = dataclasses.replace(
        s,
        name="single-job",
        arrivals=[type(s.arrivals[0])(s.start[:7], pods)],
        serving=[],
        spare_fraction=spare_fraction,
        seed=seed,
        power_cap_mw=1e9,
        end=str(parse_date(s.start, "start") + dt.timedelta(days=int(work_days * 20) + 30)),
        jobs=[
            TrainingJob(
                name="job", model=model, tokens=1.0, chips=chips, checkpoint_interval_min=interval_min
            )
        ],
    )
    return one


def _run_single(
    s: Scenario, chips: int, work_days: float, interval_min: float | None, spare_fraction: float, seed: int
) -> dict[str, Any]:
    one = _single_job(s, chips, work_days, interval_min, spare_fraction, seed)

    def planner(kind: str, spec: Any, sc: Scenario) -> dict[str, float]:
        return {"tokens_per_h": 1.0 / (work_days * 24), "mfu": 0.0}  # 1 "token" = the whole job

    res, _ = simulate(one, planner=planner)
    return res["jobs"][0]


def checkpoint_and_spares(
    s: Scenario,
    chips: int,
    work_days: float = 14.0,
    spare_fractions: tuple[float, ...] = (0.0, 0.005, 0.01, 0.02, 0.05),
    interval_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0),
    seed: int = 0,
) -> dict[str, Any]:
    rate = _job_rate(s, chips)
    mtbf = 1 / rate if rate > 0 else math.inf
    f = s.failures
    delta, restart = f.save_min / 60, f.restart_min / 60
    tau = daly_interval(delta, mtbf)
    rows = []
    for frac in spare_fractions:
        for k in interval_factors:
            j = _run_single(s, chips, work_days, tau * k * 60, frac, seed)
            rows.append(
                {
                    "spare_fraction": frac,
                    "interval_min": tau * k * 60,
                    "interval_vs_daly": k,
                    "goodput": j["goodput"],  # None: never placed (see not_placed)
                    "not_placed": j["not_placed"],
                    "finished": j["finished"],
                    "repair_wait_hours": j["badput_hours"]["repair_wait"],
                }
            )
    placed = [r for r in rows if r["goodput"] is not None]
    best = max(placed, key=lambda r: r["goodput"]) if placed else None
    return {
        "chips": chips,
        "mtbf_min": mtbf * 60,
        "daly_interval_min": tau * 60,
        "daly_goodput": daly_goodput(tau, delta, restart, mtbf),
        "work_days": work_days,
        "grid": rows,
        "best": best,
    }


def sync_vs_replicas(s: Scenario, pods: int, work_days: float = 14.0, seed: int = 0) -> dict[str, Any]:
    chips = pods * s.pod_chips
    f = s.failures
    delta, restart = f.save_min / 60, f.restart_min / 60
    out: dict[str, Any] = {"pods": pods, "chips": chips}
    for label, n_jobs, job_chips in (("synchronous", 1, chips), ("pod_replicas", pods, s.pod_chips)):
        rate = _job_rate(s, job_chips)
        mtbf = 1 / rate
        tau = daly_interval(delta, mtbf)
        sim = _run_single(s, job_chips, work_days, None, s.spare_fraction, seed)
        out[label] = {
            "jobs": n_jobs,
            "chips_per_job": job_chips,
            "mtbf_min": mtbf * 60,
            "checkpoint_interval_min": tau * 60,
            "goodput_closed_form": daly_goodput(tau, delta, restart, mtbf),
            "goodput_simulated": sim["goodput"],  # None: never placed
            "not_placed": sim["not_placed"],
        }
    out["spare_fraction"] = s.spare_fraction
    out["note"] = (
        "pod replicas only lose their own pod's work on a failure, but need an algorithm "
        "that tolerates independent replicas (e.g. local SGD / DiLoCo-style syncs); the "
        "synchronous job is plain data parallelism"
    )
    return out
