"""`megamesh fleet`: simulate and plan a million-chip fleet (pure Python, never imports jax)."""

from __future__ import annotations

import argparse
import json

import yaml

from megamesh.errors import ConfigError
from megamesh.fileio import write_new_file
from megamesh.fleet import questions, report
from megamesh.fleet.scenario import default_scenario, load, validate
from megamesh.fleet.sim import simulate


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fleet",
        help="simulate and plan the fleet: build-out, power, failures, goodput",
        description="Discrete-event simulation of a TPU fleet scenario (default: up to "
        "1,004,544 tpu7x chips arriving through 2026 under a 1 GW cap).",
    )
    fsub = p.add_subparsers(dest="fleet_cmd", metavar="WHAT", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--scenario", help="scenario YAML/JSON (default: the built-in mission scenario)")
        q.add_argument("--seed", type=int, help="override the scenario's random seed")
        q.add_argument("--json", action="store_true", help="print JSON")

    def fleet_size(q: argparse.ArgumentParser) -> None:
        q.add_argument("--chips", type=int, help="fleet size: the scenario's build-out scaled to "
                       "this many chips in whole pods, arriving in the same proportions (default: "
                       "the scenario's own, 109 tpu7x pods = 1,004,544 chips)")

    s = fsub.add_parser("simulate", help="run the scenario: goodput, utilization, energy, power, tokens")
    common(s)
    fleet_size(s)
    s.add_argument("--plot", help="write a PNG of capacity, allocation, power and goodput (a new file)")
    s.add_argument(
        "--check", action="store_true", help="check allocation and power invariants at every event"
    )
    s.add_argument("--write-default", metavar="FILE", help="write the built-in scenario as YAML and exit")
    q = fsub.add_parser("largest-model", help="largest model trainable compute-optimally by a date")
    common(q)
    fleet_size(q)
    q.add_argument("--by", help="date, YYYY-MM-DD (default: the scenario's end)")
    q = fsub.add_parser("serving-reserve", help="chips to hold back for the serving demand curve")
    common(q)
    fleet_size(q)
    q = fsub.add_parser("checkpoint", help="checkpoint interval and hot spares that maximize goodput")
    common(q)
    q.add_argument("--chips", type=int, default=16 * 9216,
                   help="job size, rounded as the planner lays it out (whole pods past one pod; "
                   "default 16 pods)")
    q.add_argument("--days", type=float, default=14.0, help="days of work at full speed (default 14)")
    q = fsub.add_parser("sync-vs-replicas", help="one synchronous job over N pods vs N pod-level replicas")
    common(q)
    size = q.add_mutually_exclusive_group()
    size.add_argument("--pods", type=int, help="job size in pods (default 109)")
    size.add_argument("--chips", type=int, help="job size in chips, rounded to whole pods")
    q.add_argument("--days", type=float, default=14.0, help="days of work at full speed (default 14)")
    p.set_defaults(run=run)


def _scenario(args: argparse.Namespace):
    s = load(args.scenario) if args.scenario else default_scenario()
    if args.seed is not None:
        s.seed = args.seed
        validate(s)
    return s


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    cmd = args.fleet_cmd
    if cmd == "simulate" and args.write_default:
        write_new_file(args.write_default, yaml.safe_dump(default_scenario().to_dict(), sort_keys=False))
        print(f"wrote {args.write_default}")
        return 0
    s = _scenario(args)
    if cmd in ("simulate", "largest-model", "serving-reserve") and args.chips is not None:
        s, line = questions.scale_fleet(s, args.chips)
        if not args.json:
            print(line)
    if cmd == "simulate":
        res, fleet = simulate(s, check=args.check)
        if args.plot:
            report.plot(fleet.series, res, args.plot)
        print(json.dumps(res, indent=2) if args.json else report.text(res))
        if args.plot and not args.json:
            print(f"plot: {args.plot}")
        return 0
    if cmd == "largest-model":
        r = questions.largest_model(s, args.by or s.end)
        text = (
            f"by {r['by']}: {r['training_chip_hours']:.3e} training chip-hours (average "
            f"{r['average_training_chips']:,.0f} chips) x MFU {r['mfu']:.1%} x goodput {r['goodput']:.1%} "
            f"= {r['compute_flops']:.3e} FLOPs -> compute-optimal dense model of {r['params'] / 1e9:,.0f}B "
            f"parameters on {r['tokens'] / 1e12:,.1f}T tokens\n  MFU: {r['mfu_source']}\n  goodput: "
            f"{r['goodput_source']}\n  approximate: {r['approximate']}"
        )
    elif cmd == "serving-reserve":
        r = questions.serving_reserve(s)
        lines = [f"{'month':<8} {'serving chips':>14} {'of installed':>13} {'demand Mtok/s':>14}"]
        for m in r["months"]:
            frac = f"{m['fraction_of_installed']:.1%}" if m["fraction_of_installed"] is not None else "-"
            lines.append(
                f"{m['month']:<8} {m['serving_chips']:>14,} {frac:>13} {m['demand_tok_s'] / 1e6:>14.2f}"
            )
        lines.append(f"peak: hold back {r['peak_serving_chips']:,} chips")
        text = "\n".join(lines)
    elif cmd == "checkpoint":
        if args.chips < 1 or args.days <= 0:
            raise ConfigError("--chips must be >= 1 and --days > 0")
        chips, note = questions.job_size(s, args.chips)
        r = questions.checkpoint_and_spares(s, chips, args.days)
        lines = [*([f"job: {note}"] if note else []),
            f"job of {r['chips']:,} chips: MTBF {r['mtbf_min']:.1f} min; plain: Daly interval "
            f"{r['daly_interval_min']:.1f} min (closed-form goodput {r['daly_goodput']:.1%})",
            f"{'recovery':>10} {'spares':>7} {'interval':>9} {'x Daly':>7} {'goodput':>8} "
            f"{'repair wait h':>14}",
        ]
        for g in r["grid"]:
            mode = g["recovery"] if g["recovery"] == g["recovery_used"] else f"{g['recovery']}*"
            row = (f"{mode:>10} {g['spare_fraction']:>7.1%} {g['interval_min']:>8.1f}m "
                   f"{g['interval_vs_daly']:>7.2f} ")
            lines.append(row + (f"{g['goodput']:>8.1%} {g['repair_wait_hours']:>14.0f}"
                                if g["goodput"] is not None else f"  {g['not_placed']}"))
        for mode, b in r["best_by_recovery"].items():
            lines.append(f"best {mode}: spares {b['spare_fraction']:.1%}, checkpoint every "
                         f"{b['interval_min']:.1f} min -> goodput {b['goodput']:.1%}" if b
                         else f"best {mode}: none (never placed, or not applicable)")
        if any(g["recovery"] != g["recovery_used"] for g in r["grid"]):
            lines.append("* no data-parallel replica across slices in the planner's layout: a lost "
                         "host's shards exist nowhere else, so the job recovers as plain")
        lines.append("interval: diloco rows give each island's own checkpoint interval")
        text = "\n".join(lines)
    else:
        if args.chips is not None:
            args.pods = questions.pods_for(s, args.chips)
        pods = 109 if args.pods is None else args.pods
        if pods < 1 or args.days <= 0:
            raise ConfigError("--pods must be >= 1 and --days > 0")
        r = questions.sync_vs_replicas(s, pods, args.days)
        lines = [f"{pods} pods = {r['chips']:,} chips, one job, by recovery mode "
                 f"(simulated, hot spares {r['spare_fraction']:.1%} of cubes, repair "
                 f"{s.failures.repair_hours:g} h):"]
        for mode, v in r["modes"].items():
            extra = (f" ({v['goodput_closed_form']:.1%} closed form, Daly)"
                     if "goodput_closed_form" in v else "")
            used = "" if v["recovery_used"] == mode else f" (recovers as {v['recovery_used']}: no replica)"
            lines.append(f"  {mode:<11} MTBF {v['mtbf_min']:6.1f} min: {_simulated(v)}{extra}{used}")
        v = r["pod_replicas"]
        lines.append(f"  {'pod replicas':<11} {v['jobs']} independent jobs of {v['chips_per_job']:,} "
                     f"chips, MTBF {v['mtbf_min']:.1f} min: {_simulated(v)} "
                     f"({v['goodput_closed_form']:.1%} closed form)")
        lines.append(r["note"])
        text = "\n".join(lines)
    print(json.dumps(r, indent=2) if args.json else text)
    return 0


def _simulated(v: dict) -> str:
    """A simulated goodput, or why the job was never placed."""
    return f"goodput {v['goodput_simulated']:.1%}" if v["goodput_simulated"] is not None else v["not_placed"]
