"""The two helper scripts that go into the image: the health check, and the build-time shim that
makes mamba-ssm / causal-conv1d honour TORCH_CUDA_ARCH_LIST."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.deploy.helpers import DEPLOY, free_port

HEALTHCHECK = DEPLOY / "docker/healthcheck.py"


class _Health:
    """A stand-in server: /health answers ``status``; with ``key``, only to that bearer key."""

    def __init__(self, status: int, key: str | None = None):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                ok_key = outer.key is None or self.headers.get("Authorization") == f"Bearer {outer.key}"
                code = outer.status if self.path == "/health" and ok_key else (401 if not ok_key else 404)
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.status, self.key = status, key
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def check(port: int, **env) -> int:
    full = {"VLMAMBA_PORT": str(port), "PATH": "/usr/bin:/bin", **env}
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env=full, capture_output=True, timeout=30).returncode


@pytest.mark.parametrize("status, code", [(200, 0), (503, 1)])
def test_healthcheck_follows_health(status, code):
    srv = _Health(status)
    try:
        assert check(srv.port) == code
    finally:
        srv.close()


def test_healthcheck_fails_when_nothing_listens():
    assert check(free_port()) == 1


def test_healthcheck_sends_the_key_when_health_is_protected():
    srv = _Health(200, key="k1")
    try:
        assert check(srv.port, VLMAMBA_PROTECT_HEALTH="1", VLMAMBA_API_KEY="k1,k2") == 0
        assert check(srv.port) == 1  # no key: 401
    finally:
        srv.close()


@pytest.fixture
def shim():
    spec = importlib.util.spec_from_file_location("cuda_arch_shim", DEPLOY / "docker/cuda_arch_shim/sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # without TORCH_CUDA_ARCH_LIST in the environment: patches nothing
    return module


# nvcc flags as mamba-ssm's setup.py builds them (abridged).
MAMBA_NVCC = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "--expt-relaxed-constexpr",
              "-gencode", "arch=compute_75,code=sm_75", "-gencode", "arch=compute_80,code=sm_80",
              "-gencode", "arch=compute_90,code=sm_90", "--threads", "4", "-DBUILD_PYTHON_PACKAGE"]


def test_shim_removes_only_architecture_flags(shim):
    assert shim.strip_arch_flags(MAMBA_NVCC) == ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__",
                                                 "--expt-relaxed-constexpr", "--threads", "4",
                                                 "-DBUILD_PYTHON_PACKAGE"]
    assert shim.strip_arch_flags(["-gencode=arch=compute_80,code=sm_80", "-arch=sm_90", "-O2"]) == ["-O2"]


def test_shim_lets_torch_use_torch_cuda_arch_list(shim, monkeypatch):
    from torch.utils import cpp_extension

    seen = {}
    monkeypatch.setattr(cpp_extension, "CUDAExtension", lambda name, sources, **kw: seen.update(kw) or name)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    shim._install()
    cpp_extension.CUDAExtension("selective_scan_cuda", ["a.cu"],
                                extra_compile_args={"cxx": ["-O3"], "nvcc": list(MAMBA_NVCC)})
    nvcc = seen["extra_compile_args"]["nvcc"]
    assert not any("arch" in f for f in nvcc) and seen["extra_compile_args"]["cxx"] == ["-O3"]
    # With no arch flag left, torch derives them from TORCH_CUDA_ARCH_LIST alone: sm_90 only.
    # (A private torch function; if a torch release renames it, this part is skipped.)
    arch_flags = getattr(cpp_extension, "_get_cuda_arch_flags", None)
    if arch_flags is not None:
        assert arch_flags(nvcc) == ["-gencode=arch=compute_90,code=sm_90"]
