"""`megamesh inspect`: a model's config, parameter table and counts (no jax unless --forward)."""

from __future__ import annotations

import argparse
import json

from megamesh.cli.common import add_model_args, resolve_model
from megamesh.model import specs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a model's config, parameters and FLOP counts")
    add_model_args(p, default=None)
    p.add_argument("--seq", type=int, default=4096, help="sequence length for FLOP counts")
    p.add_argument("--params", action="store_true", help="list every parameter spec")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def summary(cfg, seq: int) -> dict:
    return {
        "config": cfg.to_dict(),
        "params_total": specs.param_count(cfg),
        "params_active": specs.active_param_count(cfg),
        "params_matmul_active": specs.matmul_param_count(cfg),
        "flops_per_token_forward": specs.flops_per_token(cfg, seq, "forward"),
        "flops_per_token_train": specs.flops_per_token(cfg, seq, "train"),
        "kv_cache_bytes_per_token": specs.kv_cache_bytes_per_token(cfg),
        "seq": seq,
    }


def run(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = resolve_model(args, extra)
    s = summary(cfg, args.seq)
    table = specs.param_specs(cfg)
    if args.json:
        if args.params:
            s["param_specs"] = [{"name": p.name, "shape": p.shape, "axes": p.axes, "dtype": p.dtype}
                                for p in table.values()]
        print(json.dumps(s, indent=2))
        return 0
    print(f"{cfg.name}: {cfg.description}")
    for k, v in cfg.to_dict().items():
        if k not in ("name", "description"):
            print(f"  {k:18s} {v}")
    print(f"  parameters         {s['params_total']:,} total, {s['params_active']:,} active per token")
    print(f"  FLOPs per token    {s['flops_per_token_train']:.4g} train step, "
          f"{s['flops_per_token_forward']:.4g} forward (seq {args.seq}, causal counted once)")
    print(f"  KV cache           {s['kv_cache_bytes_per_token']:,} bytes per token ({cfg.compute_dtype})")
    if args.params:
        for p in table.values():
            print(f"  {p.name:28s} {str(p.shape):28s} {str(p.axes):52s} {p.dtype}")
    return 0
