"""A small parser of the Prometheus text format (so the client needs no prometheus_client)."""

from __future__ import annotations

import re

# name{labels} value [timestamp]; the label block is matched greedily up to its last brace.
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{.*\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}

MetricKey = str | tuple[str, tuple[tuple[str, str], ...]]


class Metrics(dict[MetricKey, float]):
    """Samples by key: ``"name"`` when unlabelled, ``("name", (("label", "value"), ...))`` (labels
    sorted) otherwise. ``value()`` looks either up with the labels as keywords."""

    def value(self, name: str, default: float | None = None, **labels: str) -> float | None:
        """``m.value("vlmamba_requests_finished_total", reason="stop")``."""
        return self.get(metric_key(name, labels), default)

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of one name, as (labels, value) pairs."""
        out = []
        for key, val in self.items():
            key_name, labels = (key, ()) if isinstance(key, str) else key
            if key_name == name:
                out.append((dict(labels), val))
        return out


def metric_key(name: str, labels: dict[str, str] | None = None) -> MetricKey:
    return (name, tuple(sorted(labels.items()))) if labels else name


def _parse_labels(block: str) -> dict[str, str]:
    inner, labels, pos = block[1:-1], {}, 0
    while pos < len(inner.rstrip()):
        m = _LABEL.match(inner, pos)
        if m is None:
            raise ValueError(f"bad label block {block!r}")
        labels[m.group(1)] = re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], m.group(2))
        pos = m.end()
    return labels


def parse_metrics(text: str) -> Metrics:
    """Prometheus text exposition -> Metrics. ``# HELP``/``# TYPE`` lines and comments are skipped;
    values ``+Inf``, ``-Inf`` and ``NaN`` become floats; timestamps are dropped."""
    out = Metrics()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ValueError(f"not a Prometheus sample line: {line!r}")
        name, block, value = m.groups()
        out[metric_key(name, _parse_labels(block) if block else None)] = float(value)
    return out
