"""One layer's attention over the serving KV pages: the gathering reference (`paged=gather`)
vs the blockwise kernel (`paged=xla`) at decode and prefill shapes of the tiny model
(4 kv heads x 2, head_dim 64, pages of 16, an 11,264-token context). Prints the median
ms of 5 and the largest difference from the reference.

    python bench/paged_attention.py [BLOCK ...]   # key block sizes to try (default 128 512)
"""

import sys
import time

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


def main() -> None:
    blocks = [int(x) for x in sys.argv[1:]] or [128, 512]
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


if __name__ == "__main__":
    main()
