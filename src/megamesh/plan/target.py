"""Targets: which chips and how many, split into ICI domains (slices/pods) joined by DCN.

Spellings (`--target`):
- `tpu7x:256`        256 chips; one slice while it fits a pod, else whole pods over DCN
- `tpu7x:16x16x36`   a slice topology (chips per torus dimension)
- `v4:6144`          more than a pod: equal slices over DCN when the count splits evenly
                     (2 x 3,072), else whole pods: `tpu7x:1000000` -> 109 x 9,216 = 1,004,544
- `h100:16384`       GPUs: NVLink domains of `pod_chips` (8 for H100) joined by the
                     scale-out network, which plays the role of DCN
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megamesh.errors import ConfigError
from megamesh.hardware import CHIPS, Chip, chip

_CUBE = 4  # 3-D torus TPUs are built from 4x4x4 cubes; slice dims are multiples of 4


@dataclass(frozen=True)
class Target:
    chip: Chip
    n_slices: int  # ICI domains joined by DCN (TPU slices/pods; GPU NVLink domains)
    slice_chips: int
    topology: tuple[int, ...]  # chips per torus dim of one slice (GPU: (slice_chips,))
    note: str = ""  # e.g. how a chip count was rounded

    @property
    def chips(self) -> int:
        return self.n_slices * self.slice_chips

    @property
    def devices(self) -> int:
        return self.chips * self.chip.devices_per_chip

    @property
    def slice_devices(self) -> int:
        return self.slice_chips * self.chip.devices_per_chip

    @property
    def is_tpu(self) -> bool:
        return self.chip.ici_topology.startswith("torus")

    @property
    def topology_name(self) -> str:
        """The name jax's get_topology_desc takes, e.g. `tpu7x:16x16x36`."""
        return f"{self.chip.name}:{'x'.join(map(str, self.topology))}"

    def describe(self) -> str:
        s = f"{self.chips:,} {self.chip.name} chips ({self.devices:,} devices)"
        if self.n_slices > 1:
            kind = "pods/slices" if self.is_tpu else "NVLink domains"
            s += f" = {self.n_slices:,} {kind} of {self.slice_chips:,} over DCN"
        if self.is_tpu:
            s += f", slice topology {'x'.join(map(str, self.topology))}"
        return s


def parse_target(text: str, chip_overrides: dict[str, float] | None = None) -> Target:
    name, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ConfigError(f"target {text!r} is not allowed: write CHIP:COUNT or CHIP:AxBxC "
                          f"(chips: {', '.join(CHIPS)}), e.g. tpu7x:256 or tpu7x:16x16x36")
    c = chip(name.strip().lower(), **(chip_overrides or {}))
    if "x" in rest:
        try:
            dims = tuple(int(d) for d in rest.split("x"))
        except ValueError:
            raise ConfigError(f"target topology {rest!r} is not allowed: dims must be "
                              "integers, e.g. 16x16x36") from None
        return _from_topology(c, dims)
    try:
        n = int(float(rest)) if "e" in rest.lower() else int(rest)
    except ValueError:
        raise ConfigError(f"target chip count {rest!r} is not allowed: must be a positive "
                          "integer") from None
    return from_chip_count(c, n)


def _from_topology(c: Chip, dims: tuple[int, ...]) -> Target:
    want = {"torus3d": 3, "torus2d": 2}.get(c.ici_topology)
    if want is None:
        raise ConfigError(f"{c.name} has no torus topology: give a GPU count, e.g. {c.name}:1024")
    if len(dims) != want or min(dims) < 1:
        raise ConfigError(f"topology {'x'.join(map(str, dims))} is not allowed for {c.name}: it "
                          f"needs {want} positive dims")
    n = math.prod(dims)
    if n > c.pod_chips:
        raise ConfigError(f"topology {'x'.join(map(str, dims))} has {n:,} chips, more than one "
                          f"{c.name} pod ({c.pod_chips:,}); give a chip count to span pods")
    return Target(c, 1, n, dims)


def from_chip_count(c: Chip, n: int) -> Target:
    if n < 1:
        raise ConfigError(f"target chip count {n} is not allowed: must be >= 1")
    if not c.ici_topology.startswith("torus"):
        dom = c.pod_chips
        if n <= dom:
            return Target(c, 1, n, (n,))
        if n % dom:
            raise ConfigError(f"{n:,} {c.name} GPUs is not allowed: must be a multiple of the "
                              f"{dom}-GPU NVLink domain (e.g. {n // dom * dom:,})")
        return Target(c, n // dom, dom, (dom,))
    if n == c.pod_chips:
        return Target(c, 1, n, full_pod_topology(c))
    if n < c.pod_chips:
        return Target(c, 1, n, slice_topology(c, n))
    k = math.ceil(n / c.pod_chips)  # equal slices when n splits evenly into k of them
    if n % k == 0:
        try:
            return Target(c, k, n // k, _topology(c, n // k))
        except ConfigError:
            pass
    pods = max(1, round(n / c.pod_chips))
    note = ""
    if pods * c.pod_chips != n:
        note = (f"{n:,} chips rounded to {pods:,} whole pods of {c.pod_chips:,} = "
                f"{pods * c.pod_chips:,} chips")
    return Target(c, pods, c.pod_chips, full_pod_topology(c), note)


def _topology(c: Chip, n: int) -> tuple[int, ...]:
    return full_pod_topology(c) if n == c.pod_chips else slice_topology(c, n)


def full_pod_topology(c: Chip) -> tuple[int, ...]:
    return {"tpu7x": (16, 16, 36), "v5p": (16, 20, 28), "v4": (16, 16, 16),
            "v5e": (16, 16), "v6e": (16, 16)}.get(c.name) or slice_topology(c, c.pod_chips)


def slice_topology(c: Chip, n: int) -> tuple[int, ...]:
    """A near-cubic torus shape for n chips (3-D TPUs: multiples of 4 once n >= 64)."""
    ndim = 3 if c.ici_topology == "torus3d" else 2
    best: tuple[int, ...] | None = None
    for dims in _factorizations(n, ndim):
        if ndim == 3 and n >= 64 and any(d % _CUBE for d in dims):
            continue
        if best is None or max(dims) / min(dims) < max(best) / min(best):
            best = dims
    if best is None:
        raise ConfigError(f"{n:,} {c.name} chips do not form a torus slice: 3-D slices of 64 "
                          "chips or more are whole 4x4x4 cubes (use a multiple of 64)")
    # ascending, but size-1 dims last: libtpu's hosts are 2x2x1 blocks (2x2x1, not 1x2x2)
    return tuple(sorted(best, key=lambda d: (d == 1, d)))


def _factorizations(n: int, k: int) -> list[tuple[int, ...]]:
    if k == 1:
        return [(n,)]
    out = []
    for d in range(1, n + 1):
        if n % d == 0:
            out += [(d, *rest) for rest in _factorizations(n // d, k - 1)]
    return out
