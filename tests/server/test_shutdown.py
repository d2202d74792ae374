import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from model.data.shapes import make_sample
from tests.server.live import children, wait_gone
from tests.server.test_api import ask, data_url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_running_streams_and_stops_admission(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "VLMAMBA_GRACE_PERIOD": "20",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--log-level", "warning", "serve", "--port",
                             str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        body = {"model": "m", "messages": ask(data_url(make_sample("test", 5).image()), "Describe the image."),
                "stream": True, "max_tokens": 1500, "ignore_eos": True}  # still running seconds after the signal
        events = []
        engine = children(proc.pid)  # the engine process (and multiprocessing's resource tracker)
        assert engine
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            events.append(next(lines))
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            # While draining, new work gets a clear 503 and health reports it.
            assert httpx.get(url + "/health", timeout=5).status_code == 503
            late = httpx.post(url + "/v1/chat/completions", json=body, timeout=5)
            assert late.status_code == 503 and late.json()["error"]["code"] == "unavailable"
            events += [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        finals = [json.loads(e[6:]) for e in events[:-1] if e.startswith("data: {")]
        assert finals[-1]["choices"][0]["finish_reason"] == "length"  # the stream ran to its end
        # uvicorn re-raises the signal once it has shut down cleanly, having stopped the engine process
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert wait_gone(engine, timeout=10) == []
    finally:
        if proc.poll() is None:
            proc.kill()
