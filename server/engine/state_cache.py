"""Session state cache: finished sequences' recurrent states, keyed by the exact token prefix.

A key is a chained hash over the prompt items (token ids, and for image positions the image's
digest and offset), salted by the caller's scope, so one API key never sees another's states.
A later prompt that starts with a cached prefix resumes from that state. Bounded by bytes,
evicted least-recently-used; entries with a session id are evicted after all others, and a
session keeps only its newest two entries (the latest turn's prompt and its end: a conversation
only ever resumes from its latest turn). When many sequences end at once, the engine stores
them with :meth:`StateCache.store_many`, which copies only the states the cache still holds
after the whole batch out of their slots.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


def prefix_hashes(scope: str, items: list, start: bytes | None = None) -> list[bytes]:
    """hashes[i] identifies (scope, items[:i + 1]); with ``start`` (an earlier hash of this
    chain) the items continue that prefix, so a longer sequence never rehashes its head."""
    h = start if start is not None else hashlib.blake2b(scope.encode(), digest_size=16).digest()
    out = []
    for it in items:
        h = hashlib.blake2b(h + str(it).encode(), digest_size=16).digest()
        out.append(h)
    return out


def prompt_items(prompt_ids: list[int], image_token_id: int, digests: list[str], per_image: int) -> list:
    """Token ids with each image position replaced by (image digest, offset): identical
    placeholder ids of different images must never share a cache key."""
    items, k = [], 0
    for t in prompt_ids:
        if t == image_token_id:
            items.append(f"i{digests[k // per_image]}:{k % per_image}")
            k += 1
        else:
            items.append(t)
    return items


@dataclass
class _Entry:
    state: tuple[torch.Tensor, torch.Tensor] | None
    length: int
    scope: str
    session_id: str | None
    nbytes: int


class StateCache:
    def __init__(self, max_bytes: int, per_session: int = 2):
        self.max_bytes, self.per_session = max_bytes, per_session
        self.entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def lookup(self, scope: str, hashes: list[bytes], max_len: int) -> tuple[int, tuple] | None:
        """The longest cached prefix of at most ``max_len`` items: (length, state) or None."""
        lengths = sorted({e.length for e in self.entries.values() if e.scope == scope and e.length <= max_len},
                         reverse=True)
        for n in lengths:
            e = self.entries.get(hashes[n - 1])
            if e is not None:
                self.entries.move_to_end(hashes[n - 1])
                self.hits += 1
                return n, e.state
        self.misses += 1
        return None

    def store(self, scope: str, session_id: str | None, key: bytes, length: int,
              state: tuple[torch.Tensor, torch.Tensor] | None, nbytes: int | None = None) -> None:
        """Hold ``state`` for prompts that start with the prefix ``key`` of ``length`` items
        (``state`` None and ``nbytes`` given: the bookkeeping alone, for :meth:`store_many`)."""
        if nbytes is None:
            nbytes = sum(t.numel() * t.element_size() for t in state)
        if nbytes > self.max_bytes or length == 0:
            return
        if key in self.entries:
            self._drop(key)
        if session_id is not None:
            mine = [k for k, e in self.entries.items() if e.scope == scope and e.session_id == session_id]
            for k in mine[: max(0, len(mine) - self.per_session + 1)]:  # oldest first
                self._drop(k)
        self.entries[key] = _Entry(state, length, scope, session_id, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            victim = next((k for k, e in self.entries.items() if e.session_id is None), next(iter(self.entries)))
            self._drop(victim)
            self.evictions += 1

    def store_many(self, stores: list[tuple[str, str | None, bytes, int]], nbytes: int,
                   read: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Store a batch ``(scope, session_id, key, length)``, in this order, of ``nbytes`` each,
        as :meth:`store` one by one would; ``read(i)`` makes the i-th state and is called only
        for entries still held after the whole batch (for a repeated key, its last item). When
        256 sequences end against room for 46 states, 46 are read. Returns how many were read."""
        for scope, session_id, key, length in stores:
            self.store(scope, session_id, key, length, None, nbytes)
        last = {key: i for i, (_, _, key, _) in enumerate(stores)}
        read_count = 0
        try:
            for key, i in last.items():
                entry = self.entries.get(key)
                if entry is not None and entry.state is None:
                    entry.state = read(i)
                    read_count += 1
        finally:  # a failed read leaves no entry without a state
            for key in last:
                if key in self.entries and self.entries[key].state is None:
                    self._drop(key)
        return read_count

    def _drop(self, key: bytes) -> None:
        self.bytes -= self.entries.pop(key).nbytes

    def __len__(self) -> int:
        return len(self.entries)
