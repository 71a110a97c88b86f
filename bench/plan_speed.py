"""Wall time of a full plan search (median of 5), in-process and as the CLI.

    python bench/plan_speed.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from megamesh.config import preset
from megamesh.plan.layout import Workload
from megamesh.plan.search import search
from megamesh.plan.target import parse_target

CASES = [("llama3.1-405b", "tpu7x:1000000", 8192, 109 * 288),
         ("frontier-2t", "tpu7x:1000000", 8192, 109 * 288),
         ("llama3.1-70b", "tpu7x:16x16x36", 8192, 2304)]


def main() -> None:
    print("| model | target | layouts considered | search (median of 5) | CLI wall (median of 5) |")
    print("|---|---|---|---|---|")
    for model, tgt, seq, batch in CASES:
        w = Workload(preset(model), seq, batch)
        t = parse_target(tgt)
        times, n = [], 0
        for _ in range(5):
            t0 = time.perf_counter()
            n = search(w, t).considered
            times.append(time.perf_counter() - t0)
        cli = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "megamesh.cli", "plan", "--model", model,
                            "--target", tgt, "--seq", str(seq), "--batch", str(batch), "--json"],
                           check=True, capture_output=True)
            cli.append(time.perf_counter() - t0)
        print(f"| {model} | {tgt} | {n:,} | {statistics.median(times):.3f} s | "
              f"{statistics.median(cli):.3f} s |")


if __name__ == "__main__":
    main()
