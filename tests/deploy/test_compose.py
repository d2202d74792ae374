"""docker-compose.yml and docker-compose.cpu.yml: their structure (PyYAML, always), and
``docker compose config`` / ``docker-compose config`` where a Compose CLI is installed (it parses
and validates without a Docker engine)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.helpers import DEPLOY, ROOT, arg_defaults, shipped_upstreams, stages

BASE, CPU = "docker-compose.yml", "docker-compose.cpu.yml"
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value):
    """Compose's ${VAR:-default} with an empty environment: every variable takes its default."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def merge(base, override):
    """Compose's merge of an override file, as far as these files need it (mappings merge,
    everything else is replaced)."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(override)


def load(*files: str) -> dict:
    result = {}
    for f in files:
        result = merge(result, yaml.safe_load((ROOT / f).read_text()))
    return interpolate(result)


def enabled(project: dict, *profiles: str) -> set[str]:
    return {name for name, svc in project["services"].items()
            if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)}


@pytest.fixture(scope="module")
def base():
    return load(BASE)


@pytest.fixture(scope="module")
def cpu():
    return load(BASE, CPU)


def gpu_devices(svc) -> list[dict]:
    return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_profiles_select_the_right_services(base, cpu):
    assert enabled(base) == {"vlmamba", "prometheus", "grafana"}
    assert enabled(base, "scale") == {"vlmamba", "vlmamba-1", "nginx", "prometheus", "grafana"}
    assert enabled(cpu) == {"vlmamba-cpu", "prometheus", "grafana"}


def test_gpu_servers_reserve_one_gpu_each(base):
    ids = []
    for name in ("vlmamba", "vlmamba-1"):
        (device,) = gpu_devices(base["services"][name])
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert len(device["device_ids"]) == 1
        ids += device["device_ids"]
    assert len(set(ids)) == 2  # never two replicas on one GPU


def test_cpu_variant_has_no_gpu_and_uses_the_cpu_image(cpu):
    svc = cpu["services"]["vlmamba-cpu"]
    assert not gpu_devices(svc)
    assert svc["environment"]["VLMAMBA_DEVICE"] == "cpu"
    assert svc["build"]["target"] in stages((ROOT / "Dockerfile").read_text())


@pytest.mark.parametrize("name", ["vlmamba", "vlmamba-1", "vlmamba-cpu"])
def test_servers_have_health_checks_models_and_a_drain_period(base, cpu, name):
    svc = (cpu if name == "vlmamba-cpu" else base)["services"][name]
    assert svc["healthcheck"]["test"] == ["CMD", "python", "/opt/vlmamba/healthcheck.py"]
    assert "./models:/models:ro" in svc["volumes"]
    grace = float(svc["environment"]["VLMAMBA_GRACE_PERIOD"])
    assert int(svc["stop_grace_period"].rstrip("s")) > grace
    # The checkpoint is a mounted directory, chosen by VLMAMBA_CHECKPOINT (empty: the demo model).
    assert svc["environment"]["VLMAMBA_CHECKPOINT"] == ""
    assert "vlmamba-server" in svc["networks"]["default"]["aliases"]


def test_build_args_match_the_dockerfile_defaults(base):
    args = base["services"]["vlmamba"]["build"]["args"]
    parsed = stages((ROOT / "Dockerfile").read_text())
    assert args["BASE_IMAGE"] == arg_defaults(parsed[""])["BASE_IMAGE"]
    assert args["TORCH_CUDA_ARCH_LIST"] == arg_defaults(parsed["builder"])["TORCH_CUDA_ARCH_LIST"] == "9.0"


def test_every_mounted_file_exists(base, cpu):
    for project in (base, cpu):
        for name, svc in project["services"].items():
            for vol in svc.get("volumes", []):
                src = vol.split(":")[0]
                if src.startswith("./deploy"):
                    assert (ROOT / src).exists(), f"{name}: {src} does not exist"


def test_nginx_balances_over_the_gpu_replicas(base):
    nginx = base["services"]["nginx"]
    assert "./deploy/nginx/vlmamba.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    replicas = [n for n in enabled(base, "scale") if gpu_devices(base["services"][n])]
    assert sorted(shipped_upstreams()) == sorted(f"{n}:8000" for n in replicas)
    assert set(nginx["depends_on"]) == set(replicas)


def test_monitoring_is_wired_to_the_repository_configs(base):
    prom, graf = base["services"]["prometheus"], base["services"]["grafana"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    mounts = dict(v.split(":")[:2] for v in graf["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/vlmamba.yml").read_text())
    dash_dir = provider["providers"][0]["options"]["path"]
    assert mounts["./deploy/grafana/dashboards"] == dash_dir
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dash_dir) and (DEPLOY / "grafana/dashboards" / home.rsplit("/", 1)[1]).is_file()
    # Unauthenticated monitoring ports are published on the host's loopback only.
    for svc in (prom, graf):
        assert all(p.startswith("127.0.0.1:") for p in svc["ports"])


# --- a real Compose CLI, when there is one -----------------------------------------------------

def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


needs_cli = pytest.mark.skipif(compose_cli() is None, reason="no docker compose / docker-compose CLI")


def run_config(cwd, *args: str) -> subprocess.CompletedProcess:
    # Only PATH and HOME: variables of the caller's shell must not change what is validated.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([*compose_cli(), *args, "config", "-q"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


@needs_cli
@pytest.mark.parametrize("args", [(), ("--profile", "scale"), ("-f", BASE, "-f", CPU)],
                         ids=["default", "scale", "cpu"])  # not "gpu": that keyword means "needs CUDA" here
def test_compose_cli_validates(args):
    out = run_config(ROOT, *args)
    assert out.returncode == 0, out.stderr


@needs_cli
def test_compose_cli_would_catch_a_mistake(tmp_path):
    # The validator validates: the same file with a misspelt key is refused.
    broken = (ROOT / BASE).read_text().replace("stop_grace_period:", "stop_grace_periode:")
    (tmp_path / BASE).write_text(broken)
    assert run_config(tmp_path).returncode != 0
