"""`megamesh bench serve`: measure a running server (vLLM `bench serve` metrics)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megamesh.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks against a running server")
    bsub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    s = bsub.add_parser("serve", help="load a server with streamed requests; TTFT/TPOT/ITL/E2EL, "
                        "throughput and goodput",
                        description="Send streamed requests to a running server and report TTFT, TPOT, "
                        "ITL and end-to-end latency (mean, p50, p90, p99), request and token throughput, "
                        "and goodput under SLOs, as vLLM's `bench serve` defines them.")
    s.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    s.add_argument("--api", choices=("anthropic", "openai"), default="anthropic")
    s.add_argument("--model", help="model id (default: the server's first from /v1/models)")
    s.add_argument("--api-key", default="bench")
    s.add_argument("--num-prompts", type=int, default=64)
    s.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (default inf: all at once)")
    s.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1 = Poisson)")
    s.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    s.add_argument("--input-len", type=int, default=128)
    s.add_argument("--output-len", type=int, default=128)
    s.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]")
    s.add_argument("--tokenizer", help="tokenizer.json for exact prompt lengths (a training run's)")
    s.add_argument("--dataset", choices=("random", "enterprise"), default="random",
                   help="random: prompts of --input-len; enterprise: --tenants tenants, each with its "
                   "own API key and a --system-len-token system prompt (a cache_control breakpoint), "
                   "user prompts of --input-min..--input-max tokens, outputs of "
                   "--output-min..--output-max")
    s.add_argument("--tenants", type=int, default=16)
    s.add_argument("--system-len", type=int, default=2048)
    s.add_argument("--input-min", type=int, default=200)
    s.add_argument("--input-max", type=int, default=8000)
    s.add_argument("--output-min", type=int, default=50)
    s.add_argument("--output-max", type=int, default=500)
    s.add_argument("--no-cache-control", dest="cache_control", action="store_false",
                   help="enterprise: send system prompts without cache_control (servers without "
                   "prompt caching)")
    s.add_argument("--goodput", nargs="+", default=[], metavar="SLO:MS",
                   help="SLOs such as ttft:500 tpot:50 e2el:5000")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--timeout", type=float, default=600.0,
                   help="seconds a request may wait for its next byte before it counts as failed")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--save", help="also write the JSON summary to this new file")
    s.set_defaults(run=run)


def _goodput(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, ms = item.partition(":")
        if name not in ("ttft", "tpot", "e2el"):
            raise ConfigError(f"--goodput {item!r}: the SLO name must be ttft, tpot or e2el")
        try:
            out[name] = float(ms)
        except ValueError:
            raise ConfigError(f"--goodput {item!r}: the value must be milliseconds, e.g. ttft:500") from None
        if out[name] <= 0:
            raise ConfigError(f"--goodput {item!r}: the value must be > 0 ms")
    return out


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"unrecognized arguments: {' '.join(extra)}")
    for flag in ("num_prompts", "input_len", "output_len", "tenants", "system_len", "input_min",
                 "output_min"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not allowed: at least 1")
    if args.request_rate <= 0 or args.burstiness <= 0:
        raise ConfigError("--request-rate and --burstiness must be > 0")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout {args.timeout} is not allowed: seconds > 0")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ConfigError(f"--max-concurrency {args.max_concurrency} is not allowed: at least 1")
    for lo, hi in (("input_min", "input_max"), ("output_min", "output_max")):
        if getattr(args, hi) < getattr(args, lo):
            raise ConfigError(f"--{hi.replace('_', '-')} {getattr(args, hi)} is not allowed: at least "
                              f"--{lo.replace('_', '-')} ({getattr(args, lo)})")
    if not 0 <= args.range_ratio < 1:
        raise ConfigError(f"--range-ratio {args.range_ratio} is not allowed: 0 <= r < 1")
    import httpx

    from megamesh.loadgen import BenchConfig, format_summary, run_bench

    tok = None
    if args.tokenizer:
        if not Path(args.tokenizer).is_file():
            raise ConfigError(f"--tokenizer {args.tokenizer!r} does not exist")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(args.tokenizer)
    cfg = BenchConfig(url=args.url.rstrip("/"), model=args.model, api=args.api, num_prompts=args.num_prompts,
                      request_rate=args.request_rate, burstiness=args.burstiness,
                      max_concurrency=args.max_concurrency, input_len=args.input_len,
                      output_len=args.output_len, range_ratio=args.range_ratio, seed=args.seed,
                      api_key=args.api_key, goodput=_goodput(args.goodput), dataset=args.dataset,
                      tenants=args.tenants, system_len=args.system_len, input_min=args.input_min,
                      input_max=args.input_max, output_min=args.output_min,
                      output_max=args.output_max, cache_control=args.cache_control,
                      timeout=args.timeout)
    try:
        summary = run_bench(cfg, tok)
    except httpx.HTTPError as e:
        raise ConfigError(f"cannot reach a server at {args.url}: {e}") from None
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    if args.save:
        from megamesh.fileio import write_new_file

        write_new_file(args.save, json.dumps(summary, indent=2))
    return 0 if summary["completed"] else 1
