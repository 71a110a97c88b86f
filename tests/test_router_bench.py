"""bench/router.py's policies (the stand-in for the gateway's endpoint picker in
bench/serve_enterprise.py --replicas), on their own: no servers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from router import Router  # noqa: E402


def body(system: str, user: str) -> dict:
    return {"model": "tiny", "max_tokens": 8, "system": system,
            "messages": [{"role": "user", "content": user}]}


def test_round_robin_alternates_whatever_the_prompt():
    r = Router(["a", "b"], "round-robin")
    assert [r.choose(body("same system prompt " * 50, "hi")) for _ in range(4)] == [0, 1, 0, 1]


@pytest.mark.parametrize("policy", ["affinity", "scored"])
def test_affinity_keeps_a_tenant_on_the_replica_holding_its_prefix_unless_it_is_far_busier(policy):
    r = Router(["a", "b"], policy)
    tenants = [f"You are the assistant of tenant {t}. " * 40 for t in range(6)]
    first = [r.choose(body(s, "first question")) for s in tenants]
    # the first request of each tenant: no prefix anywhere, no queue: the fewest in flight
    # from this router (they alternate); the others follow their tenant's first
    assert first == [0, 1, 0, 1, 0, 1]
    for i in first:
        r.done(i)
    assert [r.choose(body(s, f"another question {i}")) for i, s in enumerate(tenants)] == first
    # a replica far busier by its metrics loses even the prefix (affinity: past the slack;
    # scored: queue 2 + KV 2 > prefix 3)
    busy = first[0]
    r.waiting[busy], r.kv[busy] = 50.0, 0.99
    assert r.pick(body(tenants[0], "third question")) != busy
    # an unknown prompt goes to the least loaded replica
    r.waiting, r.kv, r.inflight = [5.0, 0.0], [0.0, 0.0], [0, 0]
    assert r.pick(body("a brand new tenant " * 40, "hello")) == 1
