"""Decode step time against the size of the KV page pool: a step should read the pages
its rows hold, not the whole pool (session 15 found XLA:CPU converting a bf16 pool to f32
and back every step, and full-pool copies or an all-gather in some TPU layouts).

  python bench/decode_vs_pool.py --model DIR [--dtype bfloat16] [--pages 80,1280,10240]

For each pool size: an engine on one device (`--slots` rows, `--max-len`), `--rows`
requests of 20 random tokens decoding `--tokens` tokens each, the engine's steps run in
this thread; the median time per decode step. Flat across pool sizes is right.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from megamesh.serve.engine import SamplingParams, build_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a training run or Hugging Face directory")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--pages", default="80,1280,10240", help="KV pool sizes, comma-separated")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--max-len", type=int, default=128)
    args = ap.parse_args()
    print("| KV pages | pool MB | decode ms/step (median) |\n|---|---|---|")
    for pages in (int(p) for p in args.pages.split(",")):
        eng = build_engine(args.model, mesh="tensor=1", slots=args.slots, max_len=args.max_len,
                           dtype=args.dtype, kv_pages=pages, log=lambda *a: None)
        eng.start()
        eng.compiled_all.wait()
        rng = np.random.default_rng(0)
        vocab = eng.cfg.vocab_size
        with eng.paused():
            reqs = [eng.submit(rng.integers(1, vocab, 20).tolist(),
                               SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True),
                               lambda ev: None) for _ in range(args.rows)]
            eng.step()  # admission and prefill
            times = []
            while not all(r.done for r in reqs):
                t0 = time.perf_counter()
                eng.step()
                times.append(time.perf_counter() - t0)
        eng.stop()
        print(f"| {pages:,} | {eng.kv_bytes / 1e6:,.0f} | {statistics.median(times) * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
