"""Shared by the deployment tests: paths, loopback ports, server replicas and nginx as processes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NGINX_SITE = DEPLOY / "nginx" / "vlmamba.conf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_http(url: str, deadline: float, proc: subprocess.Popen, log: Path) -> None:
    """Waits for ``url`` to answer 200; fails early if ``proc`` exits."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}:\n{tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready in time:\n{tail(log)}")


class Replica:
    """``vlmamba serve`` (the bundled demo model, on the CPU) as a subprocess on a loopback port."""

    def __init__(self, workdir: Path, name: str, extra_env: dict | None = None):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self.log = workdir / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(extra_env or {})}
        cmd = [sys.executable, "-m", "server.cli", "--log-level", "warning", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu", "--max-num-seqs", "4", "--grace-period", "1"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, deadline: float) -> None:
        wait_http(self.url + "/health", deadline, self.proc, self.log)

    def kill(self) -> None:
        """SIGKILL: a crash, no graceful shutdown."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


# --- Dockerfile -------------------------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        if not current and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if current and raw.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    out = []
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage name ("" for the global ones before the first FROM)."""
    result, name = {"": []}, ""
    for word, rest in instructions(text):
        if word == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            name = m.group(2) or m.group(1)
            result[name] = [(word, rest)]
        else:
            result[name].append((word, rest))
    return result


def arg_defaults(instrs) -> dict[str, str]:
    out = {}
    for word, rest in instrs:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            out[key] = value.strip('"')
    return out


# --- nginx ------------------------------------------------------------------------------------

_SERVER_LINE = re.compile(r"^(?P<indent>[ \t]*)server[ \t]+[\w.-]+:8000(?P<params>[^;\n]*);", re.M)


def shipped_upstreams(text: str | None = None) -> list[str]:
    """The ``host:port`` of every server line of the shipped upstream block."""
    text = NGINX_SITE.read_text() if text is None else text
    return [m.group(0).split()[1].rstrip(";") for m in _SERVER_LINE.finditer(text)]


def render_site(upstreams: list[str], listen: str, access_log: Path) -> str:
    """The shipped deploy/nginx/vlmamba.conf with its replicas replaced by ``upstreams`` (keeping
    their max_fails/fail_timeout parameters), listening on ``listen``, logging to ``access_log``.
    Everything else is the shipped file as it is."""
    text = NGINX_SITE.read_text()
    found = list(_SERVER_LINE.finditer(text))
    assert found, "no 'server NAME:8000 ...;' line in deploy/nginx/vlmamba.conf"
    indent, params = found[0].group("indent"), found[0].group("params")
    lines = "\n".join(f"{indent}server {u}{params};" for u in upstreams)
    count = iter(range(len(found)))
    text = _SERVER_LINE.sub(lambda m: lines if next(count) == 0 else "", text)
    text, n = re.subn(r"^([ \t]*)listen[ \t]+80;", rf"\g<1>listen {listen};", text, flags=re.M)
    assert n == 1, "expected one 'listen 80;' in deploy/nginx/vlmamba.conf"
    assert "/var/log/nginx/access.log" in text
    return text.replace("/var/log/nginx/access.log", str(access_log))


def _compiled_without(module: str) -> bool:
    out = subprocess.run([nginx_binary(), "-V"], capture_output=True, text=True).stderr
    return f"--without-http_{module}_module" in out


def write_nginx_config(workdir: Path, upstreams: list[str], port: int) -> Path:
    """A self-contained main config in ``workdir`` around the rendered site: foreground, one
    process (no worker user to switch to, so it runs the same as root or not), and every path
    (pid, logs, temp files) inside ``workdir``."""
    site = workdir / "vlmamba.conf"
    site.write_text(render_site(upstreams, f"127.0.0.1:{port}", workdir / "access.log"))
    temp = [f"client_body_temp_path {workdir}/client_body;", f"proxy_temp_path {workdir}/proxy;"]
    temp += [f"{m}_temp_path {workdir}/{m};" for m in ("fastcgi", "uwsgi", "scgi") if not _compiled_without(m)]
    temp_lines = "\n    ".join(temp)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log info;
events {{ worker_connections 128; }}
http {{
    access_log off;
    {temp_lines}
    include {site};
}}
""")
    return conf


def nginx_cmd(workdir: Path, conf: Path, *extra: str) -> list[str]:
    return [nginx_binary(), "-p", f"{workdir}/", "-c", str(conf), "-e", str(workdir / "error.log"), *extra]


def nginx_binary() -> str | None:
    """The nginx executable (Debian puts it in /usr/sbin, not always on a user's PATH)."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.access(p, os.X_OK)), None)


class Nginx:
    def __init__(self, workdir: Path, upstreams: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.conf = write_nginx_config(workdir, upstreams, self.port)
        self.log = workdir / "error.log"
        self.proc = subprocess.Popen(nginx_cmd(workdir, self.conf), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def wait_ready(self, deadline: float) -> None:
        wait_http(self.url + "/nginx-health", deadline, self.proc, self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish open requests
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
