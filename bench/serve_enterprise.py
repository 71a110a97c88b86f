"""Issue 15's enterprise mix at one KV memory budget: megamesh serve (paged KV, prefix
cache, chunked prefill, fair scheduling) vs the dense-cache engine megamesh had before
(a source tree of an older commit) vs Hugging Face static batching.

  git worktree add /tmp/megamesh-dense 153d1ea   # the engine before paged KV
  python bench/serve_enterprise.py --baseline-src /tmp/megamesh-dense/src [--rounds 2]

1. The `tiny` preset with a context of --max-len (11,264: a 2k system prompt, an 8k
   prompt, 500 output tokens and the chat template fit), trained for 2 steps (speed does
   not depend on how well), and its Hugging Face export.
2. The KV budget: --budget-seqs full-length sequences (default 4). The dense engine gets
   that many slots (each holds max-len positions); megamesh gets the same memory as
   pages (budget x max-len / 16, twice that with --kv-dtype bfloat16: the same bytes)
   and --slots rows; HF static batching gets that batch.
3. The mix (`megamesh bench serve --dataset enterprise`): 16 tenants with their own API
   keys and 2,048-token system prompts, Poisson arrivals at --rate, user prompts of
   200-8,000 tokens, outputs of 50-500 (ignore_eos), --num-prompts requests. megamesh is
   sent the system prompts with a cache_control breakpoint; the others without (they
   refuse or ignore it). Each server alone on the machine; medians over --rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_vs_hf import stop, wait_up  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def ensure_run(run: Path, max_len: int) -> Path:
    if not (run / "checkpoints").is_dir():
        subprocess.run([sys.executable, "-m", "megamesh.cli", "train", "--model", "tiny",
                        f"--model.max_seq_len={max_len}", "--steps", "2", "--batch", "8", "--seq",
                        "256", "--out", str(run), "--no-progress"], check=True)
    hf_dir = run / "hf"
    if not (hf_dir / "model.safetensors").is_file():
        from serve_vs_hf import ensure_hf

        ensure_hf(run)
    return hf_dir


def serve(name: str, cmd: list[str], env: dict[str, str], port: int, args, tokenizer) -> list[dict]:
    log = open(Path(args.logdir) / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, proc, timeout=1800)
        return run_rounds(name, url, args, tokenizer, cache_control=name == "megamesh")
    finally:
        stop(proc, timeout=60)
        log.close()


def serve_replicas(policy: str, cmd: list[str], args, tokenizer) -> list[dict]:
    """--replicas megamesh servers (each as `cmd` alone would be) behind bench/router.py's
    `policy`; each policy gets fresh replicas (no cache carried from another's run)."""
    procs, logs = [], []
    urls = [f"http://127.0.0.1:{8340 + i}" for i in range(args.replicas)]
    try:
        for i in range(args.replicas):
            logs.append(open(Path(args.logdir) / f"replica-{policy}-{i}.log", "w"))
            procs.append(subprocess.Popen(cmd + ["--port", str(8340 + i)], stdout=logs[-1],
                                          stderr=subprocess.STDOUT, text=True,
                                          env={**os.environ, "JAX_PLATFORMS": "cpu"}))
        for url, proc in zip(urls, procs):
            wait_up(url, proc, timeout=1800)
        logs.append(open(Path(args.logdir) / f"router-{policy}.log", "w"))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "bench" / "router.py"), "--port", "8350",
                                       "--policy", policy, *urls], stdout=logs[-1],
                                      stderr=subprocess.STDOUT, text=True))
        router = "http://127.0.0.1:8350"
        wait_up(router, procs[-1], timeout=60)
        rounds = run_rounds(f"{args.replicas} replicas, {policy}", router, args, tokenizer,
                            cache_control=True)
        import httpx

        sent = httpx.get(router + "/router").json()["sent"]
        print(f"  {policy}: requests per replica {sent}", flush=True)
        for r in rounds:
            r["requests_per_replica"] = sent
        return rounds
    finally:
        for proc in procs:
            stop(proc, timeout=60)
        for log in logs:
            log.close()


