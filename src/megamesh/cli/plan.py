"""`megamesh plan`: the best layout for a model on a target, and what it means in time,
energy, money and serving capacity. Pure Python: never imports jax (except --verify)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

from megamesh.cli.common import parse_diloco, split_overrides
from megamesh.cli.compile_cmd import compile_and_compare
from megamesh.errors import ConfigError
from megamesh.model.source import model_config
from megamesh.model.specs import WEIGHT_FORMATS, param_count
from megamesh.plan import convergence, questions, report
from megamesh.plan.layout import KERNELS, REMATS, Workload
from megamesh.plan.search import search
from megamesh.plan.target import parse_target
from megamesh.runspec import plan_json
from megamesh.sharding.logical import parse_layout

_DURATION = re.compile(r"^\s*([\d.]+)\s*(s|m|h|d|w)?\s*$")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="choose the parallel layout; predict memory, step time, MFU, "
                       "time to train, energy, cost; size serving",
                       description="Search mesh layouts (ICI and DCN), remat and microbatching for "
                       "a model on a target and rank them by predicted step time.")
    p.add_argument("--model", default="llama3.1-8b", help="preset, config file or HF directory")
    p.add_argument("--target", default="tpu7x:256",
                   help="CHIP:COUNT or CHIP:AxBxC, e.g. tpu7x:256, tpu7x:16x16x36, "
                   "tpu7x:1000000, h100:16384")
    p.add_argument("--seq", type=int, default=8192, help="sequence length (default 8192)")
    p.add_argument("--batch", type=int, help="global batch in sequences (default: the critical batch "
                   "for the model and --tokens, rounded down to what the target splits)")
    p.add_argument("--precision", default="bf16", help="bf16 or fp8 (matmul peak)")
    p.add_argument("--kernel-family", default="megamesh", choices=KERNELS,
                   help="the kernels the plan models: megamesh (default; its step on TPU and GPU: "
                   "splash / cuDNN flash attention, context parallel over a sequence axis with "
                   "an unbalanced causal split, grouped-matmul MoE, chunked loss), fused (load-"
                   "balanced context parallelism, as MaxText's Pallas kernels) or xla (the "
                   "reference kernels, `train --kernels attention=reference,moe=einsum`: full "
                   "T x T scores, one-hot einsum MoE)")
    p.add_argument("--kernels", help=argparse.SUPPRESS)  # train's and compile's per-op flag: refused here
    p.add_argument("--tokens", type=float, help="tokens to train on (default: 20 per parameter)")
    p.add_argument("--deadline", help="instead of the target's chip count: the fewest chips that "
                   "train --tokens within this time (e.g. 30d, 12h)")
    p.add_argument("--mesh", help="evaluate this one layout, e.g. dcn=2,fsdp=256,tensor=4")
    p.add_argument("--remat", help="only this remat policy: none, dots_no_batch, dots, full")
    p.add_argument("--max-microbatches", type=int,
                   help="cap on gradient-accumulation microbatches (default: as many as help fit)")
    p.add_argument("--offload", action="store_true",
                   help="also consider host offload of activations (remat offload, which "
                   "megamesh's step runs) and of optimizer state (planning only)")
    p.add_argument("--pipeline", action="store_true",
                   help="also consider pipeline stages across DCN (interleaved 1F1B; modelled for "
                   "planning; megamesh's own train step has no pipeline stages yet)")
    p.add_argument("--diloco", metavar="islands=N,inner_steps=H",
                   help="also plan the run as N decoupled islands averaging every H steps "
                   "(`megamesh train --diloco`): each island's layout, the outer step's DCN "
                   "bytes and time, the throughput vs the synchronous run")
    p.add_argument("--site-mw", type=float,
                   help="the site's power cap in MW at the wall, to compare the plan's power with "
                   "(default: the chip's catalog entry, 1,000 MW for tpu7x; none for the others)")
    p.add_argument("--top", type=int, default=8, help="candidates to print (default 8)")
    p.add_argument("--json", action="store_true", help="print JSON {best, candidates, ...}")
    p.add_argument("--plot", help="write a PNG of the step-time breakdown of the top layouts")
    p.add_argument("--verify", action="store_true",
                   help="compile the best TPU layout with `megamesh compile` and compare")
    p.add_argument("--serve", action="store_true", help="size serving instead of training")
    p.add_argument("--qps", type=float, default=10.0, help="serving: requests per second")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="bf16",
                   help="serving: the layers' matmul weights as `megamesh serve --weights` holds them")
    p.add_argument("--input-tokens", type=int, default=1024, help="serving: prompt tokens")
    p.add_argument("--output-tokens", type=int, default=256, help="serving: output tokens")
    p.add_argument("--slo-ttft-ms", type=float, help="serving: time-to-first-token SLO")
    p.add_argument("--slo-tpot-ms", type=float, help="serving: time-per-output-token SLO")
    p.set_defaults(run=run)


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"--deadline {text!r} is not allowed: write a number with a unit "
                          "s, m, h, d or w, e.g. 30d")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2) or "s"]


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.kernels is not None:
        raise ConfigError(f"plan --kernels {args.kernels} is not allowed: the kernels a plan models "
                          f"are --kernel-family ({', '.join(KERNELS)}); --kernels is train's and "
                          "compile's per-op override (e.g. attention=reference,moe=einsum)")
    if args.site_mw is not None and not args.site_mw > 0:
        raise ConfigError(f"--site-mw {args.site_mw} is not allowed: a power in MW, > 0")
    over = split_overrides(extra, ("model", "chip"))
    cfg = model_config(args.model, over["model"])
    target = parse_target(args.target, {k: float(v) for k, v in over["chip"].items()})
    if args.serve:
        ans = questions.serving_answer(cfg, target, qps=args.qps, input_tokens=args.input_tokens,
                                       output_tokens=args.output_tokens,
                                       slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                                       weights=args.weights)
        ans["weights"] = args.weights
        if args.json:
            print(json.dumps({"model": cfg.name, "target": args.target, "serve": ans}, indent=2))
        else:
            print(report.header(target))
            print(f"serving {cfg.name}: {args.qps:g} req/s of {args.input_tokens} in + "
                  f"{args.output_tokens} out tokens")
            for k, v in ans.items():
                print(f"  {k:<36} {v:,.3f}" if isinstance(v, float) else f"  {k:<36} {v}")
        return 0
    if args.batch is not None and args.batch < 1:
        raise ConfigError(f"--batch {args.batch} is not allowed: at least 1 sequence")
    if args.tokens is not None and not args.tokens > 0:
        raise ConfigError(f"--tokens {args.tokens} is not allowed: > 0")
    tokens = args.tokens or 20.0 * param_count(cfg)
    crit = convergence.critical_batch(cfg, args.seq, tokens)
    w = Workload(cfg, args.seq, args.batch or crit["sequences"], args.precision, args.kernel_family)
    if not args.batch and not args.deadline:
        w = dataclasses.replace(w, batch=convergence.default_batch(w, target, crit["sequences"]))
    batch = w.batch
    remats = REMATS
    if args.remat:
        if args.remat not in REMATS:
            raise ConfigError(f"--remat {args.remat!r} is not allowed: one of {', '.join(REMATS)}")
        remats = (args.remat,)
    if args.max_microbatches is not None and args.max_microbatches < 1:
        raise ConfigError(f"--max-microbatches {args.max_microbatches} is not allowed: must be >= 1")
    if args.deadline:
        found = questions.fewest_chips_for_deadline(
            w, target, tokens, parse_duration(args.deadline), remats=remats,
            max_microbatches=args.max_microbatches, offload=args.offload, pipeline=args.pipeline)
        if found is None:
            raise ConfigError(f"no {target.chip.name} count up to 2,000,000 chips trains "
                              f"{tokens:.3g} tokens of {cfg.name} within {args.deadline} at batch {batch}")
        target, _ = found
    fixed = None
    if args.mesh:
        fixed = parse_layout(args.mesh)
    res = search(w, target, remats=remats, fixed=fixed, max_microbatches=args.max_microbatches,
                 offload=args.offload, pipeline=args.pipeline)
    if not res.ranked:
        smallest = res.rejected[0] if res.rejected else None
        need = f"; the smallest needs {smallest.memory.total / 2**30:.1f} GiB per device " \
               f"({smallest.layout.text()}, remat {smallest.layout.remat}) and a device has " \
               f"{target.chip.device_hbm_bytes / 2**30:.0f} GiB" if smallest else ""
        raise ConfigError(f"{cfg.name} at seq {args.seq}, batch {batch} does not fit "
                          f"{target.describe()} in any layout{need}. Try more chips, a shorter "
                          "sequence or a smaller batch per device")
    best = res.ranked[0]
    train = questions.training_answer(w, target, best, tokens)
    warn = convergence.batch_warning(cfg, batch, args.seq, tokens, crit)
    fit = None if args.mesh else convergence.too_large(
        w, target, crit, w.tokens / best.step_time_s if batch <= crit["sequences"] else None)
    alts = convergence.alternatives(w, target, crit, tokens, fit) if fit else None
    if fit:
        sync = (f"{fit['sync_tokens_per_s'] / 1e6:,.1f}M tokens/s at {best.mfu:.1%} MFU"
                if fit["sync_tokens_per_s"] else "none: the critical batch does not split over it")
        too = (f"one synchronous job cannot use {target.chips:,} chips well: at the critical batch "
               f"({crit['sequences']:,} sequences) {fit['slices']} of its {target.n_slices} slices "
               f"({fit['chips']:,} chips) reach {fit['tokens_per_s'] / 1e6:,.1f}M tokens/s; all of "
               f"them, {sync}")
        warn = f"{warn}; {too}" if warn else too
    site = questions.site_answer(target, args.site_mw if args.site_mw is not None
                                 else target.chip.site_mw)
    diloco = None
    if args.diloco:
        islands, inner = parse_diloco(args.diloco)
        inner = inner or convergence.DILOCO_INNER_STEPS
        diloco = questions.diloco_answer(w, target, best, islands, inner)
    spec = best.layout.run_spec(w)
    target_spec = target.topology_name if target.n_slices == 1 else f"{target.chip.name}:{target.chips}"
    run_entry = plan_json(args.model, target_spec, args.seq, batch, spec, best.mfu)
    if args.plot:
        report.plot(res.ranked, args.plot, f"{cfg.name} on {target.describe()}")
    if args.json:
        out = {"model": cfg.name, "target": target.describe(), "target_spec": target_spec,
               "chips": target.chips, "run": run_entry,
               "seq": args.seq, "batch": batch, "precision": args.precision,
               "kernel_family": args.kernel_family, "considered": res.considered,
               "best": best.to_json(target), "training": train,
               "candidates": [e.to_json(target) for e in res.ranked[:max(args.top, 1)]],
               "why": report.why(res.ranked)}
        if diloco:
            out["diloco"] = diloco
        if site:
            out["site"] = site
        out["critical_batch"] = crit
        if alts:
            out["alternatives"] = alts
        out["warnings"] = [x for x in (warn, (site or {}).get("warning")) if x]
        print(json.dumps(out, indent=2))
    else:
        print(report.header(target))
        print(f"model: {cfg.name}, seq {args.seq}, batch {batch} sequences "
              f"({w.tokens:,} tokens/step), {args.precision}, {args.kernel_family} kernels; "
              f"{res.considered:,} layouts considered, {len(res.ranked):,} fit")
        print(report.table(res.ranked, args.top))
        print(report.why(res.ranked))
        days = train["time_to_train_days"]
        print(f"training {tokens:.3g} tokens: {train['steps']:,} steps, {days:,.1f} days at "
              f"{best.mfu:.1%} MFU", end="")
        if train["energy_mwh"] is not None:
            print(f"; {train['energy_mwh']:,.0f} MWh at {train['average_power_mw']:,.1f} MW "
                  f"({train['power_source']})", end="")
        if train["cost_usd"] is not None:
            print(f"; ${train['cost_usd']:,.0f} ({train['price_source']})", end="")
        print()
        note = "; " + ", ".join(spec.planner_only()) + " are planner only" if spec.planner_only() else ""
        print(f"run spec: {spec.layout or 'data=1'}, remat {spec.remat}, {spec.microbatches} "
              f"microbatch(es), kernels {spec.kernels}{note}; `megamesh train` flags: "
              + " ".join(spec.train_args()))
        if diloco:
            d = diloco
            print(f"DiLoCo: {d['islands']} islands of {d['island_chips']:,} chips "
                  f"({d['island_layout']}, step {d['island_step_time_s']:.2f} s, MFU "
                  f"{d['island_mfu']:.1%}); an outer step every {d['inner_steps']} steps moves "
                  f"{d['outer_step_bytes_per_host'] / 1e9:,.1f} GB per host over the DCN in "
                  f"{d['outer_step_s']:.1f} s ({d['outer_step_share']:.1%} of a round): "
                  f"{d['tokens_per_s']:,.0f} tokens/s, {d['vs_synchronous']:.2f}x the "
                  f"synchronous run's; {d['note']}")
        if warn:
            print(f"warning: {warn}")
        if alts:
            print("instead, best for this run first: " + convergence.rank_line(alts))
        if site and site["warning"]:
            print(f"warning: {site['warning']}")
        print("estimates are approximate (analytic cost model; see BENCHMARKS.md for its "
              "calibration against published runs)")
    if args.verify:
        return _verify(cfg, target, w, best)
    return 0


def _verify(cfg, target, w, best) -> int:
    if not target.is_tpu:
        raise ConfigError("--verify compiles for TPUs only; this target is a GPU")
    spec = best.layout.run_spec(w)
    spec.check_runnable(f"the best layout {best.layout.text()}", "verify")
    print(f"\nverifying {best.layout.text()} by compiling the train step for "
          f"{target.topology_name} x {target.n_slices} ...", file=sys.stderr)
    return compile_and_compare(cfg, target, spec, w.seq, w.batch, as_json=False, save=None,
                               estimate_=best)
