"""Two decode steps in flight (``EngineConfig.two_steps_from``): the host reads a step's tokens
two steps later, so steps run on sequences whose end token it has not read yet. Answers, usage
and what the session cache keeps must be those of one step in flight."""

import pytest
import torch

from model.data.shapes import make_sample
from server.engine import Engine, EngineConfig
from server.engine.state_cache import prefix_hashes
from tests.server.conftest import Collector, make_request, user


def _run(demo, two_steps_from: int, asks, **config):
    """Submit ``asks`` (rid, sample, question, max_tokens, params to set) at once to a fresh
    engine; returns the engine (shut down) and the requests and collectors."""
    model, proc = demo
    eng = Engine(model, proc, EngineConfig(max_num_seqs=6, max_prefill_seqs=3, state_cache_bytes=256 << 20,
                                           two_steps_from=two_steps_from, **config))
    reqs, cols = [], []
    for rid, s, question, max_tokens, params in asks:
        col = Collector()
        req = make_request(proc, rid, [user(question)], [s.image()], col, max_tokens=max_tokens)
        for k, v in params.items():
            setattr(req.params, k, v)
        reqs.append(req)
        cols.append(col)
        eng.add_request(req)
    eng.start()
    try:
        for c in cols:
            assert c.done.wait(60), "request did not finish"
    finally:
        eng.shutdown()
    return eng, reqs, cols


def _final_entries(eng, proc, req):
    """{generated tokens covered: cached state} of the session cache's entries that continue the
    request's prompt into its reply (the prompt's own entry excluded)."""
    items = eng._cache_items(req)
    out = {}
    for m in range(1, len(req.decoder.token_ids) + 1):
        key = prefix_hashes(req.scope, items + req.decoder.token_ids[:m])[-1]
        if key in eng.cache.entries:
            out[m] = eng.cache.entries[key].state
    return out


@torch.inference_mode()
def _prefilled(model, req, m):
    """The state after prefilling the prompt and the first ``m`` generated tokens at once."""
    state = model.allocate_state(1)
    ids = torch.tensor([req.prompt_ids + req.decoder.token_ids[:m]])
    pixels = torch.stack([im.pixel_values for im in req.images])
    model(ids, pixels, state=state, slots=torch.tensor([0]), last_only=True)
    return state.read(0)


def _asks():
    """Twelve questions (a one-word answer and the end token), two that run past the end token
    until a stop string (its 4th and 6th token), and three that run to max_tokens (3, 5 and 9)."""
    out = []
    for i in range(12):
        s = make_sample("test", i)
        qa = s.qas[i % len(s.qas)]
        out.append((f"q{i}", s, qa.question, 40, {}))
    for i, stop in ((0, "no"), (1, "orange")):  # "1\nno right..." and "3\nblue\norange..."
        s = make_sample("test", i)
        out.append((f"stop{i}", s, s.qas[1].question, 12, {"stop": (stop,), "ignore_eos": True}))
    for i, n in ((2, 3), (3, 5), (4, 9)):
        s = make_sample("test", i)
        out.append((f"len{i}", s, s.qas[0].question, n, {"ignore_eos": True}))
    return out


@pytest.fixture(scope="module")
def runs(demo):
    """The same requests with one step in flight (0), two at every batch size (1), and two from
    three rows (3): batches shrink as requests end, so steps switch between one and two."""
    return {k: _run(demo, k, _asks()) for k in (0, 1, 3)}


def test_two_steps_in_flight_answer_as_one(runs):
    one, _, cols1 = runs[0]
    assert one.two_step_steps == 0
    assert runs[1][0].two_step_steps == runs[1][0].steps > 10  # every step ran two ahead
    assert 0 < runs[3][0].two_step_steps < runs[3][0].steps
    for k in (1, 3):
        two, _, cols2 = runs[k]
        assert [c.text for c in cols2] == [c.text for c in cols1]
        assert [(c.final.finish_reason, c.final.completion_tokens, c.final.prompt_tokens) for c in cols2] == \
            [(c.final.finish_reason, c.final.completion_tokens, c.final.prompt_tokens) for c in cols1]
        assert [c.final.finish_reason for c in cols2[12:]] == ["stop", "stop", "length", "length", "length"]
        assert [c.text for c in cols2[12:14]] == ["1\n", "3\nblue\n"]
        assert two.slots_used() == 0 and not two._inflight


