import time

import pytest
import torch

from model.data.shapes import make_sample
from server.engine import Engine, EngineConfig
from tests.server.conftest import Collector, make_request, submit_decoding, user


@pytest.fixture
def engine(demo):
    model, proc = demo
    eng = Engine(model, proc, EngineConfig(max_num_seqs=8, max_prefill_seqs=4, state_cache_bytes=64 << 20))
    eng.start()
    yield eng
    eng.shutdown()


def _wait(collectors, timeout=60):
    for c in collectors:
        assert c.done.wait(timeout), "request did not finish"


def _ask_twelve(engine, proc, prefix):
    """Twelve test scenes, one question each, all submitted at once; waits for the answers.
    Returns (samples, their questions, the collectors)."""
    samples = [make_sample("test", i) for i in range(12)]
    qas = [s.qas[i % len(s.qas)] for i, s in enumerate(samples)]
    cols = [Collector() for _ in samples]
    for i, (s, qa, c) in enumerate(zip(samples, qas, cols)):
        engine.add_request(make_request(proc, f"{prefix}{i}", [user(qa.question)], [s.image()], c))
    _wait(cols)
    return samples, qas, cols


def test_concurrent_requests_are_batched_and_correct(engine, demo):
    _, proc = demo
    samples, qas, cols = _ask_twelve(engine, proc, "r")
    answers = [c.text for c in cols]
    assert answers == [qa.answer for qa in qas]
    assert all(c.final.finish_reason == "stop" and c.final.prompt_tokens > 64 for c in cols)
    assert engine.max_batch > 1 and engine.batched_steps > 0
    assert engine.slots_used() == 0 and engine.num_running() == 0


def test_second_turn_resumes_from_cached_state_with_identical_answer(engine, demo):
    _, proc = demo
    s = make_sample("test", 21)
    q1, q2 = s.qas[0], s.qas[-1]
    turn1 = [user(q1.question)]
    c1 = Collector()
    engine.add_request(make_request(proc, "t1", turn1, [s.image()], c1, scope="alice"))
    _wait([c1])
    turn2 = turn1 + [{"role": "assistant", "content": c1.text}, user(q2.question, with_image=False)]
    c2 = Collector()
    engine.add_request(make_request(proc, "t2", turn2, [s.image()], c2, scope="alice"))
    _wait([c2])
    assert c2.final.cached_tokens > 64  # the image and the first turn were skipped
    # Same request from another scope: no cache, same greedy answer.
    c3 = Collector()
    engine.add_request(make_request(proc, "t3", turn2, [s.image()], c3, scope="bob"))
    _wait([c3])
    assert c3.final.cached_tokens == 0
    assert c2.text == c3.text == q2.answer


def test_same_text_different_image_is_not_a_cache_hit(engine, demo):
    _, proc = demo
    a, b = make_sample("test", 30), make_sample("test", 31)
    msgs = [user("Describe the image.")]
    ca, cb = Collector(), Collector()
    engine.add_request(make_request(proc, "a", msgs, [a.image()], ca))
    _wait([ca])
    follow = msgs + [{"role": "assistant", "content": ca.text}, user("How many shapes are there?", False)]
    engine.add_request(make_request(proc, "b", follow, [b.image()], cb))
    _wait([cb])
    assert cb.final.cached_tokens == 0


def test_abort_frees_the_slot_and_faults_fail_only_their_batch(engine, demo):
    _, proc = demo
    s = make_sample("test", 40)
    c = Collector()
    req = make_request(proc, "long", [user("Describe the image.")], [s.image()], c, max_tokens=10_000)
    req.params.ignore_eos = True
    engine.add_request(req)
    time.sleep(0.3)
    engine.abort("long")
    deadline = time.time() + 10
    while engine.slots_used() and time.time() < deadline:
        time.sleep(0.02)
    assert engine.slots_used() == 0
    calls = []

    def boom(phase, reqs):
        if phase == "prefill" and any(r.request_id == "bad" for r in reqs) and not calls:
            calls.append(phase)
            raise RuntimeError("injected")

    engine.fault_hook = boom
    bad, good = Collector(), Collector()
    engine.add_request(make_request(proc, "bad", [user("Describe the image.")], [s.image()], bad))
    _wait([bad])
    engine.add_request(make_request(proc, "good", [user("Describe the image.")], [s.image()], good))
    _wait([good])
    assert bad.final.finish_reason == "error" and "internal error" in bad.final.error
    assert good.final.finish_reason == "stop" and good.text
    assert engine.alive and engine.slots_used() == 0


