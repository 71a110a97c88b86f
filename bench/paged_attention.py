"""One layer's attention over the serving KV pages: the gathering reference (`paged=gather`)
vs the blockwise kernel (`paged=xla`) at decode and prefill shapes of the tiny model
(4 kv heads x 2, head_dim 64, pages of 16, an 11,264-token context). Prints the median
ms of 5 and the largest difference from the reference.

    python bench/paged_attention.py [BLOCK ...]   # key block sizes to try (default 128 512)

With --steps RUN: the serving engine's whole steps instead (the `tiny` run RUN at an
--max-len context, f32, 32 slots), for the kernel --paged names (`gather`, the old path
with attention-length buckets, or `xla`, the blockwise kernel): the start-up warm-up, a
6,144-token prompt's prefill (chunks of 2,048), the same after a 2,048-token cached
prefix, and decode steps at 32 and 4 rows at 6,000 positions (medians of 5 steps). The
positions scale down with a shorter --max-len (a quick check).

    python bench/paged_attention.py --steps runs/bench-tiny-11k --paged xla      # and gather
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from megamesh.model.attention import attend
from megamesh.model.blockwise import paged_blockwise_attention
from megamesh.model.kvcache import gather_kv

K, G, Dh, P = 4, 2, 64, 16
H = K * G
PER = 11264 // P  # pages per sequence
N = 32 * PER + 1


def med(fn, *args, n: int = 5) -> float:
    fn(*args).block_until_ready()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn(*args).block_until_ready()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def gathered(q, pages, table, positions, A):
    k, v = gather_kv(pages, table, jnp.int32(0), A)
    B, S = table.shape[0], k.shape[1]
    return attend(q, k, v, positions, jnp.broadcast_to(jnp.arange(S), (B, S)))


def layer(blocks: list[int]) -> None:
    blocks = blocks or [128, 512]
    rng = np.random.default_rng(1)
    pages = jnp.asarray(rng.normal(size=(N, P, 2 * K, Dh)), jnp.float32)
    # (rows, queries, last position + 1, the gather's attention bucket)
    for B, T, L, A in [(32, 1, 6000, 6336), (4, 1, 6000, 6336), (1, 2048, 6144, 8192)]:
        table = jnp.asarray(1 + rng.permutation(N - 1)[:B * PER].reshape(B, PER), jnp.int32)
        q = jnp.asarray(rng.normal(size=(B, T, H, Dh)), jnp.float32)
        positions = jnp.broadcast_to(L - T + jnp.arange(T, dtype=jnp.int32), (B, T))
        ref = jax.jit(lambda q, pg, t, p, A=A: gathered(q, pg, t, p, A))
        want = ref(q, pages, table, positions)
        args = (q, pages, table, positions)
        row = {"gather": round(med(ref, *args), 1)}
        for blk in blocks:
            fn = jax.jit(lambda q, pg, t, p, blk=blk: paged_blockwise_attention(
                q, pg, t, jnp.int32(0), p, block=blk))
            err = float(jnp.max(jnp.abs(fn(q, pages, table, positions) - want)))
            ms = med(fn, *args)
            row[f"blockwise {blk}"] = f"{ms:.1f} (max diff {err:.1e})"
        print(f"rows {B}, queries {T}, positions {L}: ms {row}", flush=True)


def steps(run: Path, paged: str, max_len: int) -> dict:
    """The engine's whole steps with the paged kernel `paged` (module docstring)."""
    import megamesh.model.backend as backend

    backend.PLATFORM_DEFAULTS["cpu"] = dataclasses.replace(backend.PLATFORM_DEFAULTS["cpu"], paged=paged)
    from megamesh.serve.engine import SamplingParams, build_engine

    scale = max_len / 11264
    at = lambda n: max(16, int(n * scale) // 16 * 16)  # positions, scaled to the context
    eng = build_engine(str(run), mesh="tensor=1", slots=32, max_len=max_len, dtype="float32",
                       log=lambda *_: None)
    t0 = time.perf_counter()
    eng.start()
    out = {"paged": paged, "max_len": max_len, "warm_up_s": round(time.perf_counter() - t0, 1)}
    rng = np.random.default_rng(0)
    prompt = lambda n: rng.integers(1, eng.cfg.vocab_size, n).tolist()
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def drive(reqs, until=lambda: False) -> None:
        for _ in range(100_000):
            if until() or all(r.done for r in reqs):
                return
            eng.step()

    with eng.paused():
        first = prompt(at(6144))
        t = eng.stats["prefill_seconds"]
        drive([eng.submit(first, one, lambda ev: None)])
        out[f"prefill_{at(6144)}_s"] = round(eng.stats["prefill_seconds"] - t, 2)
        t = eng.stats["prefill_seconds"]
        drive([eng.submit(first[:at(2048)] + prompt(at(4096)), one, lambda ev: None)])
        out[f"prefill_after_{at(2048)}_cached_s"] = round(eng.stats["prefill_seconds"] - t, 2)
        shared = prompt(at(6000) - 16)  # one prefix for every row: its pages prefilled once
        for rows in (32, 4):
            reqs = [eng.submit(shared + prompt(16), SamplingParams(max_tokens=8, temperature=0,
                                                                   ignore_eos=True), lambda ev: None)
                    for _ in range(rows)]
            drive(reqs, until=lambda reqs=reqs: all(r.n_out >= 1 for r in reqs))  # all prefilled
            times = []
            for _ in range(5):
                t = eng.stats["decode_seconds"]
                eng.step()
                times.append(eng.stats["decode_seconds"] - t)
            out[f"decode_{rows}_rows_at_{at(6000)}_ms"] = round(float(np.median(times)) * 1e3, 1)
            for r in reqs:
                eng.cancel(r)
            drive(reqs)
    eng.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("blocks", nargs="*", type=int, help="key block sizes to try (default 128 512)")
    ap.add_argument("--steps", metavar="RUN", help="time the engine's whole steps on this tiny run")
    ap.add_argument("--paged", default="xla", choices=("xla", "gather"))
    ap.add_argument("--max-len", type=int, default=11264)
    args = ap.parse_args()
    if args.steps:
        print(json.dumps(steps(Path(args.steps), args.paged, args.max_len)))
    else:
        layer(args.blocks)


if __name__ == "__main__":
    main()
