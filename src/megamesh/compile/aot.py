"""Lower and compile megamesh's train step for a TPU topology that is not attached.

`jax.experimental.topologies.get_topology_desc` (with libtpu installed) gives
compile-only TPU devices for any topology, `num_slices` pods of it joined by DCN. The
mesh, state and batch are built over those devices exactly as `megamesh train` builds
them on real ones, and the *same* jitted function object (`build_train_step(...).fn`)
is lowered with abstract (`ShapeDtypeStruct`) arguments and compiled by XLA:TPU.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from megamesh.compile.hlo import async_overlap, collectives, dot_flops, fp8_share, matmul_flops
from megamesh.config import ModelConfig
from megamesh.errors import MegameshError
from megamesh.fileio import write_new_file
from megamesh.model.kernels import CP_GATHER
from megamesh.plan.target import Target
from megamesh.platform import (
    multislice_flags_in_effect,
    multislice_libtpu_flags,
    quiet_compile_only_libtpu,
    returning_freed_host_memory,
)
from megamesh.serve.step import build_decode_step
from megamesh.sharding.mesh import format_layout, make_mesh
from megamesh.sharding.rules import mesh_sizes
from megamesh.train.step import build_train_step


@dataclass
class CompileReport:
    target: str
    layout: str
    step: str
    devices: int
    fits: bool
    hbm_capacity_bytes: float
    hbm: dict[str, float]  # argument, output, alias, temp, code, total (per device)
    flops: float  # per device, matmuls, scans counted with their trip counts
    flops_xla_convention: float  # the same count with each loop body once (XLA's convention)
    xla_flops: float  # XLA cost analysis (loop bodies once; includes elementwise work)
    xla_bytes_accessed: float
    collectives: list[dict[str, Any]]
    lower_s: float
    compile_s: float
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    hlo_text: str = field(default="", repr=False)  # the optimized HLO (not in the JSON)

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "layout": self.layout, "step": self.step,
                "devices": self.devices, "fits": self.fits,
                "hbm_per_device_bytes": self.hbm, "hbm_capacity_bytes": self.hbm_capacity_bytes,
                "flops": self.flops, "flops_xla_convention": self.flops_xla_convention,
                "xla_flops": self.xla_flops, "xla_bytes_accessed": self.xla_bytes_accessed,
                "collectives": self.collectives, "lower_s": self.lower_s,
                "compile_s": self.compile_s, "error": self.error, **self.extra}


def topology_devices(target: Target) -> list[Any]:
    """Compile-only devices for the target's slice topology times its slice count."""
    if not target.is_tpu:
        raise MegameshError(f"compile needs a TPU target; {target.chip.name} is not a TPU "
                            "(plan it with `megamesh plan` instead)")
    # Compile-only use never touches a TPU: let several processes (parallel compiles, a
    # test beside a user's run) load libtpu instead of failing on its lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    quiet_compile_only_libtpu(target.chip.name)
    if target.n_slices > 1:  # read when libtpu loads: a process's first TPU compile decides
        multislice_libtpu_flags()
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology_name,
                                            num_slices=target.n_slices)
    except Exception as e:  # libtpu missing or topology unknown to it
        raise MegameshError(f"cannot build TPU topology {target.topology_name} x "
                            f"{target.n_slices} slices: {e}") from None
    devs = list(topo.devices)
    if len(devs) != target.devices:
        raise MegameshError(f"libtpu made {len(devs)} devices for {target.topology_name} x "
                            f"{target.n_slices}, expected {target.devices}")
    return devs


_OOM = re.compile(r"(?:used|needs?|requires?)\D{0,40}?([\d.]+)\s*([KMGT])i?B?.{0,80}?"
                  r"(?:of|has|limit|available)\D{0,40}?([\d.]+)\s*([KMGT])", re.I | re.S)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def compile_train(cfg: ModelConfig, tc: Any, target: Target, *,
                  save: str | None = None) -> CompileReport:
    """Compile megamesh's train step (the run spec `tc.run`: layout, remat, kernels) for
    `target`; never raises for an out-of-HBM step."""
    devs = topology_devices(target)
    mesh = make_mesh(tc.run.layout or None, devs)
    ts = build_train_step(cfg, tc, mesh, hbm_bytes=target.chip.device_hbm_bytes)
    state = ts.abstract_state()
    batch = jax.ShapeDtypeStruct((tc.global_batch, tc.seq_len + 1), jnp.int32,
                                 sharding=ts.batch_sharding)
    report = _compile(ts.fn, (state, batch), target, format_layout(mesh_sizes(mesh)), "train", save)
    report.extra["kernels"] = ts.kernels.describe()
    report.extra["remat"] = ts.remat
    report.extra["precision"] = tc.run.precision
    flags = multislice_flags_in_effect()
    if flags:
        report.extra["libtpu_flags"] = flags
    if report.hlo_text:
        # matmul FLOPs of the optimized HLO by operand types, and the FP8 share of them
        by_type = matmul_flops(report.hlo_text)
        report.extra["matmul_flops_by_type"] = by_type
        report.extra["fp8_matmul_share"] = fp8_share(by_type)
        # attention's kernels (Pallas custom calls) are no dots in the HLO: their FLOPs
        # are in the jaxpr count (report.flops); the FP8 share of all of the step's
        # matmul FLOPs, kernels included
        fp8 = fp8_share(by_type) * sum(by_type.values())
        report.extra["fp8_share_with_kernels"] = fp8 / report.flops if report.flops else 0.0
    if report.hlo_text and mesh_sizes(mesh).get("sequence", 1) > 1:
        # context parallelism's key/value (and segment id) gathers: asynchronous, and the
        # compute the scheduler runs while they are in flight
        report.extra["context_parallel_gathers"] = async_overlap(report.hlo_text, CP_GATHER)
    return report


