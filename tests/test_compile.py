"""megamesh compile: the real train step compiled for TPU topologies from this CPU (libtpu),
checked against the planner. Small models keep the default suite fast; bigger cases are
marked slow."""

from __future__ import annotations

import json

import pytest

from conftest import cli_env, run_cli, run_main

GiB = 2**30


def compile_json(*argv: str, rc: int = 0) -> dict:
    """`megamesh compile ARGV --json` (in this process: compiling needs no fresh jax)."""
    r = run_main("compile", *argv, "--json")
    assert r.returncode == rc, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_compile_tiny_on_ironwood_matches_the_plan():
    out = compile_json("--model", "tiny", "--target", "tpu7x:2x2x1", "--mesh", "fsdp=8",
                       "--seq", "256", "--batch", "8", "--remat", "full")
    assert out["fits"] and out["devices"] == 8 and out["layout"] == "fsdp=8"
    hbm = out["hbm_per_device_bytes"]
    assert hbm["total"] == hbm["argument"] + hbm["output"] - hbm["alias"] + hbm["temp"] + hbm["code"]
    err = out["plan"]["relative_error"]
    assert abs(err["flops"]) <= 0.02
    # the step's arguments are the sharded state (fp32 params + AdamW moments, with TPU
    # (8, 128) tile padding) and this device's share of the int32 batch
    batch_bytes = 8 * 257 * 4 / 8
    state = out["plan"]["hbm_parts_bytes"]["state"]
    assert hbm["argument"] == pytest.approx(state + batch_bytes, rel=0.005)
    kinds = {c["kind"] for c in out["collectives"]}
    assert {"all-gather", "reduce-scatter"} <= kinds  # FSDP: gather weights, scatter grads
    # our FLOP count in XLA's convention (loop bodies once) agrees with XLA's cost analysis
    assert out["flops_xla_convention"] == pytest.approx(out["xla_flops"], rel=0.05)
    assert out["precision"] == "bf16" and out["fp8_matmul_share"] == 0.0


def test_fp8_step_runs_fp8_dots_for_the_layers_matmuls():
    """Issue 25 point 2 in small: with --precision fp8 the optimized TPU HLO multiplies the
    layers' matmuls in FP8 (e4m3 x e4m3 forward, e5m2 gradients against e4m3 residuals);
    what stays bf16/f32 is attention (here the reference kernel, whose batched matmuls
    XLA:TPU writes as dilated convolutions) and the output head. Every dot and
    convolution of the HLO, counted with its loops' trip counts and only the taps that
    meet real input, adds up to the jaxpr's matmul FLOPs exactly."""
    out = compile_json("--model", "tiny", "--model.vocab_size=256", "--target", "tpu7x:2x2x1",
                       "--mesh", "fsdp=8", "--seq", "256", "--batch", "8", "--remat", "full",
                       "--precision", "fp8", "--kernels", "attention=reference")
    assert out["fits"] and out["precision"] == "fp8" and "precision=fp8" in out["kernels"]
    by_type = out["matmul_flops_by_type"]
    assert sum(by_type.values()) == pytest.approx(out["flops"], rel=1e-9)
    assert {"f8e4m3fn x f8e4m3fn", "f8e5m2 x f8e4m3fn", "f8e4m3fn x f8e5m2"} <= set(by_type)
    assert out["fp8_matmul_share"] >= 0.85, by_type  # the rest: attention and the head
    speed = out["plan"]["by_precision"]
    assert speed["fp8"]["step_time_s"] <= speed["bf16"]["step_time_s"]


