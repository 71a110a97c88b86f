"""The scheduler: which requests run, in which slot, with which KV pages. Pure Python (no
jax): unit-tested on its own in milliseconds (tests/test_scheduler.py); the engine asks
it each step what to prefill and which rows decode, and runs that on the devices.

A request holds one slot (a row of the decode batch) from admission to its last token,
and pages (`kvpool.PagePool`) as it grows: its prompt's at admission, one more each time
its decode crosses a page boundary. Admission needs a free slot and free pages for the
prompt, beyond a reserve for the running requests' next `reserve_tokens` positions each.
When a running request needs a page and none is free, the request admitted last is
preempted (vLLM's recompute preemption): its pages are freed and it goes back to the
front of the queue, to be prefilled again from its prompt and the tokens it has
generated. A bounded waiting queue (past it, `QueueFull`).

Fairness across tenants (API keys): waiting requests queue per tenant (`FairQueue`), and
the next one admitted is the head of the tenant with the fewest requests running (then
the earliest arrival). When no slot is free and that tenant runs at least two fewer
requests than the busiest tenant, the busiest tenant's last admitted request is
preempted for it: one key's burst cannot hold every slot while others wait. Background
work (priority 1, Message Batches) is admitted after interactive requests and preempted
first."""

from __future__ import annotations

import collections
import itertools
import threading

import numpy as np

from megamesh.model.specs import SCRATCH
from megamesh.serve.kvpool import PagePool
from megamesh.serve.request import QueueFull, Request

SCHEDULING = ("fair", "fcfs")


class FairQueue:
    """Waiting requests: one FIFO per tenant. `peek(running)` is the head of the tenant
    with the fewest requests running (ties: the earliest arrival), interactive requests
    before background ones; with `fair` False (first come, first served: the baseline
    bench/serve_fairness.py measures against), the earliest arrival whatever its tenant."""

    def __init__(self, fair: bool = True) -> None:
        self.queues: dict[str, collections.deque[Request]] = {}
        self.n = 0
        self.fair = fair

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return (r for q in list(self.queues.values()) for r in list(q))

    def append(self, req: Request, *, front: bool = False) -> None:
        q = self.queues.setdefault(req.tenant, collections.deque())
        q.appendleft(req) if front else q.append(req)
        self.n += 1

    def remove(self, req: Request) -> None:
        q = self.queues[req.tenant]
        q.remove(req)
        self.n -= 1
        if not q:
            del self.queues[req.tenant]

    def peek(self, running: collections.Counter) -> Request | None:
        heads = [q[0] for q in self.queues.values()]
        return min(heads, key=lambda r: (r.priority, running[r.tenant] if self.fair else 0, r.arrival),
                   default=None)


