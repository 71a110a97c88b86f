"""Pick jax's platform before jax is imported.

libtpu is installed for compile-only TPU targets; on a machine without TPUs its plugin
would still try to start and print warnings. Where no TPU, GPU plugin or explicit
JAX_PLATFORMS is present, run on the CPU. Compile-only TPU topologies work either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.util
import os
import platform
import re
import sys
import threading
from collections.abc import Iterator
from typing import Any


def on_tpu_vm() -> bool:
    """This host has TPU chips attached."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def quiet_compile_only_libtpu(chip: str) -> None:
    """Before libtpu loads on a host without TPUs (compile-only topologies): tell it the
    worker hostnames and accelerator type it would otherwise look up in the TPU VM
    metadata, failing with `E0000 ... unexpected worker hostname` and `Failed to find host
    bounds` lines on stderr (harmless for compiling, alarming to read). A user's own
    settings win; on a TPU VM nothing is set."""
    if on_tpu_vm():
        return
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip}-8")


# libtpu 0.0.42.1 aborts the process (a CHECK in offload_collective_strategies.cc:
# "(kReplicaInfoEntryCount * core_count) % hbm_granule_words == 0") lowering some
# all-gathers to the SparseCore across slices: seen for Llama 3.1 405B on 2 to 109
# Ironwood pods with dcn and sequence axes (remat none and dots_no_batch; the backward's
# weight gathers over fsdp x sequence), 2026-12-05. Multi-slice compiles run those
# all-gathers on the TensorCores instead.
MULTISLICE_LIBTPU_FLAGS = ("--xla_tpu_enable_sparse_core_collective_offload_all_gather=false",)


def multislice_libtpu_flags() -> list[str]:
    """Add MULTISLICE_LIBTPU_FLAGS to LIBTPU_INIT_ARGS (before libtpu loads; a flag the
    user set there wins). Returns `multislice_flags_in_effect()`."""
    have = os.environ.get("LIBTPU_INIT_ARGS", "")
    added = [f for f in MULTISLICE_LIBTPU_FLAGS if f.split("=")[0] not in have]
    if added:
        os.environ["LIBTPU_INIT_ARGS"] = " ".join(filter(None, [have, *added]))
    return multislice_flags_in_effect()


def multislice_flags_in_effect() -> list[str]:
    """Which of MULTISLICE_LIBTPU_FLAGS LIBTPU_INIT_ARGS holds."""
    return [f for f in MULTISLICE_LIBTPU_FLAGS if f in os.environ.get("LIBTPU_INIT_ARGS", "").split()]


def default_to_cpu_without_accelerator() -> None:
    if "JAX_PLATFORMS" in os.environ or "jax" in __import__("sys").modules:
        return
    has_gpu_plugin = any(importlib.util.find_spec(m) is not None
                         for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin"))
    if not on_tpu_vm() and not has_gpu_plugin:
        os.environ["JAX_PLATFORMS"] = "cpu"


def _glibc(name: str) -> Any:
    """glibc's function `name` (Linux with glibc only; else None)."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def keep_freed_host_memory() -> bool:
    """Let glibc keep freed host memory for reuse instead of handing it back to the OS.

    XLA:CPU allocates an executable's temporaries on every run. Large ones come from
    glibc's per-thread arenas, which cannot grow past 64 MiB and so mmap them and munmap
    them on free: every train or decode step page-faults its temporaries in again
    (measured on the CPU bench model: 112,800 minor faults = 460 MB per step, 0.67 s ->
    0.55 s without them). One arena (the main heap, which grows), no mmap and a 2 GiB
    trim threshold make the next run reuse the same pages. The price: the process keeps
    its peak heap, and XLA compiles ~1.5x slower with every thread on one arena's lock
    (bench model 3.0 -> 4.6 s; llama3.1-8b for tpu7x 49 -> 83 s), so only `megamesh
    train`, which compiles once and then runs steps, calls it; compile, serve (start-up
    compiles dozens of decode variants) and the rest do not. Call before jax starts its
    threads; MEGAMESH_KEEP_HOST_MEMORY=0 turns it off. Returns whether it was applied
    (glibc on Linux only).

    Not applied when XLA_FLAGS splits the host into several CPU devices: their threads
    then contend for the one arena's lock, which costs more than the faults (8 fake
    devices, bench model, 2026-11-26: one arena 7.4-8.7 s per step, glibc's defaults
    6.5 s, two arenas 6.3-6.5 s, single runs on a noisy host).
    """
    if os.environ.get("MEGAMESH_KEEP_HOST_MEMORY", "1") == "0":
        return False
    forced = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if forced and int(forced.group(1)) > 1:
        return False
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    return all(mallopt(param, value) == 1 for param, value in (
        (m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)))


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_AFTER = 32 * 2**20  # the most glibc's own sliding threshold reaches (64-bit)


@contextlib.contextmanager
def returning_freed_host_memory(period_s: float = 1.0,
                                mmap_threshold: int = 2**20) -> Iterator[bool]:
    """While the block runs, hand the memory glibc holds free back to the OS: blocks of
    `mmap_threshold` bytes and more get their own mappings (unmapped when freed) and a
    background thread calls `malloc_trim(0)` every `period_s` seconds (glibc on Linux
    only, else nothing; yields whether it runs).

    For long XLA compiles of huge device counts: XLA frees and reallocates per-device
    structures pass after pass, and glibc's arenas keep what was freed, so the process's
    resident memory is far above what it uses. glibc's own threshold for mapping a block
    slides up (to 32 MiB) as mapped blocks are freed, so after a while XLA's multi-MB
    per-device tables land in the arenas too. Measured on the 405B step for 32 Ironwood
    pods (589,824 devices; BENCHMARKS.md "The million-chip compile"): at the resident peak
    glibc's arenas held 8.95 GB, 5.51 GB of it in use; peak RSS 9.41 GB untrimmed, 6.36 GB
    trimming every second, 5.93 GB every 0.25 s with a 1 MiB mapping threshold. At 109
    pods a trim every 0.25 s cost ~30 s of compile time (each walks ~18 GB of arenas
    under their locks), so the default is one a second. Afterwards the mapping threshold
    stays fixed at MMAP_THRESHOLD_AFTER (glibc cannot go back to sliding).
    MEGAMESH_TRIM_HOST_MEMORY=0 turns all of it off.
    """
    trim, mallopt = _glibc("malloc_trim"), _glibc("mallopt")
    if trim is None or mallopt is None or os.environ.get("MEGAMESH_TRIM_HOST_MEMORY", "1") == "0":
        yield False
        return
    mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(period_s):
            trim(0)

    t = threading.Thread(target=loop, name="megamesh-malloc-trim", daemon=True)
    t.start()
    try:
        yield True
    finally:
        stop.set()
        t.join()
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_AFTER)