@pytest.mark.slow  # 62 s; the masked TPU step's compile and its asynchronous gathers are
# also in test_plan_memory_at_long_context_within_15_percent_of_xla (document mask on)
def test_document_masked_step_compiles_for_ironwood_and_fits_as_before():
    """Segment ids through splash under context parallelism (fsdp=4,sequence=2): the
    TPU step with document masking compiles and holds what the plain one does (8B at
    seq 8192: the same HBM to 0.004%, BENCHMARKS.md)."""
    common = ["--model", "tiny", "--model.n_layers=1", "--target", "tpu7x:2x2x1", "--mesh",
              "fsdp=4,sequence=2", "--seq", "512", "--batch", "8", "--remat", "full"]
    plain, masked = (compile_json(*common, "--document-mask", m) for m in ("off", "on"))
    assert not plain["document_mask"] and masked["document_mask"]
    assert plain["fits"] and masked["fits"]
    a, b = plain["hbm_per_device_bytes"]["total"], masked["hbm_per_device_bytes"]["total"]
    assert abs(b / a - 1) < 0.05, (a, b)
    # the keys' and values' gathers (and with the mask the segment ids') run asynchronously
    # with compute scheduled while they are in flight (forward, and the remat's recompute)
    for out, at_least in ((plain, 4), (masked, 5)):
        gathers = out["context_parallel_gathers"]
        assert len(gathers) >= at_least and all(g["compute_between"] > 0 for g in gathers), gathers


SMALL = ["--model", "llama3.1-8b", "--model.d_model=1024", "--model.n_heads=8",
         "--model.n_kv_heads=2", "--model.d_ff=3584", "--model.n_layers=4",
         "--model.vocab_size=32000"]
EIGHT_B_4 = ["--model", "llama3.1-8b", "--model.n_layers=4"]
DRIFT = ("plan memory over XLA's by more than 10% (overestimates; the 2026-12-05 long-context "
         "refit left them over, BENCHMARKS.md \"Long context\")")
DRIFTED = [pytest.mark.slow, pytest.mark.xfail(strict=True, reason=DRIFT)]
MEMORY_CASES = [  # (model args, target, layout, seq, batch, remat, microbatches)
    # slow since the default suite's memory check became the long-context one (32k tokens
    # over 4 sequence shards, below): one ~60 s compile of the model in the default suite
    pytest.param(SMALL, "tpu7x:2x2x1", "fsdp=8", 2048, 8, "full", 1, id="small-tpu7x-fsdp",
                 marks=pytest.mark.slow),
    pytest.param(SMALL, "v5p:2x2x1", "fsdp=2,tensor=2", 2048, 8, "none", 1, id="small-v5p-tp",
                 marks=pytest.mark.slow),  # v5p tensor parallel also compiles in another test
    pytest.param(SMALL, "v6e:2x2", "fsdp=2,tensor=2", 2048, 8, "none", 1, id="small-v6e-tp",
                 marks=[pytest.mark.slow, pytest.mark.xfail(
                     reason="known miss of the memory fit: plan +16% (BENCHMARKS.md)")]),
    # mid-fit (-4.6% in BENCHMARKS.md): the mission's chip, 8B layers (63 s: the slow set;
    # the default suite keeps small-tpu7x-fsdp)
    pytest.param(EIGHT_B_4, "tpu7x:2x2x2", "fsdp=16", 2048, 16, "full", 1, id="8b-tpu7x-fsdp",
                 marks=pytest.mark.slow),
    # three cases the plan now over-predicts (2026-12-04: +19%, +21%, +13%; they were within
    # 10% when the memory model was fitted, BENCHMARKS.md): strict, so a fix shows
    pytest.param(EIGHT_B_4, "v5p:2x2x2", "fsdp=4,tensor=2", 2048, 8, "dots", 1, id="8b-v5p-tp",
                 marks=DRIFTED),
    pytest.param(EIGHT_B_4, "v5p:2x2x2", "data=2,fsdp=4", 2048, 16, "dots_no_batch", 2,
                 id="8b-v5p-accumulate", marks=DRIFTED),
    pytest.param(SMALL, "v6e:4x4", "fsdp=16", 2048, 16, "dots_no_batch", 1, id="small-v6e-fsdp",
                 marks=DRIFTED),
]


