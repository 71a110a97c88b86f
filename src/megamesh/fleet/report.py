"""What `megamesh fleet` prints and plots."""

from __future__ import annotations

import io
from typing import Any

from megamesh.fileio import write_new_file
from megamesh.fleet.sim import BADPUT


def _h(x: float) -> str:
    for unit, d in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= d:
            return f"{x / d:.2f}{unit}"
    return f"{x:.0f}"


_SHORT = {"checkpoint": "ckpt", "repair_wait": "repair", "degraded": "fewer slices/islands"}
_SHORT = {k: _SHORT.get(k, k) for k in BADPUT}


def text(r: dict[str, Any]) -> str:
    lines = [
        f"fleet {r['scenario']}: {r['start']} .. {r['end']}, {r['pods_at_end']} pods = "
        f"{r['chips_installed_at_end']:,} chips at the end ({r['events']:,} events simulated)",
        f"goodput {r['goodput']:.1%} (training {r['training_goodput']:.1%}; at synchronous "
        f"quality {r['quality_adjusted_training_goodput']:.1%}), utilization "
        f"{r['utilization']:.1%} of installed chip-hours; idle {_h(r['idle_chip_hours'])} chip-hours "
        f"({r['idle_share']:.1%}), "
        + (f"${_h(r['idle_cost_usd'])} of chips doing nothing" if r["idle_cost_usd"] is not None
           else "unpriced (set price_per_chip_hour)"),
        f"energy {r['energy_gwh']:,.0f} GWh, average {r['average_power_mw']:,.0f} MW, peak "
        f"{r['peak_power_mw']:,.0f} MW (cap {r['power_cap_mw']:,.0f} MW); the largest swing when "
        f"one job stops computing: {r['largest_power_swing_mw']:,.0f} MW",
        f"power: {r['power_basis']}",
        f"tokens trained {_h(r['tokens_trained'])}, served {_h(r['tokens_served'])} of "
        f"{_h(r['tokens_demanded'])} demanded (short of demand {r['serving_shortfall_hours']:.0f} h)",
        (f"experiments (backfill: {r['backfill']['model']} runs of {r['backfill']['run_chips']:,} "
         f"chips in the capacity left free): {_h(r['backfill']['chip_hours'])} chip-hours "
         f"({r['backfill']['chip_hours'] / r['installed_chip_hours']:.1%} of installed), goodput "
         f"{r['backfill']['goodput']:.1%}, {_h(r['backfill']['tokens_trained'])} tokens, "
         f"{r['backfill']['runs_yielded']:,} runs yielded to jobs and serving"
         if r.get("backfill") else
         f"no backfill: the capacity jobs and serving leave free idles (utilization without "
         f"it {r['utilization_without_backfill']:.1%})"),
        f"cost: energy ${_h(r['cost_usd']['energy'])}"
        + (
            f", chips ${_h(r['cost_usd']['chips'])}"
            if r["cost_usd"]["chips"]
            else " (chip-hours unpriced: no public tpu7x price; set price_per_chip_hour)"
        ),
        "",
        f"{'job':<18} {'chips':>9} {'recovery':>10} {'goodput':>8} {'progress':>9} {'finish':>17} "
        f"{'interrupts':>10} {'MTBF':>8} {'ckpt':>7}  badput hours "
        f"({'/'.join(_SHORT[k] for k in BADPUT)})",
    ]
    for j in r["jobs"]:
        b = j["badput_hours"]
        finish = j["finish_time"] or "not finished"
        if j["deadline"] and j["met_deadline"] is not None:
            finish += " ok" if j["met_deadline"] else " LATE"
        if j["not_placed"]:
            lines.append(f"{j['name']:<18} {j['chips']:>9,} {j['not_placed']}")
            continue
        lines.append(
            f"{j['name']:<18} {j['chips']:>9,} {j['recovery']:>10} {j['goodput']:>8.1%} "
            f"{j['progress']:>9.1%} {finish:>17} {j['interruptions']:>10,} "
            f"{j['mtbf_hours'] * 60:>6.0f}m {j['checkpoint_interval_min']:>6.1f}m  "
            + "/".join(f"{b[k]:.0f}" for k in BADPUT)
        )
    past = [j for j in r["jobs"] if j.get("batch", {}).get("past_critical")]
    if past:
        lines += ["", "past their critical batch (plan.convergence; time to train optimistic: "
                  "more sequences per step than the run can use well):"]
        lines += [f"  {j['name']}: batch {j['batch']['sequences']:,} sequences, critical "
                  f"~{j['batch']['critical']:,}" for j in past]
    worth = [j for j in r["jobs"] if j["token_efficiency"] < 1 and not j["not_placed"]]
    if worth:
        lines += ["", "what a DiLoCo token is worth in tokens of synchronous training (plan.quality):"]
        for j in worth:
            q = j["quality"]
            lines.append(f"  {j['name']}: {j['token_efficiency']:.1%} (final loss +{q['loss_increase']:.2%} "
                         f"vs synchronous); goodput {j['goodput']:.1%} throughput, "
                         f"{j['quality_adjusted_goodput']:.1%} at synchronous quality"
                         + (f"; extrapolated: {q['extrapolated']}" if q["extrapolated"] else ""))
    times = [f"  {j['name']}: " + ", ".join(f"{k} {v:,.1f}" for k, v in j["recovery_times"].items())
             for j in r["jobs"] if j.get("recovery_times")]
    if times:
        lines += ["", "recovery times (from bench/recovery.py's measured s/GB, the planner's state "
                  "per host, the chip's DCN bandwidth; scenario.Recovery):", *times]
    lines.append(f"\napproximate: {r['approximate']}")
    return "\n".join(lines)


def plot(series: list[dict[str, float]], r: dict[str, Any], path: str) -> None:
    import matplotlib  # only for --plot: a heavy import the plain reports never need

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [p["t_h"] / 24 for p in series]
    fig, ax = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
    ax[0].plot(days, [p["installed_chips"] / 1e3 for p in series], label="installed")
    ax[0].stackplot(
        days,
        [p["training_chips"] / 1e3 for p in series],
        [p["serving_chips"] / 1e3 for p in series],
        [p.get("backfill_chips", 0) / 1e3 for p in series],
        [p["spare_chips"] / 1e3 for p in series],
        labels=["training", "serving", "experiments (backfill)", "hot spares"],
        alpha=0.6,
    )
    ax[0].set_ylabel("chips (thousands)")
    ax[0].legend(loc="upper left")
    ax[0].set_title(f"fleet {r['scenario']}: capacity and allocation")
    ax[1].plot(days, [p["power_mw"] for p in series], label="power")
    ax[1].axhline(r["power_cap_mw"], color="r", linestyle="--", label="cap")
    ax[1].set_ylabel("MW")
    ax[1].legend(loc="upper left")
    ax[2].plot(days, [p["goodput"] for p in series])
    ax[2].set_ylabel("goodput (cumulative)")
    ax[2].set_ylim(0, 1)
    ax[3].plot(days, [p["serving_demand_tok_s"] / 1e6 for p in series], label="demand")
    ax[3].plot(days, [p["serving_capacity_tok_s"] / 1e6 for p in series], label="capacity")
    ax[3].set_ylabel("serving Mtok/s")
    ax[3].set_xlabel(f"days from {r['start']}")
    ax[3].legend(loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_new_file(path, buf.getvalue())
