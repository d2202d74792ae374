import base64
import concurrent.futures as cf
import io
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from model.generate import generate
from model.sampling import SamplingParams
from server.settings import ServerSettings
from tests.server.live import LiveServer


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def live(demo):
    model, proc = demo
    settings = ServerSettings(allow_private_image_urls=True, max_num_seqs=16, image_fetch_timeout=1.5)
    with LiveServer(settings, (model, proc, "shapes-demo")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def health(live) -> dict:
    r = httpx.get(live.url + "/health")
    assert r.status_code == 200
    return r.json()


def metrics(live) -> dict:
    text = httpx.get(live.url + "/metrics").text
    return {s.name + str(sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_non_streamed_chat_with_a_data_image(client, samples):
    s = samples[0]
    qa = next(q for q in s.qas if q.qtype == "describe")
    r = client.chat.completions.create(model="shapes-demo", messages=ask(data_url(s.image()), qa.question),
                                       temperature=0)
    assert r.choices[0].message.content == qa.answer and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 64 and r.usage.completion_tokens >= 1
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.object == "chat.completion" and r.model == "shapes-demo"


def test_streamed_chat_with_an_http_image(client, images, samples):
    s = samples[1]
    qa = next(q for q in s.qas if q.qtype == "count")
    stream = client.chat.completions.create(model="shapes-demo", messages=ask(f"{images.url}/s1.png", qa.question),
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == qa.answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_sixteen_concurrent_requests_are_batched_and_correct(client, images, samples, live):
    before = metrics(live)
    jobs = [(i, samples[i].qas[i % len(samples[i].qas)]) for i in range(4, 20)]

    def one(job):
        i, qa = job
        r = client.chat.completions.create(model="m", messages=ask(f"{images.url}/s{i}.png", qa.question),
                                           temperature=0, max_tokens=40)
        return r.choices[0].message.content

    with cf.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, jobs))
    assert answers == [qa.answer for _, qa in jobs]
    after = metrics(live)
    steps = after["vlmamba_decode_batch_size_count[]"] - before.get("vlmamba_decode_batch_size_count[]", 0)
    single = after["vlmamba_decode_batch_size_bucket[('le', '1.0')]"] - \
        before.get("vlmamba_decode_batch_size_bucket[('le', '1.0')]", 0)
    assert steps > single  # some decode steps carried more than one sequence
    grew = lambda name: after[name] - before.get(name, 0)
    # Every request was prefilled once, with every prompt token not resumed from the cache.
    assert grew("vlmamba_prefill_batch_size_sum[]") == len(jobs)
    assert grew("vlmamba_prefill_batch_tokens_sum[]") == \
        grew("vlmamba_prompt_tokens_total[]") - grew("vlmamba_cached_prompt_tokens_total[]") > 0
    assert health(live)["slots_used"] == 0


def test_second_turn_uses_the_session_cache_and_matches_uncached(client, samples, demo):
    model, proc = demo
    s = samples[25]
    q1 = next(q for q in s.qas if q.qtype == "describe")
    q2 = next(q for q in s.qas if q.qtype == "count")
    msgs = ask(data_url(s.image()), q1.question)
    r1 = client.chat.completions.create(model="m", messages=msgs, temperature=0, extra_body={"session_id": "conv-1"})
    msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": q2.question}]
    r2 = client.chat.completions.create(model="m", messages=msgs, temperature=0, extra_body={"session_id": "conv-1"})
    assert r2.usage.prompt_tokens_details.cached_tokens > 64
    ref = generate(model, proc, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1.question}]},
                                 {"role": "assistant", "content": r1.choices[0].message.content},
                                 {"role": "user", "content": q2.question}],
                   images=[s.image()], params=SamplingParams(temperature=0, max_tokens=40))
    assert r2.choices[0].message.content == ref.text == q2.answer


def _post(live, body, **kw):
    return httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30, **kw)