@pytest.mark.parametrize("model,target,mesh,seq,batch,remat,mb", MEMORY_CASES)
def test_plan_memory_within_10_percent_of_xla(model, target, mesh, seq, batch, remat, mb):
    out = compile_json(*model, "--target", target, "--mesh", mesh, "--seq", str(seq), "--batch",
                       str(batch), "--remat", remat, "--microbatches", str(mb))
    err = out["plan"]["relative_error"]
    assert abs(err["hbm_per_device_bytes"]) <= 0.10, err
    assert abs(err["flops"]) <= 0.02, err
    assert out["fits"] and out["plan"]["fits"]


def test_plan_memory_at_long_context_within_15_percent_of_xla():
    """Issue 26: flash kernels hold no T x T probabilities and context parallelism gathers
    each layer's keys and values; the planner counts what they hold (32k tokens over 4
    sequence shards; BENCHMARKS.md "Long context" has the 16k-128k cases). The sequence
    stays split through the layers' matmuls: XLA gathered it whole for the backward's
    recompute when the matmuls merged batch and sequence (4x the MLP's temporaries)."""
    out = compile_json(*SMALL[:-2], "--model.n_layers=2", "--model.vocab_size=32000",
                       "--target", "tpu7x:2x2x1", "--mesh", "fsdp=2,sequence=4", "--seq", "32768",
                       "--batch", "8", "--remat", "full")
    err = out["plan"]["relative_error"]
    assert abs(err["hbm_per_device_bytes"]) <= 0.15, err
    assert out["fits"] and out["plan"]["fits"]
    assert out["document_mask"], "the default: segment ids through splash under context parallelism"
    assert out["context_parallel_gathers"], "the key/value gathers run asynchronously"


def test_offload_remat_puts_the_named_activations_in_host_memory():
    """Remat "offload" (MaxText's recipe policy) compiles for Ironwood: each layer's input
    and q, k, v and out-projection outputs of every token live in pinned host memory,
    exactly, and the plan's FLOPs (attention, gate and up recomputed) are XLA's. (HBM: with
    default XLA flags the TPU scheduler keeps device copies of more in-flight layers than
    the plan assumes; BENCHMARKS.md.) With the reference attention: under splash XLA:TPU
    offloads 1.5x these bytes (one more 2 x d_model-wide array per token and layer; not
    yet explained, issue 14's notes)."""
    out = compile_json("--model", "tiny", "--target", "tpu7x:2x2x1", "--mesh", "fsdp=8",
                       "--seq", "256", "--batch", "8", "--remat", "offload",
                       "--kernels", "attention=reference")
    from megamesh.config import preset
    from megamesh.model.specs import DTYPE_BYTES

    c = preset("tiny")  # float32 compute
    per_token_layer = DTYPE_BYTES[c.compute_dtype] * (
        2 * c.d_model + (c.n_heads + 2 * c.n_kv_heads) * c.resolved_head_dim)
    tokens = 8 * 256 // 8
    assert out["hbm_per_device_bytes"]["host_temp"] == c.n_layers * tokens * per_token_layer
    assert abs(out["plan"]["relative_error"]["flops"]) <= 0.02


