"""`megamesh compile`: prove a plan before the hardware exists, by compiling megamesh's
own train step for a TPU topology (compile-only devices from libtpu) and reading XLA's
memory, FLOPs and collectives; compared with the planner's prediction field by field."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from megamesh.cli.common import split_overrides
from megamesh.config import ModelConfig
from megamesh.errors import ConfigError
from megamesh.model.backend import choose_kernels, planner_kernels
from megamesh.model.source import model_config
from megamesh.model.specs import WEIGHT_FORMATS
from megamesh.plan.cost import estimate
from megamesh.plan.layout import Layout, Workload, place, run_layout
from megamesh.plan.memory import decode_memory
from megamesh.plan.search import search
from megamesh.plan.target import Target, parse_target
from megamesh.runspec import PRECISIONS, REMAT_POLICIES, SEARCHED_REMATS, RunSpec, read_plan
from megamesh.sharding.logical import parse_layout
from megamesh.train.config import DataConfig, ScheduleConfig, TrainConfig
from megamesh.train.config import document_mask as document_mask_on

GiB = 2**30


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="compile the real train step for a TPU topology from this "
                       "CPU and report HBM per device, FLOPs and collectives")
    p.add_argument("--model", default="llama3.1-8b", help="preset, config file or HF directory")
    p.add_argument("--target", default="tpu7x:2x2x2",
                   help="TPU topology or chip count: tpu7x:16x16x36, v5p:2x2x2, tpu7x:256")
    p.add_argument("--slices", type=int, default=None,
                   help="pods/slices of the topology joined by DCN (multi-pod)")
    p.add_argument("--mesh", help="layout, e.g. dcn=2,fsdp=256,tensor=4 (default: the plan's best)")
    p.add_argument("--plan", help="a `megamesh plan --json` file: compile its best layout")
    p.add_argument("--step", default="train",
                   help="train (the step of `megamesh train`) or decode (the serving engine's "
                   "step: --batch slots, --seq context length, bf16 weights)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, help="global batch in sequences (default: 1 per chip)")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--pipeline-microbatches", type=int, default=None,
                   help="with a stage axis in --mesh: microbatches per pipeline pass "
                        "(default: as many as stages)")
    p.add_argument("--pipeline-virtual", type=int, default=None,
                   help="with a stage axis in --mesh: chunks per stage (1: GPipe, > 1: circular)")
    p.add_argument("--remat", help=f"{', '.join(r for r in REMAT_POLICIES if r != 'auto')} (default: "
                   "the plan's; with --mesh, full; else the planner's best)")
    p.add_argument("--kernels", default="auto",
                   help="kernel overrides, e.g. attention=reference,moe=einsum (default: the "
                   "TPU's: splash attention, grouped MoE, native bf16 matmuls)")
    p.add_argument("--document-mask", choices=("auto", "on", "off"), default="auto",
                   help="train step: attention within each packed document (segment ids through "
                   "the attention kernel); auto: on from seq 8192, as `megamesh train`")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the layers' matmuls: bf16 (default) or fp8 (model/quant.py)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="bf16",
                   help="--step decode: the layers' matmul weights as `megamesh serve --weights` "
                   "holds them")
    p.add_argument("--save", help="write the serialized executable to this new file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if args.step not in ("train", "decode"):
        raise ConfigError(f"--step {args.step!r} is not allowed: one of train, decode")
    if args.save:
        if Path(args.save).exists():  # say so before minutes of compiling, not after
            raise ConfigError(f"{args.save} already exists: megamesh does not overwrite outputs; "
                              "choose another path or remove it")
    over = split_overrides(extra, ("model",))
    cfg = model_config(args.model, over["model"])
    target = parse_target(args.target)
    if args.slices:
        if args.slices < 1:
            raise ConfigError(f"--slices {args.slices} is not allowed: must be >= 1")
        target = Target(target.chip, args.slices * target.n_slices, target.slice_chips,
                        target.topology)
    kernels = choose_kernels("tpu", args.kernels)  # checked before minutes of compiling
    spec = RunSpec(layout=args.mesh or "", remat=args.remat or "full", microbatches=args.microbatches,
                   kernels=args.kernels, precision=args.precision or "bf16",
                   pipeline_microbatches=args.pipeline_microbatches or 0,
                   pipeline_virtual=args.pipeline_virtual or 1)
    seq, batch = args.seq, args.batch
    if args.plan:
        plan = read_plan(args.plan)
        plan.spec.check_runnable(f"--plan {args.plan}: its layout {plan.spec.layout}", "compile")
        # the plan's run, with the flags given here on top
        spec = plan.spec.replace(**{k: v for k, v in (("layout", args.mesh), ("remat", args.remat),
                                                      ("pipeline_microbatches", args.pipeline_microbatches),
                                                      ("pipeline_virtual", args.pipeline_virtual))
                                    if v}, kernels=args.kernels if args.kernels != "auto"
                                 else plan.spec.kernels, precision=args.precision or plan.spec.precision)
        seq, batch = plan.seq_len, batch or plan.global_batch
    batch = batch or target.chips
    if args.step == "decode":
        return compile_decode_and_compare(cfg, target, spec.layout or f"tensor={target.slice_devices}",
                                          seq, batch, as_json=args.json, save=args.save,
                                          weights=args.weights)
    est = None
    if not spec.layout:
        res = search(Workload(cfg, seq, batch, spec.precision, kernels=planner_kernels(kernels)), target,
                     remats=(args.remat,) if args.remat else SEARCHED_REMATS)
        if not res.ranked:
            raise ConfigError(f"the planner finds no layout of {cfg.name} that fits "
                              f"{target.describe()}; give --mesh to compile one anyway")
        est = res.ranked[0]
        spec = spec.replace(layout=est.layout.text(), remat=est.layout.remat,
                            microbatches=est.layout.microbatches)
    return compile_and_compare(cfg, target, spec, seq, batch, as_json=args.json, save=args.save,
                               estimate_=est, document_mask={"auto": None, "on": True,
                                                             "off": False}[args.document_mask])


def compile_and_compare(cfg: ModelConfig, target: Target, spec: RunSpec, seq: int, batch: int, *,
                        as_json: bool, save: str | None, estimate_: Any = None,
                        document_mask: bool | None = None) -> int:
    """Compile the train step of `spec` for `target` and compare with the plan (exit 3
    when it does not fit)."""
    if spec.remat == "auto":
        spec = spec.replace(remat="full")
    sizes = parse_layout(spec.layout)
    tc = TrainConfig(global_batch=batch, seq_len=seq, steps=2, run=spec,
                     schedule=ScheduleConfig(warmup_steps=1),
                     data=DataConfig(document_mask=document_mask))
    chosen = choose_kernels("tpu", spec.kernels, sizes)
    if estimate_ is None:
        lay = run_layout(spec, target)
        passes = spec.microbatches if lay.stages > 1 else 1  # accumulation around a pipeline
        estimate_ = estimate(Workload(cfg, seq, batch // passes, spec.precision,
                                      kernels=planner_kernels(chosen)), target, lay)
    print(f"compiling {cfg.name} train step (seq {seq}, batch {batch}, {spec.microbatches} "
          f"microbatches, remat {spec.remat}, kernels {chosen.describe()}"
          f"{', document mask' if document_mask_on(tc) else ''}) for "
          f"{target.describe()} with {spec.layout} ...", file=sys.stderr)
    from megamesh.compile.aot import compile_train  # jax: only once a compile is asked for

    r = compile_train(cfg, tc, target, save=save)
    # the planner's step for this layout in both precisions (the FP8 speed-up it predicts)
    by_precision = {p: estimate(Workload(cfg, seq, batch, p, kernels=planner_kernels(chosen)),
                                target, estimate_.layout) for p in PRECISIONS}
    precisions = {p: {"step_time_s": e.step_time_s, "mfu": e.mfu} for p, e in by_precision.items()}
    precisions["fp8_speedup"] = by_precision["bf16"].step_time_s / by_precision["fp8"].step_time_s
    pred = {"hbm_per_device_bytes": estimate_.memory.total, "flops": estimate_.flops_per_device}
    got = {"hbm_per_device_bytes": r.hbm["total"], "flops": r.flops}
    err = {k: (pred[k] / got[k] - 1) if got[k] else None for k in pred}
    from megamesh.model.pipeline import schedule
    from megamesh.train.step import pipeline_stages
    stages = pipeline_stages(cfg, tc, sizes)
    pipe = None
    if stages is not None:  # the schedule the compiled step runs vs the planner's bubble
        table = schedule(stages.stages, stages.microbatches, stages.repeats)
        idle = float((table < 0).mean())
        pipe = {"stages": stages.stages, "microbatches": stages.microbatches,
                "repeats": stages.repeats, "iterations": int(table.shape[0]),
                "schedule_idle_share": idle, "schedule_bubble_over_busy": idle / (1 - idle),
                "planner_bubble_over_busy": estimate_.layout.bubble}
    if as_json:
        out = r.to_json()
        out["document_mask"] = document_mask_on(tc)
        if pipe:
            out["pipeline"] = pipe
        out["plan"] = {"prediction": pred, "relative_error": err, "fits": estimate_.fits,
                       "hbm_parts_bytes": estimate_.memory.parts(),
                       "step_time_s": estimate_.step_time_s, "mfu": estimate_.mfu,
                       "by_precision": precisions}
        print(json.dumps(out, indent=2))
    else:
        _print_verdict(r, target)
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in r.hbm.items() if k != "total")
        print(f"  kernels: {r.extra.get('kernels', '')}")
        if r.extra.get("libtpu_flags"):
            print(f"  libtpu: {' '.join(r.extra['libtpu_flags'])} (across slices libtpu 0.0.42.1 "
                  "aborts lowering some all-gathers to the SparseCore: megamesh.platform)")
        if "context_parallel_gathers" in r.extra:
            g = r.extra["context_parallel_gathers"]
            print(f"  context-parallel all-gathers (keys, values, segment ids): {len(g)} asynchronous, "
                  f"{sum(x['compute_between'] > 0 for x in g)} with compute scheduled while in flight")
        print(f"  HBM per device (GiB): {parts}")
        if pipe:
            print(f"  pipeline: {stages.describe()}; the schedule runs {pipe['iterations']} "
                  f"iterations, {pipe['schedule_idle_share']:.1%} of its stage-iterations idle "
                  f"= {pipe['schedule_bubble_over_busy']:.1%} of the busy time; the planner's "
                  f"(P - 1) / (V M): {pipe['planner_bubble_over_busy']:.1%}")
        share = r.extra.get("fp8_matmul_share")
        if share is not None and spec.precision == "fp8":
            print(f"  FP8 matmuls: {share:.1%} of the optimized HLO's dot FLOPs "
                  f"({', '.join(f'{k} {v:.3g}' for k, v in r.extra['matmul_flops_by_type'].items())}); "
                  f"{r.extra['fp8_share_with_kernels']:.1%} of all matmul FLOPs with attention's "
                  "kernels (bf16)")
        print("  planned step for this layout: " + ", ".join(
            f"{p} {precisions[p]['step_time_s']:.2f} s ({precisions[p]['mfu']:.1%} MFU of the bf16 peak)"
            for p in PRECISIONS) + f"; FP8 speed-up {precisions['fp8_speedup']:.2f}x")
        print(f"  matmul FLOPs per device: {r.flops:.4g} (XLA cost analysis, loop bodies once: "
              f"{r.xla_flops:.4g}; our count in that convention: {r.flops_xla_convention:.4g})")
        _print_collectives_and_times(r)
        print("plan vs compile: " + ", ".join(
            f"{k} {pred[k]:.4g} vs {got[k]:.4g} ({err[k]:+.1%})" for k in pred if err[k] is not None))
    return 0 if r.fits else 3


def compile_decode_and_compare(cfg: Any, target: Any, mesh: str, max_len: int, batch: int, *,
                               as_json: bool, save: str | None, weights: str = "bf16") -> int:
    sizes = parse_layout(mesh)
    lay = Layout(sizes, placement=place(sizes, target))
    mem = decode_memory(cfg, lay, batch, max_len, tpu=target.is_tpu, weights=weights)
    print(f"compiling {cfg.name} decode step ({batch} slots x {max_len} tokens, {weights} weights) "
          f"for {target.describe()} with {mesh} ...", file=sys.stderr)
    from megamesh.compile.aot import compile_decode

    r = compile_decode(cfg, target, mesh, batch, max_len, save=save, weights=weights)
    err = mem.total / r.hbm["total"] - 1 if r.hbm.get("total") else None
    if as_json:
        out = r.to_json()
        out["plan"] = {"prediction": {"hbm_per_device_bytes": mem.total},
                       "relative_error": {"hbm_per_device_bytes": err},
                       "hbm_parts_bytes": {"weights": mem.state, "kv_cache": mem.activations,
                                           "logits": mem.working},
                       "fits": mem.total <= target.chip.device_hbm_bytes}
        print(json.dumps(out, indent=2))
    else:
        _print_verdict(r, target)
        print(f"  weights {mem.state / GiB:.2f} GiB, KV cache {mem.activations / GiB:.2f} GiB "
              "per device (plan)")
        _print_collectives_and_times(r)
        if err is not None:
            print(f"plan vs compile: hbm_per_device_bytes {mem.total:.4g} vs {r.hbm['total']:.4g} "
                  f"({err:+.1%})")
    return 0 if r.fits else 3


def _print_verdict(r: Any, target: Any) -> None:
    cap = r.hbm_capacity_bytes / GiB
    print(f"target {r.target} x {target.n_slices} slice(s), {r.devices:,} devices, layout "
          f"{r.layout}")
    if not r.fits:
        print(f"does not fit: needs {r.hbm['total'] / GiB:.1f} GiB, has {cap:.1f} GiB per device")
    else:
        print(f"fits: {r.hbm['total'] / GiB:.2f} GiB of {cap:.0f} GiB per device")
    if r.hbm.get("host_temp"):
        print(f"host memory (offloaded activations): {r.hbm['host_temp'] / GiB:.2f} GiB per device")


def _print_collectives_and_times(r: Any) -> None:
    for c in r.collectives:
        print(f"  {c['kind']:<20} x{c['count']:<6} {c['bytes'] / GiB:10.3f} GiB")
    print(f"  lower {r.lower_s:.1f} s, compile {r.compile_s:.1f} s")