def test_every_cached_state_is_the_state_of_the_tokens_it_is_keyed_by(runs, demo):
    """A final state is cached under the prompt and the reply tokens its slot was fed, and equals
    the state of prefilling exactly those tokens. With two steps in flight, the step after an end
    token runs on the scratch slot, so the state after the end token is kept; a stop string
    found two steps ahead leaves a slot fed a token the host had not read, which is not cached."""
    model, proc = demo
    for k, (eng, reqs, cols) in runs.items():
        covered = {}
        for req, col in zip(reqs, cols):
            entries = _final_entries(eng, proc, req)  # other replies' ends too, where they are its prefix
            for m, (conv, ssm) in entries.items():
                want_conv, want_ssm = _prefilled(model, req, m)
                assert torch.allclose(conv, want_conv, atol=1e-5), (k, req.request_id, m)
                assert torch.allclose(ssm, want_ssm, atol=1e-4, rtol=1e-4), (k, req.request_id, m)
            covered[req.request_id] = (max(entries, default=None), len(req.decoder.token_ids))
        # Replies that end on the end token keep the state after it, with one step in flight or two.
        for i in range(12):
            m, n = covered[f"q{i}"]
            assert m == n, (k, i, m, n)
        for i, n in ((2, 3), (3, 5), (4, 9)):  # max_tokens: fed all but the last, or all
            assert covered[f"len{i}"][0] in (n - 1, n)
        for i in (0, 1):  # the slot holds every token fed: the reply's, or one more it has not read
            m, n = covered[f"stop{i}"]
            assert m == n if k == 0 else m is None or m < n, (k, i, m, n)  # (m < n: another reply's end)


def test_a_follow_up_turn_resumes_after_two_steps_in_flight(demo):
    """The state kept after an answer given with two steps in flight resumes the next turn: the
    image and the first turn are skipped and the answer is the one given without the cache."""
    model, proc = demo
    eng = Engine(model, proc, EngineConfig(max_num_seqs=4, max_prefill_seqs=2, two_steps_from=1))
    eng.start()
    try:
        s = make_sample("test", 21)
        q1, q2 = s.qas[0], s.qas[-1]
        c1 = Collector()
        eng.add_request(make_request(proc, "t1", [user(q1.question)], [s.image()], c1))
        assert c1.done.wait(60)
        turn2 = [user(q1.question), {"role": "assistant", "content": c1.text}, user(q2.question, with_image=False)]
        c2 = Collector()
        eng.add_request(make_request(proc, "t2", turn2, [s.image()], c2))
        assert c2.done.wait(60)
        assert eng.two_step_steps > 0
        assert c1.text == q1.answer and c2.text == q2.answer
        assert c2.final.cached_tokens > 64
    finally:
        eng.shutdown()


def test_a_step_that_does_not_route_waits_for_every_end_token_but_the_newest(demo):
    """From three rows (two_steps_from=3): X ends at its 2nd token by max_tokens, R at its 2nd
    with the end token, Y runs on. Steps 1 and 2 run all three two ahead, and step 2 feeds R its
    end token. Step 3 has two rows left (X is done), so it does not route: before launching it the
    engine must read step 1's tokens, learn that R has ended, and leave R out, else step 3 would
    feed R a token past its end on its own slot and the state kept for R would be wrong."""
    model, proc = demo
    s = make_sample("test", 0)
    asks = [("X", s, s.qas[1].question, 2, {"ignore_eos": True}), ("R", s, s.qas[0].question, 40, {}),
            ("Y", s, s.qas[1].question, 12, {"ignore_eos": True})]
    eng, reqs, cols = _run(demo, 3, asks)
    x, r, y = reqs
    assert eng.two_step_steps == 2 and eng.steps == 11
    assert len(r.decoder.token_ids) == 2 and cols[1].final.finish_reason == "stop" and cols[1].text == s.qas[0].answer
    entries = _final_entries(eng, proc, r)
    assert max(entries) == 2
    want_conv, want_ssm = _prefilled(model, r, 2)
    assert torch.allclose(entries[2][0], want_conv, atol=1e-5)
    assert torch.allclose(entries[2][1], want_ssm, atol=1e-4, rtol=1e-4)
