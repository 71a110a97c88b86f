"""The serving engine's pure-Python parts on their own, without jax or a model: the KV
page pool with its prefix cache (`serve.kvpool`) and the scheduler (`serve.scheduler`):
admission with the reserve, preemption order, fairness across tenants, eviction. Each
test runs in milliseconds; a "step" here is what the engine does with the scheduler,
minus the device (a prefill completes in one go, a decode adds a position)."""

from __future__ import annotations

import collections

import pytest

from megamesh.serve.kvpool import SCRATCH, PagePool
from megamesh.serve.request import QueueFull, Request, SamplingParams
from megamesh.serve.scheduler import FairQueue, Scheduler

P = 4  # positions per page in these tests


def request(i: int, prompt_len: int = 8, max_tokens: int = 8, tenant: str = "", priority: int = 0,
            prompt: list[int] | None = None, pool: PagePool | None = None) -> Request:
    prompt = prompt if prompt is not None else [1000 * (i + 1) + t for t in range(prompt_len)]
    r = Request(i, prompt, SamplingParams(max_tokens=max_tokens), lambda ev: None, seed=i,
                tenant=tenant, priority=priority, arrival=float(i))
    if pool is not None:
        r.hashes = pool.hashes(r.prompt)
    return r


def make(pages: int = 64, slots: int = 4, reserve: int = 0, max_queue: int = 16, scheduling: str = "fair",
         prefix_cache: bool = True) -> Scheduler:
    pool = PagePool(pages, P, prefix_cache=prefix_cache)
    return Scheduler(pool, slots=slots, pages_per_seq=16, reserve_tokens=reserve, max_queue=max_queue,
                     scheduling=scheduling)


def admit_all(s: Scheduler) -> list[Request]:
    """Admit while the scheduler admits; each admitted prompt is prefilled whole."""
    out = []
    while (r := s.admit()) is not None:
        assert s.prefilled(r, len(r.feed) - r.prefilled)
        out.append(r)
    return out


def decode(s: Scheduler, reqs: list[Request]) -> None:
    """One decode step's bookkeeping: each running request gets its page, then a position."""
    s.make_room()
    for r in s.decodable().values():
        r.out_ids.append(0)
        r.pos += 1


def finish(s: Scheduler, r: Request) -> None:
    r.done = True
    s.release(r)


# ----------------------------------------------------------------------------- the pool


def test_pool_hands_out_lowest_pages_and_takes_them_back():
    pool = PagePool(8, P)
    assert [pool.take() for _ in range(3)] == [1, 2, 3] and pool.used == 3 and pool.available == 5
    pool.release([1, 2, 3])
    assert pool.used == 0 and pool.available == 8
    assert SCRATCH not in [pool.take() for _ in range(8)]  # page 0 is never handed out


def test_prefix_hashes_chain_over_every_token_before():
    pool = PagePool(8, P)
    a, b = pool.hashes(list(range(10))), pool.hashes([99] + list(range(1, 10)))
    assert len(a) == 2  # full pages only
    assert a[0] != b[0] and a[1] != b[1]  # page 1's hash depends on page 0's tokens too
    assert pool.hashes(list(range(8))) == a  # the same prefix, the same hashes


def test_cached_pages_are_shared_kept_after_release_and_evicted_least_recently_used():
    pool = PagePool(4, P)
    tokens = list(range(12))
    h = pool.hashes(tokens)
    pages = [pool.take() for _ in range(3)]
    pool.register(h, pages, 0, 3)
    # a later sequence of the same 12 tokens finds 2 pages (its last token is computed)
    assert pool.match(h, 12) == pages[:2] and pool.match(h, 13) == pages
    pool.share(pages[0])
    assert pool.holders(pages[0]) == 2
    pool.release(pages)
    assert pool.used == 1 and pool.cached(pages[1])  # pages[0] still held once
    pool.release([pages[0]])
    assert pool.used == 0 and pool.available == 4
    # released last page first: the tail is evicted before the head; free pages go first
    assert pool.take() == 4 and pool.stats["prefix_evictions"] == 0
    assert pool.take() == pages[2] and pool.stats["prefix_evictions"] == 1
    assert pool.match(h, 13) == pages[:2]  # its prefix forgotten, the head still cached
    off = PagePool(4, P, prefix_cache=False)
    off.register(h, pages, 0, 3)
    assert off.match(h, 13) == [] and not off.cached(pages[0])


# ----------------------------------------------------------------------------- the queue


def test_fair_queue_serves_the_tenant_with_fewest_running_then_arrival_interactive_first():
    q = FairQueue()
    a1, a2, b1 = request(0, tenant="a"), request(1, tenant="a"), request(2, tenant="b")
    bg = request(3, tenant="c", priority=1)
    for r in (bg, a1, a2, b1):
        q.append(r)
    running = collections.Counter({"a": 0, "b": 3})
    assert q.peek(running) is a1
    running["a"] = 5
    assert q.peek(running) is b1  # fewer running
    q.fair = False
    assert q.peek(running) is a1  # first come, first served
    for r in (a1, a2, b1):
        q.remove(r)
    assert q.peek(running) is bg and len(q) == 1


def test_queue_bound_is_a_clear_error():
    s = make(max_queue=2)
    s.enqueue(request(0))
    s.enqueue(request(1))
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        s.enqueue(request(2))
    assert s.stats["rejected_queue_full"] == 1


# ----------------------------------------------------------------------------- admission


