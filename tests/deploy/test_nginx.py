"""deploy/nginx/vlmamba.conf: validated by ``nginx -t``, then run in front of two real replicas.

Skipped when there is no nginx binary (CI installs Debian's nginx-light, so there it runs).
"""

from __future__ import annotations

import subprocess
import time
import uuid

import httpx
import pytest

from model.data.shapes import make_sample
from tests.deploy.helpers import (Nginx, Replica, free_port, nginx_binary, nginx_cmd, shipped_upstreams,
                                  write_nginx_config)
from tests.server.test_api import ask, data_url

pytestmark = pytest.mark.skipif(nginx_binary() is None, reason="needs the nginx binary (apt-get install nginx-light)")


def test_shipped_config_passes_nginx_t(tmp_path):
    # nginx -t resolves upstream names, and "vlmamba" only exists inside the compose network:
    # the shipped server lines are swapped for loopback addresses (nothing needs to listen there).
    conf = write_nginx_config(tmp_path, ["127.0.0.1:1", "127.0.0.1:2"], 8080)
    out = subprocess.run(nginx_cmd(tmp_path, conf, "-t"), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "syntax is ok" in out.stderr and "test is successful" in out.stderr


def test_shipped_upstreams_are_the_compose_replicas():
    assert shipped_upstreams() == ["vlmamba:8000", "vlmamba-1:8000"]


def _chat(client, messages, session=None, key=None, max_tokens=24, stream=False):
    headers = {}
    if session:
        headers["X-Session-Id"] = session
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = {"model": "shapes-demo", "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return client.post("/v1/chat/completions", json=body, headers=headers)


def _served_by(response) -> str:
    """The replica that answered: the last address nginx tried (after a failover: 'a, b')."""
    return response.headers["X-Upstream"].split(",")[-1].strip()


def _spread(client, make_request, at_least: int, limit: int = 40) -> dict[str, str]:
    """Sends requests keyed 0, 1, 2 ... until both replicas have answered (and at least
    ``at_least`` keys were sent): {key: replica}. Which key lands where depends on the ports of the
    run, so the number of keys needed to see both is not fixed."""
    seen: dict[str, str] = {}
    for i in range(limit):
        key = f"{uuid.uuid4().hex[:8]}-{i}"
        r = make_request(key)
        assert r.status_code == 200, r.text
        seen[key] = _served_by(r)
        if i + 1 >= at_least and len(set(seen.values())) == 2:
            return seen
    raise AssertionError(f"{limit} keys all hashed to {set(seen.values())}")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sessions_stick_to_a_replica_and_fail_over(tmp_path):
    replicas, lb = [], None
    try:
        # Private image URLs allowed: the test makes a replica fail to fetch one from loopback.
        env = {"VLMAMBA_ALLOW_PRIVATE_IMAGE_URLS": "1", "VLMAMBA_IMAGE_FETCH_TIMEOUT": "2"}
        replicas = [Replica(tmp_path, f"replica-{i}", env) for i in range(2)]
        deadline = time.monotonic() + 90
        for r in replicas:
            r.wait_ready(deadline)
        lb = Nginx(tmp_path, [r.address for r in replicas])
        lb.wait_ready(time.monotonic() + 15)
        by_address = {r.address: r for r in replicas}

        with httpx.Client(base_url=lb.url, timeout=60) as client:
            # Two turns of one conversation: the second resumes the first's state, so it must have
            # reached the replica that holds it.
            s = make_sample("test", 3)
            q1 = next(q for q in s.qas if q.qtype == "describe")
            q2 = next(q for q in s.qas if q.qtype == "count")
            messages = ask(data_url(s.image()), q1.question)
            r1 = _chat(client, messages, session="conv-a")
            assert r1.status_code == 200, r1.text
            home = _served_by(r1)
            assert home in by_address
            assert r1.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            messages += [{"role": "assistant", "content": r1.json()["choices"][0]["message"]["content"]},
                         {"role": "user", "content": q2.question}]
            r2 = _chat(client, messages, session="conv-a")
            assert r2.status_code == 200, r2.text
            assert _served_by(r2) == home
            assert r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0

            # A stream passes through nginx (unbuffered) to the same replica, ending in [DONE].
            with client.stream("POST", "/v1/chat/completions", headers={"X-Session-Id": "conv-a"},
                               json={"model": "m", "messages": messages, "temperature": 0, "stream": True,
                                     "max_tokens": 16}) as st:
                assert st.status_code == 200
                assert st.headers["content-type"].startswith("text/event-stream")
                assert _served_by(st) == home
                events = [line for line in st.iter_lines() if line.startswith("data: ")]
            assert len(events) >= 2 and events[-1] == "data: [DONE]"

            # Many sessions spread over both replicas, each staying on its own.
            hello = [{"role": "user", "content": "Describe the image."}]
            sessions = _spread(client, lambda k: _chat(client, hello, session=k, max_tokens=1), at_least=6)
            for key, replica in sessions.items():
                assert _served_by(_chat(client, hello, session=key, max_tokens=1)) == replica

            # Without a session id: the API key decides, and without a key the client address.
            keys = _spread(client, lambda k: _chat(client, hello, key=k, max_tokens=1), at_least=4)
            for key, replica in keys.items():
                assert _served_by(_chat(client, hello, key=key, max_tokens=1)) == replica
            anonymous = {_served_by(_chat(client, hello, max_tokens=1)) for _ in range(4)}
            assert len(anonymous) == 1

            # A client's image URL that cannot be fetched: the replica's own 502 comes back as it is,
            # tried once (not on every replica), and the replica stays in the ring.
            b_home = _served_by(_chat(client, hello, session="conv-b", max_tokens=1))
            broken = ask(f"http://127.0.0.1:{free_port()}/missing.png", "Describe the image.")
            r = _chat(client, broken, session="conv-b")
            assert r.status_code == 502 and r.json()["error"]["code"] == "image_fetch_failed", r.text
            assert r.headers["X-Upstream"] == b_home
            assert _served_by(_chat(client, hello, session="conv-b", max_tokens=1)) == b_home

            # The replica holding conv-a crashes: every request still succeeds, on the other one.
            by_address[home].kill()
            survivor = next(a for a in by_address if a != home)
            for _ in range(3):
                r = _chat(client, messages, session="conv-a")
                assert r.status_code == 200, r.text
                assert _served_by(r) == survivor
            for key in list(sessions) + list(keys):
                r = _chat(client, hello, session=key, max_tokens=1)
                assert r.status_code == 200, r.text
                assert _served_by(r) == survivor
            with client.stream("POST", "/v1/chat/completions", headers={"X-Session-Id": "conv-a"},
                               json={"model": "m", "messages": messages, "stream": True, "max_tokens": 8}) as st:
                assert st.status_code == 200
                assert [line for line in st.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
            assert client.get("/health").status_code == 200
    finally:
        if lb is not None:
            lb.stop()
        for r in replicas:
            r.stop()
