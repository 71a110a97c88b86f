"""Search: every mesh factorization (ICI within a slice, DCN across slices), remat policy
and microbatch count; drop what does not fit in HBM; rank by step time."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from megamesh.errors import ConfigError
from megamesh.model.specs import layer_stacks
from megamesh.plan.cost import Estimate, estimate
from megamesh.plan.layout import OFFLOAD_REMATS, REMATS, Layout, Workload, place
from megamesh.plan.memory import estimate_memory
from megamesh.plan.target import Target

CROSS_DOMAIN_CP_TOKENS = 4096  # tokens of the sequence per device, at least, for CP over DCN


@dataclass
class SearchResult:
    ranked: list[Estimate]  # fitting candidates, fastest first
    rejected: list[Estimate]  # did not fit (smallest memory first), for the report
    considered: int


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _candidate_sizes(w: Workload, target: Target, max_tensor: int = 64, max_sequence: int = 64):
    c = w.cfg
    ici = target.slice_devices
    n_sl = target.n_slices
    tensors = [d for d in _divisors(ici) if d <= max_tensor and c.n_heads % d == 0
               and (c.d_ff % d == 0)]
    experts = [d for d in _divisors(ici) if c.moe and c.moe.n_experts % d == 0] if c.moe else [1]
    seqs = [d for d in _divisors(ici) if d <= max_sequence and w.seq % d == 0
            and (d == 1 or d * 512 <= w.seq)] or [1]
    # (dcn data-parallel ways, fsdp ways across slices)
    dcn_splits = [(n_sl // f, f) for f in _divisors(n_sl)] if n_sl > 1 else [(1, 1)]
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
    if not target.is_tpu and n_sl > 1:
        # GPUs: the sequence may also span NVLink domains over the scale-out network (as
        # Llama 3's CP16 over two 8-GPU nodes), filling what tensor and expert leave of a
        # domain, the other domains split into dcn x fsdp; only where every device keeps
        # at least CROSS_DOMAIN_CP_TOKENS of the sequence (an assumption: smaller chunks
        # make latency-bound exchanges over the scale-out network, which the cost model
        # does not charge; Llama 3 split the sequence only in its 128k stage)
        for t in tensors:
            for e in experts:
                if ici % (t * e):
                    continue
                s_i = ici // (t * e)
                for s_d in _divisors(n_sl)[1:]:
                    s = s_i * s_d
                    if s > max_sequence or w.seq % s or s * CROSS_DOMAIN_CP_TOKENS > w.seq:
                        continue
                    rest = n_sl // s_d
                    for f in _divisors(rest):
                        dcn = rest // f
                        if w.batch % (dcn * f * e):
                            continue
                        yield {"dcn": dcn, "data": 1, "fsdp": f, "sequence": s, "tensor": t,
                               "expert": e}


def _min_batch_ways(w: Workload, target: Target, max_tensor: int) -> int:
    """The fewest batch-parallel ways in a slice (the rest tensor/sequence/expert parallel)."""
    probe = dataclasses.replace(w, batch=target.devices)  # every split of the devices divides it
    return min((s["data"] * s["fsdp"] * s["expert"] // max(1, s["dcn"] // target.n_slices)
                for s in _candidate_sizes(probe, target, max_tensor)), default=1) or 1


def batch_unit(w: Workload, target: Target, max_tensor: int = 64) -> int:
    """The batch (sequences) must be a multiple of this for some layout over `target` to
    split it (every slice over DCN times a slice's fewest batch-parallel ways)."""
    return target.n_slices * _min_batch_ways(w, target, max_tensor)


def divisible_batch(w: Workload, target: Target, max_tensor: int = 64) -> int:
    """`w.batch` rounded to the nearest multiple of `batch_unit` (at least one unit)."""
    unit = batch_unit(w, target, max_tensor)
    return max(1, round(w.batch / unit)) * unit


def _rank(e: Estimate) -> tuple[float, float]:
    """Fastest first; step times equal to 3 significant digits (closer than the model can
    tell apart) go to the layout that moves less over DCN (e.g. data parallelism across
    pods before FSDP across pods, when both hide their traffic)."""
    return float(f"{e.step_time_s:.3g}"), e.dcn_traffic_s


def _pipelines(w: Workload, target: Target, pipeline: bool, uneven: bool):
    """(stages, target of one stage): no pipeline, then P stages over DCN, each whole slices
    (that split the layers evenly unless `uneven`)."""
    yield 1, target
    if not pipeline:
        return
    for p in _divisors(target.n_slices):
        if 1 < p <= w.cfg.n_layers and (uneven or _splits_layers(w, p)):
            yield p, Target(target.chip, target.n_slices // p, target.slice_chips, target.topology)


def _splits_layers(w: Workload, chunks: int) -> bool:
    """Whether every layer stack splits into `chunks` equal chunks (as the step's
    pipeline needs, `train.step.pipeline_stages`)."""
    return all(st.n_layers % chunks == 0 for st in layer_stacks(w.cfg))


def _pipeline_options(w: Workload, stages: int, per_replica_seqs: int, uneven: bool):
    """(virtual chunks, microbatches): chunk counts that split every stack evenly (with
    `uneven`, any that leave every chunk a layer), and microbatch counts that are
    multiples of the stage count (the circular schedule needs at least as many) dividing
    the sequences of one data-parallel replica."""
    for v in (1, 2, 4, 8):
        if stages * v > w.cfg.n_layers:
            break
        if not (uneven or _splits_layers(w, stages * v)):
            continue
        m = stages
        while m <= per_replica_seqs:
            if per_replica_seqs % m == 0:
                yield v, m
            m *= 2


def search(w: Workload, target: Target, *, remats: tuple[str, ...] = REMATS,
           fixed: dict[str, int] | None = None, max_tensor: int = 64,
           max_microbatches: int | None = None, offload: bool = False,
           pipeline: bool = False, max_sequence: int = 64,
           published_pipeline: bool = False) -> SearchResult:
    """Rank layouts. `offload` also considers host offload of activations (remat
    "offload", which megamesh's step runs) and of optimizer state, `pipeline` pipeline
    stages across DCN, as many as split every layer stack evenly, under the schedule the
    step runs (`published_pipeline` instead models published runs' 1F1B with uneven
    stages, as Llama 3's 126 layers over 16: for comparison only, a plan megamesh cannot
    run, `Layout.schedule`); optimizer
    offload is modelled for planning only; `max_sequence` caps the sequence
    (context-parallel) axis (1: none)."""
    if offload:
        remats = tuple(remats) + OFFLOAD_REMATS
    ranked: list[Estimate] = []
    rejected: list[Estimate] = []
    n = 0
    any_divisible = False
    for stages, sub in _pipelines(w, target, pipeline and not fixed, published_pipeline):
        candidates = [fixed] if fixed else _candidate_sizes(w, sub, max_tensor, max_sequence)
        for sizes in candidates:
            any_divisible = True
            sizes = {a: v for a, v in sizes.items() if v > 1}
            try:
                placement = place(sizes, sub)
            except ConfigError:
                if fixed:
                    raise
                continue
            per_dev_seqs = w.batch // max(1, Layout(sizes).batch_ways)
            best_fail = None
            for remat in remats:
                if stages > 1:
                    found, tried = _best_pipelined(w, target, sizes, placement, remat, stages,
                                                   per_dev_seqs, max_microbatches, offload,
                                                   published_pipeline)
                else:
                    found, tried = _fewest_microbatches(w, target, sizes, placement, remat,
                                                        per_dev_seqs, max_microbatches, offload)
                n += tried
                for est in found:
                    if est.fits:
                        ranked.append(est)
                    elif best_fail is None or est.memory.total < best_fail.memory.total:
                        best_fail = est
            if best_fail is not None:
                rejected.append(best_fail)
    if not any_divisible:
        raise ConfigError(f"batch {w.batch} sequences cannot be split over {target.describe()}: "
                          f"no layout's batch-parallel ways divide it; use a multiple of "
                          f"{batch_unit(w, target, max_tensor):,} sequences, e.g. "
                          f"{divisible_batch(w, target, max_tensor):,}")
    ranked.sort(key=_rank)
    rejected.sort(key=lambda e: e.memory.total)
    return SearchResult(ranked, rejected, n)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _fewest_microbatches(w: Workload, target: Target, sizes: dict[str, int], placement: dict,
                         remat: str, per_dev_seqs: int, max_microbatches: int | None,
                         offload: bool) -> tuple[list[Estimate], int]:
    """The fewest microbatches that fit (more only add weight gathers), offloading the
    optimizer first when `offload`; the last one tried if none fits."""
    # any divisor of the per-device sequences (5 per device: 1 or 5 microbatches)
    counts = [m for m in _divisors(max(1, per_dev_seqs))
              if max_microbatches is None or m <= max_microbatches] or [1]
    tried = 0
    for mb in counts:
        for opt_off in ((False, True) if offload else (False,)):
            lay = Layout(sizes, remat=remat, microbatches=mb, placement=placement,
                         offload_optimizer=opt_off)
            mem = estimate_memory(w, lay, tpu=target.is_tpu)
            tried += 1
            if mem.total <= target.chip.device_hbm_bytes:
                return [estimate(w, target, lay, mem)], tried
    return [estimate(w, target, lay, mem)], tried


def _best_pipelined(w: Workload, target: Target, sizes: dict[str, int], placement: dict,
                    remat: str, stages: int, per_replica_seqs: int, max_microbatches: int | None,
                    offload: bool, uneven: bool = False) -> tuple[list[Estimate], int]:
    """For each interleaving factor, the fastest microbatch count that fits (or, if none
    fits, the smallest in memory). More microbatches shrink the bubble but stream the
    stage's weights once more each (the activations in flight are the whole pass's
    either way: GPipe)."""
    out: list[Estimate] = []
    tried = 0
    by_v: dict[int, list[Estimate]] = {}
    for v, m in _pipeline_options(w, stages, per_replica_seqs, uneven):
        if max_microbatches and m > max_microbatches:
            continue
        for opt_off in ((False, True) if offload else (False,)):
            lay = Layout(sizes, remat=remat, microbatches=m, placement=placement,
                         offload_optimizer=opt_off, stages=stages, virtual=v,
                         schedule="1f1b" if uneven else "gpipe")
            tried += 1
            by_v.setdefault(v, []).append(estimate(w, target, lay))
    for ests in by_v.values():
        fit = [e for e in ests if e.fits]
        out.append(min(fit, key=lambda e: e.step_time_s) if fit
                   else min(ests, key=lambda e: e.memory.total))
    return out, tried
