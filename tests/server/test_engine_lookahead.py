"""The decode step that follows a prefill is queued behind it before the host reads the prefill's
first tokens: new requests join that step with their first token taken on the device. Answers,
usage and what the session cache keeps must be those of the single-sequence reference path."""


import pytest
import torch

from model.data.shapes import make_sample
from model.generate import generate
from server.engine import Engine, EngineConfig
from server.engine.engine import Observer
from server.engine.state_cache import prefix_hashes
from tests.server.conftest import Collector, make_request, submit_decoding, user


class Events(Observer):
    """The order of an engine's steps (with their batch sizes) and first tokens."""

    def __init__(self):
        self.log = []

    def on_step(self, batch_size):
        self.log.append(("step", batch_size))

    def on_first_token(self, ttft_s, queue_s):
        self.log.append(("first", None))


def _wait(cols, timeout=60):
    for c in cols:
        assert c.done.wait(timeout), "request did not finish"


def test_a_prefill_is_followed_by_a_step_before_its_first_token_is_read(demo):
    """Alone, a request's first decode step is launched before its first token reaches the host
    (max_tokens - 1 steps in all). Arriving while another request decodes, it joins the step
    launched in the iteration that prefills it: a step of both rows comes before its first token."""
    model, proc = demo
    events = Events()
    eng = Engine(model, proc, EngineConfig(max_num_seqs=4, max_prefill_seqs=4), events)
    eng.start()
    try:
        s = make_sample("test", 3)
        col = Collector()
        req = make_request(proc, "alone", [user(s.qas[0].question)], [s.image()], col, max_tokens=5)
        req.params.ignore_eos = True
        eng.add_request(req)
        _wait([col])
        assert events.log[:2] == [("step", 1), ("first", None)]
        assert eng.steps == 4 and col.final.completion_tokens == 5

        events.log.clear()
        a, b = Collector(), Collector()
        submit_decoding(eng, proc, "a", [user(s.qas[1].question)], [s.image()], a)
        eng.add_request(make_request(proc, "b", [user(s.qas[0].question)], [s.image()], b))
        _wait([a, b])
        firsts = [i for i, (kind, _) in enumerate(events.log) if kind == "first"]
        assert len(firsts) == 2
        steps_before = [n for kind, n in events.log[: firsts[1]] if kind == "step"]
        assert steps_before[-1] == 2 and steps_before.count(2) == 1
        assert b.text == s.qas[0].answer and a.final.completion_tokens == 60
    finally:
        eng.shutdown()


def _asks(penalties: bool):
    """(rid, sample, question, max_tokens, params to set): questions answered with a word and
    the end token, one whose first token is made its end, stop strings, max_tokens of 1-5, and
    with ``penalties`` one with presence/frequency penalties (whose batches read every step's
    tokens before the next: no lookahead)."""
    out = []
    for i in range(8):
        s = make_sample("test", i)
        out.append((f"q{i}", s, s.qas[i % len(s.qas)].question, 40, {}))
    s = make_sample("test", 8)
    out.append(("first", s, s.qas[0].question, 40, {"stop_token_ids": "its first"}))
    for i, stop in ((0, "no"), (1, "orange")):  # "1\nno right..." and "3\nblue\norange..."
        s = make_sample("test", i)
        out.append((f"stop{i}", s, s.qas[1].question, 12, {"stop": (stop,), "ignore_eos": True}))
    for i, n in ((2, 1), (3, 2), (4, 3), (5, 5)):
        s = make_sample("test", i)
        out.append((f"len{i}", s, s.qas[0].question, n, {"ignore_eos": True}))
    if penalties:
        s = make_sample("test", 6)
        out.append(("pen", s, s.qas[1].question, 10, {"presence_penalty": 1.5, "frequency_penalty": 0.5,
                                                      "ignore_eos": True}))
    return out


def _run(demo, asks):
    """The asks through an engine of 5 slots admitting 3 at a time, so later prefills join a
    running batch; returns (engine, requests, collectors)."""
    model, proc = demo
    eng = Engine(model, proc, EngineConfig(max_num_seqs=5, max_prefill_seqs=3, state_cache_bytes=256 << 20))
    reqs, cols = [], []
    for rid, s, question, max_tokens, params in asks:
        col = Collector()
        req = make_request(proc, rid, [user(question)], [s.image()], col, max_tokens=max_tokens)
        for k, v in params.items():
            if v == "its first":  # the token the reference path answers with first
                v = (generate(model, proc, [user(question)], images=[s.image()], params=req.params).token_ids[0],)
            setattr(req.params, k, v)
        reqs.append(req)
        cols.append(col)
        eng.add_request(req)
    eng.start()
    try:
        _wait(cols)
    finally:
        eng.shutdown()
    return eng, reqs, cols


@pytest.fixture(scope="module")
def runs(demo):
    return {pen: (_asks(pen), *_run(demo, _asks(pen))) for pen in (False, True)}


