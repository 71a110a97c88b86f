"""Pick jax's platform before jax is imported.

libtpu is installed for compile-only TPU targets; on a machine without TPUs its plugin
would still try to start and print warnings. Where no TPU, GPU plugin or explicit
JAX_PLATFORMS is present, run on the CPU. Compile-only TPU topologies work either way.
"""

from __future__ import annotations

import glob
import importlib.util
import os


def default_to_cpu_without_accelerator() -> None:
    if "JAX_PLATFORMS" in os.environ or "jax" in __import__("sys").modules:
        return
    on_tpu_vm = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    has_gpu_plugin = any(importlib.util.find_spec(m) is not None
                         for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin"))
    if not on_tpu_vm and not has_gpu_plugin:
        os.environ["JAX_PLATFORMS"] = "cpu"
