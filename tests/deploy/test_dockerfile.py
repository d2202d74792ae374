"""The Dockerfile and .dockerignore, checked statically: base images can't be pulled here (no
registry), so the image itself is not built by the tests (docs/deploy.md says what was verified)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib

import pytest

from tests.deploy.helpers import ROOT, arg_defaults, stages


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def parsed(dockerfile):
    return stages(dockerfile)


def test_stages_and_base_image_args(parsed):
    assert list(parsed) == ["", "cpu", "builder", "runtime"]  # runtime last: the default target
    glob = arg_defaults(parsed[""])
    assert "cuda" in glob["BASE_IMAGE"] and "devel" in glob["BASE_IMAGE"]  # nvcc, for the kernels
    assert glob["RUNTIME_IMAGE"] == "${BASE_IMAGE}"
    assert parsed["builder"][0] == ("FROM", "${BASE_IMAGE} AS builder")
    assert parsed["runtime"][0] == ("FROM", "${RUNTIME_IMAGE} AS runtime")
    assert parsed["cpu"][0] == ("FROM", "${CPU_BASE_IMAGE} AS cpu")


def test_builder_compiles_the_cuda_extra_for_torch_cuda_arch_list(parsed):
    builder = parsed["builder"]
    assert arg_defaults(builder)["TORCH_CUDA_ARCH_LIST"] == "9.0"
    env = " ".join(rest for word, rest in builder if word == "ENV")
    assert "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}" in env
    assert "MAMBA_FORCE_BUILD=TRUE" in env and "CAUSAL_CONV1D_FORCE_BUILD=TRUE" in env
    # The packages of pyproject's "cuda" extra are the ones built (and nothing pulls in others).
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cuda"]
    names = {re.split(r"[<>=!~ \[]", req, maxsplit=1)[0] for req in extra}
    specs = arg_defaults(builder)
    built = {re.split(r"[<>=!~ ]", specs[k], maxsplit=1)[0] for k in ("MAMBA_SSM_SPEC", "CAUSAL_CONV1D_SPEC")}
    assert built == names
    wheel_cmd = next(rest for word, rest in builder if word == "RUN" and "cuda_arch_shim" in rest)
    assert "--no-build-isolation" in wheel_cmd  # compiled against the image's torch
    assert "${MAMBA_SSM_SPEC}" in wheel_cmd and "${CAUSAL_CONV1D_SPEC}" in wheel_cmd


@pytest.mark.parametrize("stage", ["runtime", "cpu"])
def test_serving_stages_run_as_non_root_with_a_health_check(parsed, stage):
    instrs = parsed[stage]
    users = [rest for word, rest in instrs if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    useradd = next(rest for word, rest in instrs if word == "RUN" and "useradd" in rest)
    assert "--uid 10001" in useradd and users[-1] == "vlmamba"
    health = next(rest for word, rest in instrs if word == "HEALTHCHECK")
    assert "/opt/vlmamba/healthcheck.py" in health and "--start-period" in health
    copies = [rest for word, rest in instrs if word == "COPY"]
    assert "deploy/docker/healthcheck.py /opt/vlmamba/healthcheck.py" in copies
    assert "/health" in (ROOT / "deploy/docker/healthcheck.py").read_text()
    # The bundled demo model by default; VLMAMBA_CHECKPOINT (a mounted directory) otherwise.
    entry = next(rest for word, rest in instrs if word == "ENTRYPOINT")
    cmd = next(rest for word, rest in instrs if word == "CMD")
    assert json.loads(entry) + json.loads(cmd) == ["vlmamba", "serve", "--host", "0.0.0.0"]
    assert "--checkpoint" not in cmd
    assert any(word == "EXPOSE" and rest == "8000" for word, rest in instrs)


def test_runtime_keeps_the_base_images_torch(parsed):
    install = next(rest for word, rest in parsed["runtime"] if word == "RUN" and "/tmp/wheels" in rest)
    assert "PIP_CONSTRAINT=/tmp/torch.txt" in install
    assert "selective_scan_cuda" in install and "causal_conv1d_cuda" in install  # kernels load


# --- .dockerignore ---------------------------------------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's .dockerignore matching: Go filepath.Match plus "**" (any number of folders)."""
    pattern = pattern.strip().rstrip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def ignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """A path is ignored when the last rule that matches it or one of its parents excludes it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for exclude, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            result = exclude
    return result


@pytest.fixture(scope="module")
def ignore_rules():
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((not line.startswith("!"), _pattern_regex(line.lstrip("!"))))
    return rules


def copy_sources(parsed) -> set[str]:
    out = set()
    for name, instrs in parsed.items():
        for word, rest in instrs:
            if word == "COPY" and "--from=" not in rest:
                out.update(shlex.split(rest)[:-1])
    return out


def test_every_copied_file_exists_and_is_in_the_build_context(parsed, ignore_rules):
    sources = copy_sources(parsed)
    assert {"pyproject.toml", "README.md", "kernels", "model", "server",
            "deploy/docker/healthcheck.py", "deploy/docker/cuda_arch_shim"} <= sources
    for src in sorted(sources):
        path = ROOT / src
        assert path.exists(), f"COPY {src}: no such file"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if "__pycache__" in rel or rel.endswith(".pyc"):
                continue
            assert not ignored(rel, ignore_rules), f"{rel} is COPYed but .dockerignore leaves it out"


def test_dockerignore_keeps_the_rest_out(ignore_rules):
    for rel in (".git/config", "tests/deploy/test_nginx.py", "docs/api.md", "models/my-ckpt/model.safetensors",
                "server/__pycache__/app.cpython-311.pyc", "benchmarks/results/x.json", "vlmamba_serve.egg-info/PKG-INFO",
                "deploy/k8s/deployment.yaml", ".venv/bin/python"):
        assert ignored(rel, ignore_rules), rel
    assert not ignored("model/checkpoints/shapes-demo/model.safetensors", ignore_rules)  # the demo model