def test_a_failed_prefill_leaves_the_running_requests_tokens_intact(demo):
    """A prefill that fails while other requests decode (their step in flight, lookahead on)
    fails its own requests only: the running request gets the same tokens as when run alone."""
    model, proc = demo
    s = make_sample("test", 7)
    tokens = []
    for inject in (False, True):
        eng = Engine(model, proc, EngineConfig(max_num_seqs=4, max_prefill_seqs=4))
        eng.fault_hook = lambda phase, reqs: (_ for _ in ()).throw(RuntimeError("injected")) if (
            phase == "prefill" and any(r.request_id == "bad" for r in reqs)) else None
        eng.start()
        try:
            good, bad = Collector(), Collector()
            req = submit_decoding(eng, proc, "good", [user(s.qas[0].question)], [s.image()], good)
            if inject:
                eng.add_request(make_request(proc, "bad", [user("Describe the image.")], [s.image()], bad))
                _wait([bad])
                assert bad.final.finish_reason == "error"
            _wait([good])
            assert good.final.finish_reason == "length" and eng.alive
            tokens.append((list(req.decoder.token_ids), good.text))
        finally:
            eng.shutdown()
    assert len(tokens[0][0]) == 60 and tokens[1] == tokens[0]


class RaisingSink(Collector):
    """Raises once: at its ``at``-th call, or on the final output (``at="final"``)."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls, self.raised = at, 0, False

    def __call__(self, out):
        self.calls += 1
        if not self.raised and (out.finished if self.at == "final" else self.calls == self.at):
            self.raised = True
            raise RuntimeError("sink failed")
        super().__call__(out)


@pytest.mark.parametrize("at,max_tokens,alone", [(1, 20, False), (3, 20, False), ("final", 20, False),
                                                 ("final", 1, True), ("final", 3, True), (2, 5, True)])
def test_a_failing_delivery_fails_its_own_request_only(demo, at, max_tokens, alone):
    """A sink that raises (on a first token that joins a running batch, mid-answer, or on the final
    output, also when nothing else runs and the tokens are read at the end of an iteration) fails
    its own request only: the running request finishes as it would have, the slot is freed, and
    the engine answers the next request."""
    model, proc = demo
    s = make_sample("test", 3)
    eng = Engine(model, proc, EngineConfig(max_num_seqs=4, max_prefill_seqs=4))
    eng.start()
    try:
        a = Collector()
        if not alone:
            ra = submit_decoding(eng, proc, "a", [user(s.qas[1].question)], [s.image()], a)
        b = RaisingSink(at)
        rb = make_request(proc, "b", [user(s.qas[0].question)], [s.image()], b, max_tokens=max_tokens)
        rb.params.ignore_eos = True
        eng.add_request(rb)
        if at == "final":  # its final output was the one lost: nothing more comes
            deadline = time.time() + 30
            while not b.raised and time.time() < deadline:
                time.sleep(0.005)
            assert b.raised and not any(o.finished for o in b.outputs)
        else:
            _wait([b])
            assert b.final.finish_reason == "error" and "internal error" in b.final.error
        if not alone:
            _wait([a])
            assert a.final.finish_reason == "length" and len(ra.decoder.token_ids) == 60
        c = Collector()
        eng.add_request(make_request(proc, "c", [user(s.qas[0].question)], [s.image()], c))
        _wait([c])
        assert c.final.finish_reason == "stop" and c.text == s.qas[0].answer
        assert eng.alive and eng.slots_used() == 0 and eng.num_running() == 0
    finally:
        eng.shutdown()


def test_bf16_state_storage_answers_the_same(demo):
    model, proc = demo
    with pytest.raises(ValueError, match="state_dtype"):
        EngineConfig(state_dtype="float16")
    eng = Engine(model, proc, EngineConfig(max_num_seqs=4, max_prefill_seqs=4, state_dtype="bfloat16"))
    eng.start()
    try:
        samples = [make_sample("test", i) for i in range(4)]
        cols = [Collector() for _ in samples]
        for i, (s, c) in enumerate(zip(samples, cols)):
            eng.add_request(make_request(proc, f"b{i}", [user(s.qas[0].question)], [s.image()], c))
        _wait(cols)
        assert eng.state.ssm.dtype == torch.bfloat16
        assert [c.text for c in cols] == [s.qas[0].answer for s in samples]
    finally:
        eng.shutdown()


def _six_at_once(demo, room: int):
    """Six sequences prefilled and ended together by an engine whose cache has room for
    ``room`` states: (how many states it copied out of slots, the cache's entries by key, the
    requests)."""
    model, proc = demo
    eng = Engine(model, proc, EngineConfig(max_num_seqs=8, max_prefill_seqs=8))
    eng.cache.max_bytes = room * eng.state.bytes_per_slot
    reads = []
    real_read = eng.state.read
    eng.state.read = lambda slot: reads.append(slot) or real_read(slot)
    reqs, cols = [], []
    for i in range(6):
        s, col = make_sample("test", i), Collector()
        req = make_request(proc, f"e{i}", [user(s.qas[0].question)], [s.image()], col, max_tokens=3)
        req.params.ignore_eos = True  # all six end at the same step
        eng.add_request(req)
        reqs.append(req)
        cols.append(col)
    eng.start()
    try:
        _wait(cols)
    finally:
        eng.shutdown()
    assert eng.max_batch == 6 and all(c.final.finish_reason == "length" for c in cols)
    return len(reads), {k: e.state for k, e in eng.cache.entries.items()}, reqs


def test_states_the_cache_would_evict_at_once_are_never_copied(demo):
    """Against a cache with room for three states, the engine copies only the three prompt ends
    and the three final states it keeps (the last three of each batch), not twelve; they are
    the states an engine with room for all of them holds under the same keys."""
    from server.engine.state_cache import prefix_hashes

    reads, kept, reqs = _six_at_once(demo, room=3)
    all_reads, held, _ = _six_at_once(demo, room=100)
    assert (reads, all_reads) == (6, 12) and len(held) == 12
    finals = [prefix_hashes(r.scope, r.decoder.token_ids[: r.fed], r.prompt_key)[-1] for r in reqs]
    assert list(kept) == finals[3:]
    for key, (conv, ssm) in kept.items():
        assert torch.equal(conv, held[key][0]) and torch.equal(ssm, held[key][1])


@pytest.mark.parametrize("fail", [False, True])
def test_final_replies_go_out_before_the_final_states_are_cached(demo, fail):
    """Requests that end are answered first and their final states copied into the session cache
    after (the copies cost milliseconds at large batches); a copy that fails then loses only the
    cache entry: every request still has one final output, "length", and the engine serves on."""
    model, proc = demo
    eng = Engine(model, proc, EngineConfig(max_num_seqs=4, max_prefill_seqs=4))
    cols, reqs, seen = [Collector() for _ in range(3)], [], []
    real_read = eng.state.read

    def read(slot):
        finals = sum(c.done.is_set() for c in cols)
        seen.append(finals)
        if fail and finals:
            raise RuntimeError("injected copy failure")
        return real_read(slot)

    eng.state.read = read
    for i, col in enumerate(cols):
        s = make_sample("test", i)
        req = make_request(proc, f"f{i}", [user(s.qas[0].question)], [s.image()], col, max_tokens=4)
        req.params.ignore_eos = True  # all three end at the same step
        eng.add_request(req)
        reqs.append(req)
    eng.start()
    try:
        _wait(cols)
        assert [[o.finished for o in c.outputs].count(True) for c in cols] == [1, 1, 1]
        assert [c.final.finish_reason for c in cols] == ["length"] * 3 and eng.max_batch == 3
        assert seen[:3] == [0, 0, 0]  # the prompts' ends, before any reply
        deadline = time.time() + 10  # the replies are out; the engine's iteration goes on copying
        while len(seen) < (4 if fail else 6) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert seen[3:] == ([3] if fail else [3, 3, 3])  # the final states, after every reply
        assert [[o.finished for o in c.outputs].count(True) for c in cols] == [1, 1, 1]
        assert not any(o.finish_reason == "error" for c in cols for o in c.outputs)
        assert len(eng.cache) == (3 if fail else 6) and eng.slots_used() == 0
        eng.state.read = real_read
        again = Collector()
        s = make_sample("test", 0)
        eng.add_request(make_request(proc, "again", [user(s.qas[0].question)], [s.image()], again))
        _wait([again])
        assert eng.alive and again.final.finish_reason == "stop" and again.text == s.qas[0].answer
    finally:
        eng.shutdown()


def test_no_step_is_launched_past_every_rows_max_tokens(demo):
    """The first token comes from the prefill and each decode step makes one more, so requests
    of 3 and 6 tokens that start together take 5 steps: none runs after the step in flight has
    taken every row to its max_tokens."""
    model, proc = demo
    eng = Engine(model, proc, EngineConfig(max_num_seqs=4, max_prefill_seqs=4))
    cols = [Collector(), Collector()]
    for i, (col, n) in enumerate(zip(cols, (3, 6))):
        s = make_sample("test", i)
        req = make_request(proc, f"m{i}", [user(s.qas[0].question)], [s.image()], col, max_tokens=n)
        req.params.ignore_eos = True
        eng.add_request(req)
    eng.start()
    try:
        _wait(cols)
        assert [c.final.completion_tokens for c in cols] == [3, 6]
        assert eng.steps == 5 and eng.max_batch == 2
    finally:
        eng.shutdown()


def test_warm_up_leaves_no_trace(demo):
    """The start-up prefill pass (run on GPUs so that no request waits for a kernel compile)
    zeroes the slots it used, caches nothing, reports no metrics, and answers stay the same."""
    from server.engine.engine import Observer

    class Counting(Observer):
        calls = 0

        def on_step(self, batch_size):
            Counting.calls += 1

    model, proc = demo
    eng = Engine(model, proc, EngineConfig(max_num_seqs=4, max_prefill_seqs=3), Counting())
    eng.warm_up()
    assert not eng.state.conv.any() and not eng.state.ssm.any()
    assert len(eng.cache) == 0 and Counting.calls == 0
    eng.start()
    try:
        s = make_sample("test", 5)
        col = Collector()
        eng.add_request(make_request(proc, "w", [user(s.qas[0].question)], [s.image()], col))
        _wait([col])
        assert col.text == s.qas[0].answer
    finally:
        eng.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_on_gpu_answers_through_graphs_like_on_cpu():
    """On CUDA the engine replays image encoding, short prefills and decode steps from graphs;
    the demo model still answers every question as on the CPU, and a second turn resumes."""
    from model.checkpoint_vlm import load_vlmamba
    from model.demo import DEMO_CHECKPOINT

    model, proc = load_vlmamba(DEMO_CHECKPOINT, device="cuda")
    eng = Engine(model, proc, EngineConfig(max_num_seqs=8, max_prefill_seqs=4))
    assert eng.graphs is not None and eng.prefill_graphs is not None and eng.encoder_graphs is not None
    eng.start()
    try:
        samples, qas, cols = _ask_twelve(eng, proc, "g")
        assert [c.text for c in cols] == [qa.answer for qa in qas]
        turn2 = [user(qas[0].question), {"role": "assistant", "content": cols[0].text},
                 user(samples[0].qas[-1].question, with_image=False)]
        c2 = Collector()
        eng.add_request(make_request(proc, "g-turn2", turn2, [samples[0].image()], c2))
        _wait([c2])
        assert c2.final.cached_tokens > 64 and c2.text == samples[0].qas[-1].answer
        assert eng.prefill_graphs.replays > 0 and eng.encoder_graphs.replays > 0
    finally:
        eng.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_queues_decode_steps_without_waiting_for_the_device():
    """A decode step queues its work while the one before still runs: from picking the tokens
    to feed to launching the copy of the sampled ones, nothing waits for the device (CUDA's
    sync debug mode turns such a wait into an error, which fails the batch). A prefill queues
    its image encoding, its pass and its first tokens' sampling the same way, so the step that
    follows it is queued behind it. Checked with greedy, sampled and seeded rows while the batch
    shrinks; only reading launched work's tokens (``_consume``) may wait, and the engine waits
    there only for the step before the last (and the prefill before it)."""
    from model.checkpoint_vlm import load_vlmamba
    from model.demo import DEMO_CHECKPOINT
    from model.sampling import SamplingParams

    model, proc = load_vlmamba(DEMO_CHECKPOINT, device="cuda")
    eng = Engine(model, proc, EngineConfig(max_num_seqs=8, max_prefill_seqs=4))
    decode, prefill, consume, strict_steps, strict_prefills = eng._decode, eng._prefill, eng._consume, [], []

    def strict(fn, done):
        def call(reqs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn(reqs)
                done.append(len(reqs))
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return call

    def lenient_consume(inf):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            consume(inf)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    eng._decode, eng._prefill, eng._consume = strict(decode, strict_steps), strict(prefill, strict_prefills), \
        lenient_consume
    eng.start()
    try:
        s = make_sample("test", 0)
        cols = [Collector() for _ in range(6)]
        for i, col in enumerate(cols):
            req = make_request(proc, f"s{i}", [user(s.qas[0].question)], [s.image()], col)
            req.params = SamplingParams(max_tokens=6 + 4 * i, temperature=0.0 if i % 3 == 0 else 0.8, top_p=0.9,
                                        seed=i if i % 3 == 2 else None, ignore_eos=True)
            eng.add_request(req)
        _wait(cols)
        assert [c.final.finish_reason for c in cols] == ["length"] * 6
        assert [c.final.completion_tokens for c in cols] == [6 + 4 * i for i in range(6)]
        assert len(strict_steps) >= 25 and max(strict_steps) == 6 and min(strict_steps) == 1
        assert sum(strict_prefills) == 6 and len(strict_prefills) >= 2  # 4 slots per prefill at most
    finally:
        eng.shutdown()


def test_uint8_pixels_are_normalized_on_the_device(engine, demo):
    """The server sends uint8 pixels (a quarter of the bytes); the engine normalizes them on its
    device. Alone, and batched with float pixels, the answers are the float pixels' answers."""
    from server.engine import ImageInput

    _, proc = demo
    samples = [make_sample("test", i) for i in range(20, 26)]
    qas = [s.qas[0] for s in samples]
    answers = {}
    for mode in ("float", "uint8", "mixed"):
        cols = [Collector() for _ in samples]
        for i, (s, qa, c) in enumerate(zip(samples, qas, cols)):
            req = make_request(proc, f"{mode}{i}", [user(qa.question)], [s.image()], c)
            if mode == "uint8" or (mode == "mixed" and i % 2):
                px = proc.preprocess_images([s.image()], normalize=False)[0]
                assert px.dtype == torch.uint8
                req.images = [ImageInput(px, f"{mode}{i}")]  # own digests: no cache hits across modes
            else:
                req.images = [ImageInput(req.images[0].pixel_values, f"{mode}{i}")]
            engine.add_request(req)
        _wait(cols)
        answers[mode] = [c.text for c in cols]
    assert answers["uint8"] == answers["mixed"] == answers["float"] == [qa.answer for qa in qas]
    # The pixels the vision tower got: the processor's own, to the last bit or so.
    pics = [s.image() for s in samples[:3]]
    want = proc.preprocess_images(pics)
    raw = list(proc.preprocess_images(pics, normalize=False))
    for given in (raw, [raw[0], want[1], raw[2]]):
        torch.testing.assert_close(engine._pixels(given), want, atol=1e-6, rtol=0)
