"""Step time of megamesh's train step for a workload, target and layout.

Per device, per step:
- compute: hardware FLOPs (matmuls incl. what the kernels really do: the full T x T
  attention score matrix of the xla kernels, MoE capacity padding and dispatch einsums,
  remat recompute) at MXU_EFFICIENCY of peak;
- HBM: weights streamed by every matmul pass (a matmul is bound by max(FLOPs, bytes)),
  plus element-wise traffic (norms, RoPE, softmax, SwiGLU, residuals, logits, optimizer);
- communication, ring/torus formulas: FSDP all-gather (fwd, bwd) and reduce-scatter of
  gradients per microbatch, over fsdp and sequence (the ZeRO axes: context-parallel
  devices hold a share of the weights too); data/DCN gradient all-reduce once per step (these
  are asynchronous and hide under compute up to OVERLAP); tensor-parallel all-reduces,
  sequence-parallel K/V all-gathers and expert all-to-alls sit on the critical path.

Efficiency constants (the only fitted numbers; calibrated on the published rows of
bench/plan_calibration.py, sources in docs/sources.md; BENCHMARKS.md "Planner calibration"):

- MXU_EFFICIENCY: share of peak FLOP/s that large bf16 matmuls sustain;
- ICI_EFFICIENCY and DCN_EFFICIENCY: achieved share of link bandwidth;
- OVERLAP: share of the local step time that async collectives can hide under;
- ELEMENTWISE_TRAFFIC: HBM bytes moved by element-wise work (norms,
  RoPE, residual adds, SwiGLU) as a multiple of one bf16 read and write of their operands
  (f32 upcasts inside norms, the backward pass re-reading them);
- MOE_IMBALANCE: expert matmuls take this much longer than their FLOPs
  say, because the step waits for the busiest expert (routing is never perfectly even);
- FP8_MXU_EFFICIENCY: share of the FP8 peak the layers' matmuls sustain under
  `--precision fp8` (fitted on MaxText's published fp8_full rows on Ironwood,
  bench/plan_calibration.py FP8_ROWS). Only those matmuls run at the FP8 rate: attention's
  kernels, the output head and MoE dispatch stay bf16 (as in `model/quant.py`). MFU is
  model FLOPs over the bf16 peak in both precisions, so FP8's MFU is bf16's times its
  speed-up.
Approximate by nature: a torus axis is assumed to get the share of the chip's links its
size spans (log n / log slice size, at least one torus dimension).

Pipeline parallelism follows the schedule megamesh's step runs (`model.pipeline`: GPipe,
or its circular variant with V chunks per stage): P stages (the mesh's stage axis, across
DCN), M microbatches, M V + P - 1 iterations of which P - 1 are the fill and drain; the
busiest stage paces the step, the bubble adds (P - 1) / (V M) of the busy time (the same
idle share as Megatron's interleaved 1F1B, Narayanan et al., SC'21), every iteration
hands one microbatch's activations (and, backward, their gradients) to the next stage
point to point (asynchronous, hidden like the other async collectives), and FSDP within
a stage gathers each layer's weights every iteration (streamed, as MaxText's pipeline
does by default): M + (P - 1) / V gathers of the stage's weights per pass. Published
runs' 1F1B (Layout.schedule "1f1b", for comparison only) keeps at most P microbatches'
activations and gathers a stage's weights once per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megamesh.model.specs import flops_per_token, layer_stacks, splash_block
from megamesh.plan.layout import Layout, Workload
from megamesh.plan.memory import (
    ADAM_BYTES,
    Memory,
    estimate_memory,
    layer_activation_bytes,
    sharded_params,
    specs_table,
    tokens_per_microbatch,
)
from megamesh.plan.target import Target

MXU_EFFICIENCY = 0.68  # share of peak FLOP/s that large bf16 matmuls sustain
ICI_EFFICIENCY = 0.75  # share of ICI/NVLink link bandwidth collectives achieve
DCN_EFFICIENCY = 0.75  # share of DCN / scale-out bandwidth collectives achieve
OVERLAP = 0.9  # share of local step time under which async collectives can hide
# share of the FP8 peak that the layers' FP8 matmuls sustain, quantization included (Qwix's
# absmax scaling: a reduction and a cast per operand); fitted on MaxText's published
# fp8_full rows on Ironwood (bench/plan_calibration.py FP8_ROWS, docs/sources.md)
FP8_MXU_EFFICIENCY = 0.72
MOE_IMBALANCE = 1.25  # expert work runs at the pace of the busiest expert (top-k routing)
ELEMENTWISE_TRAFFIC = 3.0  # HBM bytes of element-wise ops, x one bf16 read+write of operands

# Counts, not fitted (what the step does per parameter, per layer or per token):
# AdamW's update reads f32 params, grads and both moments (4 x 4 B) and writes params and
# moments (3 x 4 B): 28 bytes per parameter a device holds.
OPTIMIZER_UPDATE_BYTES = 28
# f32 logits cross HBM about 6 times per token, 4 bytes each: written by the head's
# matmul, read and written by the softmax and its gradient, read by the backward GEMMs
# (a count of the passes, not a measurement).
LOGITS_F32_PASSES = 6
# Tensor-parallel all-reduces per layer and pass (Megatron-LM, Shoeybi et al. 2019): one
# after attention's output projection and one after the MLP in the forward pass, the
# same two on the input gradients backward; full remat repeats the forward's.
TP_ALL_REDUCES_PER_PASS = 2
# Expert parallelism: one all-to-all to dispatch tokens to experts and one to combine
# them, per MoE layer and pass (forward, backward, and the recomputed forward of full remat).
EP_ALL_TO_ALLS_PER_PASS = 2


def diloco_round_bytes(param_bytes: float, islands: int) -> tuple[float, float]:
    """(written, read) bytes of one DiLoCo island per outer step (`train.diloco`: a
    reduce-scatter and all-gather through storage): its parameters out (P) and its part of
    the mean (P/N); its part of the N-1 other reports in and the N-1 other parts in
    (2 (N-1)/N P)."""
    return param_bytes * (1 + 1 / islands), param_bytes * 2 * (islands - 1) / islands


def forward_passes(remat: str) -> int:
    """Forward passes over each layer per step: 1, plus the recompute of full remat
    (the other policies recompute element-wise work only, not matmuls or collectives)."""
    return 2 if remat == "full" else 1


@dataclass
class Estimate:
    layout: Layout
    step_time_s: float
    mfu: float
    tokens_per_s_per_chip: float
    memory: Memory
    hbm_capacity: float
    breakdown: dict[str, float]  # seconds: compute, hbm, ici, dcn (exposed parts)
    comm: dict[str, float] = field(default_factory=dict)  # seconds of each collective, unhidden
    # hardware FLOPs per device per step (matmuls; with megamesh's pipeline the idle
    # iterations' too: its stages compute on zeros there, `model.pipeline`)
    flops_per_device: float = 0.0
    model_flops_per_step: float = 0.0
    dcn_traffic_s: float = 0.0  # seconds of DCN transfers per step, hidden or not

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.hbm_capacity

    @property
    def bottleneck(self) -> str:
        return max(self.breakdown, key=self.breakdown.__getitem__)

    def to_json(self, target: Target) -> dict:
        return {
            "layout": ({"pipeline": self.layout.stages} if self.layout.stages > 1 else {})
            | ({a: n for a, n in self.layout.sizes.items() if n > 1} or {"data": 1}),
            "pipeline_stages": self.layout.stages, "virtual_stages": self.layout.virtual,
            "layout_text": self.layout.text(), "remat": self.layout.remat,
            "microbatches": self.layout.microbatches,
            "offload_optimizer": self.layout.offload_optimizer,
            "ici": {a: p[0] for a, p in self.layout.placement.items() if p[0] > 1},
            "dcn": {a: p[1] for a, p in self.layout.placement.items() if p[1] > 1},
            "step_time_s": self.step_time_s, "mfu": self.mfu,
            "tokens_per_s_per_chip": self.tokens_per_s_per_chip,
            "hbm_per_device_bytes": self.memory.total,
            "hbm_parts_bytes": self.memory.parts(), "hbm_capacity_bytes": self.hbm_capacity,
            "fits": self.fits, "bottleneck": self.bottleneck,
            "breakdown_s": self.breakdown, "collectives_s": self.comm,
            "flops_per_device": self.flops_per_device,
        }


def axis_bandwidth(target: Target, n_ici: int) -> float:
    """Collective bandwidth (bytes/s egress per device) of an ICI axis of n_ici devices."""
    c = target.chip
    egress = c.ici_bw / 2 / c.devices_per_chip * ICI_EFFICIENCY
    if c.ici_topology == "nvlink":
        return egress
    ndim = 3 if c.ici_topology == "torus3d" else 2
    share = max(1 / ndim, math.log(n_ici) / math.log(max(target.slice_devices, 2)))
    return egress * min(1.0, share)


def gather_parts(target: Target, layout: Layout, axis: str, full_bytes: float) -> tuple[float, float]:
    """(ICI s, DCN s) of an all-gather (or reduce-scatter) over `axis` of an array of
    `full_bytes` gathered size: hierarchical, the DCN phase moves the 1/ni share."""
    ni, nd = layout.ici(axis), layout.dcn(axis)
    ici = dcn = 0.0
    if ni > 1:
        ici = full_bytes * (ni - 1) / ni / axis_bandwidth(target, ni)
    if nd > 1:
        c = target.chip
        dcn = full_bytes / ni * (nd - 1) / nd / (c.dcn_bw / c.devices_per_chip * DCN_EFFICIENCY)
    return ici, dcn


# splash's backward (separate dq and dkv kernels, MaxText's default) recomputes the
# scores and their gradient's product in both kernels: 7 block matmuls against autodiff's
# 4, i.e. 3.5x the forward's attention instead of 2x (checked against the kernel bodies in
# the compiled step's jaxpr, compile.hlo.dot_flops)
SPLASH_BACKWARD = 3.5


def causal_block_fraction(seq: int) -> float:
    """Share of the full T x T score matrix a causal flash kernel computes: splash's
    tiles (`model.specs.splash_block`) on and below the diagonal, nb (nb + 1) / 2 tiles of
    the padded sequence's nb^2. 0.53 at 8k tokens, 1 for one tile."""
    blk = splash_block(seq)
    nb = -(-seq // blk)
    return nb * (nb + 1) / 2 * blk * blk / (seq * seq)


def recomputes_attention(w: Workload, remat: str) -> bool:
    """Whether the backward pass runs attention and the expert matmuls forward again:
    under full, dots_no_batch (they have batch dimensions) and offload remat, and under
    dots too for the flash kernels (a Pallas call and ragged_dots are no dots to it)."""
    return remat in ("full", "dots_no_batch", "offload") or (remat == "dots" and w.flash)


def hardware_flops_per_token(w: Workload, remat: str) -> tuple[float, float, float]:
    """(train-step FLOPs per token the kernels execute, of which attention scores, of
    which routed-expert matmuls).

    Checked exactly against the step's jaxpr (tests): forward + 2x for the backward
    pass + what the remat policy recomputes.
    """
    c = w.cfg
    specs = specs_table(c)
    dense = sum(2.0 * s.size for s in specs.values() if s.matmul and s.active_fraction == 1)
    expert = sum(2.0 * s.size * s.active_fraction for s in specs.values() if s.active_fraction < 1)
    att = 4.0 * w.seq * c.n_heads * c.resolved_head_dim * c.n_layers  # full score matrix
    if w.flash:
        att *= causal_block_fraction(w.seq)  # flash kernels skip the blocks above the diagonal
    dispatch = _dispatch_forward(w)
    if dispatch:
        m = c.moe
        expert *= m.capacity_factor if m.capacity_factor else m.n_experts / m.top_k
    fwd = dense + expert + att + dispatch
    # Full remat recomputes each layer's forward except what nothing downstream needs (jax
    # drops it as dead code): the head (outside the scanned layers) and each layer's last
    # op before the residual add: w_down of dense MLPs and shared experts, the combine
    # einsum of MoE layers.
    head = 2.0 * c.vocab_size * c.d_model
    down = sum(2.0 * s.size for n, s in specs.items() if n.endswith("w_down")
               and s.active_fraction == 1)
    # dots_no_batch saves only matmuls without batch dims: attention, dispatch and the
    # per-expert einsums (batch dim: expert) are recomputed.
    nb = att + (expert + dispatch if dispatch else 0.0)
    # offload (MaxText's recipe policy) saves the layer input and the attention
    # projections: attention and a dense MLP's gate and up projections run again; in MoE
    # layers every expert matmul does (the combine's gradient needs the experts' outputs)
    # and the dispatch into experts
    gate_up = sum(2.0 * s.size for n, s in specs.items() if n.endswith(("w_gate", "w_up"))
                  and s.active_fraction == 1)
    off = att + gate_up + expert + dispatch / 2
    # the flash kernels (a Pallas call) and grouped matmuls (ragged_dot) are no dots to
    # the dots policies: never saved, so recomputed under both
    kernel_ops = att + expert if w.flash else 0.0
    recompute = {"full": fwd - head - down - dispatch / 2, "dots": kernel_ops, "none": 0.0,
                 "dots_no_batch": kernel_ops or nb, "offload": off}[remat]
    expert_train = expert * (4 if recomputes_attention(w, remat) else 3)
    if w.flash:
        recompute += (SPLASH_BACKWARD - 2) * att
    return 3 * fwd + recompute, att, expert_train


def _dispatch_forward(w: Workload) -> float:
    """Forward FLOPs per token of GShard's one-hot dispatch and combine einsums, 2 * slots *
    D each per MoE layer (the xla kernels' MoE; 0 otherwise)."""
    c = w.cfg
    if not (c.moe and w.kernels == "xla"):
        return 0.0
    m = c.moe
    n_moe = sum(st.n_layers for st in layer_stacks(c) if st.moe)
    slots = (m.capacity_factor * m.top_k if m.capacity_factor else m.n_experts) * w.seq
    return 4.0 * slots * c.d_model * n_moe


def dispatch_flops_per_token(w: Workload, remat: str) -> float:
    """Train-step FLOPs per token of the dispatch and combine einsums: forward, backward,
    and what the remat policy recomputes of them (as `hardware_flops_per_token` counts)."""
    fwd = _dispatch_forward(w)
    return 3 * fwd + {"full": fwd / 2, "offload": fwd / 2, "dots_no_batch": fwd}.get(remat, 0.0)


def estimate(w: Workload, target: Target, layout: Layout, memory: Memory | None = None) -> Estimate:
    c, chip = w.cfg, target.chip
    n_dev = target.devices
    peak_dev = chip.bf16_flops / chip.devices_per_chip  # MFU's denominator in both precisions
    hbm_bw = chip.hbm_bw / chip.devices_per_chip
    mem = memory or estimate_memory(w, layout, tpu=target.is_tpu)
    held, gathered = sharded_params(w, layout, tpu=target.is_tpu)
    t, e, s = layout.size("tensor"), layout.size("expert"), layout.size("sequence")
    mb = layout.microbatches
    tok_mb = tokens_per_microbatch(w, layout)
    tok_dev = tok_mb * mb
    # weight gathers (and the work every layer does per microbatch) per pass: with
    # pipeline stages the fill and drain iterations run the stage's layers too
    mb_iter = layout.pipeline_iterations

    hw_per_token, att, expert_per_token = hardware_flops_per_token(w, layout.remat)
    # attention's hardware FLOPs per token: forward, splash's backward, and the forward
    # again where remat recomputes it
    att_hw = att * (1 + SPLASH_BACKWARD + recomputes_attention(w, layout.remat))
    cp_pacing = 0.0
    if s > 1 and w.kernels == "megamesh":
        if target.is_tpu:
            # splash context parallelism (model.kernels.splash_context_parallel): keys
            # and values gathered, each device's queries offset by their positions. In
            # the load-balanced order (the sequence splits into 2s chunks) every device
            # does 1/s of the causal work; otherwise the last does (2s - 1) / s^2 of it
            if w.seq % (2 * s):
                cp_pacing = att_hw * w.tokens / n_dev * ((2 * s - 1) / s - 1)
        else:
            # the GPU kernels see whole sequences: each device of a sequence group
            # gathers queries, keys and values and repeats the whole attention
            hw_per_token += (s - 1) * att_hw
    # tensor/expert/sequence devices share tokens; each does its share of the work (the
    # busiest pipeline stage paces the step)
    imbalance = layout.stage_imbalance(c.n_layers)
    flops_dev = hw_per_token * w.tokens / n_dev * imbalance
    paced = flops_dev + (MOE_IMBALANCE - 1) * expert_per_token * w.tokens / n_dev + cp_pacing
    t_flops = paced / (peak_dev * MXU_EFFICIENCY)
    if w.precision == "fp8" and chip.fp8_flops:
        # the layers' matmuls at the FP8 rate; attention's kernels (and the context-
        # parallel pacing of them), the output head and MoE dispatch stay bf16
        head = 6.0 * c.vocab_size * c.d_model  # forward + both backward GEMMs
        bf16 = ((att_hw + head + dispatch_flops_per_token(w, layout.remat)) * w.tokens / n_dev
                * imbalance + cp_pacing)
        fp8_peak_dev = chip.fp8_flops / chip.devices_per_chip
        t_flops = (bf16 / (peak_dev * MXU_EFFICIENCY)
                   + max(0.0, paced - bf16) / (fp8_peak_dev * FP8_MXU_EFFICIENCY))
    # weight-streaming matmul passes per microbatch: forward, the backward's two GEMMs,
    # and the recomputed forward of full remat
    passes = 2 + forward_passes(layout.remat)
    t_weights = gathered * 2 * passes * mb_iter / hbm_bw
    t_mm = max(t_flops, t_weights)

    D, Dh = c.d_model, c.resolved_head_dim
    F = (c.moe.d_ff_expert * c.moe.top_k if c.moe else c.d_ff) / t
    HK = (c.n_heads + 2 * c.n_kv_heads) * Dh / t
    per_tok_layer = ELEMENTWISE_TRAFFIC * 2 * (12 * D + 3 * F + 2 * HK)
    if w.kernels == "xla":
        per_tok_layer += c.n_heads / t * w.seq * 12  # scores f32 out/in, probs bf16 out/in
    stage_layers = layout.stage_layers(c.n_layers)
    elem = tok_dev * per_tok_layer * stage_layers * (passes + 1)
    elem += tok_dev * c.vocab_size / t * 4 * LOGITS_F32_PASSES + held * OPTIMIZER_UPDATE_BYTES
    t_elem = elem / hbm_bw
    t_local = t_mm + t_elem

    comm: dict[str, float] = {}
    net = {"async_ici": 0.0, "async_dcn": 0.0, "sync_ici": 0.0, "sync_dcn": 0.0}

    def add(name: str, kind: str, axis: str, full_bytes: float, times: float) -> None:
        ici, dcn = gather_parts(target, layout, axis, full_bytes)
        comm[name] = comm.get(name, 0.0) + times * (ici + dcn)
        net[kind + "_ici"] += times * ici
        net[kind + "_dcn"] += times * dcn

    def add_zero(full_bytes: float, times: float) -> None:
        """A gather (or reduce-scatter) over the ZeRO axes, fsdp and sequence: one
        collective over both, its bytes as fsdp's whole and sequence's 1/fsdp share."""
        add("fsdp", "async", "fsdp", full_bytes, times)
        add("fsdp", "async", "sequence", full_bytes / layout.size("fsdp"), times)

    if layout.zero_ways > 1:  # bf16 weights gathered fwd and bwd, fp32 grads scattered
        add_zero(gathered * 2 * 2, mb_iter)
        add_zero(gathered * 4, mb_iter)
    if layout.stages > 1:  # activations forward, their gradients back, every iteration
        hops = layout.virtual * mb + (0 if layout.schedule == "1f1b" else layout.stages - 1)
        p2p = 2 * hops * tok_mb * D * 2 / t
        comm["pipeline_p2p"] = p2p / (chip.dcn_bw / chip.devices_per_chip * DCN_EFFICIENCY)
        net["async_dcn"] += comm["pipeline_p2p"]
    grad = held * 4
    for ax in ("data", "dcn"):  # parameters replicated over these: all-reduce
        if layout.size(ax) > 1:
            add(ax + "_grads", "async", ax, grad, 2)
    if t > 1:
        n_ar = TP_ALL_REDUCES_PER_PASS * (forward_passes(layout.remat) + 1)  # + backward
        add("tensor", "sync", "tensor", tok_mb * D * 2, mb * stage_layers * n_ar * 2)
    if s > 1:
        # context parallelism's key/value gathers (forward, the recompute, the backward's
        # reduce-scatter): asynchronous on TPU, compute in flight while they run (the
        # scheduled HLO shows it: compile/hlo.async_overlap, BENCHMARKS.md "Long context")
        kv = tok_mb * s * 2 * c.n_kv_heads * Dh / min(t, c.n_kv_heads) * 2
        add("sequence_kv", "async" if target.is_tpu else "sync", "sequence", kv, mb * stage_layers * 3)
    if e > 1 and c.moe:
        m = c.moe
        n_moe = sum(st.n_layers for st in layer_stacks(c) if st.moe) * stage_layers / c.n_layers
        vol = tok_mb * m.top_k * (m.capacity_factor or 1.0) * D * 2
        hops = max(1.0, layout.ici("expert") ** (1 / 3) / 2) if target.is_tpu else 1.0
        n_a2a = EP_ALL_TO_ALLS_PER_PASS * (forward_passes(layout.remat) + 1)  # + backward
        add("expert", "sync", "expert", vol, mb * n_moe * n_a2a * hops)

    # async collectives (XLA's latency-hiding scheduler) hide under local work; ICI and
    # DCN are separate networks and hide independently
    hide = OVERLAP * t_local
    exposed_ici = max(0.0, net["async_ici"] - hide)
    exposed_dcn = max(0.0, net["async_dcn"] - hide)
    sync = net["sync_ici"] + net["sync_dcn"]
    # host offload over PCIe: saved activations out in the forward pass and back in the
    # backward pass (asynchronous); offloaded optimizer moments in and out at the update
    host = 0.0
    exposed_host = 0.0
    if layout.remat == "offload":
        saved = sum(st.n_layers * layer_activation_bytes(w, layout, "offload", st.moe)
                    for st in layer_stacks(c))
        comm["host_activations"] = 2 * tok_dev * saved / chip.host_bw * chip.devices_per_chip
        exposed_host = max(0.0, comm["host_activations"] - hide)
    if layout.offload_optimizer:
        # both f32 moments in from host memory and back out: 2 x ADAM_BYTES per parameter
        comm["host_optimizer"] = held * 2 * ADAM_BYTES / chip.host_bw * chip.devices_per_chip
        host += comm["host_optimizer"]
    sync += host
    # the activations' PCIe traffic runs beside the collectives: beyond the local work the
    # step waits for the longer of the two, not their sum (the sum made less local work,
    # e.g. FP8 matmuls, predict a slower step once both were exposed). ICI and DCN
    # exposures still add (the hierarchical collectives' phases are sequential); with
    # both exposed, less local work can still predict a slower step (not changed here).
    if exposed_host > exposed_ici + exposed_dcn:
        exposed = {"ici": 0.0, "dcn": 0.0, "host": exposed_host}
    else:
        exposed = {"ici": exposed_ici, "dcn": exposed_dcn, "host": 0.0}
    host += exposed["host"]
    bubble = t_local * layout.bubble
    step = t_local + bubble + exposed["ici"] + exposed["dcn"] + exposed["host"] + sync
    model_flops = flops_per_token(c, w.seq, "train") * w.tokens
    mfu = model_flops / (step * n_dev * peak_dev)
    breakdown = {"compute": t_flops, "hbm": t_mm - t_flops + t_elem,
                 "ici": exposed["ici"] + net["sync_ici"], "dcn": exposed["dcn"] + net["sync_dcn"],
                 "host": host, "bubble": bubble}
    return Estimate(layout=layout, step_time_s=step, mfu=mfu,
                    tokens_per_s_per_chip=w.tokens / step / target.chips, memory=mem,
                    hbm_capacity=chip.device_hbm_bytes, breakdown=breakdown, comm=comm,
                    flops_per_device=flops_dev * (1 + layout.bubble * (layout.schedule == "gpipe")),
                    model_flops_per_step=model_flops,
                    dcn_traffic_s=net["async_dcn"] + net["sync_dcn"])
