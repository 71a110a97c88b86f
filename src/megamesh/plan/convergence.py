"""How large a global batch a run can use, and what to do with a target that is larger
than one synchronous job at that batch can use well.

The batch: DeepSeek LLM's batch-size scaling law (Bi et al. 2024, arXiv 2401.02954,
section 3.1): B_opt = 0.2920 * C^0.3271 tokens, C = M * D, M the non-embedding training
FLOPs per token (6 x the non-embedding matmul parameters + 3 x full attention, their
72*n_layer*d^2 + 12*n_layer*d*l_seq for a dense transformer) and D the tokens trained.
They report loss near its minimum over a broad band of batches around it; megamesh takes
it as the largest batch a run uses well (the "critical" batch): past it, more sequences
per step buy little loss per token, so a step-time prediction at a larger batch
overstates how fast the run converges. Fitted on DeepSeek's small-scale sweeps and
checked on their 7B and 67B runs; plans of 1e24 FLOPs and more extrapolate it, and the
answers say so. Approximate.

A target too large for one synchronous job: at the critical batch, fewer slices reach
(within 10%) the tokens/s the whole target does (each slice needs its own sequences, and
past that the extra chips only add tensor, sequence and DCN traffic). The alternatives
then: fewer chips (that many slices), DiLoCo islands of that size (their quality from
`plan.quality`), or several jobs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megamesh.config import ModelConfig
from megamesh.model.specs import attention_flops_per_token, matmul_param_count, param_count
from megamesh.plan.layout import Workload
from megamesh.plan.quality import token_efficiency
from megamesh.plan.questions import diloco_answer
from megamesh.plan.search import batch_unit, search
from megamesh.plan.target import Target, from_chip_count

BATCH_COEF, BATCH_EXP = 0.2920, 0.3271  # DeepSeek LLM, B_opt = 0.2920 * C^0.3271 tokens
FIT_NOTE = ("DeepSeek LLM's batch scaling law (arXiv 2401.02954), fitted on small-scale runs "
            "and checked at 7B and 67B")
DILOCO_INNER_STEPS = 500  # plan --diloco's default H


def non_embedding_flops_per_token(cfg: ModelConfig, seq: int) -> float:
    """DeepSeek's M: training FLOPs per token without the vocabulary projection."""
    head = cfg.d_model * cfg.vocab_size  # the output head's matmul (tied or not)
    return 6.0 * (matmul_param_count(cfg) - head) + 3.0 * attention_flops_per_token(
        cfg, seq, causal=False)


