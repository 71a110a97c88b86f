"""`megamesh bench serve`: load a running server and measure it the way vLLM's `bench serve`
does (vllm/benchmarks/serve.py; the API as docs/serving.md describes):

- arrivals: all at once (rate inf), or gaps drawn from a gamma distribution with shape
  `burstiness` and mean 1/rate (burstiness 1 = Poisson); `max_concurrency` caps requests
  in flight;
- prompts: random token ids decoded to text and re-encoded to exactly the input length
  (vLLM's `random` dataset) when a tokenizer is given, otherwise random words (then the
  input length is approximate and the server's usage says the real count); input and
  output lengths drawn uniformly in [len*(1-range_ratio), len*(1+range_ratio)];
- per request, from the streamed chunks: TTFT (first text chunk), ITL (every gap between
  chunks), TPOT = (latency - TTFT) / (output tokens - 1), E2EL; output tokens from the
  response's usage;
- throughput: completed requests, output tokens and all tokens per second of the run;
  goodput = requests meeting every SLO given (ttft, tpot, e2el in ms) per second.

Streams the Anthropic Messages API (`--api anthropic`, default) or OpenAI chat completions
(`--api openai`), asking the server to ignore end-of-sequence (`ignore_eos`) so every
request produces its full output length.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import numpy as np


@dataclass
class RequestResult:
    ok: bool
    input_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0
    error: str = ""


@dataclass
class BenchConfig:
    url: str
    model: str | None = None
    api: str = "anthropic"
    num_prompts: int = 64
    request_rate: float = float("inf")
    burstiness: float = 1.0
    max_concurrency: int | None = None
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0
    seed: int = 0
    api_key: str = "bench"
    goodput: dict[str, float] = field(default_factory=dict)  # ms: ttft, tpot, e2el
    warmups: int = 2


WORDS = ("the of and to in is for on that with as it data model value return list self import "
         "def class if else while try except json path file string number object array key").split()


def make_prompts(cfg: BenchConfig, tokenizer: Any | None) -> list[tuple[str, int, int]]:
    """(prompt text, input tokens (exact with a tokenizer, else estimated), output tokens)."""
    rng = np.random.default_rng(cfg.seed)
    r = cfg.range_ratio
    lo_i, hi_i = max(1, int(cfg.input_len * (1 - r))), int(cfg.input_len * (1 + r))
    lo_o, hi_o = max(1, int(cfg.output_len * (1 - r))), int(cfg.output_len * (1 + r))
    out = []
    for _ in range(cfg.num_prompts):
        n_in, n_out = int(rng.integers(lo_i, hi_i + 1)), int(rng.integers(lo_o, hi_o + 1))
        if tokenizer is not None:
            vocab = tokenizer.get_vocab_size()
            ids = rng.integers(1, vocab, n_in).tolist()
            text = tokenizer.decode(ids)
            ids = tokenizer.encode(text).ids[:n_in]
            text = tokenizer.decode(ids)
            out.append((text, len(tokenizer.encode(text).ids), n_out))
        else:
            words = rng.choice(WORDS, size=max(1, int(n_in / 1.3)))
            out.append((" ".join(words), n_in, n_out))
    return out


async def _one(client: httpx.AsyncClient, cfg: BenchConfig, model: str, prompt: str,
               n_out: int) -> RequestResult:
    res = RequestResult(ok=False, start=time.perf_counter())
    if cfg.api == "anthropic":
        path = "/v1/messages"
        body = {"model": model, "max_tokens": n_out, "stream": True, "ignore_eos": True,
                "temperature": 0.0, "messages": [{"role": "user", "content": prompt}]}
        headers = {"x-api-key": cfg.api_key, "anthropic-version": "2023-06-01"}
    else:
        path = "/v1/chat/completions"
        body = {"model": model, "max_tokens": n_out, "stream": True, "ignore_eos": True,
                "temperature": 0.0, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": prompt}]}
        headers = {"authorization": f"Bearer {cfg.api_key}"}
    t0 = res.start
    last = None
    try:
        async with client.stream("POST", cfg.url + path, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                text = None
                if cfg.api == "anthropic":
                    if ev["type"] == "content_block_delta":
                        text = ev["delta"].get("text")
                    elif ev["type"] == "message_start":
                        res.input_tokens = ev["message"]["usage"]["input_tokens"]
                    elif ev["type"] == "message_delta":
                        res.output_tokens = ev["usage"]["output_tokens"]
                    elif ev["type"] == "error":
                        res.error = ev["error"]["message"]
                        return res
                else:
                    if ev.get("usage"):
                        res.input_tokens = ev["usage"]["prompt_tokens"]
                        res.output_tokens = ev["usage"]["completion_tokens"]
                    if ev.get("choices"):
                        text = ev["choices"][0]["delta"].get("content")
                if text:
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
        res.latency = time.perf_counter() - t0
        res.ok = last is not None
        if not res.ok:
            res.error = "no text streamed"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _intervals(cfg: BenchConfig, n: int) -> list[float]:
    if cfg.request_rate == float("inf"):
        return [0.0] * n
    rng = np.random.default_rng(cfg.seed + 1)
    theta = 1.0 / (cfg.request_rate * cfg.burstiness)
    return rng.gamma(shape=cfg.burstiness, scale=theta, size=n).tolist()


async def _wait_compiled(client: httpx.AsyncClient, url: str, timeout: float = 600.0) -> None:
    """A megamesh server compiles its smaller decode batches after start-up and says so in
    /health (`compiling`); measure once it is done. Other servers: no wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = await client.get(url + "/health")
            if r.status_code != 200 or not r.json().get("compiling", False):
                return
        except (httpx.HTTPError, ValueError):
            return
        await asyncio.sleep(0.5)


