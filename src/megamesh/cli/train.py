"""`megamesh train`: sharded, checkpointed, resumable training on the available devices."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from megamesh.cli.common import parse_diloco, split_overrides
from megamesh.errors import ConfigError
from megamesh.model.source import model_config
from megamesh.runspec import PRECISIONS, read_plan
from megamesh.settings import apply_overrides
from megamesh.train.config import TrainConfig, default_warmup

_FOR_LIFE = contextlib.ExitStack()  # never closed: what `megamesh train` routes for the whole process


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (default: tiny on the Python stdlib source)",
                       description="Train on this machine's devices. Override any training field "
                       "with --train.KEY=VALUE and any model field with --model.KEY=VALUE.")
    p.add_argument("--model", default=None,
                   help="preset name, config file (.json/.yaml) or Hugging Face directory "
                   "(default: the --plan's model, else tiny); override fields with --model.FIELD=VALUE")
    p.add_argument("--plan", help="a `megamesh plan --json` file: run its model, sequence length, "
                   "batch and run spec (layout, remat, microbatches, kernels); flags override it")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, tokenizer)")
    p.add_argument("--data", nargs="+", default=None,
                   help="text files or folders, .jsonl (text field), .parquet (text column), packed in "
                   "memory; or prepared datasets (`megamesh data prepare`; folders or URLs such as "
                   "gs://...), streamed, mixed by weight as a:0.7,b:0.3 or a YAML file of "
                   "sources; default: the Python standard library's source")
    p.add_argument("--mesh", default=None, help="layout such as data=2,fsdp=4 (default: all devices on fsdp)")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch", type=int, help="global batch in sequences")
    p.add_argument("--seq", type=int, help="sequence length in tokens")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--accum", type=int, help="gradient-accumulation microbatches per step")
    p.add_argument("--remat", help="remat policy: auto (default: the fastest that fits), none, dots, "
                   "dots_no_batch, full, offload (layer inputs and attention projections to host memory)")
    p.add_argument("--kernels", help="kernel overrides, e.g. attention=blockwise,moe=einsum "
                   "(default: the platform's; see model/backend.py)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the layers' matmuls: bf16 (default) or fp8 (e4m3 forward, e5m2 gradients, "
                   "f32 master weights; see model/quant.py)")
    p.add_argument("--resume", action="store_true", help="continue from the latest good checkpoint in --out")
    p.add_argument("--new-data", action="store_true",
                   help="with --resume and --data: continue on documents other than those the run "
                   "trained on (packed with its tokenizer; recorded in OUT/data/corpus.json)")
    p.add_argument("--elastic", action="store_true",
                   help="keep the global batch on any device count: a restart on fewer (or more) "
                   "data-parallel groups takes more (or fewer) microbatches; see train.loop.fit_elastic")
    p.add_argument("--diloco", metavar="islands=N,inner_steps=H",
                   help="decoupled training: this job is one of N islands that average their "
                   "parameters every H steps (an outer Nesterov step; train.diloco.* for "
                   "outer_lr, outer_momentum, quorum, wait_s); every island passes the same "
                   "--out and its own --island")
    p.add_argument("--island", type=int, help="with --diloco: which island this job is, 0..N-1")
    p.add_argument("--no-progress", action="store_true", help="plain log lines even in a terminal")
    p.set_defaults(run=run)


def build_configs(args: argparse.Namespace, extra: list[str]):
    """(model config, train config): the --plan's run, then --train.* overrides, then flags."""
    over = split_overrides(extra, ("model", "train"))
    train_over: dict[str, object] = {}
    model = args.model
    if args.plan:
        plan = read_plan(args.plan)
        plan.spec.check_runnable(f"--plan {args.plan}", "train")
        model = model or plan.model
        train_over.update({"seq_len": plan.seq_len, "global_batch": plan.global_batch})
        train_over.update({f"run.{k}": v for k, v in plan.spec.to_dict().items()})
    args.model = model or "tiny"
    cfg = model_config(args.model, over["model"])
    train_over.update(over["train"])
    for flag, key in (("steps", "steps"), ("batch", "global_batch"), ("seq", "seq_len"),
                      ("lr", "optimizer.lr"), ("mesh", "run.layout"), ("remat", "run.remat"),
                      ("accum", "run.microbatches"), ("kernels", "run.kernels"),
                      ("precision", "run.precision")):
        if getattr(args, flag) is not None:
            train_over[key] = getattr(args, flag)
    if args.diloco:
        islands, inner = parse_diloco(args.diloco)
        train_over["diloco.islands"] = islands
        if inner is not None:
            train_over["diloco.inner_steps"] = inner
    if "steps" in train_over and "schedule.warmup_steps" not in train_over:
        train_over["schedule.warmup_steps"] = default_warmup(int(train_over["steps"]))
    return cfg, apply_overrides(TrainConfig(), train_over, "train.")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    cfg, tc = build_configs(args, extra)
    from megamesh.data.tokenizer import model_tokenizer
    from megamesh.model.source import load_weights
    from megamesh.platform import keep_freed_host_memory
    from megamesh.train.distributed import initialize_from_env
    from megamesh.train.loop import train

    keep_freed_host_memory()  # before jax starts its threads
    initialize_from_env()
    import jax

    if "JAX_COMPILATION_CACHE_DIR" not in os.environ and not jax.config.jax_compilation_cache_dir:
        # compiled steps persist in the run: a restart (a failure, a preemption, an elastic
        # resize back to a size seen before) loads them instead of compiling again. A
        # JAX_COMPILATION_CACHE_DIR in the environment (even empty: none) is left to jax.
        jax.config.update("jax_compilation_cache_dir", str(Path(args.out).absolute() / "compile_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    from megamesh.model.backend import choose_kernels

    choose_kernels(jax.default_backend(), tc.run.kernels)  # a bad --kernels fails before data prep
    from megamesh.train.checkpoint import orbax_log_to

    # Orbax's tracebacks to a file for the rest of the process (a failed save's abandoned
    # writers are reported when collected, up to exit; `train` routes to the same file);
    # and at exit, after module teardown has undone that, the RuntimeWarning for such a
    # writer coroutine would be the second line of a one-line error
    _FOR_LIFE.enter_context(orbax_log_to(Path(args.out) / "orbax.log"))
    warnings.filterwarnings("ignore", message="coroutine '.*' was never awaited", category=RuntimeWarning)
    if args.new_data and not (args.resume and args.data):
        raise ConfigError("--new-data goes with --resume and --data (the documents to continue on)")
    result = train(cfg, tc, args.out, data_paths=args.data, resume=args.resume, new_data=args.new_data,
                   elastic=args.elastic, island=args.island,
                   progress=False if args.no_progress else None,
                   initial_params=load_weights(args.model), tokenizer=model_tokenizer(args.model))
    if result.preempted:
        sys.stdout.flush()
        return 143
    return 0
