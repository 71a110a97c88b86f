"""The mission's jobs by recovery mode: throughput goodput vs goodput at synchronous quality.

For each training job of the default mission scenario (or --scenario), the whole scenario
simulated with that job under each recovery mode (`fleet.questions.recovery_by_quality`):
the job's goodput counting every token (throughput), its goodput counting a DiLoCo token at
what it is worth in synchronous tokens (`plan.quality`), its finish, and the fleet's
training goodput both ways. Prints markdown for BENCHMARKS.md. Pure Python, seconds.

    python bench/fleet_quality.py [--job frontier-2t] [--scenario FILE]
"""

from __future__ import annotations

import argparse
import sys

from megamesh.fleet.questions import recovery_by_quality
from megamesh.fleet.scenario import default_scenario, load


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", action="append", help="a job name (default: every job)")
    ap.add_argument("--scenario", help="scenario YAML/JSON (default: the built-in mission)")
    args = ap.parse_args(argv)
    s = load(args.scenario) if args.scenario else default_scenario()
    print("| job | recovery | goodput (throughput) | token worth | goodput at synchronous quality "
          "| finish | fleet training goodput | at synchronous quality | chosen |")
    print("|---|---|---|---|---|---|---|---|---|")
    notes = set()
    for name in args.job or [j.name for j in s.jobs]:
        r = recovery_by_quality(s, name)
        current = next(j for j in s.jobs if j.name == name).recovery or s.recovery.mode
        for mode, v in r["modes"].items():
            if v["goodput"] is None:
                print(f"| {name} | {mode} | not placed | | | | | | |")
                continue
            top = r["modes"][r["best"]]["quality_adjusted_goodput"]
            tie = round(v["quality_adjusted_goodput"], 3) == round(top, 3)  # equal to 0.1 point
            mark = ("best" if tie else "") + (" (scenario)" if mode == current else "")
            print(f"| {name} | {mode} | {v['goodput']:.1%} | {v['token_efficiency']:.1%} "
                  f"| {v['quality_adjusted_goodput']:.1%} | {v['finish_time'] or 'not finished'} "
                  f"| {v['fleet_training_goodput']:.1%} | {v['fleet_quality_adjusted_training_goodput']:.1%} "
                  f"| {mark.strip()} |")
            if v["extrapolated"]:
                notes.add(f"{name} {mode}: extrapolated: {v['extrapolated']}")
    for n in sorted(notes):
        print(f"\n{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