@pytest.mark.parametrize("penalties", [False, True])
def test_answers_and_usage_are_the_reference_paths(runs, demo, penalties):
    model, proc = demo
    asks, eng, reqs, cols = runs[penalties]
    assert eng.slots_used() == 0 and all(r.answered for inf in eng._pending for r in inf.reqs)
    for (rid, s, question, _, _), req, col in zip(asks, reqs, cols):
        want = generate(model, proc, [user(question)], images=[s.image()], params=req.params)
        assert (col.text, col.final.finish_reason, col.final.completion_tokens) == \
            (want.text, want.finish_reason, len(want.token_ids)), rid
        assert req.decoder.token_ids == want.token_ids, rid
    by_id = {r.request_id: c for r, c in zip(reqs, cols)}
    assert [by_id[f"stop{i}"].text for i in (0, 1)] == ["1\n", "3\nblue\n"]
    assert [by_id[f"len{i}"].final.completion_tokens for i in (2, 3, 4, 5)] == [1, 2, 3, 5]
    assert (by_id["first"].final.finish_reason, by_id["first"].final.completion_tokens) == ("stop", 1)


def _final_entries(eng, req):
    """{reply tokens covered: cached state} of the cache's entries that continue the request's
    prompt into its reply (the prompt's own entry excluded)."""
    items = eng._cache_items(req)
    out = {}
    for m in range(1, len(req.decoder.token_ids) + 1):
        key = prefix_hashes(req.scope, items + req.decoder.token_ids[:m])[-1]
        if key in eng.cache.entries:
            out[m] = eng.cache.entries[key].state
    return out


@torch.inference_mode()
def _prefilled(model, req, m):
    """The state after prefilling the prompt and the first ``m`` reply tokens at once."""
    state = model.allocate_state(1)
    ids = torch.tensor([req.prompt_ids + req.decoder.token_ids[:m]])
    pixels = torch.stack([im.pixel_values for im in req.images])
    model(ids, pixels, state=state, slots=torch.tensor([0]), last_only=True)
    return state.read(0)


@pytest.mark.parametrize("penalties", [False, True])
def test_every_cached_state_is_the_state_of_the_tokens_it_is_keyed_by(runs, demo, penalties):
    """A final state is cached under the prompt and the reply tokens its slot was fed, and equals
    prefilling exactly those tokens. Without penalties every step is queued before the host reads
    the tokens it feeds, so a reply that ends on an end token, even its first, keeps the state
    after it (the step queued behind the prefill fed it)."""
    model, _ = demo
    _, eng, reqs, _ = runs[penalties]
    covered = {}
    for req in reqs:
        entries = _final_entries(eng, req)
        for m, (conv, ssm) in entries.items():
            want_conv, want_ssm = _prefilled(model, req, m)
            assert torch.allclose(conv, want_conv, atol=1e-5), (req.request_id, m)
            assert torch.allclose(ssm, want_ssm, atol=1e-4, rtol=1e-4), (req.request_id, m)
        covered[req.request_id] = (max(entries, default=None), len(req.decoder.token_ids))
    assert all(m is not None for m, _ in covered.values())
    for i, n in ((2, 1), (3, 2), (4, 3), (5, 5)):  # max_tokens: fed all but the last, or all
        assert covered[f"len{i}"][0] in (n - 1, n)
    if not penalties:
        assert covered["first"] == (1, 1)
        for i in range(8):
            m, n = covered[f"q{i}"]
            assert m == n, (i, m, n)


def test_penalties_count_the_first_token_of_the_prefill(demo):
    """A batch with penalties reads the prefill's first tokens before it samples the step that
    follows, so they count. On the demo model with its logits scaled down (flat enough for
    penalties of +-2 to change the pick), penalised greedy replies equal the reference path's."""
    import copy

    model, proc = demo
    flat = copy.deepcopy(model)
    with torch.no_grad():
        flat.llm.backbone.norm_f.weight.mul_(0.1)
    eng = Engine(flat, proc, EngineConfig(max_num_seqs=5, max_prefill_seqs=3))
    asks, cols = [], []
    for i, (presence, frequency) in enumerate(((1.5, 0.5), (-2.0, -2.0), (0.0, 2.0), (2.0, 0.0))):
        s, col = make_sample("test", 6 + i), Collector()
        req = make_request(proc, f"p{i}", [user(s.qas[0].question)], [s.image()], col, max_tokens=8)
        req.params.presence_penalty, req.params.frequency_penalty, req.params.ignore_eos = presence, frequency, True
        eng.add_request(req)
        asks.append((s, req))
        cols.append(col)
    eng.start()
    try:
        _wait(cols)
    finally:
        eng.shutdown()
    for (s, req), col in zip(asks, cols):
        want = generate(flat, proc, [user(s.qas[0].question)], images=[s.image()], params=req.params)
        assert req.decoder.token_ids == want.token_ids and col.text == want.text, req.request_id
    assert cols[1].text == "purple" * 8  # a negative penalty repeats the first token from the second on
