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

`--dataset enterprise` (issue 15's mix): `tenants` tenants, each with its own system
prompt of `system_len` tokens and its own API key; each request picks a tenant at random,
its user prompt has a uniform [input_min, input_max] tokens and its output [output_min,
output_max]; the system prompt carries a cache_control breakpoint (unless
`cache_control` is off, for servers without prompt caching). Adds the prefix-cache hit
rate (prompt tokens read from the cache, from the responses' usage) and, sampled from a
megamesh server's /metrics during the run, the KV pages in use.
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
    input_tokens: int = 0  # all of the prompt, cached or not
    cached_tokens: int = 0  # read from the prompt cache
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
    dataset: str = "random"  # or "enterprise"
    tenants: int = 16
    system_len: int = 2048
    input_min: int = 200
    input_max: int = 8000
    output_min: int = 50
    output_max: int = 500
    cache_control: bool = True
    timeout: float = 600.0  # seconds a request may wait for its next byte (then it fails)


@dataclass
class BenchPrompt:
    text: str  # the user message
    n_in: int  # input tokens (exact with a tokenizer, else estimated)
    n_out: int
    system: str | None = None
    key: str | None = None  # the API key (tenant) to send it with (default cfg.api_key)


WORDS = ("the of and to in is for on that with as it data model value return list self import "
         "def class if else while try except json path file string number object array key").split()


def _text(rng: np.random.Generator, n: int, tokenizer: Any | None) -> tuple[str, int]:
    """Random text of n tokens (exactly, re-encoded, with a tokenizer; else ~n in words)."""
    if tokenizer is None:
        return " ".join(rng.choice(WORDS, size=max(1, int(n / 1.3)))), n
    ids = rng.integers(1, tokenizer.get_vocab_size(), n).tolist()
    ids = tokenizer.encode(tokenizer.decode(ids)).ids[:n]
    text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text).ids)


def make_prompts(cfg: BenchConfig, tokenizer: Any | None) -> list[BenchPrompt]:
    rng = np.random.default_rng(cfg.seed)
    if cfg.dataset == "enterprise":
        # the tenants' system prompts are the same in every run (seed-independent)
        sys_rng = np.random.default_rng(12345)
        systems = [_text(sys_rng, cfg.system_len, tokenizer) for _ in range(cfg.tenants)]
        out = []
        for _ in range(cfg.num_prompts):
            t = int(rng.integers(cfg.tenants))
            text, n = _text(rng, int(rng.integers(cfg.input_min, cfg.input_max + 1)), tokenizer)
            out.append(BenchPrompt(text, n + systems[t][1],
                                   int(rng.integers(cfg.output_min, cfg.output_max + 1)),
                                   systems[t][0], f"tenant-{t}"))
        return out
    r = cfg.range_ratio
    lo_i, hi_i = max(1, int(cfg.input_len * (1 - r))), int(cfg.input_len * (1 + r))
    lo_o, hi_o = max(1, int(cfg.output_len * (1 - r))), int(cfg.output_len * (1 + r))
    out = []
    for _ in range(cfg.num_prompts):
        n_in, n_out = int(rng.integers(lo_i, hi_i + 1)), int(rng.integers(lo_o, hi_o + 1))
        out.append(BenchPrompt(*_text(rng, n_in, tokenizer), n_out))
    return out


async def _one(client: httpx.AsyncClient, cfg: BenchConfig, model: str, p: BenchPrompt,
               n_out: int) -> RequestResult:
    res = RequestResult(ok=False, start=time.perf_counter())
    key = p.key or cfg.api_key
    if cfg.api == "anthropic":
        path = "/v1/messages"
        body = {"model": model, "max_tokens": n_out, "stream": True, "ignore_eos": True,
                "temperature": 0.0, "messages": [{"role": "user", "content": p.text}]}
        if p.system is not None:
            body["system"] = ([{"type": "text", "text": p.system, "cache_control": {"type": "ephemeral"}}]
                              if cfg.cache_control else p.system)
        headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    else:
        path = "/v1/chat/completions"
        system = [{"role": "system", "content": p.system}] if p.system is not None else []
        body = {"model": model, "max_tokens": n_out, "stream": True, "ignore_eos": True,
                "temperature": 0.0, "stream_options": {"include_usage": True},
                "messages": [*system, {"role": "user", "content": p.text}]}
        headers = {"authorization": f"Bearer {key}"}
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
                        u = ev["message"]["usage"]
                        res.cached_tokens = u.get("cache_read_input_tokens") or 0
                        res.input_tokens = (u["input_tokens"] + res.cached_tokens
                                            + (u.get("cache_creation_input_tokens") or 0))
                    elif ev["type"] == "message_delta":
                        res.output_tokens = ev["usage"]["output_tokens"]
                    elif ev["type"] == "error":
                        res.error = ev["error"]["message"]
                        return res
                else:
                    if ev.get("usage"):
                        res.input_tokens = ev["usage"]["prompt_tokens"]
                        details = ev["usage"].get("prompt_tokens_details") or {}
                        res.cached_tokens = details.get("cached_tokens") or 0
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


# megamesh's counters of the whole server's life (a run's share: last minus first)
COUNTERS = {"hit_tokens": "megamesh_prefix_cache_hit_tokens", "preempted": "megamesh_preempted",
            "prefill": 'megamesh_engine_seconds{phase="prefill"}',
            "decode": 'megamesh_engine_seconds{phase="decode"}'}
