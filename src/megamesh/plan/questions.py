"""Training and serving questions answered from the cost model: time to train, energy,
power and cost; fewest chips for a deadline; serving capacity per replica and fleet."""

from __future__ import annotations

import math
from typing import Any

from megamesh.errors import ConfigError
from megamesh.model.specs import (
    WEIGHT_FORMATS,
    flops_per_token,
    kv_cache_bytes_per_token,
    kv_split_ways,
    matmul_param_count,
    serving_weight_bytes,
)
from megamesh.plan.cost import MXU_EFFICIENCY, Estimate, axis_bandwidth, diloco_round_bytes
from megamesh.plan.layout import Workload
from megamesh.plan.memory import ADAM_BYTES
from megamesh.plan.search import search
from megamesh.plan.target import Target, from_chip_count

PUE = 1.1  # Google fleet PUE (hardware.md: CNBC 2022, Q2 2021 figure)
HBM_RESERVE = 0.9  # share of HBM serving may fill (runtime, fragmentation)


def power_per_chip_w(target: Target) -> tuple[float | None, str]:
    """All-in watts per chip at the wall (incl. PUE), and how it was derived."""
    c = target.chip
    if c.all_in_power_w:
        return c.all_in_power_w * PUE, f"{c.all_in_power_w:.0f} W all-in x PUE {PUE}"
    return None, f"no public all-in power for {c.name} (override chip all_in_power_w)"


def training_answer(w: Workload, target: Target, best: Estimate, tokens: float) -> dict:
    steps = math.ceil(tokens / w.tokens)
    seconds = steps * best.step_time_s
    watts, power_src = power_per_chip_w(target)
    out = {"tokens": tokens, "steps": steps, "time_to_train_s": seconds,
           "time_to_train_days": seconds / 86400, "mfu": best.mfu,
           "total_flops": flops_per_token(w.cfg, w.seq, "train") * tokens,
           "power_source": power_src, "average_power_mw": None, "energy_mwh": None, "cost_usd": None}
    if watts:
        out["average_power_mw"] = watts * target.chips / 1e6
        out["energy_mwh"] = out["average_power_mw"] * seconds / 3600
    if target.chip.price_per_chip_hour:
        out["cost_usd"] = target.chip.price_per_chip_hour * target.chips * seconds / 3600
        out["price_source"] = f"${target.chip.price_per_chip_hour}/chip-hour " + (
            "(unconfirmed)" if "price_per_chip_hour" in target.chip.unconfirmed else "")
    return out


