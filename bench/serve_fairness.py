"""Fair scheduling across API keys: one key floods `megamesh serve`, another asks short
questions one at a time; its time to first token vs the same questions on an idle server.

  python bench/serve_fairness.py [--run DIR] [--rounds 3] [--slots 16] [--flood 64]
  python bench/serve_fairness.py --scheduling fcfs --rounds 1   # the first-come baseline

1. A megamesh training run of the `tiny` preset (trained for 2 steps if DIR has none).
2. `megamesh serve --slots S` on 127.0.0.1, alone on the machine.
3. Per round: tenant "b" sends --questions streamed requests one after another (a
   256-token prompt, 8 output tokens) on the idle server; then tenant "flood" sends
   --flood-total requests, --flood at a time (128-token prompts, 256 output tokens,
   ignore_eos: S run, the rest wait, a backlog while they last) and, once the flood is
   under way, "b" asks other questions of the same lengths (no warm-up request: it would
   wait out the flood unmeasured); the run records whether the flood outlasted them.
   Client-side TTFT (`megamesh.loadgen`, vLLM's definition), median per phase; the
   ratio flooded / idle per round, and its median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_vs_hf import ensure_run, stop, wait_up  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from tokenizers import Tokenizer

    from megamesh.loadgen import BenchConfig, run_bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(ROOT / "runs" / "bench-tiny"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--flood", type=int, default=64, help="flood requests in flight (default 64)")
    ap.add_argument("--flood-total", type=int, default=192,
                    help="flood requests in all: a backlog while they last (default 192)")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--port", type=int, default=8320)
    ap.add_argument("--scheduling", default="fair", choices=("fair", "fcfs"),
                    help="the server's --scheduling: fair (default) or fcfs, the first-come "
                    "first-served baseline")
    ap.add_argument("--out", default=None, help="JSON results (default: a new file under runs/)")
    args = ap.parse_args()
    run = Path(args.run)
    ensure_run(run)
    tokenizer = Tokenizer.from_file(str(run / "tokenizer.json"))
    cmd = [sys.executable, "-m", "megamesh.cli", "serve", "--model", str(run), "--port",
           str(args.port), "--slots", str(args.slots), "--max-len", "1024",
           "--max-concurrent-per-key", str(args.flood), "--scheduling", args.scheduling]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    url = f"http://127.0.0.1:{args.port}"

    def questions(seed: int) -> dict:
        # no warm-up requests: they would wait out a flood unmeasured
        return run_bench(BenchConfig(url=url, api_key="b", num_prompts=args.questions,
                                     max_concurrency=1, input_len=256, output_len=8, seed=seed,
                                     warmups=0), tokenizer)

    rounds = []
    try:
        wait_up(url, proc)
        for i in range(args.rounds):
            idle = questions(100 + i)
            flood_cfg = BenchConfig(url=url, api_key="flood", num_prompts=args.flood_total,
                                    max_concurrency=args.flood, input_len=128, output_len=256,
                                    seed=i)
            result: dict = {}
            flooder = threading.Thread(target=lambda c=flood_cfg, r=result: r.update(run_bench(c, tokenizer)))
            flooder.start()
            time.sleep(3.0)  # the flood admitted and decoding
            busy = questions(200 + i)  # other prompts: none of them cached
            busy["flood_still_running"] = flooder.is_alive()
            flooder.join()
            r = {"idle_ttft_ms_p50": idle["ttft_ms"]["p50"], "flooded_ttft_ms_p50": busy["ttft_ms"]["p50"],
                 "idle_ttft_ms_p99": idle["ttft_ms"]["p99"], "flooded_ttft_ms_p99": busy["ttft_ms"]["p99"],
                 "flood_output_tok_s": result["output_throughput"], "failed": idle["failed"] + busy["failed"]
                 + result["failed"], "flood_outlasted_questions": busy["flood_still_running"]}
            r["ratio"] = r["flooded_ttft_ms_p50"] / r["idle_ttft_ms_p50"]
            print(f"round {i + 1}: tenant b TTFT p50 idle {r['idle_ttft_ms_p50']:.0f} ms, during the "
                  f"flood {r['flooded_ttft_ms_p50']:.0f} ms ({r['ratio']:.2f}x); p99 "
                  f"{r['idle_ttft_ms_p99']:.0f} / {r['flooded_ttft_ms_p99']:.0f} ms; flood "
                  f"{r['flood_output_tok_s']:.0f} output tok/s, still running after the questions: "
                  f"{r['flood_outlasted_questions']}; failed {r['failed']}", flush=True)
            rounds.append(r)
    finally:
        stop(proc)
    summary = {"median_ratio": statistics.median(r["ratio"] for r in rounds),
               "median_idle_ttft_ms": statistics.median(r["idle_ttft_ms_p50"] for r in rounds),
               "median_flooded_ttft_ms": statistics.median(r["flooded_ttft_ms_p50"] for r in rounds),
               "rounds": rounds, "args": vars(args)}
    print(f"median over {len(rounds)} rounds: idle {summary['median_idle_ttft_ms']:.0f} ms, flooded "
          f"{summary['median_flooded_ttft_ms']:.0f} ms, ratio {summary['median_ratio']:.2f}x")
    out = Path(args.out) if args.out else ROOT / "runs" / f"serve_fairness-{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
