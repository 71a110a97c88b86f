"""FP8 training quality on this CPU: the same model, seed and corpus trained in bf16 and in
FP8 (`--precision fp8`, model/quant.py), and the FP8 scale granularity compared.

Each run is `megamesh train` in its own process (the quickstart's fixed corpus, the
default seed); the table gives the final validation loss, its gap to bf16, the
non-finite steps skipped, and the median step time (XLA:CPU has no FP8 units: it
converts, so FP8 is slower here; the ratio says by how much).

Variants: bf16; fp8 (per-channel current scaling: what `--precision fp8` runs); fp8-tensor
(one scale per operand); fp8-fixed (a constant +-224 range for activations and weights,
as MaxText's Ironwood recipes set it; `model.quant.SCALINGS`). Models: tiny (the preset) and wide
(d_model 768, 12 heads, d_ff 2048, 2 layers, seq 128).

    python bench/fp8_quality.py --out runs/fp8q [--steps 300] [--models tiny,wide]
        [--variants bf16,fp8,fp8-tensor]

Exits 1 if an fp8 run's validation loss is more than 2% from its bf16 twin's or any FP8
run skipped a non-finite step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = {
    "tiny": [],
    "wide": ["--model.d_model=768", "--model.n_heads=12", "--model.n_kv_heads=4",
             "--model.d_ff=2048", "--model.n_layers=2", "--seq", "128"],
}
VARIANTS = {"bf16": ("bf16", "channel"), "fp8": ("fp8", "channel"), "fp8-tensor": ("fp8", "tensor"),
            "fp8-fixed": ("fp8", "fixed")}
TOLERANCE = 0.02

RUNNER = """
import sys
import megamesh.model.quant as q
q._scaling = sys.argv[1]
from megamesh.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run(out: Path, model: str, variant: str, steps: int) -> dict:
    precision, scaling = VARIANTS[variant]
    d = out / f"{model}-{variant}"
    argv = ["train", "--out", str(d), "--steps", str(steps), "--precision", precision,
            "--no-progress", *MODELS[model]]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", RUNNER, scaling, *argv], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{model} {variant} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    times = [r["step_time_s"] for r in rows if not r.get("compile_step") and "step_time_s" in r]
    return {"model": model, "variant": variant, "steps": last["step"], "loss": last["loss"],
            "val_loss": last.get("val_loss"), "skipped": last["skipped_steps"],
            "step_s": statistics.median(times), "wall_s": time.perf_counter() - t0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="a new directory for the runs and results.jsonl")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--models", default="tiny,wide")
    ap.add_argument("--variants", default="bf16,fp8,fp8-tensor")
    a = ap.parse_args()
    out = Path(a.out)
    if out.exists():
        raise SystemExit(f"{out} exists: choose a new directory (results are never overwritten)")
    out.mkdir(parents=True)
    models, variants = a.models.split(","), a.variants.split(",")
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: {m!r} is not one of {', '.join(MODELS)}")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    results = []
    for m in models:
        for v in variants:
            r = run(out, m, v, a.steps)
            results.append(r)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{m} {v}: val {r['val_loss']:.4f}, step {r['step_s']:.3f} s", file=sys.stderr)
    print("| model | variant | steps | final train loss | final val loss | vs bf16 | non-finite "
          "skipped | median step (s) | step vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|")
    bad = False
    for r in results:
        base = next((b for b in results if b["model"] == r["model"] and b["variant"] == "bf16"), None)
        gap = r["val_loss"] / base["val_loss"] - 1 if base else None
        slow = r["step_s"] / base["step_s"] if base else None
        if r["variant"] != "bf16" and ((gap is not None and abs(gap) > TOLERANCE) or r["skipped"]):
            bad = True
        print(f"| {r['model']} | {r['variant']} | {r['steps']} | {r['loss']:.4f} | {r['val_loss']:.4f} "
              f"| {'' if gap is None else f'{gap:+.2%}'} | {r['skipped']} | {r['step_s']:.3f} "
              f"| {'' if slow is None else f'{slow:.2f}x'} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