class Scheduler:
    def __init__(self, pool: PagePool, *, slots: int, pages_per_seq: int, reserve_tokens: int = 256,
                 max_queue: int = 256, scheduling: str = "fair",
                 stats: collections.Counter | None = None) -> None:
        """`slots` rows of the decode batch, each with a page table row of `pages_per_seq`
        pages; `reserve_tokens`: positions of growth per running request that admission
        leaves free (`reserve`); `max_queue`: waiting requests at most; `scheduling`:
        "fair" across tenants or "fcfs" (first come, first served; background work
        still yields). The engine checks them (`engine.check_engine_flags`)."""
        self.pool, self.slots, self.reserve_tokens, self.max_queue = pool, slots, reserve_tokens, max_queue
        self.stats = pool.stats if stats is None else stats
        self.table = np.zeros((slots, pages_per_seq), np.int32)  # a row per slot
        self.free = list(range(slots))[::-1]  # pop() gives the lowest slot
        self.active: dict[int, Request] = {}  # slot -> request
        self.waiting = FairQueue()
        self.scheduling = scheduling
        self.prefilling: list[Request] = []  # admitted, prompt not yet all prefilled
        self.running: collections.Counter[str] = collections.Counter()  # tenant -> running
        self._admissions = itertools.count()
        # guards `waiting` (submitted from other threads); re-entrant: a preemption under
        # it puts its request back
        self.cv = threading.Condition(threading.RLock())

    @property
    def scheduling(self) -> str:
        return "fair" if self.waiting.fair else "fcfs"

    @scheduling.setter
    def scheduling(self, value: str) -> None:
        self.waiting.fair = value == "fair"

    # ------------------------------------------------------------------ the queue

    def enqueue(self, req: Request) -> None:
        """Queue a request (QueueFull past `max_queue` waiting)."""
        with self.cv:
            if len(self.waiting) >= self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull(f"the server is overloaded: {len(self.waiting)} requests are waiting "
                                f"(the bound is {self.max_queue}); retry later")
            self.waiting.append(req)
            self.stats["requests"] += 1
            self.cv.notify_all()

    def cancel(self, req: Request) -> None:
        with self.cv:
            if not req.done:
                req.cancelled = True
                self.cv.notify_all()

    def reap(self) -> list[Request]:
        """The cancelled requests, waiting (taken out of the queue) or running (still
        holding their slots: the caller finishes them)."""
        with self.cv:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        return gone + [r for r in self.active.values() if r.cancelled]

    # ------------------------------------------------------------------ admission

    def admit(self) -> Request | None:
        """The next waiting request admitted into a slot with the pages of its prompt (those
        found in the prefix cache shared), preempting for fairness if that is what frees a
        slot; None when none can be admitted now (no request, no slot fairly due, or not
        enough pages beyond the reserve). A cancelled request comes out of the queue as
        it is, without a slot (`slot` -1): the caller finishes it."""
        pool = self.pool
        with self.cv:
            req = self.waiting.peek(self.running)
            if req is None:
                return None
            if not self.free and not req.cancelled:
                victim = self.unfair(req)
                if victim is None:
                    return None  # every slot busy, fairly shared
                self.preempt(victim)
                self.stats["preempted_for_fairness"] += 1
            tokens = req.context
            hit = pool.match(req.hashes, len(tokens))
            # pages for the prompt and the first decode's position (a request admitted is
            # not preempted by its own next step), and its next reserve_tokens
            reach = min(len(tokens) + self.reserve_tokens, len(req.prompt) + req.sampling.max_tokens)
            need = max(len(tokens), reach) // pool.page_size + 1 - len(hit)
            if not req.cancelled and need + self.reserve() > pool.available - pool.unheld(hit):
                return None  # wait for pages (a running request's end frees some)
            self.waiting.remove(req)
        if req.cancelled:
            return req
        req.slot = self.free.pop()
        req.admitted = next(self._admissions)
        self.active[req.slot] = req
        self.running[req.tenant] += 1
        for page in hit:  # shared with whoever else holds them
            pool.share(page)
            self.table[req.slot, len(req.pages)] = page
            req.pages.append(page)
        self.grow(req, len(tokens))
        req.feed = tokens
        req.prefilled = req.reused = len(hit) * pool.page_size
        self.stats["prefix_hit_tokens"] += req.prefilled
        self.prefilling.append(req)
        return req

    def prefilled(self, req: Request, n: int) -> bool:
        """`req`'s next n positions are computed (a prefill chunk): the pages they
        completed go in the prefix cache (as each chunk ends: a request of the same tenant
        arriving meanwhile reuses them, and a request preempted mid-prompt leaves them
        cached for its own readmission). True when its whole feed is in: its next
        token is drawn and it decodes from the next step on."""
        start, end = req.prefilled, req.prefilled + n
        P = self.pool.page_size
        self.pool.register(req.hashes, req.pages, max(start, req.reused) // P, end // P)
        req.prefilled = end
        if end < len(req.feed):
            return False
        self.prefilling.remove(req)
        req.pos = len(req.feed)
        return True

    def reserve(self) -> int:
        """Pages held back from admission for the running requests' next tokens: each one's
        next `reserve_tokens` positions (or up to its max_tokens, if sooner). Admitting
        into the pages they are about to need would preempt one of them within steps,
        and a preemption recomputes a prompt. (A reserve of at least every request's
        max_tokens rules preemption out.)"""
        total, P = 0, self.pool.page_size
        for r in self.active.values():
            at = len(r.feed) if r in self.prefilling else r.pos
            end = min(at + self.reserve_tokens, len(r.prompt) + r.sampling.max_tokens)
            total += max(0, end // P + 1 - len(r.pages))
        return total

    def unfair(self, req: Request) -> Request | None:
        """The request to preempt so that `req` gets a slot: for an interactive request, the
        last admitted background one if any runs; else the last admitted of the busiest
        tenant, when that runs at least two more requests than `req`'s."""
        background = [r for r in self.active.values() if r.priority > req.priority]
        if background:
            return max(background, key=lambda r: r.admitted)
        if self.scheduling != "fair":
            return None
        peers = collections.Counter(r.tenant for r in self.active.values()
                                    if r.priority == req.priority)
        busiest = max(peers, key=lambda t: peers[t], default=None)
        if busiest is None or peers[busiest] < peers[req.tenant] + 2:
            return None
        return max((r for r in self.active.values() if r.tenant == busiest), key=lambda r: r.admitted)

    # ------------------------------------------------------------------ pages and slots

    def grow(self, req: Request, pos: int) -> None:
        """Give `req` the pages for positions up to `pos` (pages must be available)."""
        while len(req.pages) <= pos // self.pool.page_size:
            page = self.pool.take()
            self.table[req.slot, len(req.pages)] = page
            req.pages.append(page)

    def make_room(self) -> None:
        """Every running request gets the page its next decode writes to; while none is free,
        the request admitted last is preempted (recompute: back to the queue's front)."""
        for req in sorted(self.active.values(), key=lambda r: r.admitted):
            if req.done or self.active.get(req.slot) is not req or req in self.prefilling:
                continue  # (a prompt being prefilled has its pages)
            while len(req.pages) <= req.pos // self.pool.page_size and not self.pool.available:
                self.preempt(max(self.active.values(), key=lambda r: r.admitted))
            if self.active.get(req.slot) is req:
                self.grow(req, req.pos)

    def preempt(self, req: Request) -> None:
        """Back to the front of its queue, its slot and pages freed: it is prefilled again
        from its prompt and the tokens it has generated (its stream just pauses)."""
        self.release(req)
        req.slot, req.pos = -1, 0
        req.hashes = self.pool.hashes(req.context)  # what it will prefill
        with self.cv:
            self.waiting.append(req, front=True)
        self.stats["preempted"] += 1

    def release(self, req: Request) -> None:
        """Free the slot and pages of a running request."""
        if req in self.prefilling:
            self.prefilling.remove(req)
        if req.slot >= 0 and self.active.get(req.slot) is req:
            del self.active[req.slot]
            self.running[req.tenant] -= 1
            if not self.running[req.tenant]:
                del self.running[req.tenant]
            self.free.append(req.slot)
            self.free.sort(reverse=True)
            self.table[req.slot] = SCRATCH
        self.pool.release(req.pages)
        req.pages = []

    def compact(self) -> None:
        """Keep the busy slots at the low rows (decode runs the smallest batch bucket that
        covers them): move the highest busy row's page table into the lowest free row."""
        while self.active and self.free:
            low, high = min(self.free), max(self.active)
            if low > high:
                return
            req = self.active.pop(high)
            self.table[low], self.table[high] = self.table[high], SCRATCH
            self.free.remove(low)
            self.free.append(high)
            self.free.sort(reverse=True)
            req.slot = low
            self.active[low] = req
            self.stats["slot_moves"] += 1

    def decodable(self) -> dict[int, Request]:
        """The running requests whose prompts are all in: slot -> request."""
        return {slot: r for slot, r in self.active.items() if r not in self.prefilling}