@pytest.mark.parametrize("case,status,code", [
    ("bad_base64", 400, "invalid_image"),
    ("not_image", 400, "invalid_image"),
    ("too_many_images", 400, "invalid_request"),
    ("prompt_too_long", 400, "context_length_exceeded"),
    ("bad_temperature", 400, "invalid_request"),
    ("n_two", 400, "invalid_request"),
    ("long_stop", 400, "invalid_request"),
    ("stream_options_without_stream", 400, "invalid_request"),
    ("long_session_header", 400, "invalid_request"),
    ("bad_image_host", 400, "invalid_image_url"),
    ("missing_messages", 400, "invalid_request"),
    ("fetch_404", 502, "image_fetch_failed"),
    ("fetch_timeout", 504, "image_fetch_timeout"),
])
def test_errors_have_openai_shape_and_leave_the_server_clean(live, images, samples, case, status, code):
    img = data_url(samples[2].image())
    body = {"model": "m", "messages": ask(img, "How many shapes are there?")}
    headers = {}
    if case == "bad_base64":
        body["messages"] = ask("data:image/png;base64,@@@notbase64", "Hi")
    elif case == "not_image":
        body["messages"] = ask("data:image/png;base64," + base64.b64encode(b"hello world").decode(), "Hi")
    elif case == "too_many_images":
        body["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": img}}] * 9
    elif case == "prompt_too_long":
        body["messages"][0]["content"][1]["text"] = "yes " * 5000
    elif case == "bad_temperature":
        body["temperature"] = 7
    elif case == "n_two":
        body["n"] = 2
    elif case == "stream_options_without_stream":  # as OpenAI answers it
        body["stream_options"] = {"include_usage": True}
    elif case == "long_session_header":  # capped like the body's session_id
        headers = {"X-Session-Id": "s" * 257}
    elif case == "long_stop":  # matched on every token in the engine's loop: bounded in length
        body["stop"] = ["z" * 257]
    elif case == "bad_image_host":  # an empty label, which the resolver cannot encode
        body["messages"] = ask("http://a..b/x.png", "Hi")
    elif case == "missing_messages":
        body.pop("messages")
    elif case == "fetch_404":
        body["messages"] = ask(f"{images.url}/missing.png", "Hi")
    elif case == "fetch_timeout":
        body["messages"] = ask(f"{images.url}/stall/3", "Hi")
    r = _post(live, body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and "type" in err and "param" in err
    assert health(live)["slots_used"] == 0 and health(live)["waiting"] == 0


def test_validation_errors_name_the_field_the_request_wrote(live):
    url = live.url + "/v1/chat/completions"
    bad_json = httpx.post(url, content=b'{"model": "m", "messages": [}', headers={"content-type": "application/json"})
    err = bad_json.json()["error"]
    assert bad_json.status_code == 400 and err["param"] is None and "not valid JSON (at character" in err["message"]
    # A part of list content: its path, not the string member of the union it was not written as.
    part = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    assert _post(live, part).json()["error"]["param"] == "messages.0.content.0.image_url.url"
    text = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}
    assert _post(live, text).json()["error"]["param"] == "messages.0.content.0.text"


def test_text_may_mention_the_image_marker(live, samples):
    # "<image>" in text is text (it was a 400: a placeholder without an image); image parts still count.
    r = _post(live, {"model": "m", "messages": [{"role": "user", "content": "What is the <image> tag in HTML?"}],
                     "max_tokens": 2})
    assert r.status_code == 200, r.text
    body = {"model": "m", "max_tokens": 2, "messages": ask(data_url(samples[2].image()), "Is there an <image> here?")}
    r = _post(live, body)
    assert r.status_code == 200, r.text


def test_client_disconnect_mid_stream_frees_the_slot(live, samples):
    import time

    aborted = "vlmamba_requests_finished_total[('reason', 'abort')]"
    generated = "vlmamba_generation_tokens_total[]"
    before, tokens_before = metrics(live).get(aborted, 0), metrics(live).get(generated, 0)
    body = {"model": "m", "messages": ask(data_url(samples[3].image()), "Describe the image."), "stream": True,
            "max_tokens": 3500, "ignore_eos": True}  # would run for many seconds
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept alive: a collected iterator closes the response
        for _ in range(6):
            assert next(lines).startswith("data: {") and next(lines) == ""
        assert health(live)["slots_used"] == 1
    t0 = time.time()
    while health(live)["slots_used"] and time.time() - t0 < 5:
        time.sleep(0.02)
    assert health(live)["slots_used"] == 0
    assert metrics(live)[aborted] == before + 1  # freed by the abort, not by finishing
    assert metrics(live)[generated] >= tokens_before + 6  # the tokens it did generate are counted


