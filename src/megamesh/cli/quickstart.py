"""`megamesh quickstart`: the main job on its embedded default.

Lists the model presets with their sizes, builds the `tiny` model and runs it on this
machine's devices (a full forward pass, and KV-cached prefill + decode checked against
it), then trains it for a few minutes on the embedded corpus (the Python standard
library's source), saves a checkpoint and prints a generated sample; finally serves that
checkpoint on 127.0.0.1 (`megamesh serve`'s engine and API in this process), sends one
Messages API request through the official anthropic SDK, prints the reply and stops.
"""

from __future__ import annotations

import argparse
import time

from megamesh.cli.common import add_model_args, resolve_model
from megamesh.config import PRESETS
from megamesh.model import specs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="list the presets and run the tiny model on this machine")
    add_model_args(p, default="tiny")
    p.add_argument("--batch", type=int, default=4, help="sequences per forward (default 4)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--out", default="runs/quickstart",
                   help="run directory for the training part (default runs/quickstart; resumed if present)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200, a few minutes)")
    p.set_defaults(run=run)


def preset_table() -> str:
    rows = [f"{'preset':14s} {'params':>9s} {'active':>9s} {'layers':>6s} {'d_model':>7s} "
            f"{'heads/kv':>8s} {'experts':>8s} {'train FLOPs/tok @4k':>20s}"]
    for name, cfg in PRESETS.items():
        experts = f"{cfg.moe.top_k}/{cfg.moe.n_experts}" if cfg.moe else "-"
        rows.append(
            f"{name:14s} {_human(specs.param_count(cfg)):>9s} {_human(specs.active_param_count(cfg)):>9s} "
            f"{cfg.n_layers:6d} {cfg.d_model:7d} {cfg.n_heads:>4d}/{cfg.n_kv_heads:<3d} {experts:>8s} "
            f"{specs.flops_per_token(cfg, 4096, 'train'):20.3e}"
        )
    return "\n".join(rows)


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def run(args: argparse.Namespace, extra: list[str]) -> int:
    cfg = resolve_model(args, extra)
    print("megamesh model presets (parameters from the spec table):")
    print(preset_table())
    print()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from megamesh.model.kvcache import init_cache
    from megamesh.model.source import load_weights
    from megamesh.model.transformer import forward, init_params
    from megamesh.pytree import unflatten

    B, T = args.batch, min(args.seq, cfg.max_seq_len)
    print(f"running {cfg.name} ({_human(specs.param_count(cfg))} parameters) on "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), batch {B} x {T} tokens")
    flat = load_weights(args.model)
    params = unflatten({k: jnp.asarray(v) for k, v in flat.items()}) if flat else \
        init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    fwd = jax.jit(lambda p, t, q, c: forward(p, t, q, c, cfg=cfg)[::2])  # (logits, cache)

    t0 = time.perf_counter()
    logits, _ = jax.block_until_ready(fwd(params, tokens, positions, None))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(params, tokens, positions, None))
        times.append(time.perf_counter() - t0)
    step = sorted(times)[1]
    flops = specs.flops_per_token(cfg, T, "forward") * B * T
    print(f"  forward: logits {tuple(logits.shape)}, first call {compile_s:.2f}s (compile), "
          f"then {step * 1e3:.1f} ms = {B * T / step:,.0f} tokens/s, "
          f"{flops / step / 1e9:.1f} GFLOP/s (median of 3)")

    # Prefill half, then decode the rest one token at a time through the KV cache.
    half = T // 2
    cache = init_cache(cfg, B, T)
    out, cache = fwd(params, tokens[:, :half], positions[:, :half], cache)
    pieces = [out]
    t0 = time.perf_counter()
    for i in range(half, T):
        out, cache = fwd(params, tokens[:, i:i + 1], positions[:, i:i + 1], cache)
        pieces.append(out)
    decode_s = time.perf_counter() - t0
    cached = jnp.concatenate(pieces, axis=1)
    err = float(jnp.max(jnp.abs(cached - logits)) / jnp.max(jnp.abs(logits)))
    print(f"  KV cache: prefill {half} + decode {T - half} tokens ({(T - half) * B / decode_s:,.0f} "
          f"tokens/s incl. compile); max relative difference from the full forward {err:.1e}")
    greedy = np.asarray(jnp.argmax(logits[0, :8], axis=-1))
    print(f"  greedy next tokens of row 0 (random weights): {greedy.tolist()}")
    print()
    if flat:
        return 0  # imported weights: nothing to train here
    return train_and_sample(cfg, args)


def train_and_sample(cfg, args: argparse.Namespace) -> int:
    from pathlib import Path

    from megamesh.model.generate import generate
    from megamesh.rundir import EOS, load_tokenizer
    from megamesh.settings import apply_overrides
    from megamesh.train.config import TrainConfig, default_warmup
    from megamesh.train.loop import train

    out = Path(args.out)
    tc = apply_overrides(TrainConfig(), {"steps": args.steps, "global_batch": 8, "seq_len": args.seq,
                                         "schedule.warmup_steps": default_warmup(args.steps),
                                         "checkpoint.every": max(1, args.steps // 4),
                                         "eval.every": max(1, args.steps // 4)}, "train.")
    resume = (out / "checkpoints").exists()
    print(f"training {cfg.name} for {tc.steps} steps into {out}" + (" (resuming)" if resume else ""))
    result = train(cfg, tc, out, resume=resume)
    tok = load_tokenizer(out / "tokenizer.json")
    prompt = "import os\n\n\ndef "
    ids = generate(result.params, cfg, tok.encode(prompt).ids, 80, temperature=0.8, top_k=40,
                   seed=0, stop_ids=(tok.token_to_id(EOS),))
    print("\nsample (temperature 0.8, top-k 40) from the trained checkpoint:")
    print("-" * 60)
    print(prompt + tok.decode(ids))
    print("-" * 60)
    del result
    return serve_once(out)


def serve_once(out) -> int:
    """Serve the run in `out`, ask it one question through the anthropic SDK, stop."""
    import anthropic

    from megamesh.serve.api import create_app
    from megamesh.serve.engine import build_engine
    from megamesh.serve.server import start_in_thread

    print(f"\nserving {out} (the same engine and API as `megamesh serve --model {out}`) ...")
    engine = build_engine(str(out), mesh="tensor=1", slots=4, max_len=256, log=lambda *_: None)
    warm = engine.start()
    running = start_in_thread(create_app(engine))
    try:
        client = anthropic.Anthropic(base_url=running.url, api_key="quickstart", max_retries=0)
        t0 = time.perf_counter()
        msg = client.messages.create(
            model=engine.model.name, max_tokens=60, system="You write Python.",
            messages=[{"role": "user", "content": "Write a function that reads a file."},
                      {"role": "assistant", "content": "def read"}],
            extra_body={"temperature": 0.8, "top_k": 40})
        dt = time.perf_counter() - t0
        print(f"{running.url}/v1/messages -> {msg.id} ({msg.usage.input_tokens} tokens in, "
              f"{msg.usage.output_tokens} out, stop_reason {msg.stop_reason}, {dt * 1e3:.0f} ms; "
              f"warm-up {warm:.1f}s)")
        print("-" * 60)
        print("def read" + msg.content[0].text)
        print("-" * 60)
    finally:
        running.stop()
        engine.stop()
    print("server stopped. Serve it yourself: megamesh serve --model " + str(out))
    return 0