def compile_decode(cfg: ModelConfig, target: Target, layout: str | None, batch: int,
                   max_len: int, *, dtype: str = "bfloat16", save: str | None = None,
                   weights: str = "bf16") -> CompileReport:
    """Compile the serving decode step (`serve.step.build_decode_step`) for `target`, its
    layers' weights as loaded or quantized (`weights`: fp8, int8; `model.quant`)."""
    devs = topology_devices(target)
    mesh = make_mesh(layout, devs)
    ds = build_decode_step(cfg, mesh, batch, max_len, dtype=dtype, weights=weights)
    args = ds.abstract_args(cfg)
    report = _compile(ds.fn, args, target, format_layout(mesh_sizes(mesh)), "decode", save)
    # which attention over the KV pages the step runs (`model.kernels.paged_attention`)
    ragged = "ragged_paged_attention" in str(jax.make_jaxpr(ds.fn)(*args))
    report.extra["paged_attention"] = ("ragged (Pallas TPU kernel)" if ragged
                                        else "xla (plain JAX, a block of pages at a time)")
    report.extra["weights"] = weights
    return report


def _compile(fn: Any, args: tuple, target: Target, layout: str, step: str,
             save: str | None) -> CompileReport:
    n = target.devices
    cap = target.chip.device_hbm_bytes
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    jaxpr = jax.make_jaxpr(fn)(*args)
    lower_s = time.perf_counter() - t0
    flops = dot_flops(jaxpr) / n
    flops_once = dot_flops(jaxpr, trip_counts=False) / n
    t0 = time.perf_counter()
    try:
        with returning_freed_host_memory():
            compiled = lowered.compile()
    except Exception as e:  # XLA reports out-of-HBM as a compile error
        msg = str(e)
        need = _parse_oom(msg)
        if need is None:
            raise MegameshError(f"XLA could not compile the {step} step: {msg[:2000]}") from None
        hbm = {"total": need[0]}
        return CompileReport(target.topology_name, layout, step, n, False, cap, hbm, flops,
                             flops_once, 0.0, 0.0, [], lower_s, time.perf_counter() - t0,
                             error=msg.strip().splitlines()[0][:500])
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    hbm = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
           "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
           "code": m.generated_code_size_in_bytes}
    hbm["total"] = hbm["argument"] + hbm["output"] - hbm["alias"] + hbm["temp"] + hbm["code"]
    # host memory (pinned) the step's buffers use, e.g. activations under remat "offload";
    # not HBM, so not in the total
    hbm["host_temp"] = float(getattr(m, "host_temp_size_in_bytes", 0) or 0)
    ca = compiled.cost_analysis()
    ca = (ca[0] if isinstance(ca, (list, tuple)) else ca) or {}
    if save:
        write_new_file(save, _serialize(compiled))
    text = compiled.as_text()
    return CompileReport(target.topology_name, layout, step, n, hbm["total"] <= cap, cap, hbm,
                         flops, flops_once, float(ca.get("flops", 0.0)),
                         float(ca.get("bytes accessed", 0.0)), collectives(text),
                         lower_s, compile_s, hlo_text=text)


def _parse_oom(msg: str) -> tuple[float, float] | None:
    if "memory" not in msg.lower() and "hbm" not in msg.lower():
        return None
    m = _OOM.search(msg)
    if not m:
        return (float("nan"), float("nan"))
    return (float(m.group(1)) * _UNITS[m.group(2).upper()], float(m.group(3)) * _UNITS[m.group(4).upper()])


def _serialize(compiled: Any) -> bytes:
    from jax.experimental.serialize_executable import serialize

    payload, _, _ = serialize(compiled)
    return payload
