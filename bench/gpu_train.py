"""Training tokens/s and MFU on one GPU: megamesh vs Hugging Face transformers.

The model (issue 14's): Llama-shaped, d_model 2048, 16 layers, 16 heads / 8 KV heads,
head_dim 128, d_ff 8192, vocab 32000, untied embeddings (1,137,772,544 parameters in
both systems), synthetic tokens, bf16 compute, fp32 master weights, AdamW.

- megamesh: `build_train_step` on a one-device mesh with its defaults (remat "auto",
  the platform's kernels: cuDNN attention, native bf16 matmuls, fused chunked loss).
- hf-eager: `LlamaForCausalLM` (attn_implementation="sdpa"), fp32 weights,
  `torch.autocast(bfloat16)`, `torch.optim.AdamW(fused=True)`, no checkpointing.
- hf-compile: the same under `torch.compile`.
- megamesh-fp8: megamesh with `--precision fp8` (the layers' matmuls in FP8 through Qwix,
  model/quant.py; needs the `qwix` wheel of bench/gpu_wheels.sh on the GPU image): issue
  25 point 6's FP8 vs bf16 at 2048 x 16, the same run.

Each measurement runs in its own process (bench/workers.py: a fresh allocator, so an
out-of-memory ends that row only; a timeout per worker, `--timeout`, after which it is
killed with its process group; each finished row appended to the `--out` JSONL file at
once; no worker starts when under 20 s of `--budget` are left). A worker imports only
what the step needs: none of the packages the GPU image lacks (workers.NOT_ON_GPU_IMAGE).
`--steps` steps per worker, of which the first `--warmup` are dropped; the figure is the
median step time, and over `--runs` processes
(run 1 of every row first, so a run cut short has every row once) the median of those.
MFU = megamesh's model FLOPs per token (`model.specs.flops_per_token`: 6N plus causal
attention) x tokens/s / the GPU's dense bf16 peak (`--peak`, default 989e12: H100/H200
SXM, NVIDIA's datasheet). Both systems see the same tokens per row: megamesh's batch is
seq + 1 tokens (inputs and shifted targets), Hugging Face gets `labels=input_ids` of
seq tokens and shifts them itself. Usage on the GPU machine (megamesh + hf-eager at the
three shapes in one call of under 8 minutes):

    PYTHONPATH=src python bench/gpu_train.py --out $OUT/train.jsonl --cache /tmp/jax-cache
    python bench/gpu_train.py --table train.jsonl      # the table of a (cut-short) run

`--tiny` runs a 2-layer, 256-wide model at small shapes: a check of this script on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from workers import (
    Budget,
    Rows,
    compilation_cache_env,
    emit,
    error_row,
    not_loaded,
    read_rows,
    run_worker,
    timeouts_for,
)

MODEL = {"d_model": 2048, "n_layers": 16, "n_heads": 16, "n_kv_heads": 8, "head_dim": 128,
         "d_ff": 8192, "vocab_size": 32000}
TINY = {"d_model": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 64,
        "d_ff": 512, "vocab_size": 1024}
SHAPES = [(2048, 16), (8192, 4), (512, 64)]  # (seq, batch)
TINY_SHAPES = [(128, 4), (256, 2)]
SYSTEMS = ("megamesh", "hf-eager", "hf-compile", "megamesh-fp8")


def model_flops_per_token(model: dict, seq: int) -> float:
    from megamesh.config import ModelConfig
    from megamesh.model.specs import flops_per_token

    return flops_per_token(ModelConfig(name="bench", **model, max_seq_len=seq), seq, "train")


def run_megamesh(model: dict, seq: int, batch: int, steps: int, precision: str = "bf16") -> dict:
    import jax
    import numpy as np

    from megamesh.config import ModelConfig
    from megamesh.runspec import RunSpec
    from megamesh.sharding.mesh import global_array, make_mesh
    from megamesh.train.config import ScheduleConfig, TrainConfig
    from megamesh.train.step import build_train_step

    cfg = ModelConfig(name="bench", **model, max_seq_len=seq)
    tc = TrainConfig(steps=1000, global_batch=batch, seq_len=seq, schedule=ScheduleConfig(warmup_steps=10),
                     run=RunSpec(precision=precision))
    ts = build_train_step(cfg, tc, make_mesh("fsdp=1", jax.devices()[:1]))
    state = ts.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        b = global_array(rng.integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int32),
                         ts.batch_sharding)
        t0 = time.perf_counter()
        state, m = ts.fn(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return {"times": times, "loss": float(m["loss"]), "model": model, "remat": ts.remat,
            "kernels": ts.kernels.describe(), "loss_chunks": ts.loss_chunks,
            "versions": {"jax": jax.__version__}}


def run_hf(model: dict, seq: int, batch: int, steps: int, compiled: bool) -> dict:
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    conf = transformers.LlamaConfig(
        hidden_size=model["d_model"], num_hidden_layers=model["n_layers"],
        num_attention_heads=model["n_heads"], num_key_value_heads=model["n_kv_heads"],
        head_dim=model["head_dim"], intermediate_size=model["d_ff"],
        vocab_size=model["vocab_size"], max_position_embeddings=seq, tie_word_embeddings=False,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    net = transformers.LlamaForCausalLM(conf).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4, weight_decay=0.1, fused=dev == "cuda")
    fwd = torch.compile(net) if compiled else net
    gen = torch.Generator(device="cpu").manual_seed(0)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, model["vocab_size"], (batch, seq), generator=gen).to(dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = fwd(input_ids=ids, labels=ids).loss  # the model shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"times": times, "loss": float(loss), "model": model,
            "params": sum(p.numel() for p in net.parameters()),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def worker(system: str, seq: int, batch: int, steps: int, tiny: bool) -> None:
    """One measurement in this process; prints one JSON line (an out-of-memory is a result)."""
    model = TINY if tiny else MODEL
    try:
        if system in ("megamesh", "megamesh-fp8"):
            out = run_megamesh(model, seq, batch, steps, "fp8" if system == "megamesh-fp8" else "bf16")
        else:
            out = run_hf(model, seq, batch, steps, compiled=system == "hf-compile")
    except Exception as e:  # noqa: BLE001 - OOM is reported, anything else too
        emit(error_row(e))
        return
    if system.startswith("megamesh"):  # the step alone: not the loop's data, checkpoint or grammar libraries
        out["imported"] = not_loaded()
    emit(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=4, metavar=("SYSTEM", "SEQ", "BATCH", "STEPS"))
    ap.add_argument("--runs", type=int, default=2,
                    help="processes per measurement (median); run 1 of every row comes first")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="first steps dropped (compile, warm-up)")
    ap.add_argument("--systems", default="megamesh,hf-eager", help=f"any of {','.join(SYSTEMS)}")
    ap.add_argument("--shapes", help="SEQxBATCH,... (default: 2048x16,8192x4,512x64)")
    ap.add_argument("--peak", type=float, default=989e12, help="dense bf16 FLOP/s of the GPU")
    ap.add_argument("--tiny", action="store_true", help="small model and shapes (a CPU check)")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per worker process")
    ap.add_argument("--timeout-for", action="append", default=[], metavar="SYSTEM=S",
                    help="another timeout for one system's workers")
    ap.add_argument("--budget", type=float, default=450.0,
                    help="seconds for the whole run: no worker starts with under 20 s left")
    ap.add_argument("--cache", help="jax's persistent compilation cache directory for workers")
    ap.add_argument("--out", help="JSONL results file, a line per measurement as it ends")
    ap.add_argument("--table", metavar="JSONL", help="print the table of a results file and exit")
    args = ap.parse_args()
    if args.worker:
        system, seq, batch, steps = args.worker
        worker(system, int(seq), int(batch), int(steps), args.tiny)
        return 0
    if args.table:
        header, rows = read_rows(args.table)
        print(table(summarize(rows, header.get("warmup", 3), header.get("peak", args.peak))))
        return 0
    systems = args.systems.split(",")
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        print(f"--systems: {bad} not allowed: any of {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    timeouts = timeouts_for(args.timeout, args.timeout_for, SYSTEMS)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    model = TINY if args.tiny else MODEL
    if args.warmup >= args.steps:
        print("--warmup must be below --steps", file=sys.stderr)
        return 2
    header = {"model": model, "peak": args.peak, "warmup": args.warmup, "steps": args.steps,
              "flops_per_token": {f"{s}": model_flops_per_token(model, s) for s, _ in shapes}}
    rows, budget = Rows(args.out, header), Budget(args.budget)
    env = compilation_cache_env(args.cache)
    for run in range(args.runs):
        for seq, batch in shapes:
            for system in systems:
                row = {"system": system, "seq": seq, "batch": batch, "run": run}
                timeout = budget.timeout(timeouts[system])
                if timeout is None:
                    row.update(error="skipped: the --budget ran out", oom=False)
                else:
                    cmd = [sys.executable, __file__, "--worker", system, str(seq), str(batch),
                           str(args.steps)] + (["--tiny"] if args.tiny else [])
                    row.update(run_worker(cmd, timeout, env))
                rows.add(row)
                print(json.dumps({k: v for k, v in row.items() if k != "times"}),
                      file=sys.stderr, flush=True)
    summary = summarize(rows.rows, args.warmup, args.peak, header["flops_per_token"])
    print(table(summary))
    return 0


def summarize(rows: list[dict], warmup: int, peak: float,
              flops_per_token: dict[str, float] | None = None) -> list[dict]:
    """One row per (system, shape): the median over runs of each run's median step time."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["system"], r["seq"], r["batch"]), []).append(r)
    out = []
    for (system, seq, batch), runs in groups.items():
        ok = [r for r in runs if "times" in r and len(r["times"]) > warmup]
        row = {"system": system, "seq": seq, "batch": batch, "runs": len(runs), "ok": len(ok)}
        if ok:
            step = statistics.median(statistics.median(r["times"][warmup:]) for r in ok)
            fpt = (flops_per_token or {}).get(f"{seq}") or model_flops_per_token(
                ok[0].get("model") or MODEL, seq)
            row.update(step_s=step, tokens_per_s=seq * batch / step,
                       mfu=fpt * seq * batch / step / peak, loss=ok[0]["loss"],
                       **{k: ok[0][k] for k in ("remat", "kernels", "loss_chunks") if k in ok[0]})
        else:
            row["error"] = runs[0].get("error", "")
        out.append(row)
    return out


def table(results: list[dict]) -> str:
    """Markdown: one row per system and shape, with ratios to HF eager and compiled and
    to megamesh in bf16 (for its FP8 row)."""
    base = {(r["system"], r["seq"], r["batch"]): r.get("tokens_per_s") for r in results}
    out = ["| system | seq x batch | remat / kernels | tokens/s | MFU | vs hf-eager | vs hf-compile "
           "| vs megamesh bf16 |",
           "|---|---|---|---|---|---|---|---|"]
    for r in results:
        key = (r["seq"], r["batch"])
        if "tokens_per_s" not in r:
            out.append(f"| {r['system']} | {key[0]} x {key[1]} | | {r.get('error', '')[:80]} | | | | |")
            continue
        ratios = []
        for peer in ("hf-eager", "hf-compile", "megamesh"):
            b = base.get((peer, *key))
            ratios.append(f"{r['tokens_per_s'] / b:.2f}x" if b else "-")
        how = f"{r['remat']}, {r['kernels']}" if "remat" in r else ""
        out.append(f"| {r['system']} | {key[0]} x {key[1]} | {how} | {r['tokens_per_s']:,.0f} "
                   f"| {r['mfu']:.1%} | {ratios[0]} | {ratios[1]} | {ratios[2]} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
