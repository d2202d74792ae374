"""Prometheus config and the Grafana dashboard: every metric the dashboard queries is one the
server really exports (so a renamed metric can't silently blank a panel)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.engine.types import EngineStats
from server.images import PixelBudget
from server.metrics import Metrics
from tests.deploy.helpers import DEPLOY

DASHBOARD = DEPLOY / "grafana/dashboards/vlmamba.json"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs(dashboard) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p["targets"]]


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Sample names of the server's /metrics, with every metric observed at least once."""
    m = Metrics()
    m.attach(SimpleNamespace(stats=lambda: EngineStats(running=1, slots_used=1, slots_total=16, cache_bytes=1024,
                                                       cache_entries=2, cache_hits=3, cache_misses=1)))
    m.watch_decoding(PixelBudget(100))
    for h in (m.ttft, m.itl, m.e2e, m.queue, m.fetch, m.batch):
        h.observe(0.1)
    for c in (m.prompt_tokens, m.cached_tokens, m.generation_tokens):
        c.inc()
    m.finished.labels("stop").inc()
    m.rejected.labels("queue_full").inc()
    m.fetch_failures.labels("timeout").inc()
    text = m.render().decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_every_queried_metric_is_exported(dashboard, exported):
    queried = {name for e in exprs(dashboard) for name in re.findall(r"\bvlmamba_\w+", e)}
    assert queried and queried <= exported, sorted(queried - exported)


def test_the_dashboard_covers_what_operators_need(dashboard):
    text = " ".join(exprs(dashboard))
    for metric in ("vlmamba_time_to_first_token_seconds_bucket",      # TTFT
                   "vlmamba_inter_token_latency_seconds_bucket",       # ITL
                   "vlmamba_generation_tokens_total",                  # throughput
                   "vlmamba_requests_running", "vlmamba_requests_waiting",
                   "vlmamba_state_slots_used", "vlmamba_state_slots_total",
                   "vlmamba_state_cache_hits_total", "vlmamba_state_cache_misses_total",  # hit rate
                   "vlmamba_state_cache_bytes",
                   "vlmamba_requests_finished_total", "vlmamba_requests_rejected_total"):  # errors
        assert metric in text, metric
    assert 'reason="error"' in text


def test_dashboard_structure(dashboard):
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    for p in panels(dashboard):
        assert p["datasource"]["uid"] == ds["uid"], p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == ds["uid"] for t in p["targets"])
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
    (var,) = dashboard["templating"]["list"]
    assert var["name"] == "instance"
    assert all('instance=~"$instance"' in e for e in exprs(dashboard) if "vlmamba_" in e)


def test_prometheus_scrapes_every_replica_directly():
    cfg = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "vlmamba")
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["vlmamba-server"] and sd["type"] == "A" and sd["port"] == 8000
    # The dashboard's "Replicas up" panel counts this job.
    assert 'up{job="vlmamba"}' in DASHBOARD.read_text().replace('\\"', '"')


promtool = shutil.which("promtool")


@pytest.mark.skipif(promtool is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_config_and_every_query(tmp_path, dashboard):
    out = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus/prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # PromQL syntax of every panel, as recording rules (Grafana's variables filled in).
    rules = [{"record": f"vlmamba:check_{i}",
              "expr": e.replace("$__rate_interval", "1m").replace("$instance", ".*")}
             for i, e in enumerate(exprs(dashboard))]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
