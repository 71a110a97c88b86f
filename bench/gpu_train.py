"""Training tokens/s and MFU on one GPU: megamesh vs Hugging Face transformers.

The model (issue 14's): Llama-shaped, d_model 2048, 16 layers, 16 heads / 8 KV heads,
head_dim 128, d_ff 8192, vocab 32000, untied embeddings (1,137,772,544 parameters in
both systems), synthetic tokens, bf16 compute, fp32 master weights, AdamW.

- megamesh: `build_train_step` on a one-device mesh with its defaults (remat "auto",
  the platform's kernels: cuDNN attention, native bf16 matmuls, fused chunked loss).
- hf-eager: `LlamaForCausalLM` (attn_implementation="sdpa"), fp32 weights,
  `torch.autocast(bfloat16)`, `torch.optim.AdamW(fused=True)`, no checkpointing.
- hf-compile: the same under `torch.compile`.

Each measurement runs in its own process (a fresh allocator; an out-of-memory in one
does not poison the next), `--steps` steps of which the first `--warmup` are dropped;
the reported figure is the median step time, and over `--runs` processes the median of
those. MFU = megamesh's model FLOPs per token (`model.specs.flops_per_token`: 6N plus
causal attention) x tokens/s / the GPU's dense bf16 peak (`--peak`, default 989e12:
H100/H200 SXM, NVIDIA's datasheet). Usage on the GPU machine:

    PYTHONPATH=src python bench/gpu_train.py --runs 3 --json gpu.json

`--tiny` runs a 2-layer, 256-wide model at small shapes: a check of this script on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODEL = {"d_model": 2048, "n_layers": 16, "n_heads": 16, "n_kv_heads": 8, "head_dim": 128,
         "d_ff": 8192, "vocab_size": 32000}
TINY = {"d_model": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 64,
        "d_ff": 512, "vocab_size": 1024}
SHAPES = [(2048, 16), (8192, 4), (512, 64)]  # (seq, batch)
TINY_SHAPES = [(128, 4), (256, 2)]
SYSTEMS = ("megamesh", "hf-eager", "hf-compile")


def model_flops_per_token(model: dict, seq: int) -> float:
    from megamesh.config import ModelConfig
    from megamesh.model.specs import flops_per_token

    return flops_per_token(ModelConfig(name="bench", **model, max_seq_len=seq), seq, "train")


def run_megamesh(model: dict, seq: int, batch: int, steps: int) -> dict:
    import jax
    import numpy as np

    from megamesh.config import ModelConfig
    from megamesh.sharding.mesh import make_mesh
    from megamesh.train.config import ScheduleConfig, TrainConfig
    from megamesh.train.loop import global_array
    from megamesh.train.step import build_train_step

    cfg = ModelConfig(name="bench", **model, max_seq_len=seq)
    tc = TrainConfig(steps=1000, global_batch=batch, seq_len=seq, schedule=ScheduleConfig(warmup_steps=10))
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
    return {"times": times, "loss": float(m["loss"]), "remat": ts.remat,
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
        ids = torch.randint(0, model["vocab_size"], (batch, seq + 1), generator=gen).to(dev)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = fwd(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"times": times, "loss": float(loss), "params": sum(p.numel() for p in net.parameters()),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def worker(system: str, seq: int, batch: int, steps: int, tiny: bool) -> None:
    """One measurement in this process; prints one JSON line (an out-of-memory is a result)."""
    model = TINY if tiny else MODEL
    try:
        if system == "megamesh":
            out = run_megamesh(model, seq, batch, steps)
        else:
            out = run_hf(model, seq, batch, steps, compiled=system == "hf-compile")
    except Exception as e:  # noqa: BLE001 - OOM is reported, anything else too
        msg = str(e)
        oom = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
        print(json.dumps({"error": ("out of memory: " if oom else "") + msg[:400], "oom": oom}))
        return
    print(json.dumps(out))


def measure(system: str, seq: int, batch: int, steps: int, tiny: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, str(seq), str(batch), str(steps)]
    cmd += ["--tiny"] if tiny else []
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": f"exit {r.returncode}: {r.stderr[-600:]}", "oom": False}
    return json.loads(lines[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=4, metavar=("SYSTEM", "SEQ", "BATCH", "STEPS"))
    ap.add_argument("--runs", type=int, default=3, help="processes per measurement (median)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="first steps dropped (compile, warm-up)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--shapes", help="SEQxBATCH,... (default: 2048x16,8192x4,512x64)")
    ap.add_argument("--peak", type=float, default=989e12, help="dense bf16 FLOP/s of the GPU")
    ap.add_argument("--tiny", action="store_true", help="small model and shapes (a CPU check)")
    ap.add_argument("--json", help="write all results to this file")
    args = ap.parse_args()
    if args.worker:
        system, seq, batch, steps = args.worker
        worker(system, int(seq), int(batch), int(steps), args.tiny)
        return 0
    systems = args.systems.split(",")
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        print(f"--systems: {bad} not allowed: any of {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    model = TINY if args.tiny else MODEL
    if args.warmup >= args.steps:
        print("--warmup must be below --steps", file=sys.stderr)
        return 2
    results = []
    for seq, batch in shapes:
        fpt = model_flops_per_token(model, seq)
        for system in systems:
            runs = [measure(system, seq, batch, args.steps, args.tiny) for _ in range(args.runs)]
            ok = [r for r in runs if "times" in r]
            row = {"system": system, "seq": seq, "batch": batch, "runs": runs}
            if ok:
                step = statistics.median(statistics.median(r["times"][args.warmup:]) for r in ok)
                row.update(step_s=step, tokens_per_s=seq * batch / step,
                           mfu=fpt * seq * batch / step / args.peak,
                           **{k: ok[0][k] for k in ("remat", "kernels", "loss_chunks") if k in ok[0]})
            else:
                row["error"] = runs[0].get("error", "")
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), file=sys.stderr,
                  flush=True)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "peak": args.peak, "results": results}, f, indent=1)
    return 0


def table(results: list[dict]) -> str:
    """Markdown: one row per system and shape, with ratios to HF eager and compiled."""
    base = {(r["system"], r["seq"], r["batch"]): r.get("tokens_per_s") for r in results}
    out = ["| system | seq x batch | remat / kernels | tokens/s | MFU | vs hf-eager | vs hf-compile |",
           "|---|---|---|---|---|---|---|"]
    for r in results:
        key = (r["seq"], r["batch"])
        if "tokens_per_s" not in r:
            out.append(f"| {r['system']} | {key[0]} x {key[1]} | | {r.get('error', '')[:80]} | | | |")
            continue
        ratios = []
        for peer in ("hf-eager", "hf-compile"):
            b = base.get((peer, *key))
            ratios.append(f"{r['tokens_per_s'] / b:.2f}x" if b else "-")
        how = f"{r['remat']}, {r['kernels']}" if "remat" in r else ""
        out.append(f"| {r['system']} | {key[0]} x {key[1]} | {how} | {r['tokens_per_s']:,.0f} "
                   f"| {r['mfu']:.1%} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
