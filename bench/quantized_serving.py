"""Serving with quantized weights (`megamesh serve --weights fp8|int8`) against the
weights as trained, on one trained run: how often the greedy tokens agree, the weight
bytes, and decode speed at batch 1 and at saturation.

- free-running agreement: each prompt decoded greedily by each engine; the share of
  positions where the quantized engine's token equals the reference engine's (after a
  first difference the two continue from different text, so this is the strict figure);
- teacher-forced agreement: the reference's sequences scored by both weight sets in one
  forward pass; the share of positions whose top-1 token agrees (each position from the
  same prefix);
- decode tokens/s: one request alone (batch 1) and --slots requests at once.

    python bench/quantized_serving.py --run RUN_DIR [--prompts 16] [--tokens 64] [--slots 16]
        [--reference float32|bfloat16]

XLA:CPU has no int8 / FP8 matmul units: it converts the weights in the matmul, so CPU
speed says little about an accelerator's (where decode reads the weights from HBM).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

PROMPTS = [
    "The quick brown fox", "Once upon a time", "In the beginning", "def main():",
    "import numpy as np", "The capital of France is", "Hello, how are you", "class Node:",
    "The weather today", "for i in range(10):", "Dear Sir or Madam,", "The results show that",
    "It was a dark and stormy night", "SELECT * FROM", "The model was trained on", "Question:",
]


def greedy(engine, prompts: list[list[int]], tokens: int, at_once: bool) -> tuple[list[list[int]], float]:
    """Greedy outputs of `prompts` (ignoring EOS) and decode tokens/s: all submitted at
    once, or one after another."""
    from megamesh.serve.engine import SamplingParams

    sampling = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    outs: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    if at_once:
        done = threading.Semaphore(0)
        reqs = [engine.submit(p, sampling, lambda ev: ev.done and done.release()) for p in prompts]
        for _ in prompts:
            assert done.acquire(timeout=600)
        outs = [r.out_ids for r in reqs]
    else:
        for i, p in enumerate(prompts):
            ev = threading.Event()
            r = engine.submit(p, sampling, lambda e, ev=ev: e.done and ev.set())
            assert ev.wait(600)
            outs[i] = r.out_ids
    return outs, len(prompts) * tokens / (time.perf_counter() - t0)


def teacher_forced(ref, quant, cfg, seqs: list[list[int]]) -> float:
    """Share of positions where both weight sets' top-1 next token agree on `seqs`."""
    from megamesh.model.transformer import forward

    n = max(len(s) for s in seqs)
    toks = jnp.asarray([s + [0] * (n - len(s)) for s in seqs], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), toks.shape)
    fwd = jax.jit(lambda p: jnp.argmax(forward(p, toks, pos, cfg=cfg).logits, -1))
    a, b = np.asarray(fwd(ref)), np.asarray(fwd(quant))
    valid = np.asarray([[i < len(s) for i in range(n)] for s in seqs])
    return float((a == b)[valid].mean())


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))
    return same / sum(len(p) for p in a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a `megamesh train` run directory (or HF directory)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--reference", default="float32", choices=("float32", "bfloat16"),
                    help="--dtype of every engine (the unquantized reference's weights)")
    a = ap.parse_args()
    from megamesh.serve.engine import build_engine

    engines, results = {}, {}
    for w in ("bf16", "fp8", "int8"):
        eng = build_engine(a.run, mesh="tensor=1", slots=a.slots, max_len=512, dtype=a.reference,
                           weights=w, log=lambda *_: None)
        eng.start()
        engines[w] = eng
        tok = eng.model.tokenizer
        prompts = [tok.encode(p).ids for p in (PROMPTS * (a.prompts // len(PROMPTS) + 1))[:a.prompts]]
        one = [greedy(eng, prompts[:4], a.tokens, at_once=False)[1] for _ in range(3)]
        outs, sat = greedy(eng, prompts, a.tokens, at_once=True)
        results[w] = {"outs": outs, "prompts": prompts, "batch1": statistics.median(one),
                      "saturated": sat, "bytes": eng.weight_bytes}
        eng.stop()
    ref = results["bf16"]
    cfg = engines["bf16"].cfg
    seqs = [p + o for p, o in zip(ref["prompts"], ref["outs"])]
    print(f"run {a.run}: {a.prompts} prompts x {a.tokens} greedy tokens, reference weights "
          f"{a.reference}, jax {jax.__version__} on {jax.devices()[0].platform}\n")
    print("| weights | weight bytes | vs reference | free-running agreement | teacher-forced agreement "
          "| decode tok/s, batch 1 | decode tok/s, " + f"{a.prompts} at once |")
    print("|---|---|---|---|---|---|---|")
    for w, r in results.items():
        tf = 1.0 if w == "bf16" else teacher_forced(engines["bf16"].params, engines[w].params, cfg, seqs)
        print(f"| {w if w != 'bf16' else a.reference + ' (as trained)'} | {r['bytes'] / 2**20:,.1f} MiB "
              f"| {r['bytes'] / ref['bytes']:.2f}x | {agreement(ref['outs'], r['outs']):.1%} | {tf:.1%} "
              f"| {r['batch1']:,.0f} | {r['saturated']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