def critical_batch(cfg: ModelConfig, seq: int, tokens: float) -> dict[str, Any]:
    """The largest useful global batch for training `cfg` on `tokens` at `seq`."""
    compute = non_embedding_flops_per_token(cfg, seq) * tokens
    b = BATCH_COEF * compute**BATCH_EXP
    return {"tokens": b, "sequences": max(1, int(b // seq)), "compute_flops": compute,
            "source": FIT_NOTE + (" (extrapolated: this run's compute is past the runs it was "
                                  "checked on)" if compute > 1e24 else "")}


def default_batch(w: Workload, target: Target, crit_sequences: int) -> int:
    """The critical batch rounded down to what a layout over `target` can split (at least
    one unit of it)."""
    unit = batch_unit(w, target)
    return max(1, crit_sequences // unit) * unit


def batch_warning(cfg: ModelConfig, batch: int, seq: int, tokens: float, crit: dict) -> str | None:
    if batch <= crit["sequences"]:
        return None
    return (f"batch {batch:,} sequences ({batch * seq / 1e6:,.1f}M tokens) is past the critical "
            f"batch of ~{crit['sequences']:,} ({crit['tokens'] / 1e6:,.1f}M tokens) for {cfg.name} "
            f"on {tokens:.3g} tokens ({crit['source']}): steps past it buy little loss, so the "
            "time to train below is optimistic")


def _rate(w: Workload, target: Target, crit: dict) -> tuple[float, Workload, Any] | None:
    wk = dataclasses.replace(w, batch=default_batch(w, target, crit["sequences"]))
    if wk.batch > crit["sequences"]:
        return None  # cannot even split the critical batch
    res = search(wk, target)
    if not res.ranked:
        return None
    return wk.tokens / res.ranked[0].step_time_s, wk, res.ranked[0]


def too_large(w: Workload, target: Target, crit: dict, sync_rate: float | None) -> dict | None:
    """For a multi-slice target: the fewest slices that reach 90% of the best tokens/s any
    slice count reaches at the critical batch (powers of two, halves and thirds of the
    target, and the whole target); or, when none does, the fewest that reach half of it
    and past which the other slices add tokens/s at under half their rate per slice
    (diminishing returns: the critical batch spread that thin leaves the chips idle).
    None when the whole target is needed and used about as well as any part of it: one
    synchronous job uses it well."""
    n = target.n_slices
    if n < 2:
        return None
    rates: dict[int, tuple[float, Workload, Any]] = {}
    # powers of two, and halves and thirds of the target (whole islands of it)
    for k in sorted({2**i for i in range(n.bit_length()) if 2**i < n} | {n // 2, n // 3} - {0}):
        got = _rate(w, from_chip_count(target.chip, k * target.slice_chips), crit)
        if got:
            rates[k] = got
    if not rates:
        return None
    top = max([sync_rate or 0.0, *(r for r, _, _ in rates.values())])
    enough = [k for k, (r, _, _) in rates.items() if r >= 0.9 * top]
    if not enough and sync_rate:
        # diminishing returns: the fewest slices from which the rest of the target adds
        # tokens/s at under half their rate per slice
        enough = [k for k, (r, _, _) in rates.items()
                  if r >= 0.5 * top and (sync_rate - r) / (n - k) < 0.5 * r / k][:1]
    if not enough:
        return None  # only the whole target gets there: one job uses it well
    k = min(enough)
    rate, wk, best = rates[k]
    return {"slices": k, "chips": k * target.slice_chips, "tokens_per_s": rate, "workload": wk,
            "best": best, "sync_tokens_per_s": sync_rate, "best_tokens_per_s": top}


def alternatives(w: Workload, target: Target, crit: dict, tokens: float,
                 fit: dict) -> list[dict]:
    """Fewer chips, DiLoCo islands and several jobs for a target one synchronous job at the
    critical batch cannot use well (`fit`: `too_large`'s answer), best for this run first."""
    k, wk, best, rate = fit["slices"], fit["workload"], fit["best"], fit["tokens_per_s"]
    days = tokens / rate / 86400
    out = [{"option": "fewer chips", "chips": fit["chips"], "jobs": 1, "islands": 1,
            "batch": wk.batch, "layout": best.layout.text(), "mfu": best.mfu,
            "tokens_per_s": rate, "quality": 1.0, "effective_tokens_per_s": rate,
            "time_to_train_days": days,
            "note": f"{k} of the {target.n_slices} slices at the critical batch"}]
    islands = target.n_slices // k
    if islands >= 2:
        whole = from_chip_count(target.chip, islands * fit["chips"])
        d = diloco_answer(dataclasses.replace(wk, batch=wk.batch * islands), whole, best, islands,
                          DILOCO_INNER_STEPS)
        q = token_efficiency(param_count(w.cfg), tokens, islands, DILOCO_INNER_STEPS)
        eff_rate = d["tokens_per_s"] * q["efficiency"]
        out.append({"option": "DiLoCo islands", "chips": whole.chips, "jobs": 1, "islands": islands,
                    "batch": wk.batch, "layout": d["island_layout"], "mfu": d["island_mfu"],
                    "tokens_per_s": d["tokens_per_s"], "quality": q["efficiency"],
                    "effective_tokens_per_s": eff_rate,
                    "time_to_train_days": tokens / eff_rate / 86400,
                    "note": (f"{islands} islands of {k} slices, each at the critical batch, an outer "
                             f"step every {DILOCO_INNER_STEPS} steps ({d['outer_step_share']:.1%} of "
                             f"the time); a DiLoCo token is worth {q['efficiency']:.1%} of a "
                             f"synchronous one (loss +{q['loss_increase']:.2%}"
                             + (f"; extrapolated: {q['extrapolated']}" if q["extrapolated"] else "")
                             + ")")})
        out.append({"option": "several jobs", "chips": whole.chips, "jobs": islands,
                    "islands": 1, "batch": wk.batch, "layout": best.layout.text(), "mfu": best.mfu,
                    "tokens_per_s": rate * islands, "quality": 1.0, "effective_tokens_per_s": rate,
                    "time_to_train_days": days,
                    "note": f"{islands} independent runs of {k} slices (other models, experiments, "
                            "ablations): this run goes as fast as with fewer chips"})
    out.sort(key=lambda o: -o["effective_tokens_per_s"])
    return out


def rank_line(alts: list[dict]) -> str:
    parts = []
    for i, o in enumerate(alts, 1):
        parts.append(f"{i}. {o['option']}: {o['chips']:,} chips, {o['effective_tokens_per_s'] / 1e6:,.1f}M "
                     f"tokens/s toward this run at synchronous quality, "
                     f"{o['time_to_train_days']:,.1f} days ({o['note']})")
    return "; ".join(parts)

