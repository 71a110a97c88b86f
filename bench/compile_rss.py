"""Where `megamesh compile`'s memory goes: VmRSS and VmHWM (peak) after each phase (the
topology's compile-only devices, the step built, lowering and the jaxpr, XLA's compile,
the HLO text and its parse), by wrapping those calls from outside the product.

  python bench/compile_rss.py compile --model llama3.1-405b --target tpu7x:16x16x36 \\
      --slices 109 --seq 8192 --batch 125568

TRIM_PERIOD_S=0.25 sets how often `compile` trims glibc's free memory while XLA runs
(`megamesh.platform.returning_freed_host_memory`; default 1 s).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

import jax.stages

import megamesh.compile.aot as aot
from megamesh.cli import main

T0 = time.perf_counter()


def mem(tag: str) -> None:
    d = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                d[k] = int(v.split()[0]) / 1e6
    print(f"[{time.perf_counter() - T0:7.1f}s] {tag:34s} RSS {d['VmRSS']:6.2f} GB  "
          f"peak {d['VmHWM']:6.2f} GB", flush=True)


def after(fn: Any, tag: str) -> Any:
    def wrapped(*a: Any, **k: Any) -> Any:
        r = fn(*a, **k)
        mem(tag)
        return r
    return wrapped


def collectives(text: str) -> Any:
    mem(f"as_text ({len(text) / 1e6:.0f} MB of HLO)")
    r = real_collectives(text)
    mem("collectives parsed")
    return r


def compile_(self: Any, *a: Any, **k: Any) -> Any:
    mem("lowered + jaxpr")
    r = real_compile(self, *a, **k)
    mem("compiled by XLA")
    return r


real_collectives, real_compile = aot.collectives, jax.stages.Lowered.compile
aot.topology_devices = after(aot.topology_devices, "topology devices")
aot.build_train_step = after(aot.build_train_step, "build_train_step")
aot.collectives = collectives
jax.stages.Lowered.compile = compile_
if os.environ.get("TRIM_PERIOD_S"):  # experiments: how often compile hands freed memory back
    aot.returning_freed_host_memory = functools.partial(
        aot.returning_freed_host_memory, period_s=float(os.environ["TRIM_PERIOD_S"]))

if __name__ == "__main__":
    mem("imports")
    rc = main(sys.argv[1:])
    mem("done")
    sys.exit(rc)