def run_rounds(name: str, url: str, args, tokenizer, cache_control: bool) -> list[dict]:
    from megamesh.loadgen import BenchConfig, run_bench

    rounds = []
    for i in range(args.rounds):
        cfg = BenchConfig(url=url, dataset="enterprise", num_prompts=args.num_prompts,
                          request_rate=args.rate, seed=i, warmups=1,
                          cache_control=cache_control, max_concurrency=None,
                          system_len=args.system_len, input_min=args.input_min,
                          input_max=args.input_max, output_min=args.output_min,
                          output_max=args.output_max, timeout=args.timeout)
        s = run_bench(cfg, tokenizer)
        kv = s["kv_pages_used"]
        kv_text = ("-" if kv is None else f"{kv['mean']:.0%} mean / {kv['max']:.0%} max, "
                   f"{s['preempted'] or 0:.0f} preemptions")
        print(f"  {name} round {i + 1}: {s['output_throughput']:.1f} output tok/s, TTFT p50 "
              f"{s['ttft_ms']['p50']:.0f} p99 {s['ttft_ms']['p99']:.0f} ms, TPOT p50 "
              f"{s['tpot_ms']['p50']:.1f} p99 {s['tpot_ms']['p99']:.1f} ms, prefix hits "
              f"{s['prefix_cache_hit_rate']:.1%} by usage"
              + ("" if s["engine_prefix_hit_rate"] is None else
                 f", {s['engine_prefix_hit_rate']:.1%} in the engine")
              + f", KV in use {kv_text}, "
              + ("" if not s["engine_seconds"] else
                 f"engine {s['engine_seconds']['prefill']:.0f} s prefill / "
                 f"{s['engine_seconds']['decode']:.0f} s decode, ")
              + f"{s['duration_s']:.0f} s, failed {s['failed']}", flush=True)
        rounds.append(s)
    return rounds


