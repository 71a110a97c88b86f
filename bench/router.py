"""A routing step in front of several `megamesh serve` replicas, standing in for GKE
Inference Gateway's endpoint picker in benchmarks (bench/serve_enterprise.py --replicas).

  python bench/router.py --port 8350 --policy affinity http://127.0.0.1:8340 http://127.0.0.1:8341

Policies:
- `round-robin`: each request to the next replica in turn (what a plain Service does).
- `affinity`: prefix affinity, then least queue: the request goes to the replica this
  router sent the longest run of its prompt's leading blocks to (see below), unless that
  replica has more than SLACK requests waiting beyond the least waiting one; with no
  prefix anywhere (or past the slack), to the replica with the fewest waiting, then the
  fewest in flight from this router (as llm-d-router's prefix-cache affinity filter
  before its load scorers).
- `scored`: the picker's default profile, simplified: every replica is scored
  3 x prefix affinity + 2 x queue + 2 x KV room (the weights of llm-d-router's default
  scheduling profile) and the best one takes the request. Prefix affinity: the fraction
  of the request's prompt, in blocks of 256 characters hashed as a chain (a block's hash
  covers everything before it), whose blocks this router last sent to that replica (an
  LRU index, as the picker's prefix-cache scorer keeps; it does not see the replicas'
  caches). Queue, as the picker's queue scorer: (longest - this one's) / (longest -
  shortest), 1 when all are equal, of each replica's `vllm:num_requests_waiting` (requests
  not admitted yet: a running request costs no score, so affinity is not outweighed by a
  one-request difference in load); KV room: 1 - `vllm:kv_cache_usage_perc`. Metrics are
  scraped from every replica's /metrics every 100 ms. Ties go to the replica with fewer
  requests in flight from this router, then the first. (A first version scored the
  requests in flight instead of waiting ones: a difference of one request outweighed a
  whole system prompt's affinity, and the hit rate stayed at round-robin's; BENCHMARKS.md.)

`/metrics` answers the sum of the replicas' megamesh_* KV and engine figures (the load
generator reads them); `/router` says where requests went. Not a product: the gateway
does this in a deployment (docs/serving.md).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import itertools
import json
import time

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

BLOCK_CHARS = 256
INDEX_BLOCKS = 200_000  # LRU capacity of the prefix index (blocks)
WEIGHTS = {"prefix": 3.0, "queue": 2.0, "kv": 2.0}
POLICIES = ("round-robin", "affinity", "scored")
SLACK = 4  # waiting requests a replica holding the prefix may have beyond the least
SUMMED = ("megamesh_kv_pages_used", "megamesh_kv_pages", "megamesh_prefix_cache_hit_tokens",
          "megamesh_preempted", 'megamesh_engine_seconds{phase="prefill"}',
          'megamesh_engine_seconds{phase="decode"}')


def prompt_text(body: dict) -> str:
    """What the replicas' prefix caches key on, as text: system, tools and messages in order."""
    parts = [json.dumps(body.get("system", ""), sort_keys=True), json.dumps(body.get("tools", []))]
    parts += [json.dumps(m, sort_keys=True) for m in body.get("messages", [])]
    return "".join(parts)


def block_hashes(text: str) -> list[bytes]:
    out, h = [], b""
    for i in range(0, len(text) - BLOCK_CHARS + 1, BLOCK_CHARS):
        h = hashlib.blake2b(h + text[i:i + BLOCK_CHARS].encode(), digest_size=12).digest()
        out.append(h)
    return out