def test_admission_takes_lowest_slots_and_the_prompts_pages():
    s = make()
    reqs = [request(i, prompt_len=9, pool=s.pool) for i in range(3)]
    for r in reqs:
        s.enqueue(r)
    assert admit_all(s) == reqs
    assert [r.slot for r in reqs] == [0, 1, 2]
    # 9 prompt tokens and the first decode's position: positions 0..9 -> 3 pages of 4
    assert all(len(r.pages) == 3 for r in reqs) and s.pool.used == 9
    assert list(s.table[0, :3]) == reqs[0].pages and s.table[3].max() == SCRATCH
    assert all(r.pos == 9 for r in reqs) and not s.prefilling


def test_admission_waits_for_the_reserve_of_running_requests():
    """reserve_tokens: pages kept free for the running requests' next positions. 12 pages:
    a running request of prompt 8 holds 3 and reserves 4 more (its next 16 positions),
    which leaves 5; a new prompt of 8 with the same reach needs 7: it waits."""
    s = make(pages=12, reserve=16)
    first = request(0, prompt_len=8, max_tokens=16, pool=s.pool)
    s.enqueue(first)
    assert admit_all(s) == [first] and len(first.pages) == 3 and s.reserve() == 4
    second = request(1, prompt_len=8, max_tokens=16, pool=s.pool)
    s.enqueue(second)
    assert s.admit() is None and len(s.waiting) == 1
    finish(s, first)
    assert admit_all(s) == [second]


def test_a_cached_prefix_is_shared_not_recomputed():
    s = make()
    shared = list(range(16))
    a = request(0, prompt=shared + [100, 101], pool=s.pool)
    s.enqueue(a)
    admit_all(s)
    b = request(1, prompt=shared + [200], pool=s.pool)
    s.enqueue(b)
    (got,) = admit_all(s)
    assert got is b and b.reused == b.prefilled - 1 == 16 and b.pages[:4] == a.pages[:4]
    assert all(s.pool.holders(p) == 2 for p in a.pages[:4])
    assert s.stats["prefix_hit_tokens"] == 16


def test_a_full_pool_preempts_the_last_admitted_and_it_resumes_from_its_tokens():
    """10 pages: three requests of 8 prompt tokens take 3 each; as they decode past a page
    boundary the one admitted last is preempted (its pages freed), back at the queue's
    front with the tokens it generated, and readmitted when pages free up."""
    s = make(pages=10)
    reqs = [request(i, prompt_len=8, max_tokens=12, pool=s.pool) for i in range(3)]
    for r in reqs:
        s.enqueue(r)
    assert admit_all(s) == reqs
    for _ in range(4):  # positions 8..11 fit; 12 needs a 4th page each
        decode(s, reqs)
    decode(s, reqs)
    assert s.stats["preempted"] == 1 and reqs[2].slot == -1 and reqs[2].pages == []
    assert list(s.waiting) == [reqs[2]] and len(reqs[2].out_ids) == 4
    assert reqs[2].hashes == s.pool.hashes(reqs[2].prompt + reqs[2].out_ids)
    finish(s, reqs[0])
    (back,) = admit_all(s)
    assert back is reqs[2] and back.feed == back.prompt + back.out_ids and back.pos == 12


def test_fairness_preempts_the_busiest_tenant_for_a_waiting_one():
    s = make(slots=4, reserve=0)
    flood = [request(i, tenant="flood", pool=s.pool) for i in range(6)]
    for r in flood:
        s.enqueue(r)
    assert admit_all(s) == flood[:4]  # every slot
    other = request(10, tenant="other", pool=s.pool)
    other.arrival = 100.0
    s.enqueue(other)
    (got,) = admit_all(s)  # flood runs 4, other 0: flood's last admitted makes room
    assert got is other and flood[3].slot == -1 and s.stats["preempted_for_fairness"] == 1
    assert s.running == {"flood": 3, "other": 1}
    assert s.admit() is None  # flood's next waits: no slot, and flood is the busiest tenant
    fcfs = make(slots=4, scheduling="fcfs")
    for r in [request(i, tenant="flood", pool=fcfs.pool) for i in range(4)]:
        fcfs.enqueue(r)
    admit_all(fcfs)
    fcfs.enqueue(request(10, tenant="other", pool=fcfs.pool))
    assert fcfs.admit() is None and fcfs.stats["preempted_for_fairness"] == 0


def test_background_work_yields_to_interactive_requests():
    s = make(slots=2, scheduling="fcfs")
    batch = [request(i, tenant="batch", priority=1, pool=s.pool) for i in range(2)]
    for r in batch:
        s.enqueue(r)
    admit_all(s)
    chat = request(5, tenant="batch", pool=s.pool)  # the same key: still first
    s.enqueue(chat)
    assert admit_all(s) == [chat] and batch[1].slot == -1 and chat.slot == 1


def test_compaction_moves_busy_rows_low_and_cancelled_requests_are_reaped():
    s = make(slots=4)
    reqs = [request(i, pool=s.pool) for i in range(4)]
    for r in reqs:
        s.enqueue(r)
    admit_all(s)
    finish(s, reqs[0])
    finish(s, reqs[1])
    s.compact()
    assert {r.slot for r in reqs[2:]} == {0, 1} and s.stats["slot_moves"] == 2
    assert (s.table[2:] == SCRATCH).all()
    assert list(s.table[reqs[3].slot, :3]) == reqs[3].pages
    waiting = request(9, pool=s.pool)
    s.enqueue(waiting)
    s.cancel(waiting)
    s.cancel(reqs[2])
    assert s.reap() == [waiting, reqs[2]] and not len(s.waiting)

