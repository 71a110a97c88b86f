"""The KV page pool and its prefix cache: which pages are free, who holds each one, and
which hold a known prefix. Pure Python (no jax): the pages' contents live on the devices
(`serve.runner`); this is their bookkeeping, unit-tested on its own.

A page holds `page_size` positions. A request holds pages for the positions it has
(`Scheduler`), each with a reference count: several requests share the pages of a
common prompt prefix. Every full page of a prompt is registered under a hash of its
tokens and of every token before it (a chain, as vLLM's), so a later prompt that begins
the same way finds them (`match`). A registered page nobody holds stays cached until its
memory is needed: `take` hands out a free page first, else the least recently released
cached one (LRU eviction)."""

from __future__ import annotations

import collections
import hashlib

import numpy as np

from megamesh.model.specs import SCRATCH


class PagePool:
    def __init__(self, n_pages: int, page_size: int, *, prefix_cache: bool = True,
                 stats: collections.Counter | None = None) -> None:
        """`n_pages` pages to hand out (ids 1..n_pages; page 0 is SCRATCH)."""
        self.n_pages, self.page_size, self.prefix_cache = n_pages, page_size, prefix_cache
        self.stats = collections.Counter() if stats is None else stats
        self._free = list(range(n_pages, SCRATCH, -1))  # pop() gives the lowest page
        self._refs = np.zeros(n_pages + 1, np.int32)  # holders of each page
        self._hash_of: dict[int, bytes] = {}  # cached page -> its prefix hash
        self._by_hash: dict[bytes, int] = {}
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU

    def hashes(self, tokens: list[int]) -> list[bytes]:
        """The prefix hash of each full page of `tokens`: page i's covers tokens
        [0, (i + 1) * page_size)."""
        out, h, P = [], b"", self.page_size
        arr = np.asarray(tokens, np.int32)
        for i in range(len(tokens) // P):
            h = hashlib.blake2b(h + arr[i * P:(i + 1) * P].tobytes(), digest_size=16).digest()
            out.append(h)
        return out

    def match(self, hashes: list[bytes], n: int) -> list[int]:
        """The cached pages that begin a sequence of n tokens with these page hashes (at
        least its last token is left to compute: its logits draw the next token)."""
        hit = []
        for h in hashes[:(n - 1) // self.page_size] if self.prefix_cache else []:
            page = self._by_hash.get(h)
            if page is None:
                break
            hit.append(page)
        return hit

    @property
    def available(self) -> int:
        """Pages that can be handed out: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def used(self) -> int:
        """Pages somebody holds."""
        return self.n_pages - self.available

    def unheld(self, pages: list[int]) -> int:
        """How many of these cached pages nobody holds (sharing them takes them out of
        `available`)."""
        return sum(1 for p in pages if p in self._evictable)

    def share(self, page: int) -> None:
        """One more holder of a cached page."""
        self._evictable.pop(page, None)
        self._refs[page] += 1

    def take(self) -> int:
        """A page for new contents (held once): a free one, else the least recently used
        cached one, whose prefix is forgotten. `available` must be > 0."""
        if self._free:
            page = self._free.pop()
        else:
            page, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash_of.pop(page)]
            self.stats["prefix_evictions"] += 1
        self._refs[page] = 1
        return page

    def register(self, hashes: list[bytes], pages: list[int], first: int, end: int) -> None:
        """Put pages[first:end], whose contents are now final, in the prefix cache under
        hashes[first:end] (a prefix already cached keeps its page)."""
        if not self.prefix_cache:
            return
        for i in range(first, end):
            if hashes[i] not in self._by_hash:
                self._by_hash[hashes[i]] = pages[i]
                self._hash_of[pages[i]] = hashes[i]

    def release(self, pages: list[int]) -> None:
        """One holder fewer of each page (last pages first: a prefix's tail is evicted
        before its head). A page nobody holds is cached if registered, else free."""
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._evictable[page] = None  # the most recently used end
                else:
                    self._free.append(page)

    def holders(self, page: int) -> int:
        return int(self._refs[page])

    def cached(self, page: int) -> bool:
        """Registered under a prefix hash (held or not)."""
        return page in self._hash_of
