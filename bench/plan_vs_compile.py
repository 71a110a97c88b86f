"""The planner's HBM per device and FLOPs vs XLA:TPU's for the same train step and layout.

Each case compiles megamesh's real train step for a TPU topology on this CPU (libtpu,
compile-only devices) and prints a markdown row for BENCHMARKS.md. Slow (tens of seconds
per case on 2 cores):

    python bench/plan_vs_compile.py            # all cases
    python bench/plan_vs_compile.py --quick    # the small ones
    python bench/plan_vs_compile.py --long     # long contexts (16k-128k tokens)
"""

from __future__ import annotations

import sys
import time

from megamesh.config import preset
from megamesh.plan.cost import estimate
from megamesh.plan.layout import Layout, Workload, place
from megamesh.plan.target import parse_target
from megamesh.runspec import RunSpec
from megamesh.sharding.mesh import parse_layout
from megamesh.train.config import ScheduleConfig, TrainConfig

GiB = 2**30
SMALL = dict(d_model=1024, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=3584, vocab_size=32000)
L4 = dict(n_layers=4)

# (model, overrides, target, layout, seq, batch, remat, microbatches, quick)
CASES = [
    ("llama3.1-8b", SMALL, "tpu7x:2x2x1", "fsdp=8", 2048, 8, "full", 1, True),
    ("llama3.1-8b", SMALL, "v5p:2x2x1", "fsdp=2,tensor=2", 2048, 8, "none", 1, True),
    ("llama3.1-8b", SMALL, "v6e:2x2", "data=2,fsdp=2", 2048, 8, "dots", 1, True),
    ("llama3.1-8b", SMALL, "v6e:2x2", "fsdp=2,tensor=2", 2048, 8, "none", 1, True),
    ("llama3.1-8b", SMALL, "v6e:2x2", "fsdp=4", 2048, 8, "full", 1, True),
    ("llama3.1-8b", SMALL, "v6e:4x4", "fsdp=16", 2048, 16, "dots_no_batch", 1, True),
    ("llama3.1-8b", {**SMALL, "vocab_size": 8000}, "tpu7x:2x2x1", "fsdp=8", 2048, 8, "full", 1,
     True),
    ("llama3.1-8b", SMALL, "tpu7x:2x2x1", "fsdp=8", 2048, 16, "full", 1, True),
    ("llama3.1-8b", {**SMALL, "n_layers": 8}, "tpu7x:2x2x1", "fsdp=8", 2048, 8, "full", 1, True),
    ("llama3.1-8b", L4, "tpu7x:2x2x2", "fsdp=16", 2048, 16, "full", 1, False),
    ("llama3.1-8b", L4, "tpu7x:4x4x4", "fsdp=128", 2048, 128, "full", 1, False),
    ("llama3.1-8b", L4, "tpu7x:2x2x2", "fsdp=16", 1024, 16, "none", 1, False),
    ("llama3.1-8b", L4, "v5p:2x2x2", "fsdp=4,tensor=2", 2048, 8, "dots", 1, False),
    ("llama3.1-8b", L4, "v6e:4x4", "fsdp=8,tensor=2", 4096, 32, "full", 2, False),
    ("llama3.1-8b", L4, "v5p:2x2x2", "data=2,fsdp=4", 2048, 16, "dots_no_batch", 2, False),
    ("llama3.1-8b", L4, "tpu7x:2x2x2", "fsdp=8,sequence=2", 4096, 8, "full", 1, False),
    ("llama3.1-405b", {}, "tpu7x:16x24x24", "data=9,fsdp=256,tensor=8", 2048, 2304, "full", 1,
     False),
]

# Long contexts (`--long`): flash kernels hold no T x T probabilities, context parallelism
# gathers each layer's keys and values (BENCHMARKS.md "Long context").
LONG_CASES = [
    ("llama3.1-8b", SMALL, "tpu7x:2x2x1", "fsdp=8", 32768, 8, "full", 1, False),
    ("llama3.1-8b", SMALL, "tpu7x:2x2x1", "fsdp=2,sequence=4", 32768, 8, "full", 1, False),
    ("llama3.1-8b", SMALL, "tpu7x:2x2x1", "fsdp=8", 16384, 8, "none", 1, False),
    ("llama3.1-8b", SMALL, "tpu7x:2x2x1", "fsdp=2,sequence=4", 32768, 8, "none", 1, False),
    ("llama3.1-8b", SMALL, "tpu7x:2x2x1", "fsdp=2,sequence=2,tensor=2", 32768, 8,
     "dots_no_batch", 1, False),
    ("llama3.1-8b", L4, "tpu7x:2x2x2", "fsdp=4,sequence=4", 65536, 16, "full", 1, False),
    ("llama3.1-70b", {}, "tpu7x:256", "fsdp=8,sequence=16,tensor=4", 131072, 64, "full", 8,
     False),
    ("llama3.1-70b", {}, "tpu7x:256", "fsdp=16,sequence=32", 131072, 64, "full", 4, False),
    ("llama3.1-70b", {}, "tpu7x:256", "data=8,sequence=32,tensor=2", 131072, 64, "none", 8, False),
    ("llama3.1-70b", {}, "tpu7x:256", "fsdp=64,sequence=8", 131072, 64, "full", 1, False),
]


def main() -> int:
    from megamesh.compile.aot import compile_train

    quick = "--quick" in sys.argv
    print("| model | target | layout | seq | batch | remat | mb | plan HBM/dev | XLA HBM/dev "
          "| HBM error | plan fits | XLA fits | FLOPs error | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    cases = LONG_CASES if "--long" in sys.argv else CASES
    for name, over, tgt, lay, seq, batch, remat, mb, is_quick in cases:
        if quick and not is_quick:
            continue
        cfg = preset(name).replace(**over)
        target = parse_target(tgt)
        sizes = parse_layout(lay)
        est = estimate(Workload(cfg, seq, batch), target,
                       Layout(sizes, remat=remat, microbatches=mb, placement=place(sizes, target)))
        tc = TrainConfig(global_batch=batch, seq_len=seq, steps=2, schedule=ScheduleConfig(warmup_steps=1),
                         run=RunSpec(layout=lay, remat=remat, microbatches=mb))
        t0 = time.perf_counter()
        r = compile_train(cfg, tc, target)
        wall = time.perf_counter() - t0
        got = r.hbm["total"]
        extra = {k: v for k, v in over.items() if SMALL.get(k) != v}
        label = name + ("" if not over else " (4 layers)" if over is L4 else
                        " (small)" if not extra else f" (small, {extra})")
        print(f"| {label} | {tgt} | {lay} | {seq} | {batch} | {remat} | {mb} "
              f"| {est.memory.total / GiB:.2f} GiB | {got / GiB:.2f} GiB "
              f"| {est.memory.total / got - 1:+.1%} | {'yes' if est.fits else 'no'} "
              f"| {'yes' if r.fits else 'no'} | {est.flops_per_device / r.flops - 1:+.1%} "
              f"| {wall:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
