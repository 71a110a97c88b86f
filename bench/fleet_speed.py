"""How fast `megamesh fleet` simulates, and what its cost grows with.

  python bench/fleet_speed.py [--repeats 3]

1. The built-in mission scenario (1,004,544 tpu7x chips by December 2026, one simulated
   year): wall time, median of --repeats runs. Target: < 10 s.
2. Cost vs fleet size: fleets of 1, 11 and 109 pods, each fully used by pod-sized jobs
   (failure rate per chip scaled by 109/pods so the small fleets see many events too):
   the time per event stays flat from 9,216 to 1,004,544 chips, so total time follows
   the number of events, not the number of chips.
3. Cost vs events at a fixed size: the 109-pod fleet with 1x, 4x and 16x the failure
   rate: time per event stays flat.
The planner's per-job throughput numbers are stubbed in 2 and 3 (they are computed once
per job shape and cached in 1) so only the event loop is timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from megamesh.fleet.scenario import Arrival, Failures, Scenario, TrainingJob, default_scenario, validate
from megamesh.fleet.sim import simulate


def timed(scenario: Scenario, planner=None, repeats: int = 3) -> tuple[float, int]:
    times, events = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        res, _ = simulate(scenario, planner=planner)
        times.append(time.perf_counter() - t0)
        events = res["events"]
    return statistics.median(times), events


def uniform(pods: int, rate_scale: float) -> Scenario:
    f = Failures()
    f = Failures(
        chip_per_hour=f.chip_per_hour * rate_scale,
        host_per_hour=f.host_per_hour * rate_scale,
        pod_per_hour=f.pod_per_hour * rate_scale,
    )
    jobs = [TrainingJob(name=f"pod{i}", model="llama3.1-70b", tokens=1e18, chips=8192) for i in range(pods)]
    return validate(
        Scenario(
            name=f"uniform-{pods}",
            arrivals=[Arrival("2026-01", pods)],
            jobs=jobs,
            failures=f,
            power_cap_mw=1e6,
            spare_fraction=0.05,
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    stub = lambda kind, spec, s: {"tokens_per_h": 1e9, "mfu": 0.4}  # noqa: E731

    print(f"python {sys.version.split()[0]}")
    from megamesh.fleet import sim

    sim._train_numbers.cache_clear()
    sim._serve_numbers.cache_clear()
    t0 = time.perf_counter()
    simulate(default_scenario())
    cold = time.perf_counter() - t0
    t, ev = timed(default_scenario(), repeats=args.repeats)
    print(
        f"1. mission scenario, 1,004,544 chips, one year: {cold:.2f} s cold (incl. the planner's layout "
        f"search for each job and the serving model), {t:.2f} s warm (median of {args.repeats}), "
        f"{ev:,} events, {t / ev * 1e6:.0f} us/event"
    )
    print("2. different fleet sizes (time per event):")
    for pods in (1, 11, 109):
        t, ev = timed(uniform(pods, 109 / pods), stub, args.repeats)
        print(
            f"   {pods:>3} pods ({pods * 9216:>9,} chips): {t:.2f} s, {ev:,} events, "
            f"{t / ev * 1e6:.0f} us/event"
        )
    print("3. same fleet (109 pods), more events:")
    for scale in (1, 4, 16):
        t, ev = timed(uniform(109, scale), stub, args.repeats)
        print(f"   failure rate x{scale:<2}: {t:.2f} s, {ev:,} events, {t / ev * 1e6:.0f} us/event")


if __name__ == "__main__":
    main()
