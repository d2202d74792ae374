"""Request preparation in worker processes: same tokens and pixels as in a thread, errors keep
their type, a dead worker costs no request, and a live server answers through its workers."""

import asyncio
import os
import signal
import sys

import openai
import pytest
import torch

from model.errors import InvalidRequest
from server.prepare import Preparer, auto_workers, encode
from server.settings import ServerSettings, from_args
from tests.server.live import LiveServer
from tests.server.test_api import ask, data_url


def messages_for(proc, question, n_images):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def pool(demo):
    """A started two-worker preparer, run on its own event loop (stopped at the end)."""
    loop = asyncio.new_event_loop()
    preparer = Preparer(demo[1], workers=2)
    loop.run_until_complete(preparer.start())
    yield preparer, loop
    preparer.shutdown()
    loop.close()


def test_workers_prepare_exactly_what_a_thread_does(pool, demo, samples):
    preparer, loop = pool
    proc = demo[1]
    for n in (0, 1, 2):
        images = [s.image() for s in samples[:n]]
        msgs = messages_for(proc, f"what is in picture {n}?", n)
        want_ids, want = encode(proc, msgs, images)
        ids, got = loop.run_until_complete(preparer.encode(msgs, images))
        assert ids == want_ids and len(got) == len(want) == n
        for g, w in zip(got, want):
            print("pixels", g.pixel_values.dtype, tuple(g.pixel_values.shape))
            assert g.pixel_values.dtype == w.pixel_values.dtype and torch.equal(g.pixel_values, w.pixel_values)
            assert g.digest == w.digest
    assert len(set(preparer.pids())) == 2 and os.getpid() not in preparer.pids()


def test_an_error_in_a_worker_keeps_its_type_and_field(pool, demo, samples):
    preparer, loop = pool
    msgs = messages_for(demo[1], f"a {demo[1].image_token} in the text", 1)
    with pytest.raises(InvalidRequest) as e:
        loop.run_until_complete(preparer.encode(msgs, [samples[0].image()]))
    assert e.value.param == "messages" and e.value.status == 400 and "reserved marker" in e.value.message


def test_a_dead_worker_costs_no_request_and_the_pool_is_replaced(demo, samples):
    loop = asyncio.new_event_loop()
    preparer = Preparer(demo[1], workers=1)
    try:
        loop.run_until_complete(preparer.start())
        before = preparer.pids()
        os.kill(before[0], signal.SIGKILL)
        msgs = messages_for(demo[1], "how many shapes?", 1)
        want_ids, want = encode(demo[1], msgs, [samples[2].image()])
        for _ in range(2):  # the first sees the broken pool (prepared in a thread), the second uses the new one
            ids, got = loop.run_until_complete(preparer.encode(msgs, [samples[2].image()]))
            assert ids == want_ids and got[0].digest == want[0].digest
        after = preparer.pids()
        assert after and not set(after) & set(before)
    finally:
        preparer.shutdown()
        loop.close()


def test_auto_worker_count_and_setting():
    assert [auto_workers(c) for c in (1, 2, 7, 8, 16, 32, 128)] == [0, 0, 0, 2, 4, 8, 8]
    assert ServerSettings().prepare_workers == -1
    assert from_args(None, {"VLMAMBA_PREPARE_WORKERS": "3"}).prepare_workers == 3


def _thread_names(pid: int) -> set[str]:
    base = f"/proc/{pid}/task"
    return {open(f"{base}/{t}/comm").read().strip() for t in os.listdir(base)}


def test_live_server_answers_through_its_worker_processes(demo, samples):
    model, proc = demo
    s = samples[3]
    qa = next(q for q in s.qas if q.qtype == "describe")
    settings = ServerSettings(max_num_seqs=4, prepare_workers=2)
    with LiveServer(settings, (model, proc, "shapes-demo")) as srv:
        preparer = srv.app.state.preparer
        assert len(preparer.pids()) == 2
        if sys.platform.startswith("linux"):
            assert all("vlmamba-prep" in _thread_names(pid) for pid in preparer.pids())
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="shapes-demo", messages=ask(data_url(s.image()), qa.question),
                                           temperature=0)
        assert r.choices[0].message.content == qa.answer
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="shapes-demo", temperature=0,
                                           messages=ask(data_url(s.image()), f"is {proc.image_token} here?"))
        assert e.value.body["param"] == "messages" and "reserved marker" in e.value.body["message"]
        pids = preparer.pids()
    for pid in pids:  # the workers stop with the server
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
