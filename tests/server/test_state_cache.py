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