class Router:
    def __init__(self, backends: list[str], policy: str) -> None:
        self.backends, self.policy = backends, policy
        self.rr = itertools.cycle(range(len(backends)))
        self.index: collections.OrderedDict[bytes, set[int]] = collections.OrderedDict()
        self.waiting = [0.0] * len(backends)  # not admitted yet, from the replica's metrics
        self.kv = [0.0] * len(backends)
        self.inflight = [0] * len(backends)  # sent by this router, response not finished
        self.sent = [0] * len(backends)
        self.metrics_text = [""] * len(backends)
        self.client = httpx.AsyncClient(timeout=None)

    async def poll(self) -> None:
        while True:
            for i, url in enumerate(self.backends):
                try:
                    text = (await self.client.get(url + "/metrics", timeout=2)).text
                except httpx.HTTPError:
                    continue
                self.metrics_text[i] = text
                for line in text.splitlines():
                    name, _, value = line.partition(" ")
                    if name == "vllm:num_requests_waiting":
                        self.waiting[i] = float(value)
                    elif name == "vllm:kv_cache_usage_perc":
                        self.kv[i] = float(value)
            await asyncio.sleep(0.1)

    def choose(self, body: dict) -> int:
        """The replica for this request (counted in flight there until `done`)."""
        i = self.pick(body)
        self.inflight[i] += 1
        self.sent[i] += 1
        return i

    def done(self, i: int) -> None:
        self.inflight[i] -= 1

    def pick(self, body: dict) -> int:
        if self.policy == "round-robin":
            return next(self.rr)
        hashes = block_hashes(prompt_text(body))
        n = len(self.backends)
        prefix = [0.0] * n
        for i in range(n):
            run = 0
            for h in hashes:
                if i not in self.index.get(h, ()):
                    break
                run += 1
            prefix[i] = run / len(hashes) if hashes else 0.0
        queue = self.waiting
        lo, hi = min(queue), max(queue)
        least = min(range(n), key=lambda i: (queue[i], self.inflight[i], i))
        if self.policy == "affinity":
            held = max(range(n), key=lambda i: (prefix[i], -queue[i], -self.inflight[i], -i))
            best = held if prefix[held] > 0 and queue[held] <= lo + SLACK else least
        else:
            score = [WEIGHTS["prefix"] * prefix[i]
                     + WEIGHTS["queue"] * (1.0 if hi == lo else (hi - queue[i]) / (hi - lo))
                     + WEIGHTS["kv"] * (1.0 - self.kv[i]) for i in range(n)]
            best = max(range(n), key=lambda i: (score[i], -self.inflight[i], -i))
        for h in hashes:
            self.index.setdefault(h, set()).add(best)
            self.index.move_to_end(h)
        while len(self.index) > INDEX_BLOCKS:
            self.index.popitem(last=False)
        return best

    async def forward(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        i = self.choose(body if isinstance(body, dict) else {})
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        req = self.client.build_request(request.method, self.backends[i] + request.url.path,
                                        params=request.query_params, headers=headers, content=raw)
        try:
            upstream = await self.client.send(req, stream=True)
        except BaseException:
            self.done(i)
            raise

        async def body_iter():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                self.done(i)
                await upstream.aclose()

        keep = {k: v for k, v in upstream.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")}
        return StreamingResponse(body_iter(), status_code=upstream.status_code, headers=keep)

    def summed_metrics(self) -> str:
        total: dict[str, float] = collections.defaultdict(float)
        for text in self.metrics_text:
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name in SUMMED:
                    total[name] += float(value)
        return "".join(f"{k} {v}\n" for k, v in total.items())


def app(router: Router) -> Starlette:
    async def forward(request: Request) -> Response:
        return await router.forward(request)

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(router.summed_metrics())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "backends": router.backends})

    async def where(request: Request) -> Response:
        return JSONResponse({"policy": router.policy, "sent": router.sent})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.get_running_loop().create_task(router.poll())
        yield
        task.cancel()

    return Starlette(routes=[Route("/v1/{path:path}", forward, methods=["GET", "POST"]),
                             Route("/metrics", metrics), Route("/health", health), Route("/router", where)],
                     lifespan=lifespan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("backends", nargs="+", help="replica base URLs")
    ap.add_argument("--port", type=int, default=8350)
    ap.add_argument("--policy", choices=POLICIES, default="affinity")
    args = ap.parse_args()
    print(f"routing {args.policy} over {len(args.backends)} replicas on port {args.port} "
          f"({time.time():.0f})", flush=True)
    uvicorn.run(app(Router(args.backends, args.policy)), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