async def _run(cfg: BenchConfig, prompts: list[tuple[str, int, int]]) -> tuple[list[RequestResult], float]:
    limits = httpx.Limits(max_connections=cfg.max_concurrency or len(prompts) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        model = cfg.model
        if model is None:
            r = await client.get(cfg.url + "/v1/models",
                                 headers={"x-api-key": cfg.api_key, "authorization": f"Bearer {cfg.api_key}"})
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        await _wait_compiled(client, cfg.url)
        for text, _, _ in prompts[:cfg.warmups]:  # warm-up: not measured
            await _one(client, cfg, model, text, 4)
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

        async def limited(text: str, n_out: int) -> RequestResult:
            if sem is None:
                return await _one(client, cfg, model, text, n_out)
            async with sem:
                return await _one(client, cfg, model, text, n_out)

        tasks = []
        t0 = time.perf_counter()
        for (text, _, n_out), gap in zip(prompts, _intervals(cfg, len(prompts))):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(text, n_out)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def _stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    a = np.asarray(xs) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summarize(cfg: BenchConfig, results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    good = 0
    for r in ok:
        tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        meets = ((cfg.goodput.get("ttft") is None or r.ttft * 1e3 <= cfg.goodput["ttft"]) and
                 (cfg.goodput.get("tpot") is None or tpot * 1e3 <= cfg.goodput["tpot"]) and
                 (cfg.goodput.get("e2el") is None or r.latency * 1e3 <= cfg.goodput["e2el"]))
        good += meets
    errors = [r.error for r in results if not r.ok]
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k != "api_key"},
        "completed": len(ok), "failed": len(errors), "errors": sorted(set(errors))[:5],
        "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "goodput": good / duration if cfg.goodput else None,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpots),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2el_ms": _stats([r.latency for r in ok]),
    }


def run_bench(cfg: BenchConfig, tokenizer: Any | None = None) -> dict[str, Any]:
    prompts = make_prompts(cfg, tokenizer)
    results, duration = asyncio.run(_run(cfg, prompts))
    summary = summarize(cfg, results, duration)
    summary["input_lengths_exact"] = tokenizer is not None
    return summary


def format_summary(s: dict[str, Any]) -> str:
    c = s["config"]
    rate = "inf (all at once)" if c["request_rate"] == float("inf") else f"{c['request_rate']}/s"
    lines = [
        f"{'=' * 16} serving benchmark {'=' * 16}",
        f"server: {c['url']} ({c['api']} API); {c['num_prompts']} prompts, rate {rate}, "
        f"max concurrency {c['max_concurrency'] or 'unbounded'}",
        f"successful requests:          {s['completed']:>10}   failed: {s['failed']}",
        f"duration (s):                 {s['duration_s']:>10.2f}",
        f"input / output tokens:        {s['total_input_tokens']:>10} / {s['total_output_tokens']}"
        + ("" if s["input_lengths_exact"] else "  (prompts: random words; lengths approximate)"),
        f"request throughput (req/s):   {s['request_throughput']:>10.2f}",
        f"output token throughput (/s): {s['output_throughput']:>10.1f}",
        f"total token throughput (/s):  {s['total_token_throughput']:>10.1f}",
    ]
    if s["goodput"] is not None:
        lines.append(f"goodput (req/s meeting SLOs): {s['goodput']:>10.2f}")
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2EL", "e2el_ms")):
        st = s[key]
        lines.append(f"{name:<5} ms  mean {st['mean']:>9.1f}  p50 {st['p50']:>9.1f}  p90 {st['p90']:>9.1f}  "
                     f"p99 {st['p99']:>9.1f}")
    for e in s["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def median_of(runs: list[dict[str, Any]], path: str) -> float:
    vals = []
    for r in runs:
        v: Any = r
        for k in path.split("."):
            v = v[k]
        vals.append(v)
    return statistics.median(vals)