def test_compile_saves_the_executable_never_overwrites_and_prints_no_libtpu_noise(tmp_path):
    """libtpu looks for TPU VM metadata it cannot find here and used to print `E0000 ...
    unexpected worker hostname` and `Failed to find host bounds` on every compile; the
    compile path now tells it (issue 30 point 4). A real subprocess: libtpu writes to
    file descriptor 2, which an in-process capture would miss."""
    exe = tmp_path / "step.exe"
    args = ["--model", "tiny", "--model.n_layers=1", "--target", "tpu7x:2x2x1", "--mesh",
            "fsdp=8", "--seq", "128", "--batch", "8", "--save", str(exe)]
    env = {k: v for k, v in cli_env().items()
           if k not in ("TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE")}
    r = run_cli("compile", *args, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for noise in ("E0000", "Failed to find host bounds", "could not determine TPU"):
        assert noise not in r.stderr, r.stderr[-3000:]
    assert exe.stat().st_size > 1000
    before = exe.read_bytes()
    r = run_main("compile", *args)
    assert r.returncode == 2 and "already exists" in r.stderr
    assert exe.read_bytes() == before


def test_fsdp_spans_slices_over_dcn():
    """fsdp=16 on two 8-device slices: the fsdp axis itself crosses DCN (MaxText's
    dcn_fsdp_parallelism), so each device holds 1/16 of the state, as the plan says."""
    from megamesh.config import preset
    from megamesh.plan.layout import Layout, Workload, place
    from megamesh.plan.memory import estimate_memory
    from megamesh.plan.target import Target, parse_target

    out = compile_json("--model", "tiny", "--target", "tpu7x:2x2x1", "--slices", "2", "--mesh",
                       "fsdp=16", "--seq", "256", "--batch", "16", "--remat", "full")
    assert out["fits"] and out["devices"] == 16
    batch_bytes = 16 * 257 * 4 / 16
    state = out["plan"]["hbm_parts_bytes"]["state"]
    assert out["hbm_per_device_bytes"]["argument"] == pytest.approx(state + batch_bytes, rel=0.01)
    one = parse_target("tpu7x:2x2x1")
    two = Target(one.chip, 2, one.slice_chips, one.topology)
    w = Workload(preset("tiny"), 256, 16)
    spans = place({"fsdp": 16}, two)
    assert spans["fsdp"] == (8, 2)  # 8 ways within a slice x 2 across
    data_over_dcn = estimate_memory(w, Layout({"dcn": 2, "fsdp": 8},
                                              placement=place({"dcn": 2, "fsdp": 8}, two)), tpu=True)
    assert state < 0.6 * data_over_dcn.state


@pytest.mark.slow  # 22 s; tensor parallel compiles also in small-v5p-tp and the sharding tests
def test_compile_tensor_parallel_on_v5p_flops_and_state():
    out = compile_json("--model", "tiny", "--target", "v5p:2x2x1", "--mesh", "fsdp=2,tensor=2",
                       "--seq", "512", "--batch", "8", "--remat", "none")
    assert out["fits"]
    assert abs(out["plan"]["relative_error"]["flops"]) <= 0.02
    assert any(c["kind"] == "all-reduce" and c["bytes"] > 0 for c in out["collectives"])


def test_compile_bad_input_is_a_clear_error():
    for argv, needle in [(["--target", "h100:8"], "TPU"), (["--mesh", "fsdp=3"], "devices"),
                         (["--step", "prefill"], "--step")]:
        r = run_main("compile", "--model", "tiny", *argv)
        assert r.returncode == 2, r.stderr[-2000:]
        assert needle in r.stderr and "Traceback" not in r.stderr


def test_layout_that_cannot_fit_is_reported_by_both():
    out = compile_json("--model", "llama3.1-8b", "--model.n_layers=16", "--target", "v5e:2x2",
                       "--mesh", "fsdp=4", "--seq", "1024", "--batch", "4", "--remat", "full",
                       rc=3)
    assert out["fits"] is False and out["plan"]["fits"] is False
    assert out["hbm_per_device_bytes"]["total"] > out["hbm_capacity_bytes"]
    assert "memory" in out["error"].lower() or "hbm" in out["error"].lower()


@pytest.mark.slow  # 23 s; --verify runs compile_and_compare, which the compile tests above run
def test_plan_verify_compiles_the_best_layout():
    r = run_main("plan", "--model", "tiny", "--target", "tpu7x:4", "--seq", "256", "--batch", "8",
                 "--verify")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "plan vs compile:" in r.stdout and "fits:" in r.stdout


def test_compile_decode_step_for_serving():
    """The serving decode step over the paged KV cache, for tpu7x: attention is TPU's ragged
    paged attention kernel (head dim 128), and the pages are updated in place."""
    out = compile_json("--step", "decode", "--model", "tiny", "--model.head_dim=128", "--target",
                       "tpu7x:2x2x1", "--mesh", "data=2,tensor=4", "--seq", "1024", "--batch", "32")
    assert out["fits"] and out["step"] == "decode"
    assert out["paged_attention"].startswith("ragged")
    parts, hbm = out["plan"]["hbm_parts_bytes"], out["hbm_per_device_bytes"]
    # arguments: bf16 weights (serve rules: tensor parallel) + this device's KV pages + rows
    assert hbm["argument"] == pytest.approx(parts["weights"] + parts["kv_cache"], rel=0.01)
    assert hbm["alias"] == pytest.approx(parts["kv_cache"], rel=0.01)  # donated: in place
    assert hbm["temp"] < 0.1 * parts["kv_cache"]  # no copy of the pages
    assert any(c["kind"] == "all-reduce" for c in out["collectives"])  # tensor parallel
    # issue 25 point 4: the same step serving fp8 weights (the layers' matmuls): the
    # arguments hold them at 1 byte, as planned, the pages as before
    fp8 = compile_json("--step", "decode", "--model", "tiny", "--model.head_dim=128", "--target",
                       "tpu7x:2x2x1", "--mesh", "data=2,tensor=4", "--seq", "1024", "--batch", "32",
                       "--weights", "fp8")
    assert fp8["fits"] and fp8["weights"] == "fp8"
    q = fp8["plan"]["hbm_parts_bytes"]
    assert q["weights"] < 0.8 * parts["weights"] and q["kv_cache"] == parts["kv_cache"]
    assert fp8["hbm_per_device_bytes"]["argument"] == pytest.approx(q["weights"] + q["kv_cache"], rel=0.02)


@pytest.mark.slow
def test_405b_train_step_compiles_for_a_full_ironwood_pod():
    """Llama 3.1 405B on 9,216 chips (18,432 devices): fits, per plan and per XLA."""
    out = compile_json("--model", "llama3.1-405b", "--target", "tpu7x:16x24x24", "--mesh",
                       "data=9,fsdp=256,tensor=8", "--seq", "2048", "--batch", "2304",
                       "--remat", "full")
    assert out["devices"] == 18432 and out["fits"] and out["plan"]["fits"]
    assert abs(out["plan"]["relative_error"]["flops"]) <= 0.02


WINDOWED_LOOP_HLO = """\
%body (p: (u32[], bf16[8,8])) -> (u32[], bf16[8,8]) {
  %p = (u32[], bf16[8,8]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %x = bf16[8,8]{1,0} get-tuple-element(%p), index=1
  %two = u32[] constant(2)
  %next = u32[] add(%i, %two)
  %y = bf16[8,8]{1,0} convolution(%x, %x), dim_labels=bf_io->bf
  ROOT %t = (u32[], bf16[8,8]) tuple(%next, %y)
}

%cond (q: (u32[], bf16[8,8])) -> pred[] {
  %q = (u32[], bf16[8,8]) parameter(0)
  %bound = u32[] constant(4)
  %j = u32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %bound), direction=LT
}

ENTRY %main (a: bf16[8,8]) -> bf16[8,8] {
  %a = bf16[8,8]{1,0} parameter(0)
  %zero = u32[] constant(0)
  %start = u32[] copy(%zero)
  %init = (u32[], bf16[8,8]) tuple(%start, %a)
  %w = (u32[], bf16[8,8]) while(%init), condition=%cond, body=%body
  ROOT %out = bf16[8,8]{1,0} get-tuple-element(%w), index=1
}
"""


def test_hlo_loops_count_their_trips_from_start_bound_and_step():
    """XLA's windowed-einsum loops count from 0 by 2 to their bound (u32): the loop above
    runs twice, so its 8x8x8 matmul counts 2 x 1,024 FLOPs (read as its bound alone it
    was 4 times; as an unknown loop once)."""
    from megamesh.compile.hlo import fp8_share, matmul_flops

    got = matmul_flops(WINDOWED_LOOP_HLO)
    assert got == {"bf16 x bf16": 2 * 2 * 8 * 8 * 8}
    assert fp8_share(got) == 0.0
    assert matmul_flops(WINDOWED_LOOP_HLO.replace("constant(2)", "constant(1)")) == {"bf16 x bf16": 4 * 1024}