def test_client_disconnect_without_streaming_frees_the_slot(live, samples):
    import logging
    import time

    class Errors(logging.Handler):
        def __init__(self):
            super().__init__(logging.ERROR)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    errors = Errors()
    logging.getLogger("uvicorn.error").addHandler(errors)
    try:
        body = {"model": "m", "messages": ask(data_url(samples[4].image()), "Describe the image."),
                "max_tokens": 3500, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(live.url + "/v1/chat/completions", json=body, timeout=1.0)
        t0 = time.time()
        while health(live)["slots_used"] and time.time() - t0 < 5:
            time.sleep(0.05)
        assert health(live)["slots_used"] == 0 and time.time() - t0 < 5
        time.sleep(0.2)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(errors)
    assert not errors.records, errors.records[0].getMessage()  # a hang-up is not a server error


def test_models_metrics_and_docs(live, client):
    assert [m.id for m in client.models.list().data] == ["shapes-demo"]
    assert client.models.retrieve("shapes-demo").id == "shapes-demo"  # the SDK's models.retrieve
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.body["code"] == "model_not_found"
    m = metrics(live)
    for name in ("vlmamba_time_to_first_token_seconds_count[]", "vlmamba_prompt_tokens_total[]",
                 "vlmamba_generation_tokens_total[]", "vlmamba_state_slots_total[]", "vlmamba_state_cache_bytes[]",
                 "vlmamba_requests_finished_total[('reason', 'stop')]"):
        assert name in m, name
    assert m["vlmamba_generation_tokens_total[]"] > 0 and m["vlmamba_state_slots_total[]"] == 16
    # Every request handed to the engine was timed from its handler's start (images, tokenizing).
    assert 0 < m["vlmamba_request_prepare_seconds_count[]"] <= m["vlmamba_time_to_first_token_seconds_count[]"] + 1
    assert m["vlmamba_request_prepare_seconds_sum[]"] > 0
    assert m["vlmamba_cached_prompt_tokens_total[]"] > 0  # the multi-turn test hit the cache
    # Images have been decoded; none is being decoded or waiting now.
    assert m["vlmamba_image_fetch_seconds_count[]"] > 0
    assert m["vlmamba_image_decoding_pixels[]"] == 0 and m["vlmamba_image_decoding_waiting[]"] == 0
    assert httpx.get(live.url + "/docs").status_code == 200
    assert "/v1/chat/completions" in httpx.get(live.url + "/openapi.json").json()["paths"]


@pytest.fixture(scope="module")
def strict(demo):
    model, proc = demo
    settings = ServerSettings(api_key="k1,k2", max_body_bytes=200_000, max_num_seqs=1, max_queue=1)
    with LiveServer(settings, (model, proc, "shapes-demo")) as srv:
        yield srv


def test_api_keys_body_limit_queue_and_private_urls(strict, images, samples):
    url = strict.url + "/v1/chat/completions"
    body = {"model": "m", "messages": ask(data_url(samples[5].image()), "How many shapes are there?")}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}).json()["error"]["code"] == \
        "invalid_api_key"
    ok = httpx.post(url, json=body, headers={"Authorization": "Bearer k2"}, timeout=30)
    assert ok.status_code == 200
    # The scheme is case-insensitive; a bare key is not a bearer credential.
    assert httpx.post(url, json=body, headers={"Authorization": "bearer k2"}, timeout=30).status_code == 200
    assert httpx.post(url, json=body, headers={"Authorization": "k2"}).status_code == 401
    # A method the route does not take: 405 saying which it does.
    wrong = httpx.get(url, headers={"Authorization": "Bearer k1"})
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert httpx.get(strict.url + "/health").status_code == 200  # health stays open
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 300_000}]}
    r = httpx.post(url, json=big, headers={"Authorization": "Bearer k1"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # The same body sent in chunks, with no Content-Length: counted as it streams in, still a 413.
    raw = json.dumps(big).encode()
    chunks = (raw[i:i + 16384] for i in range(0, len(raw), 16384))
    r = httpx.post(url, content=chunks, headers={"Authorization": "Bearer k1", "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer k1"}, timeout=30).status_code == 200
    private = {"model": "m", "messages": ask(f"{images.url}/s1.png", "Hi")}
    r = httpx.post(url, json=private, headers={"Authorization": "Bearer k1"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_url_refused"
    # One slot, queue of one: a burst gets 429s with Retry-After, and everything else completes.
    slow = dict(body, max_tokens=400, temperature=1.0, frequency_penalty=-2.0)
    with cf.ThreadPoolExecutor(6) as pool:
        rs = list(pool.map(lambda _: httpx.post(url, json=slow, headers={"Authorization": "Bearer k1"}, timeout=60),
                           range(6)))
    codes = sorted(r.status_code for r in rs)
    assert 429 in codes and set(codes) <= {200, 429}
    assert all(r.headers.get("retry-after") for r in rs if r.status_code == 429)
    assert httpx.get(strict.url + "/health").json()["slots_used"] == 0