METRICS = ("megamesh_kv_pages_used", "megamesh_kv_pages", *COUNTERS.values())


async def _scrape(client: httpx.AsyncClient, url: str) -> dict[str, float] | None:
    """megamesh's KV gauges from /metrics (None from servers without them)."""
    try:
        text = (await client.get(url + "/metrics")).text
        got = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
               if line.split(" ", 1)[0] in METRICS}
    except (httpx.HTTPError, ValueError, IndexError):
        return None
    return got if len(got) == len(METRICS) else None


async def _kv_samples(client: httpx.AsyncClient, url: str, out: list[dict[str, float]],
                      every: float = 0.5) -> None:
    """megamesh's KV gauges every `every` s, until cancelled."""
    while True:
        got = await _scrape(client, url)
        if got:
            out.append(got)
        await asyncio.sleep(every)


async def _run(cfg: BenchConfig, prompts: list[BenchPrompt], gaps: list[float] | None = None) -> tuple[
        list[RequestResult], float, list[dict[str, float]], dict[str, float] | None]:
    """Results, duration, megamesh's gauges sampled during the run, and its counters'
    growth over the run (COUNTERS' keys; None from servers without them). `gaps`: the
    seconds before each request (default: drawn from cfg's rate and burstiness)."""
    limits = httpx.Limits(max_connections=cfg.max_concurrency or len(prompts) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout), limits=limits) as client:
        model = cfg.model
        if model is None:
            r = await client.get(cfg.url + "/v1/models",
                                 headers={"x-api-key": cfg.api_key, "authorization": f"Bearer {cfg.api_key}"})
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        await _wait_compiled(client, cfg.url)
        for i in range(cfg.warmups):  # warm-up: not measured, and nothing to cache for later
            await _one(client, cfg, model, BenchPrompt(f"warm-up {i}", 4, 4), 4)
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

        async def limited(p: BenchPrompt) -> RequestResult:
            if sem is None:
                return await _one(client, cfg, model, p, p.n_out)
            async with sem:
                return await _one(client, cfg, model, p, p.n_out)

        kv: list[dict[str, float]] = []
        first = await _scrape(client, cfg.url)
        sampler = asyncio.create_task(_kv_samples(client, cfg.url, kv))
        tasks = []
        t0 = time.perf_counter()
        for p, gap in zip(prompts, _intervals(cfg, len(prompts)) if gaps is None else gaps):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(p)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        sampler.cancel()
        last = await _scrape(client, cfg.url)
        grown = ({k: last[m] - first[m] for k, m in COUNTERS.items()} if first and last
                 else None)
        return list(results), duration, kv, grown


def _stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    a = np.asarray(xs) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summarize(cfg: BenchConfig, results: list[RequestResult], duration: float,
              kv: list[dict[str, float]] | None = None,
              grown: dict[str, float] | None = None) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.input_tokens for r in ok)
    kv = kv or []
    used = [k["megamesh_kv_pages_used"] / k["megamesh_kv_pages"] for k in kv
            if k["megamesh_kv_pages"]]
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
        "prefix_cache_hit_rate": sum(r.cached_tokens for r in ok) / in_tokens if in_tokens else 0.0,
        # every prompt token the engine read from cached pages (whatever cache_control
        # said; re-admissions after preemption included), per prompt token sent
        "engine_prefix_hit_rate": grown["hit_tokens"] / in_tokens if grown and in_tokens else None,
        # requests preempted (for pages or fairness; recomputed) in the run
        "preempted": grown["preempted"] if grown else None,
        # in prefill and decode steps during the run
        "engine_seconds": {p: grown[p] for p in ("prefill", "decode")} if grown else None,
        "kv_pages_used": ({"mean": float(np.mean(used)), "max": float(np.max(used)),
                           "pages": kv[-1]["megamesh_kv_pages"]} if used else None),
    }


def run_bench(cfg: BenchConfig, tokenizer: Any | None = None) -> dict[str, Any]:
    prompts = make_prompts(cfg, tokenizer)
    results, duration, kv, grown = asyncio.run(_run(cfg, prompts))
    summary = summarize(cfg, results, duration, kv, grown)
    summary["input_lengths_exact"] = tokenizer is not None
    return summary


def format_summary(s: dict[str, Any]) -> str:
    c = s["config"]
    rate = "inf (all at once)" if c["request_rate"] == float("inf") else f"{c['request_rate']}/s"
    lines = [
        f"{'=' * 16} serving benchmark {'=' * 16}",
        f"server: {c['url']} ({c['api']} API); {c['num_prompts']} {c['dataset']} prompts, rate {rate}, "
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
    lines.append(f"prefix cache hit rate:        {s['prefix_cache_hit_rate']:>10.1%}  (prompt tokens "
                 "read from the cache, per the responses' usage)")
    if s.get("engine_prefix_hit_rate") is not None:
        lines.append(f"engine prefix hit rate:       {s['engine_prefix_hit_rate']:>10.1%}  (prompt "
                     "tokens the engine read from cached pages, any prefix)")
    if s["kv_pages_used"]:
        k = s["kv_pages_used"]
        lines.append(f"KV pages in use:              {k['mean']:>10.1%}  mean, {k['max']:.1%} max of "
                     f"{k['pages']:.0f} pages; {s['preempted'] or 0:.0f} preemptions")
    if s.get("engine_seconds"):
        e = s["engine_seconds"]
        lines.append(f"engine busy (s):              {e['prefill']:>10.1f}  prefill, {e['decode']:.1f} "
                     "decode")
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
