import random

import pytest
import torch

from server.engine.state_cache import StateCache, prefix_hashes, prompt_items


def _state(n=10):
    return (torch.zeros(n), torch.zeros(n))  # 80 bytes


def test_longest_prefix_wins_and_scopes_are_isolated():
    c = StateCache(10_000)
    items = [1, 2, 3, 4, 5, 6]
    h = prefix_hashes("alice", items)
    c.store("alice", None, h[1], 2, _state())
    c.store("alice", None, h[3], 4, _state())
    assert c.lookup("alice", h, 5)[0] == 4
    assert c.lookup("alice", h, 3)[0] == 2  # never longer than allowed
    assert c.lookup("bob", prefix_hashes("bob", items), 5) is None
    other = prefix_hashes("alice", [1, 2, 9, 4, 5, 6])
    assert c.lookup("alice", other, 5)[0] == 2
    assert (c.hits, c.misses) == (3, 1)


def test_lru_eviction_prefers_unpinned_and_sessions_keep_two():
    c = StateCache(3 * 80)
    keys = [prefix_hashes("", [i])[-1] for i in range(6)]
    c.store("", "s", keys[0], 1, _state())
    c.store("", None, keys[1], 1, _state())
    c.store("", None, keys[2], 1, _state())
    c.store("", None, keys[3], 1, _state())  # over budget: the oldest unpinned entry goes, not the session's
    assert keys[0] in c.entries and keys[1] not in c.entries and c.evictions == 1
    c.store("", "s", keys[4], 1, _state())
    c.store("", "s", keys[5], 1, _state())  # a session keeps its newest two
    assert keys[0] not in c.entries and {keys[4], keys[5]} <= set(c.entries) and c.bytes <= 3 * 80


def test_images_with_identical_placeholders_get_different_items():
    a = prompt_items([5, 9, 9, 9, 9, 6], 9, ["imgA"], 4)
    b = prompt_items([5, 9, 9, 9, 9, 6], 9, ["imgB"], 4)
    assert a[0] == b[0] and a[1:5] != b[1:5] and prefix_hashes("", a)[-1] != prefix_hashes("", b)[-1]


def test_a_chain_continues_from_an_earlier_hash():
    whole = prefix_hashes("s", [1, 2, 3, 4, 5])
    assert prefix_hashes("s", [4, 5], start=whole[2]) == whole[3:]


@pytest.mark.parametrize("seed", range(40))
def test_store_many_leaves_what_storing_one_by_one_does_and_reads_only_what_stays(seed):
    """Whatever the cache holds (sessions and not, several scopes, repeated keys) and whatever a
    batch stores, store_many leaves the entries, in order and with the states, that storing the
    batch one by one leaves, and reads only the states that stay (the last of a repeated key)."""
    rng = random.Random(seed)
    room = rng.randint(1, 8)
    keys = [prefix_hashes("", [i])[-1] for i in range(12)]

    def stores(n):
        return [(rng.choice("ab"), rng.choice([None, None, "s1", "s2"]), rng.choice(keys), rng.randint(1, 5))
                for _ in range(n)]

    head, batch = stores(rng.randint(0, 12)), stores(rng.randint(1, 12))
    states = [_state() for _ in batch]
    one, many = StateCache(room * 80), StateCache(room * 80)
    for c in (one, many):
        for scope, session, key, length in head:
            c.store(scope, session, key, length, _state())
    for (scope, session, key, length), state in zip(batch, states):
        one.store(scope, session, key, length, state)
    reads = []
    assert many.store_many(batch, 80, lambda i: reads.append(i) or states[i]) == len(reads)
    assert list(many.entries) == list(one.entries) and many.bytes == one.bytes
    batch_keys = {key for _, _, key, _ in batch}
    for key, entry in one.entries.items():
        assert many.entries[key].state is not None
        if key in batch_keys:
            assert many.entries[key].state is entry.state
    assert sorted(reads) == sorted(i for i, (_, _, key, _) in enumerate(batch)
                                   if key in one.entries and one.entries[key].state is states[i])


def test_a_failed_read_leaves_no_entry_without_a_state():
    c = StateCache(10 * 80)
    keys = [prefix_hashes("", [i])[-1] for i in range(3)]

    def read(i):
        if i == 1:
            raise RuntimeError("out of memory")
        return _state()

    with pytest.raises(RuntimeError):
        c.store_many([("", None, k, 1) for k in keys], 80, read)
    assert all(e.state is not None for e in c.entries.values()) and c.bytes == 80 * len(c.entries)
