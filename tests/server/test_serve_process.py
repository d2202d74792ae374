"""What `vlmamba serve` sets up in the HTTP server's process before it serves."""

import os
import subprocess
import sys
from pathlib import Path

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
