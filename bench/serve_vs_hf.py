"""megamesh serve vs Hugging Face transformers `generate` (torch, CPU) on the same weights.

  python bench/serve_vs_hf.py [--run DIR] [--rounds 3] [--concurrency 32] [--num-prompts 64]

1. A megamesh training run of the `tiny` preset (trained for 2 steps if DIR has none:
   speed does not depend on how well it is trained), exported to a Hugging Face
   directory (config.json + model.safetensors + the run's tokenizer.json).
2. Each server in turn on 127.0.0.1, alone on the machine: `megamesh serve` (continuous
   batching, --slots = concurrency), bench/hf_server.py --mode sequential (one request at
   a time), bench/hf_server.py --mode static (batches of up to `concurrency`).
3. The same client for all (`megamesh.loadgen`, vLLM `bench serve` metrics): prompts
   of exactly --input-len random tokens (+ the chat template), --output-len output tokens
   (ignore_eos), greedy, all requests at once (or Poisson arrivals at --request-rate,
   lengths spread by --range-ratio) with at most --concurrency in flight.
   Medians over --rounds rounds. Writes a JSON file with every round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def ensure_run(run: Path) -> None:
    if (run / "checkpoints").is_dir():
        return
    subprocess.run(
        [
            sys.executable,
            "-m",
            "megamesh.cli",
            "train",
            "--model",
            "tiny",
            "--steps",
            "2",
            "--batch",
            "8",
            "--seq",
            "256",
            "--out",
            str(run),
            "--no-progress",
        ],
        check=True,
    )


def ensure_hf(run: Path) -> Path:
    out = run / "hf"
    if (out / "model.safetensors").is_file():
        return out
    code = f"""
import jax, numpy as np, shutil
from megamesh.serve.load import load_model
from megamesh.sharding.mesh import make_mesh
from megamesh.sharding.rules import param_shardings, strategy
from megamesh.pytree import flatten
from megamesh.model import hf
mesh = make_mesh("data=1", jax.devices()[:1])
m = load_model({str(run)!r}, lambda cfg: param_shardings(cfg, mesh, strategy("serve")), "float32")
flat = {{k: np.asarray(v) for k, v in flatten(jax.device_get(m.params)).items()}}
hf.save_hf(m.cfg, flat, {str(out)!r})
shutil.copy({str(run / "tokenizer.json")!r}, {str(out / "tokenizer.json")!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return out


def wait_up(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                # megamesh compiles its smaller decode batches after start-up: measure the
                # server once it is done (servers without /health are ready when up)
                h = httpx.get(url + "/health", timeout=1)
                if h.status_code != 200 or not h.json().get("compiling", False):
                    return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def measure(name: str, cmd: list[str], port: int, args, tokenizer) -> list[dict]:
    from megamesh.loadgen import BenchConfig, run_bench

    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, proc)
        rounds = []
        for i in range(args.rounds):
            cfg = BenchConfig(
                url=url,
                num_prompts=args.num_prompts,
                max_concurrency=args.concurrency,
                input_len=args.input_len,
                output_len=args.output_len,
                seed=i,
                request_rate=args.request_rate,
                range_ratio=args.range_ratio,
            )
            s = run_bench(cfg, tokenizer)
            print(
                f"  {name} round {i + 1}: {s['output_throughput']:.1f} output tok/s, TTFT p50 "
                f"{s['ttft_ms']['p50']:.0f} ms, TPOT p50 {s['tpot_ms']['p50']:.1f} ms, "
                f"failed {s['failed']}",
                flush=True,
            )
            rounds.append(s)
        return rounds
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate a server process; kill it if it is not gone within `timeout` s."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def med(rounds: list[dict], *path: str) -> float:
    from megamesh.loadgen import median_of

    return median_of(rounds, ".".join(path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=str(ROOT / "runs" / "bench-tiny"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrivals at this rate (default inf: all at once)",
    )
    ap.add_argument(
        "--range-ratio", type=float, default=0.0, help="length spread, as in vLLM's random dataset"
    )
    ap.add_argument("--only", nargs="+", default=["megamesh", "hf-sequential", "hf-static"],
                    help="servers: megamesh, megamesh-no-logprobs, hf-sequential, hf-static")
    ap.add_argument("--out", default=None, help="JSON results (default: a new file under runs/)")
    args = ap.parse_args()

    run = Path(args.run)
    ensure_run(run)
    hf_dir = ensure_hf(run)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(run / "tokenizer.json"))
    servers = {
        "megamesh": (
            [
                sys.executable,
                "-m",
                "megamesh.cli",
                "serve",
                "--model",
                str(run),
                "--port",
                "8310",
                "--slots",
                str(args.concurrency),
                "--max-len",
                "1024",
            ],
            8310,
        ),
        "hf-sequential": (
            [
                sys.executable,
                str(ROOT / "bench" / "hf_server.py"),
                "--model",
                str(hf_dir),
                "--port",
                "8311",
                "--mode",
                "sequential",
            ],
            8311,
        ),
        "hf-static": (
            [
                sys.executable,
                str(ROOT / "bench" / "hf_server.py"),
                "--model",
                str(hf_dir),
                "--port",
                "8312",
                "--mode",
                "static",
                "--batch",
                str(args.concurrency),
            ],
            8312,
        ),
    }
    # the same server without log-probabilities (serve's --max-logprobs 0: the decode step
    # computes no log-softmax and top-k), to measure what computing them costs
    cmd, _ = servers["megamesh"]
    servers["megamesh-no-logprobs"] = ([*cmd[:cmd.index("--port")], "--port", "8313",
                                        *cmd[cmd.index("--port") + 2:], "--max-logprobs", "0"], 8313)
    results = {}
    for name in args.only:
        cmd, port = servers[name]
        print(f"{name}: {' '.join(cmd)}", flush=True)
        results[name] = measure(name, cmd, port, args, tokenizer)

    import jax
    import torch
    import transformers

    versions = {
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(f"\nversions: {versions}")
    print(f"{'server':<15} {'out tok/s':>10} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12} {'E2EL p50 ms':>12}")
    for name, rounds in results.items():
        print(
            f"{name:<15} {med(rounds, 'output_throughput'):>10.1f} {med(rounds, 'ttft_ms', 'p50'):>12.0f} "
            f"{med(rounds, 'tpot_ms', 'p50'):>12.1f} {med(rounds, 'e2el_ms', 'p50'):>12.0f}"
        )
    if "megamesh" in results:
        for base in ("hf-sequential", "hf-static"):
            if base in results:
                r = med(results["megamesh"], "output_throughput") / med(results[base], "output_throughput")
                t = med(results["megamesh"], "ttft_ms", "p50") / med(results[base], "ttft_ms", "p50")
                print(f"megamesh / {base}: output tok/s x{r:.2f}, TTFT p50 x{t:.2f}")
    out = Path(args.out) if args.out else ROOT / "runs" / f"serve_vs_hf-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        sys.exit(f"{out} exists: not overwriting")
    out.write_text(json.dumps({"args": vars(args), "versions": versions, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
