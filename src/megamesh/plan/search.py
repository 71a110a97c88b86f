"""Search: every mesh factorization (ICI within a slice, DCN across slices), remat policy
and microbatch count; drop what does not fit in HBM; rank by step time."""

from __future__ import annotations

from dataclasses import dataclass

from megamesh.errors import ConfigError
from megamesh.plan.cost import Estimate, estimate
from megamesh.plan.layout import OFFLOAD_REMATS, REMATS, Layout, Workload, place
from megamesh.plan.memory import estimate_memory
from megamesh.plan.target import Target


@dataclass
class SearchResult:
    ranked: list[Estimate]  # fitting candidates, fastest first
    rejected: list[Estimate]  # did not fit (smallest memory first), for the report
    considered: int


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _candidate_sizes(w: Workload, target: Target, max_tensor: int = 64):
    c = w.cfg
    ici = target.slice_devices
    n_sl = target.n_slices
    tensors = [d for d in _divisors(ici) if d <= max_tensor and c.n_heads % d == 0
               and (c.d_ff % d == 0)]
    experts = [d for d in _divisors(ici) if c.moe and c.moe.n_experts % d == 0] if c.moe else [1]
    seqs = [d for d in _divisors(ici) if d <= 64 and w.seq % d == 0 and d * 512 <= w.seq] or [1]
    dcn_splits = [(n_sl, 1)]  # (dcn data-parallel ways, fsdp ways across slices)
    if not target.is_tpu and n_sl > 1:
        dcn_splits = [(n_sl // f, f) for f in _divisors(n_sl)]
    for t in tensors:
        for e in experts:
            if ici % (t * e):
                continue
            for s in seqs:
                if ici % (t * e * s):
                    continue
                rest = ici // (t * e * s)
                for data in _divisors(rest):
                    fsdp_i = rest // data
                    for dcn, fsdp_d in dcn_splits:
                        if fsdp_d > 1 and data > 1:
                            continue  # data would sit between fsdp's ICI and DCN parts
                        sizes = {"dcn": dcn, "data": data, "fsdp": fsdp_i * fsdp_d,
                                 "sequence": s, "tensor": t, "expert": e}
                        ways = dcn * data * fsdp_i * fsdp_d * e
                        if w.batch % ways:
                            continue
                        yield sizes


def _min_batch_ways(w: Workload, target: Target, max_tensor: int) -> int:
    """The fewest batch-parallel ways in a slice (the rest tensor/sequence/expert parallel)."""
    import dataclasses

    probe = dataclasses.replace(w, batch=1 << 62)  # any split divides it
    return min((s["data"] * s["fsdp"] * s["expert"] // max(1, s["dcn"] // target.n_slices)
                for s in _candidate_sizes(probe, target, max_tensor)), default=1) or 1


def search(w: Workload, target: Target, *, remats: tuple[str, ...] = REMATS,
           fixed: dict[str, int] | None = None, max_tensor: int = 64,
           max_microbatches: int | None = None, offload: bool = False) -> SearchResult:
    """Rank layouts. `offload` also considers host offload of activations and optimizer
    state (modelled for planning; megamesh's own step cannot offload yet)."""
    if offload:
        remats = tuple(remats) + OFFLOAD_REMATS
    ranked: list[Estimate] = []
    rejected: list[Estimate] = []
    n = 0
    any_divisible = False
    candidates = [fixed] if fixed else _candidate_sizes(w, target, max_tensor)
    for sizes in candidates:
        any_divisible = True
        sizes = {a: v for a, v in sizes.items() if v > 1}
        try:
            placement = place(sizes, target)
        except ConfigError:
            if fixed:
                raise
            continue
        per_dev_seqs = w.batch // max(1, Layout(sizes).batch_ways)
        best_fail = None
        for remat in remats:
            # the fewest microbatches that fit (more only add weight gathers)
            mb, opt_off = 1, False
            while True:
                lay = Layout(sizes, remat=remat, microbatches=mb, placement=placement,
                             offload_optimizer=opt_off)
                mem = estimate_memory(w, lay, tpu=target.is_tpu)
                n += 1
                if mem.total <= target.chip.device_hbm_bytes:
                    break
                if offload and not opt_off:
                    opt_off = True
                    continue
                if mb * 2 > per_dev_seqs or per_dev_seqs % (mb * 2) \
                        or mb * 2 > (max_microbatches or mb * 2):
                    break
                mb, opt_off = mb * 2, False
            est = estimate(w, target, lay, mem)
            if est.fits:
                ranked.append(est)
            elif best_fail is None or est.memory.total < best_fail.memory.total:
                best_fail = est
        if best_fail is not None:
            rejected.append(best_fail)
    if not any_divisible:
        unit = target.n_slices * _min_batch_ways(w, target, max_tensor)
        raise ConfigError(f"batch {w.batch} sequences cannot be split over {target.describe()}: "
                          f"no layout's batch-parallel ways divide it; use a multiple of {unit:,} "
                          f"sequences, e.g. {max(1, round(w.batch / unit)) * unit:,}")
    ranked.sort(key=lambda e: e.step_time_s)
    rejected.sort(key=lambda e: e.memory.total)
    return SearchResult(ranked, rejected, n)