def site_answer(target: Target, site_mw: float | None) -> dict | None:
    """The plan's power at the wall against a site's cap (None: no cap known or given):
    whether it fits and, when not, how many chips (whole slices) would."""
    if site_mw is None:
        return None
    watts, source = power_per_chip_w(target)
    out: dict[str, Any] = {"site_mw": site_mw, "power_mw": None, "within": None,
                           "chips_that_fit": None, "warning": None}
    if not watts:
        out["warning"] = f"cannot compare with the site's {site_mw:,.0f} MW: {source}"
        return out
    power = watts * target.chips / 1e6
    fit = int(site_mw * 1e6 // watts)
    c = target.chip
    unit = target.slice_chips if fit >= target.slice_chips else \
        (64 if c.ici_topology == "torus3d" else c.pod_chips if c.ici_topology == "torus2d" else 8)
    fit -= fit % unit  # whole slices; within one, whole cubes (TPU) or hosts (GPU)
    out.update(power_mw=power, within=power <= site_mw, chips_that_fit=fit)
    if power > site_mw:
        slices = (f" ({fit // target.slice_chips:,} slices of {target.slice_chips:,})"
                  if fit >= target.slice_chips else "")
        out["warning"] = (f"{target.chips:,} chips draw {power:,.0f} MW at the wall, past the "
                          f"site's {site_mw:,.0f} MW: {fit:,} chips fit{slices} "
                          f"(--site-mw sets the cap)")
    return out


def fewest_chips_for_deadline(w: Workload, target: Target, tokens: float, deadline_s: float,
                              max_chips: int = 2_000_000,
                              **search_options: Any) -> tuple[Target, Estimate] | None:
    """The smallest chip count (whole cubes inside a pod, whole pods beyond) that meets it;
    `search_options` (remats, offload, pipeline, ...) go to every search."""
    c = target.chip
    unit = 64 if c.ici_topology == "torus3d" else (c.pod_chips if c.ici_topology == "torus2d" else 8)
    counts = sorted({n for n in [unit * 2**k for k in range(40)] if n <= c.pod_chips} |
                    {c.pod_chips * k for k in range(1, max_chips // c.pod_chips + 1)})

    def time_at(n: int) -> tuple[float, Target, Estimate | None]:
        try:
            tgt = from_chip_count(c, n)
            res = search(w, tgt, **search_options)
        except ConfigError:
            return math.inf, target, None
        if not res.ranked:
            return math.inf, tgt, None
        best = res.ranked[0]
        return math.ceil(tokens / w.tokens) * best.step_time_s, tgt, best

    # gallop up the candidate counts to the first that meets the deadline, then bisect
    # back (step time falls as chips grow, monotone enough between the two probes)
    prev, i = -1, 0
    found = None
    while i < len(counts):
        t_i, tgt_i, est_i = time_at(counts[i])
        if t_i <= deadline_s:
            found = (i, tgt_i, est_i)
            break
        prev, i = i, (i * 2 + 1)
    if found is None:
        return None
    lo, hi = prev + 1, found[0]
    tgt_hi, est_hi = found[1], found[2]
    while lo < hi:
        mid = (lo + hi) // 2
        t_mid, tgt_mid, est_mid = time_at(counts[mid])
        if t_mid <= deadline_s:
            hi, tgt_hi, est_hi = mid, tgt_mid, est_mid
        else:
            lo = mid + 1
    assert est_hi is not None
    return tgt_hi, est_hi


def serving_answer(cfg, target: Target, *, qps: float, input_tokens: int, output_tokens: int,
                   slo_ttft_ms: float | None, slo_tpot_ms: float | None,
                   weights: str = "bf16") -> dict:
    """Serving layout per replica, KV capacity, max batch, TTFT/TPOT, replicas, cost.

    A replica is the smallest tensor-parallel group (within one slice) whose HBM holds
    the weights (bf16, or the layers' matmul weights in fp8 / int8 with per-channel
    scales: `megamesh serve --weights`) with room for KV cache; decode is bound by
    max(weights + KV bytes read per step / HBM bandwidth, FLOPs / peak) plus
    tensor-parallel all-reduces. Quantized weights are weight-only: the FLOPs stay bf16's.
    The KV cache splits over the tensor axis by kv head (the serving engine's pages,
    `model.kvcache.page_axes`); past the KV head count each head is repeated on tensor /
    kv_heads devices, so a device holds (and reads) 1 / kv_heads of it
    (`model.specs.kv_split_ways`).
    """
    if qps <= 0 or input_tokens < 1 or output_tokens < 1:
        raise ConfigError("--qps must be > 0 and --input-tokens/--output-tokens >= 1")
    chip = target.chip
    ctx = input_tokens + output_tokens
    if ctx > cfg.max_seq_len:
        raise ConfigError(f"input + output tokens = {ctx} exceeds {cfg.name}'s context of "
                          f"{cfg.max_seq_len}")
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"--weights {weights!r} is not allowed: one of {', '.join(WEIGHT_FORMATS)}")
    wbytes = serving_weight_bytes(cfg, weights)
    kv_tok = kv_cache_bytes_per_token(cfg, "bfloat16")
    dev_hbm = chip.device_hbm_bytes * HBM_RESERVE
    hbm_bw = chip.hbm_bw / chip.devices_per_chip
    peak = chip.bf16_flops / chip.devices_per_chip * MXU_EFFICIENCY
    n_active = matmul_param_count(cfg)
    options = []
    t = 1
    while t <= target.slice_devices:
        if target.slice_devices % t == 0 and (cfg.n_heads % t == 0 or t > cfg.n_heads):
            free = dev_hbm - wbytes / t  # per device
            if free > kv_tok * ctx / kv_split_ways(cfg.n_kv_heads, t):
                options.append(t)
        t *= 2
    if not options:
        raise ConfigError(f"{cfg.name} ({wbytes / 1e9:.0f} GB of {weights} weights) does not fit "
                          f"one {chip.name} slice of {target.slice_devices} devices with room for "
                          "KV cache; use a larger target or a smaller model")
    best = None
    for t in options[:4]:
        kv_cap_tokens = (dev_hbm - wbytes / t) * kv_split_ways(cfg.n_kv_heads, t) / kv_tok
        max_batch = max(1, int(kv_cap_tokens // ctx))
        for batch in sorted({max_batch} | {b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
                                           if b < max_batch}, reverse=True):
            avg_ctx = input_tokens + output_tokens / 2
            bytes_step = wbytes + batch * avg_ctx * kv_tok * t / kv_split_ways(cfg.n_kv_heads, t)
            flops_step = batch * (2 * n_active + 4 * avg_ctx * cfg.n_heads *
                                  cfg.resolved_head_dim * cfg.n_layers)
            tp_comm = 0.0
            if t > 1:
                bw = axis_bandwidth(target, t)
                tp_comm = cfg.n_layers * 2 * (2 * batch * cfg.d_model * 2 * (t - 1) / t / bw + 10e-6)
            tpot = max(bytes_step / (hbm_bw * t), flops_step / (peak * t)) + tp_comm
            prefill = (2 * n_active + 2 * input_tokens * cfg.n_heads * cfg.resolved_head_dim *
                       cfg.n_layers) * input_tokens / (peak * t)
            ttft = prefill + tpot
            if slo_tpot_ms and tpot * 1e3 > slo_tpot_ms:
                continue
            if slo_ttft_ms and ttft * 1e3 > slo_ttft_ms:
                continue
            # a replica's decode slots are shared with prefills (one prefill per request)
            per_req = output_tokens * tpot + prefill
            rps = batch / per_req
            tok_s = rps * output_tokens
            chips_replica = math.ceil(t / chip.devices_per_chip)
            cand = {"tensor": t, "chips_per_replica": chips_replica, "kv_capacity_tokens":
                    int(kv_cap_tokens), "max_batch": max_batch, "batch": batch,
                    "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3,
                    "decode_tokens_per_s_per_chip": tok_s / chips_replica,
                    "requests_per_s_per_replica": rps}
            if best is None or cand["decode_tokens_per_s_per_chip"] > best["decode_tokens_per_s_per_chip"]:
                best = cand
            break
    if best is None:
        raise ConfigError(f"no {chip.name} serving layout meets the SLOs (TTFT {slo_ttft_ms} ms, "
                          f"TPOT {slo_tpot_ms} ms); relax them or use a faster chip")
    replicas = math.ceil(qps / best["requests_per_s_per_replica"])
    chips = replicas * best["chips_per_replica"]
    best.update({"qps": qps, "input_tokens": input_tokens, "output_tokens": output_tokens,
                 "context_tokens": input_tokens + output_tokens, "replicas": replicas, "chips_needed": chips,
                 "target_chips": target.chips, "fits_target": chips <= target.chips})
    watts, _ = power_per_chip_w(target)
    tok_per_h = qps * output_tokens * 3600
    best["cost_per_million_output_tokens_usd"] = (
        chip.price_per_chip_hour * chips / tok_per_h * 1e6 if chip.price_per_chip_hour else None)
    best["power_mw"] = watts * chips / 1e6 if watts else None
    best["approximate"] = ("roofline estimate: decode bound by HBM bytes or FLOPs, perfect "
                           "continuous batching, no prefix caching")
    return best


def diloco_answer(w: Workload, target: Target, sync_best: Estimate, islands: int,
                  inner_steps: int) -> dict[str, Any]:
    """The same training as `islands` decoupled islands (`megamesh train --diloco`): each
    its own best layout on chips/islands at batch/islands; every `inner_steps` steps an
    outer step exchanges ~3x an island host's parameters over the DCN (train.diloco:
    reduce-scatter + all-gather through storage; no bytes cross between steps), against
    data parallelism's gradient all-reduce every step. Quorum and staleness (what a failure
    costs) are simulated by `megamesh fleet` (recovery: diloco)."""
    if islands < 2 or target.chips % islands or w.batch % islands:
        raise ConfigError(f"--diloco islands={islands} is not allowed: at least 2, dividing the "
                          f"{target.chips:,} chips and the batch {w.batch:,}")
    if inner_steps < 1:
        raise ConfigError(f"--diloco inner_steps={inner_steps} is not allowed: must be >= 1")
    island_target = from_chip_count(target.chip, target.chips // islands)
    wi = Workload(w.cfg, w.seq, w.batch // islands, w.precision, w.kernels)
    res = search(wi, island_target)
    if not res.ranked:
        raise ConfigError(f"{w.cfg.name} at batch {wi.batch} does not fit one island of "
                          f"{island_target.chips:,} chips")
    best = res.ranked[0]
    host_chips = 4 if target.is_tpu else 8  # TPU VMs drive 4 chips; GPU nodes 8
    params_host = best.memory.state * 4 / (4 + ADAM_BYTES) * host_chips  # f32 params of the state
    per_round = sum(diloco_round_bytes(params_host, islands))
    dcn_host = target.chip.dcn_bw * host_chips
    sync_s = per_round / dcn_host
    round_s = inner_steps * best.step_time_s
    eff = round_s / (round_s + sync_s)
    tokens_per_s = islands * wi.tokens / best.step_time_s * eff
    return {
        "islands": islands, "inner_steps": inner_steps,
        "island_chips": island_target.chips, "island_layout": best.layout.text(),
        "island_step_time_s": best.step_time_s, "island_mfu": best.mfu,
        "outer_step_bytes_per_host": per_round, "outer_step_s": sync_s,
        "outer_step_share": 1 - eff, "tokens_per_s": tokens_per_s,
        "vs_synchronous": tokens_per_s / (w.tokens / sync_best.step_time_s),
        "dcn_bytes_per_step_per_host": per_round / inner_steps,
        "synchronous_dcn_s_per_step": sync_best.dcn_traffic_s,
        "note": "the outer step's time assumes the chip's DCN bandwidth per host (published); "
                "megamesh fleet uses bench/recovery.py's measured restore rate where slower. "
                "An outer step needs a quorum (train.diloco.quorum, default a majority); an "
                "island that misses it is left out of that round and rejoins at the next outer "
                "state (its share of the missed rounds is not trained)",
    }
