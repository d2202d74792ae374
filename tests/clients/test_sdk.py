"""The Python client against real servers on loopback serving the bundled demo model.

The demo model answers Shapes-VQA questions exactly with temperature 0, so answers are compared
with the data set's expected answers."""

import asyncio
import concurrent.futures as cf
import importlib.metadata
import io
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.settings import ServerSettings
from tests.server.live import ImageServer, LiveServer
from vlmamba_client import (AsyncClient, AuthenticationError, BadRequestError, Client, RateLimitError,
                            RequestTooLargeError)
from vlmamba_client.cli import main as cli_main
from vlmamba_client.images import data_url

LONG = dict(max_tokens=2000, ignore_eos=True)  # would run for many seconds unless cancelled
ABORTED = ("vlmamba_requests_finished_total", "abort")


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def qa(sample, qtype: str):
    return next(q for q in sample.qas if q.qtype == qtype)


def wait_until(check, timeout: float = 15.0) -> bool:
    """Poll ``check()`` until true; generous timeout because other suites share the CPU."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.03)
    return False


@pytest.fixture(scope="module")
def live(demo):
    model, proc = demo
    with LiveServer(ServerSettings(allow_private_image_urls=True, max_num_seqs=4),
                    (model, proc, "shapes-demo")) as srv:
        yield srv


@pytest.fixture(scope="module")
def tiny(demo):
    """One slot, a queue of one, an API key and a small body limit."""
    model, proc = demo
    settings = ServerSettings(api_key="k", max_num_seqs=1, max_queue=1, max_body_bytes=200_000)
    with LiveServer(settings, (model, proc, "shapes-demo")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(live):
    with Client(live.url, max_retries=0, timeout=60) as c:
        yield c


def _image_input(kind: str, sample, index: int, images: ImageServer, tmp_path: Path):
    path = tmp_path / "shape.png"
    path.write_bytes(png(sample.image()))
    return {"path": path, "str_path": str(path), "bytes": path.read_bytes(), "pil": sample.image(),
            "http_url": f"{images.url}/s{index}.png", "data_url": data_url(path.read_bytes())}[kind]


@pytest.mark.parametrize("index,kind", list(enumerate(["path", "str_path", "bytes", "pil", "http_url", "data_url"])))
def test_every_image_kind_gets_the_expected_answer(client, samples, images, tmp_path, index, kind):
    s = samples[index]
    q = qa(s, "describe")
    r = client.chat(prompt=q.question, images=[_image_input(kind, s, index, images, tmp_path)], temperature=0)
    assert r.text == q.answer and r.finish_reason == "stop" and r.model == "shapes-demo"
    assert r.usage.prompt_tokens > 64 and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.raw["choices"][0]["message"]["content"] == q.answer  # the server's body stays available


def test_streamed_chat_yields_deltas_then_a_final_chunk(client, samples):
    s = samples[6]
    q = qa(s, "describe")
    with client.chat(prompt=q.question, images=[s.image()], temperature=0, stream=True) as stream:
        chunks = list(stream)
    assert "".join(c.text for c in chunks) == stream.text == q.answer
    assert all(c.text and c.finish_reason is None for c in chunks[:-1])
    final = chunks[-1]
    assert final.text == "" and final.finish_reason == "stop" and final.usage.completion_tokens >= 1
    assert final.usage.prompt_tokens > 64 and stream.final().text == q.answer


def test_messages_form_with_a_system_prompt_and_images(client, samples):
    s = samples[7]
    q = qa(s, "count")
    messages = [{"role": "user", "content": q.question}]
    r = client.chat(messages, images=[png(s.image())], system="You answer questions about images.",
                    temperature=0, max_tokens=20, seed=1, top_p=1.0, top_k=0, stop=["\n\n"])
    assert r.text == q.answer
    assert messages == [{"role": "user", "content": q.question}]  # the caller's list is left alone
    with pytest.raises(TypeError, match="temprature"):
        client.chat(prompt="hi", temprature=0)  # a typo is caught before anything is sent


def test_async_client_streamed_and_not(live, samples, images):
    s8, s9 = samples[8], samples[9]
    q8, q9 = qa(s8, "describe"), qa(s9, "where")

    async def run():
        async with AsyncClient(live.url, timeout=60) as ac:
            r = await ac.chat(prompt=q8.question, images=[f"{images.url}/s8.png"], temperature=0)
            stream = await ac.chat(prompt=q9.question, images=[s9.image()], temperature=0, stream=True)
            async with stream:
                texts = [c.text async for c in stream]
            return r, texts, stream

    r, texts, stream = asyncio.run(run())
    assert r.text == q8.answer and r.usage.completion_tokens >= 1
    assert "".join(texts) == q9.answer and stream.finish_reason == "stop" and stream.usage.completion_tokens >= 1


def test_a_session_resumes_from_the_cached_state(client, samples):
    s = samples[10]
    session = client.session(temperature=0)
    r1 = session.ask(qa(s, "describe").question, images=[s.image()])
    r2 = session.ask(qa(s, "count").question)
    assert (r1.text, r2.text) == (qa(s, "describe").answer, qa(s, "count").answer)
    assert r1.usage.cached_tokens == 0 and r2.usage.cached_tokens > 64  # the image was not prefilled again
    with session.ask(qa(s, "color").question, stream=True) as stream:
        assert "".join(c.text for c in stream) == qa(s, "color").answer
    assert stream.usage.cached_tokens > r2.usage.cached_tokens
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 3
    assert session.messages[-1]["content"] == qa(s, "color").answer


def test_an_async_session_resumes_from_the_cached_state(live, samples):
    s = samples[11]

    async def run():
        async with AsyncClient(live.url, timeout=60) as ac:
            session = ac.session(temperature=0)
            return await session.ask(qa(s, "where").question, images=[png(s.image())]), \
                await session.ask(qa(s, "exists").question), session

    r1, r2, session = asyncio.run(run())
    assert (r1.text, r2.text) == (qa(s, "where").answer, qa(s, "exists").answer)
    assert r2.usage.cached_tokens > 64 and len(session.messages) == 4 and session.session_id.startswith("sess-")


def test_a_bad_parameter_raises_a_typed_bad_request(client):
    with pytest.raises(BadRequestError) as e:
        client.chat(prompt="Hello", temperature=5)
    assert e.value.status == 400 and e.value.code == "invalid_request" and e.value.param == "temperature"
    assert e.value.type == "invalid_request_error" and "temperature" in e.value.message
    assert e.value.body["error"]["param"] == "temperature"


def test_api_key_and_body_limit_errors(tiny):
    with Client(tiny.url, api_key="", max_retries=0) as anonymous, pytest.raises(AuthenticationError) as e:
        anonymous.chat(prompt="Hello", max_tokens=2)
    assert e.value.status == 401 and e.value.code == "invalid_api_key"
    with Client(tiny.url, api_key="k", max_retries=0) as keyed:
        assert keyed.chat(prompt="Hello", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
        with pytest.raises(RequestTooLargeError) as e:
            keyed.chat(prompt="x" * 300_000)
    assert e.value.status == 413 and e.value.code == "request_too_large"


def test_a_full_queue_is_retried_until_admitted(tiny):
    slow = dict(prompt="Describe the image.", max_tokens=300, ignore_eos=True)
    statuses: list[int] = []
    hooks = {"response": [lambda r: statuses.append(r.status_code)]}
    with Client(tiny.url, "k", max_retries=0, timeout=60) as plain, \
            Client(tiny.url, "k", max_retries=12, backoff=0.2, max_backoff=1.0, timeout=60,
                   http_client=httpx.Client(timeout=60, event_hooks=hooks)) as patient, \
            cf.ThreadPoolExecutor(2) as pool:
        first = pool.submit(plain.chat, **slow)
        assert wait_until(lambda: plain.health().running == 1)
        second = pool.submit(plain.chat, **slow)  # fills the queue of one
        assert wait_until(lambda: plain.health().waiting == 1)
        with pytest.raises(RateLimitError) as e:
            plain.chat(prompt="Hi", max_tokens=2)
        assert e.value.status == 429 and e.value.code == "queue_full" and e.value.retry_after == 1
        r = patient.chat(prompt="Hi", max_tokens=2, ignore_eos=True)
        assert r.usage.completion_tokens == 2
        assert first.result().usage.completion_tokens == second.result().usage.completion_tokens == 300
    assert statuses[0] == 429 and statuses[-1] == 200 and set(statuses) == {429, 200}


def _slots_freed_by_abort(client: Client, aborts_before: float) -> bool:
    return wait_until(lambda: client.health().slots_used == 0) and \
        client.metrics().value(ABORTED[0], reason=ABORTED[1]) == aborts_before + 1


@pytest.mark.parametrize("how", ["break", "close", "with"])
def test_closing_a_stream_early_frees_the_server_slot(client, samples, how):
    aborts = client.metrics().value(ABORTED[0], 0.0, reason=ABORTED[1])
    args = dict(prompt="Describe the image.", images=[samples[12].image()], stream=True, **LONG)
    if how == "break":
        for chunk in client.chat(**args):  # the dropped stream hangs up
            assert client.health().slots_used == 1
            break
    elif how == "close":
        stream = client.chat(**args)
        next(stream)
        stream.close()
        assert list(stream) == [] and stream.finish_reason is None
    else:
        with client.chat(**args) as stream:
            next(stream)
    assert _slots_freed_by_abort(client, aborts)


def test_closing_an_async_stream_early_frees_the_server_slot(live, client):
    aborts = client.metrics().value(ABORTED[0], 0.0, reason=ABORTED[1])

    async def run():
        async with AsyncClient(live.url, timeout=60) as ac:
            async with await ac.chat(prompt="Describe the image.", stream=True, **LONG) as stream:
                await anext(stream)
            async for _ in await ac.chat(prompt="Describe the image.", stream=True, **LONG):
                break  # the dropped stream is closed on the loop
            for _ in range(300):
                if (await ac.health()).slots_used == 0:
                    return True
                await asyncio.sleep(0.05)
            return False

    assert asyncio.run(run())
    assert client.metrics().value(ABORTED[0], reason=ABORTED[1]) == aborts + 2


def test_health_models_and_metrics(client):
    h = client.health()
    assert h.status == "ok" and h.slots_used == 0 and h.waiting == 0
    assert [m.id for m in client.models()] == ["shapes-demo"]
    m = client.metrics()
    assert m["vlmamba_state_slots_total"] == 4 and m.value("vlmamba_generation_tokens_total") > 0
    assert m.value("vlmamba_requests_finished_total", reason="stop") >= 1
    assert m.value("vlmamba_decode_batch_size_bucket", le="+Inf") == m["vlmamba_decode_batch_size_count"]
    assert "stop" in {labels["reason"] for labels, _ in m.samples("vlmamba_requests_finished_total")}


def test_cli_answers_a_question_about_an_image(live, samples, tmp_path, capsys):
    s = samples[13]
    path = tmp_path / "q.png"
    path.write_bytes(png(s.image()))
    base = ["--url", live.url, "--image", str(path), "--temperature", "0"]
    assert cli_main(["chat", *base, qa(s, "describe").question]) == 0
    assert capsys.readouterr().out == qa(s, "describe").answer + "\n"
    assert cli_main(["chat", *base, "--no-stream", "--usage", qa(s, "count").question]) == 0
    out = capsys.readouterr()
    assert out.out == qa(s, "count").answer + "\n" and out.err.startswith("tokens: prompt ")
    assert cli_main(["models", "--url", live.url]) == 0 and capsys.readouterr().out == "shapes-demo\n"
    assert cli_main(["health", "--url", live.url]) == 0 and '"status": "ok"' in capsys.readouterr().out
    assert cli_main(["chat", "--url", live.url, "--image", str(tmp_path / "missing.png"), "Hi"]) == 1
    assert "missing.png" in capsys.readouterr().err


def test_cli_reports_a_missing_key_and_explains_itself(tiny, capsys, monkeypatch):
    monkeypatch.delenv("VLMAMBA_API_KEY", raising=False)
    assert cli_main(["chat", "--url", tiny.url, "Hello"]) == 1
    assert "--api-key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["chat", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--image", "--url", "--api-key", "--max-tokens", "--temperature",
                                        "--no-stream", "VLMAMBA_URL"))


def test_the_console_script_is_declared():
    eps = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "vlmamba-client"]
    assert eps and eps[0].value == "vlmamba_client.cli:main"
    out = subprocess.run([sys.executable, "-m", "vlmamba_client", "--help"], capture_output=True, text=True,
                         check=True)
    assert all(cmd in out.stdout for cmd in ("chat", "health", "models", "examples:"))


def test_importing_the_client_pulls_in_no_heavy_dependency(tmp_path):
    code = ("import sys, vlmamba_client; heavy = {'torch', 'numpy', 'PIL'} & {m.split('.')[0] for m in sys.modules}; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
