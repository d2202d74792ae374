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


@pytest.mark.parametrize("seed", range(20))
def test_held_after_predicts_what_storing_a_batch_leaves(seed):
    """Whatever the cache holds (sessions and not, several scopes) and whatever a batch stores,
    held_after names exactly the batch's keys that storing them all, in order, leaves cached,
    and changes nothing itself."""
    rng = random.Random(seed)
    room = rng.randint(1, 8)
    c = StateCache(room * 80, per_session=2)
    keys = [prefix_hashes("", [i])[-1] for i in range(40)]

    def stores(n):
        return [(rng.choice("ab"), rng.choice([None, None, "s1", "s2"]), rng.choice(keys), rng.randint(1, 5))
                for _ in range(n)]

    for scope, session, key, length in stores(rng.randint(0, 12)):
        c.store(scope, session, key, length, _state())
    before = list(c.entries)
    batch = stores(rng.randint(1, 12))
    predicted = c.held_after(batch, 80)
    assert list(c.entries) == before
    for scope, session, key, length in batch:
        c.store(scope, session, key, length, _state())
    assert predicted == [key in c.entries for _, _, key, _ in batch]
    assert c.bytes <= room * 80