def main() -> None:
    from tokenizers import Tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None, help="default: runs/bench-tiny-<max-len>")
    ap.add_argument("--max-len", type=int, default=11264)
    ap.add_argument("--budget-seqs", type=int, default=4)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--system-len", type=int, default=2048)
    ap.add_argument("--input-min", type=int, default=200)
    ap.add_argument("--input-max", type=int, default=8000)
    ap.add_argument("--output-min", type=int, default=50)
    ap.add_argument("--output-max", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kv-dtype", choices=("float32", "bfloat16"),
                    help="megamesh's KV pages (default: the weights', float32 on CPU); the "
                    "budget stays in bytes")
    ap.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds a request may wait (an overloaded server queues for long)")
    ap.add_argument("--baseline-src", help="src/ of a megamesh tree with the dense-cache engine")
    ap.add_argument("--only", nargs="+", default=["megamesh", "dense", "hf-static"])
    ap.add_argument("--logdir", default=str(ROOT / "runs" / "serve_enterprise-logs"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--replicas", type=int, default=0,
                    help="instead of the one-server comparison: this many megamesh replicas behind "
                    "bench/router.py, once per --routing policy (issue 27 point 5)")
    ap.add_argument("--routing", nargs="+", default=["round-robin", "affinity"],
                    choices=("round-robin", "affinity", "scored"))
    args = ap.parse_args()
    Path(args.logdir).mkdir(parents=True, exist_ok=True)
    run = Path(args.run or ROOT / "runs" / f"bench-tiny-{args.max_len}")
    hf_dir = ensure_run(run, args.max_len)
    tokenizer = Tokenizer.from_file(str(run / "tokenizer.json"))
    # the same bytes: bf16 pages hold twice the positions of the f32 cache the others keep
    pages = args.budget_seqs * args.max_len // 16 * (2 if args.kv_dtype == "bfloat16" else 1)
    py = [sys.executable, "-m", "megamesh.cli", "serve", "--model", str(run), "--max-len",
          str(args.max_len), "--max-concurrent-per-key", "1000", "--max-queue", "1000"]
    servers = {
        "megamesh": (py + ["--port", "8340", "--slots", str(args.slots), "--kv-pages", str(pages)]
                     + (["--kv-dtype", args.kv_dtype] if args.kv_dtype else []), {}, 8340),
        "dense": (py + ["--port", "8341", "--slots", str(args.budget_seqs)],
                  {"PYTHONPATH": args.baseline_src or ""}, 8341),
        "hf-static": ([sys.executable, str(ROOT / "bench" / "hf_server.py"), "--model", str(hf_dir),
                       "--port", "8342", "--mode", "static", "--batch", str(args.budget_seqs)], {}, 8342),
    }
    results = {}
    if args.replicas:
        replica = py + ["--slots", str(args.slots), "--kv-pages", str(pages)] + (
            ["--kv-dtype", args.kv_dtype] if args.kv_dtype else [])
        for policy in args.routing:
            print(f"{args.replicas} replicas, {policy}: {' '.join(replica[2:])}", flush=True)
            results[policy] = serve_replicas(policy, replica, args, tokenizer)
        args.only = []
    for name in args.only:
        if name == "dense" and not args.baseline_src:
            print("  dense: skipped (no --baseline-src)")
            continue
        cmd, env, port = servers[name]
        print(f"{name}: {' '.join(cmd[2:])}", flush=True)
        results[name] = serve(name, cmd, env, port, args, tokenizer)

    def med(name: str, path: str) -> float | None:
        from megamesh.loadgen import median_of

        if "." not in path and any(r[path] is None for r in results[name]):
            return None  # (a figure only megamesh reports)
        return median_of(results[name], path)

    summary = {"args": vars(args), "rounds": results, "medians": {}}
    for name in results:
        summary["medians"][name] = {k: med(name, k) for k in (
            "output_throughput", "ttft_ms.p50", "ttft_ms.p99", "tpot_ms.p50", "tpot_ms.p99",
            "prefix_cache_hit_rate", "engine_prefix_hit_rate")}
    if "megamesh" in results:
        m = summary["medians"]["megamesh"]
        for other in [n for n in results if n != "megamesh"]:
            o = summary["medians"][other]
            ratio = {"output_throughput": m["output_throughput"] / o["output_throughput"],
                     "ttft_p50_lower_by": o["ttft_ms.p50"] / m["ttft_ms.p50"]}
            summary[f"megamesh_vs_{other}"] = ratio
            print(f"megamesh vs {other}: {ratio['output_throughput']:.2f}x output tok/s, TTFT p50 "
                  f"{ratio['ttft_p50_lower_by']:.1f}x lower", flush=True)
    for policy in [p for p in ("affinity", "scored") if p in results and "round-robin" in results]:
        rr, aff = summary["medians"]["round-robin"], summary["medians"][policy]
        summary[f"{policy}_vs_round_robin"] = {
            "prefix_cache_hit_rate": [rr["prefix_cache_hit_rate"], aff["prefix_cache_hit_rate"]],
            "ttft_p50_lower_by": rr["ttft_ms.p50"] / aff["ttft_ms.p50"],
            "output_throughput": aff["output_throughput"] / rr["output_throughput"]}
        print(f"{policy} vs round-robin: prefix hits {rr['prefix_cache_hit_rate']:.1%} -> "
              f"{aff['prefix_cache_hit_rate']:.1%}, TTFT p50 {rr['ttft_ms.p50']:.0f} -> "
              f"{aff['ttft_ms.p50']:.0f} ms", flush=True)
    print(json.dumps(summary["medians"], indent=1))
    out = Path(args.out) if args.out else ROOT / "runs" / f"serve_enterprise-{int(time.time())}.json"
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
