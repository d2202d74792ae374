"""The engine in a process of its own (the default when the server loads its model): a real
uvicorn on loopback, the official OpenAI client, images over HTTP from a local image server."""

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.data.shapes import make_sample
from server.app import load_model
from server.engine import EngineConfig, EngineProcess, EngineStartError
from server.settings import ServerSettings
from tests.server.live import LiveServer, running, wait_gone
from tests.server.test_api import ask, data_url

SETTINGS = dict(allow_private_image_urls=True, max_num_seqs=4, image_fetch_timeout=5)
LONG = {"max_tokens": 3500, "ignore_eos": True}  # runs for many seconds on the demo model


@pytest.fixture(scope="module")
def served():
    """Loads the bundled demo model itself, so the engine runs in a child process."""
    with LiveServer(ServerSettings(**SETTINGS), None) as srv:
        yield srv


@pytest.fixture(scope="module")
def threaded(demo):
    """The same settings with an already loaded model: the engine runs in a thread of this process."""
    model, proc = demo
    with LiveServer(ServerSettings(**SETTINGS), (model, proc, "shapes-demo")) as srv:
        yield srv


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _health(srv) -> httpx.Response:
    return httpx.get(srv.url + "/health", timeout=10)


def _metrics(srv) -> dict:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    return {s.name + str(sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _wait_idle(srv, timeout=10) -> dict:
    deadline = time.time() + timeout
    while (h := _health(srv).json())["slots_used"] and time.time() < deadline:
        time.sleep(0.02)
    return h


def test_the_engine_runs_in_a_child_process(served):
    engine = served.app.state.engine
    assert isinstance(engine, EngineProcess) and engine.alive and running(engine.pid) and engine.pid != os.getpid()
    assert _health(served).json() == {"status": "ok", "running": 0, "waiting": 0, "slots_used": 0}
    assert [m.id for m in _client(served).models.list().data] == ["shapes-demo"]


def _thread_names(pid: int) -> list[str]:
    return sorted(Path(f"/proc/{pid}/task/{t}/comm").read_text().strip() for t in os.listdir(f"/proc/{pid}/task"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OS thread names are set on Linux")
def test_threads_carry_their_names_to_the_os(served, samples):
    """top -H, ps -L and the serving benchmark's CPU report tell the threads apart."""
    _client(served).chat.completions.create(model="m", messages=ask(data_url(samples[0].image()), "Hi"), max_tokens=2)
    child = served.app.state.engine.pid
    assert Path(f"/proc/{child}/comm").read_text().strip() == "vlmamba-engine"
    assert {"vlmamba-engine", "engine", "engine-outbox", "parent-watch"} <= set(_thread_names(child))
    mine = _thread_names(os.getpid())  # the image was decoded in a named worker thread
    assert {"engine-reader", "engine-writer"} <= set(mine) and any(n.startswith("worker_") for n in mine)


def _answers(srv, messages) -> tuple:
    client = _client(srv)
    plain = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=40)
    chunks = list(client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return plain.choices[0].message.content, plain.usage.model_dump(), streamed, chunks[-1].usage.model_dump()


def test_chat_with_an_image_matches_the_in_process_engine(served, threaded, images, samples):
    for i, s in enumerate(samples[:2]):
        qa = next(q for q in s.qas if q.qtype == "describe")
        messages = ask(f"{images.url}/s{i}.png", qa.question)
        got, want = _answers(served, messages), _answers(threaded, messages)
        print(f"engine process: {got[0]!r}; in-process engine: {want[0]!r}")
        assert got == want and got[0] == got[2] == qa.answer


def test_concurrent_requests_are_batched_in_the_child(served, images, samples):
    before = _metrics(served)
    jobs = [(i % 4, samples[i % 4].qas[i // 4 % len(samples[i % 4].qas)]) for i in range(8)]
    one = lambda job: _client(served).chat.completions.create(
        model="m", messages=ask(f"{images.url}/s{job[0]}.png", job[1].question), temperature=0,
        max_tokens=40).choices[0].message.content
    with cf.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, jobs)) == [qa.answer for _, qa in jobs]
    after = _metrics(served)
    key, single = "vlmamba_decode_batch_size_count[]", "vlmamba_decode_batch_size_bucket[('le', '1.0')]"
    assert after[key] - before[key] > after[single] - before[single]  # some steps carried several sequences
    assert _wait_idle(served)["slots_used"] == 0


def test_second_turn_resumes_from_the_session_cache(served, samples):
    s = samples[2]
    q1 = next(q for q in s.qas if q.qtype == "describe")
    q2 = next(q for q in s.qas if q.qtype == "count")
    client, msgs = _client(served), ask(data_url(s.image()), q1.question)
    r1 = client.chat.completions.create(model="m", messages=msgs, temperature=0, extra_body={"session_id": "p-1"})
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": q2.question}]
    r2 = client.chat.completions.create(model="m", messages=msgs, temperature=0, extra_body={"session_id": "p-1"})
    assert r2.usage.prompt_tokens_details.cached_tokens > 64 and r2.choices[0].message.content == q2.answer


def test_metrics_advance_with_every_request(served, samples):
    before = _metrics(served)
    r = _client(served).chat.completions.create(model="m", messages=ask(data_url(samples[3].image()), "Hi"),
                                                max_tokens=5, extra_body={"ignore_eos": True})
    after = _metrics(served)
    grew = lambda name, by=None: after[name] - before.get(name, 0) == by if by is not None else \
        after[name] > before.get(name, 0)
    assert grew("vlmamba_generation_tokens_total[]", 5)
    assert grew("vlmamba_prompt_tokens_total[]", r.usage.prompt_tokens)
    prefilled = r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens
    assert grew("vlmamba_prefill_batch_size_count[]", 1) and grew("vlmamba_prefill_batch_size_sum[]", 1)
    assert grew("vlmamba_prefill_batch_tokens_sum[]", prefilled)
    assert grew("vlmamba_requests_finished_total[('reason', 'length')]", 1)
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert grew(f"vlmamba_{h}_count[]", 1), h
    assert grew("vlmamba_inter_token_latency_seconds_count[]", 4) and grew("vlmamba_decode_batch_size_count[]")
    assert after["vlmamba_state_slots_total[]"] == 4 and after["vlmamba_state_cache_entries[]"] > 0
    assert after["vlmamba_state_cache_bytes[]"] > 0 and after["vlmamba_state_cache_misses_total[]"] > 0


def test_client_disconnect_mid_stream_frees_the_slot(served, samples):
    aborted = "vlmamba_requests_finished_total[('reason', 'abort')]"
    before = _metrics(served).get(aborted, 0)
    body = {"model": "m", "messages": ask(data_url(samples[0].image()), "Describe the image."), "stream": True,
            **LONG}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # kept alive: a collected iterator closes the response
        for _ in range(4):
            assert next(lines).startswith("data: {") and next(lines) == ""
        assert _health(served).json()["slots_used"] == 1
    assert _wait_idle(served)["slots_used"] == 0
    assert _metrics(served)[aborted] == before + 1  # freed by the abort, not by finishing


def test_a_failing_start_is_a_clear_error():
    engine = EngineProcess(partial(load_model, ServerSettings(checkpoint="/nonexistent/checkpoint")), EngineConfig())
    with pytest.raises(EngineStartError, match="failed to start: FileNotFoundError.*nonexistent/checkpoint"):
        engine.start()
    assert not running(engine.pid) and not engine.alive


def test_a_killed_engine_fails_in_flight_requests_and_health():
    img = data_url(make_sample("test", 5).image())
    body = {"model": "m", "messages": ask(img, "Describe the image."), **LONG}
    with LiveServer(ServerSettings(**SETTINGS), None) as srv:
        pid, url = srv.app.state.engine.pid, srv.url + "/v1/chat/completions"
        with cf.ThreadPoolExecutor(1) as pool, httpx.stream("POST", url, json={**body, "stream": True},
                                                            timeout=30) as stream:
            plain = pool.submit(httpx.post, url, json=body, timeout=30)
            lines = stream.iter_lines()
            assert next(lines).startswith("data: {")
            deadline = time.time() + 20
            while _health(srv).json()["running"] < 2 and time.time() < deadline:
                time.sleep(0.02)
            os.kill(pid, signal.SIGKILL)
            rest = [line for line in lines if line]
            r = plain.result(timeout=30)
        assert rest[-1] == "data: [DONE]" and "engine process exited" in json.loads(rest[-2][6:])["error"]["message"]
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert "engine process exited" in r.json()["error"]["message"]
        assert _health(srv).status_code == 503
        late = httpx.post(url, json=body, timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "unavailable"
    assert not running(pid)


def test_the_engine_process_exits_with_the_server_process():
    """Even while it is still loading: a server killed outright leaves no engine behind."""
    script = ("import functools, sys, threading, time\n"
              "from server.engine import EngineConfig, EngineProcess\n"
              "e = EngineProcess(functools.partial(time.sleep, 120), EngineConfig())\n"
              "threading.Thread(target=e.start, daemon=True).start()\n"
              "while e.pid is None: time.sleep(0.01)\n"
              "print(e.pid, flush=True)\n"
              "time.sleep(120)\n")
    server = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[2], stdout=subprocess.PIPE,
                              text=True)
    try:
        pid = int(server.stdout.readline())
        assert running(pid)
        server.kill()
        server.wait(timeout=10)
        assert wait_gone([pid], timeout=10) == []
    finally:
        server.kill()


def test_shutdown_stops_the_engine_process(served):
    engine = served.app.state.engine
    served.__exit__(None, None, None)
    assert engine.process.exitcode == 0 and not running(engine.pid) and not engine.alive
