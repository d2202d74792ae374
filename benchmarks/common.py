"""Shared pieces of the benchmark scripts: timing, machine description, JSON and the docs table."""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path

DOC = Path(__file__).parents[1] / "docs" / "performance.md"
PRESET = Path(__file__).parents[1] / "model" / "configs" / "vlmamba-2.8b-so400m"


def sync(device) -> None:
    import torch  # here, not at the top: the serving benchmark's client processes never need it

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int = 1) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls of fn (after the caller's warm-up) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def machine(device) -> dict:
    import torch

    d = torch.device(device)
    info = {"host": platform.node(), "cpu_count": __import__("os").cpu_count(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}
    if d.type == "cuda":
        p = torch.cuda.get_device_properties(d)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        info["gpu"] = None
    return info


def write_json(result: dict, out: str | None, quiet: bool = False) -> None:
    text = json.dumps(result, indent=2)
    if not quiet:
        print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:,.0f}" if isinstance(v, float) and abs(v) >= 100 else (
        f"{v:.3g}" if isinstance(v, float) else ("–" if v is None else str(v)))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str, doc: Path | str | None = DOC) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    if doc is None:
        return
    doc = Path(doc)
    text = doc.read_text() if doc.exists() else "# Performance\n"
    block = f"<!-- {name}:start -->\n{body.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
