"""What `vlmamba serve` sets up in the HTTP server's process before it serves."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).parents[2]

# Runs `vlmamba serve` with the server's run loop replaced by one that reports torch's intra-op
# threads at the moment serving would start (conftest.py pins this process's threads, so a
# fresh interpreter is needed to see the default).
PROBE = """
import sys, torch
import server.app as app
seen = {}
class Server:
    def run(self):
        seen["threads"] = torch.get_num_threads()
app.draining_server = lambda config, grace: Server()
from server.cli import main
default = torch.get_num_threads()
rc = main(["--log-level", "warning", "serve", "--port", "0"] + sys.argv[1:])
print(default, seen["threads"], rc)
"""


def _threads(*args: str) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "VLMAMBA_"))}
    out = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    default, serving, rc = map(int, out.stdout.split()[-3:])
    assert rc == 0
    return default, serving


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="torch's default is one thread on one CPU")
def test_http_process_keeps_one_intra_op_thread_when_the_engine_has_its_own_process():
    # Here torch only preprocesses images, a few small ops per request in worker threads; an
    # intra-op pool's idle threads would spin against the engine process for the CPU.
    default, serving = _threads()
    assert default > 1 and serving == 1
    # With the engine in this process, the model's CPU work keeps torch's default pool.
    default, serving = _threads("--no-engine-process")
    assert serving == default > 1


def test_a_full_collection_skips_what_start_up_froze():
    """With the start-up heap frozen, a full collection no longer walks it: in a fresh interpreter
    holding what the server imports, one takes a fraction of the time it took before."""
    probe = """
import gc, time
import server.app, server.serving, server.engine.process
from model.checkpoint_vlm import load_vlmamba
from server.heap import freeze_startup_heap
model = load_vlmamba("model/checkpoints/shapes-demo", device="cpu")
def full():
    t = time.perf_counter(); gc.collect(); return time.perf_counter() - t
before = min(full() for _ in range(3))
frozen = freeze_startup_heap("probe")
after = min(full() for _ in range(3))
print(frozen, before, after)
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    frozen, before, after = out.stdout.split()[-3:]
    print(f"{frozen} objects frozen; a full collection {float(before) * 1e3:.1f} -> {float(after) * 1e3:.2f} ms")
    assert int(frozen) > 100_000 and float(after) < float(before) / 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vlmamba_serve_freezes_the_start_up_heap_of_both_processes():
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "--log-level", "info", "serve", "--port",
                             str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("the server did not become healthy")
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    frozen = dict((who, int(n)) for who, n in
                  re.findall(r"(server process|engine process): (\d+) objects from start-up frozen", log))
    assert set(frozen) == {"server process", "engine process"}, log[-3000:]
    assert min(frozen.values()) > 100_000  # the imports and the model, not a handful
