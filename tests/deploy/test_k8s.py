"""deploy/k8s: the manifests hang together (labels, ports, probes, the affinity annotation);
rendered by ``kubectl kustomize`` where kubectl is installed (it needs no cluster)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.deploy.helpers import DEPLOY

K8S = DEPLOY / "k8s"


@pytest.fixture(scope="module")
def objects() -> dict[str, dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            out[doc["kind"]] = doc
    return out


def test_deployment_runs_one_gpu_per_pod_with_health_probes(objects):
    pod = objects["Deployment"]["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    # Non-root, as the image's user (Dockerfile: useradd --uid 10001).
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001
    env = {e["name"]: e for e in c["env"]}
    grace = float(env["VLMAMBA_GRACE_PERIOD"]["value"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace + 5  # + the preStop pause
    assert env["VLMAMBA_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def test_service_and_ingress_point_at_the_pods(objects):
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    svc = objects["Service"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert objects["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "http"
    (rule,) = objects["Ingress"]["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend["name"] == svc["metadata"]["name"] and backend["port"]["name"] == port["name"]


def test_ingress_hashes_on_the_session_and_streams_unbuffered(objects):
    ann = objects["Ingress"]["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert ann[prefix + "upstream-hash-by"] == "$http_x_session_id"
    assert ann[prefix + "proxy-buffering"] == "off"
    assert int(ann[prefix + "proxy-read-timeout"]) >= 600
    assert "http_502" not in ann[prefix + "proxy-next-upstream"]  # see deploy/nginx/vlmamba.conf


kubectl = shutil.which("kubectl")


@pytest.mark.skipif(kubectl is None, reason="kubectl not installed")
def test_kustomize_renders():
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout)]
    assert sorted(kinds) == ["Deployment", "Ingress", "PodDisruptionBudget", "Service"]
