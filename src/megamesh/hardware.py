"""Accelerator catalog: per-chip peak FLOP/s, HBM, interconnect, power and price, with sources.

Pure Python (plan and fleet import it). Figures are per chip, dense (no sparsity); the
source of every row (docs/sources.md):
- TPUs: Google Cloud TPU docs (docs.cloud.google.com/tpu/docs/tpu7x, /v5p, /v6e, /v5e,
  cloud.google.com/tpu/docs/v4); per-link ICI and DCN from jax-ml/scaling-book `tpus.md`.
- GPUs: jax-ml/scaling-book `gpus.md`; glennklockwood.com/garden/processors/h100.
Figures with no public source are flagged `unconfirmed` (treat them as parameters).

A chip may hold several JAX devices (Ironwood: 2); `devices_per_chip` says how many, and
per-device figures divide by it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megamesh.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Chip:
    name: str
    bf16_flops: float  # peak dense bf16 FLOP/s per chip
    fp8_flops: float | None  # peak dense fp8 FLOP/s per chip (None: no fp8 matmul)
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    devices_per_chip: int
    ici_bw: float  # scale-up bytes/s per chip, bidirectional total
    ici_topology: str  # "torus3d", "torus2d", "nvlink"
    pod_chips: int  # chips in one ICI/NVLink domain (pod)
    dcn_bw: float  # scale-out bytes/s per chip
    chip_power_w: float | None
    all_in_power_w: float | None  # chip + host + network share, before PUE
    price_per_chip_hour: float | None
    # host <-> device bytes/s per chip (PCIe), for host offload; no per-chip figure is
    # published for TPUs: PCIe Gen4 x16 (~32 GB/s) assumed, Gen5 x16 for H100/H200/B200
    host_bw: float = 32e9
    # the power a site of this chip's fleet can draw at the wall (MW), where one is known
    site_mw: float | None = None
    unconfirmed: tuple[str, ...] = ()
    source: str = ""

    @property
    def device_flops(self) -> float:
        return self.bf16_flops / self.devices_per_chip

    @property
    def device_hbm_bytes(self) -> float:
        return self.hbm_bytes / self.devices_per_chip


GiB = 2**30
GB = 1e9
T = 1e12

CHIPS: dict[str, Chip] = {c.name: c for c in [
    Chip(name="v4", bf16_flops=275 * T, fp8_flops=None, hbm_bytes=32 * GiB, hbm_bw=1.2e12,
         devices_per_chip=1, ici_bw=540 * GB, ici_topology="torus3d", pod_chips=4096,
         dcn_bw=50e9 / 8, chip_power_w=170, all_in_power_w=None, price_per_chip_hour=None,
         unconfirmed=("all_in_power_w", "price_per_chip_hour"),
         source="cloud.google.com/tpu/docs/v4; power: measured mean 170 W (hardware.md)"),
    Chip(name="v5e", bf16_flops=197 * T, fp8_flops=None, hbm_bytes=16 * GB, hbm_bw=0.82e12,
         devices_per_chip=1, ici_bw=400 * GB, ici_topology="torus2d", pod_chips=256,
         dcn_bw=25e9 / 8, chip_power_w=None, all_in_power_w=None, price_per_chip_hour=1.20,
         unconfirmed=("chip_power_w", "all_in_power_w"),
         source="docs.cloud.google.com/tpu/docs/v5e; price secondary (hardware.md)"),
    Chip(name="v5p", bf16_flops=459 * T, fp8_flops=459 * T, hbm_bytes=95 * GiB, hbm_bw=2.77e12,
         devices_per_chip=1, ici_bw=1200 * GB, ici_topology="torus3d", pod_chips=8960,
         dcn_bw=50e9 / 8, chip_power_w=None, all_in_power_w=None, price_per_chip_hour=4.20,
         unconfirmed=("chip_power_w", "all_in_power_w"),
         source="docs.cloud.google.com/tpu/docs/v5p; price secondary (hardware.md)"),
    Chip(name="v6e", bf16_flops=918 * T, fp8_flops=918 * T, hbm_bytes=32 * GB, hbm_bw=1.64e12,
         devices_per_chip=1, ici_bw=800 * GB, ici_topology="torus2d", pod_chips=256,
         dcn_bw=100e9 / 8, chip_power_w=None, all_in_power_w=None, price_per_chip_hour=2.70,
         unconfirmed=("chip_power_w", "all_in_power_w"),
         source="docs.cloud.google.com/tpu/docs/v6e; price: Google via neowin (hardware.md)"),
    Chip(name="tpu7x", bf16_flops=2307 * T, fp8_flops=4614 * T, hbm_bytes=192 * GiB,
         hbm_bw=7.38e12, devices_per_chip=2, ici_bw=1200 * GB, ici_topology="torus3d",
         pod_chips=9216, dcn_bw=100e9 / 8, chip_power_w=None, all_in_power_w=1090,
         price_per_chip_hour=None, site_mw=1000.0,
         unconfirmed=("all_in_power_w", "price_per_chip_hour"),
         source="docs.cloud.google.com/tpu/docs/tpu7x; ~10 MW per 9,216-chip pod "
         "(third-party, Hot Chips 2025) = ~1.09 kW/chip; site: the mission's 'well over a "
         "gigawatt' through 2026, taken as 1,000 MW as `megamesh fleet` caps it"),
    Chip(name="h100", host_bw=64e9, bf16_flops=989 * T, fp8_flops=1979 * T, hbm_bytes=80 * GB, hbm_bw=3.35e12,
         devices_per_chip=1, ici_bw=900 * GB, ici_topology="nvlink", pod_chips=8,
         dcn_bw=400e9 / 8, chip_power_w=700, all_in_power_w=1275, price_per_chip_hour=2.9,
         unconfirmed=("price_per_chip_hour",),
         source="scaling-book gpus.md; DGX H100 10.2 kW / 8 GPUs (secondary); "
         "market price 1.9-3.9 $/h (midpoint)"),
    Chip(name="h200", host_bw=64e9, bf16_flops=989 * T, fp8_flops=1979 * T, hbm_bytes=141 * GB, hbm_bw=4.8e12,
         devices_per_chip=1, ici_bw=900 * GB, ici_topology="nvlink", pod_chips=8,
         dcn_bw=400e9 / 8, chip_power_w=700, all_in_power_w=None, price_per_chip_hour=10.0,
         unconfirmed=("all_in_power_w", "price_per_chip_hour"),
         source="scaling-book gpus.md; GCP price approx."),
    Chip(name="b200", host_bw=64e9, bf16_flops=2250 * T, fp8_flops=4500 * T, hbm_bytes=192 * GB,
         hbm_bw=8.0e12,
         devices_per_chip=1, ici_bw=1800 * GB, ici_topology="nvlink", pod_chips=8,
         dcn_bw=400e9 / 8, chip_power_w=1000, all_in_power_w=None, price_per_chip_hour=None,
         unconfirmed=("chip_power_w", "all_in_power_w", "price_per_chip_hour"),
         source="scaling-book gpus.md; power third-party"),
    Chip(name="gb200", host_bw=64e9, bf16_flops=2500 * T, fp8_flops=5000 * T, hbm_bytes=186 * GB,
         hbm_bw=8.0e12, devices_per_chip=1, ici_bw=1800 * GB, ici_topology="nvlink",
         pod_chips=72, dcn_bw=400e9 / 8, chip_power_w=None, all_in_power_w=1670,
         price_per_chip_hour=None,
         unconfirmed=("bf16_flops", "fp8_flops", "all_in_power_w", "price_per_chip_hour"),
         source="aiwiki.ai/wiki/nvidia_gb200_nvl72 (per-GPU share of the NVL72 rack)"),
]}

# jax's device_kind strings -> catalog names (for MFU on real devices).
DEVICE_KINDS = {
    "TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
    "TPU v6 lite": "v6e", "TPU v6e": "v6e", "TPU7x": "tpu7x", "TPU 7x": "tpu7x",
    "NVIDIA H100 80GB HBM3": "h100", "NVIDIA H100": "h100", "NVIDIA H200": "h200",
    "NVIDIA B200": "b200",
}


UNCONFIRMED_EVERYWHERE = ("host_bw",)  # no per-chip source found for any chip


def chip(name: str, **overrides: float) -> Chip:
    """A catalog chip by name; any field can be overridden (unconfirmed figures especially)."""
    if name not in CHIPS:
        raise ConfigError(f"unknown chip {name!r}: allowed are {', '.join(CHIPS)}")
    c = CHIPS[name]
    bad = set(overrides) - {f.name for f in dataclasses.fields(Chip)}
    if bad:
        raise ConfigError(f"unknown chip field {sorted(bad)[0]!r}")
    return dataclasses.replace(c, **overrides) if overrides else c


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The catalog chip for a jax device_kind string, or None if unknown (e.g. CPU)."""
    for kind, name in DEVICE_KINDS.items():
        if device_kind.startswith(kind):
            return CHIPS[name]
    return None
