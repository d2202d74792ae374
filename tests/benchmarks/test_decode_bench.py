"""The decode benchmark runs end to end at a tiny shape on the CPU and writes its table."""

import pytest

from benchmarks.common import write_section
from benchmarks.decode import main


def test_decode_benchmark_tiny_cpu(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nintro stays\n")
    out = main(["--device", "cpu", "--layers", "2", "--d-model", "64", "--batches", "1", "3", "--prompt", "12",
                "--new", "3", "--repeats", "1", "--systems", "ours", "transformers", "--doc", str(doc),
                "--out", str(tmp_path / "r.json"), "--prefill-shapes", "1x5", "2x7"])
    ours = [r for r in out["rows"] if r["system"] == "ours" and "batch" in r]
    assert [r["batch"] for r in ours] == [1, 3]
    for r in ours:
        assert r["prefill_tok_s"] > 0 and r["engine_decode_tok_s"] > 0 and r["loop_decode_tok_s"] > 0
    assert {r["batch"] for r in out["rows"] if r["system"] == "transformers"} == {1, 3}
    shapes = [r for r in out["rows"] if "prefill_shape" in r]
    assert [r["prefill_shape"] for r in shapes] == [[1, 5], [2, 7]]
    assert all(r["eager_ms"] > 0 and r["engine_ms"] > 0 and r["graph"] is False for r in shapes)  # no graphs on a CPU
    text = doc.read_text()
    assert "intro stays" in text and "| ours (engine) |" in text and "| transformers generate |" in text
    assert "| ours | 2 x 7 |" in text and "| system | batch x prompt | eager ms | engine ms | from a graph |" in text
    assert (tmp_path / "r.json").exists()


def test_decode_benchmark_times_prefill_batches_beyond_its_decode_batches(tmp_path):
    """A prefill shape wider than every decode batch still gets state slots of its own."""
    out = main(["--device", "cpu", "--layers", "1", "--d-model", "32", "--batches", "1", "--prompt", "6",
                "--new", "2", "--repeats", "1", "--systems", "ours", "--doc", "", "--prefill-shapes", "5x4"])
    (row,) = [r for r in out["rows"] if "prefill_shape" in r]
    assert row["prefill_shape"] == [5, 4] and row["engine_ms"] > 0


def test_decode_benchmark_times_decode_steps_with_and_without_pdl(tmp_path, monkeypatch):
    """--pdl-ab times a step per batch plainly, with VLMAMBA_PDL on, and with it and the prefetch
    ahead (on a CPU all launch plainly), writes its table, and leaves both settings as it found
    them."""
    import os

    import kernels.triton._pdl as P

    monkeypatch.setenv("VLMAMBA_PDL", "1")
    monkeypatch.setattr(P, "PREFETCH_AHEAD", True)
    out = main(["--device", "cpu", "--layers", "1", "--d-model", "32", "--batches", "1", "--prompt", "6",
                "--new", "2", "--repeats", "1", "--systems", "--doc", "", "--pdl-ab", "1", "3"])
    rows = {(r["pdl_ab_batch"], r["pdl"], r["ahead"]): r["step_ms"] for r in out["rows"] if "pdl_ab_batch" in r}
    assert sorted(rows) == [(b, on, ahead) for b in (1, 3) for on, ahead in ((False, False), (True, False),
                                                                              (True, True))]
    assert min(rows.values()) > 0
    assert "| batch | plain ms | PDL ms | PDL + ahead ms | gain over plain |" in out["table"]
    assert "\n| 3 | " in out["table"]
    assert os.environ["VLMAMBA_PDL"] == "1" and P.PREFETCH_AHEAD


def test_decode_benchmark_rejects_a_malformed_prefill_shape(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--systems", "ours", "--prefill-shapes", "16"])
    assert "BATCHxLENGTH" in capsys.readouterr().err


def test_write_section_replaces_in_place(tmp_path):
    doc = tmp_path / "p.md"
    write_section("a", "first", doc)
    write_section("b", "second", doc)
    write_section("a", "third", doc)
    text = doc.read_text()
    assert "first" not in text and text.index("third") < text.index("second")


def test_decode_benchmark_merges_an_earlier_run(tmp_path):
    first = tmp_path / "peer.json"
    common = ["--device", "cpu", "--layers", "1", "--d-model", "32", "--batches", "2", "--prompt", "8", "--new", "2",
              "--repeats", "1", "--doc", ""]
    main(common + ["--systems", "transformers", "--out", str(first)])
    out = main(common + ["--systems", "ours", "--merge", str(first)])
    assert {r["system"] for r in out["rows"] if "batch" in r} == {"ours", "transformers"}
    assert "| transformers generate |" in out["table"] and "| ours (engine) |" in out["table"]


def test_decode_benchmark_times_prefill_with_each_scan_loop():
    """--scan-ab times each shape with the scan's own choice and each loop forced, writes its
    table, and leaves the scan's configuration function as it found it."""
    import kernels.triton.selective_scan as scan
    from benchmarks.decode import SCAN_LOOPS

    own = scan._config
    out = main(["--device", "cpu", "--layers", "1", "--d-model", "32", "--batches", "1", "--prompt", "6",
                "--new", "2", "--repeats", "1", "--systems", "--doc", "", "--scan-ab", "1x8", "2x4"])
    rows = {(tuple(r["scan_ab_shape"]), r["scan"]): r for r in out["rows"] if "scan_ab_shape" in r}
    assert sorted(rows) == sorted((s, n) for s in ((1, 8), (2, 4)) for n in ("auto", *SCAN_LOOPS))
    assert all(r["ms"] > 0 for r in rows.values())
    assert rows[(1, 8), "auto"]["auto_is"] == list(own(1, 64, 16))  # d_inner 64 at d_model 32
    assert scan._config is own
    assert "| batch x prompt | auto picks | auto | chunked | seq16 |" in out["table"] and "\n| 2 x 4 | " in out["table"]


def test_decode_benchmark_records_a_step_timeline(monkeypatch):
    """--timeline records one step's kernels (on a CPU: its top-level operators) with
    programmatic dependent launch off and on, each with a span that covers them and per-name
    counts that add up to the total, and leaves VLMAMBA_PDL as it found it."""
    import os

    monkeypatch.delenv("VLMAMBA_PDL", raising=False)
    out = main(["--device", "cpu", "--layers", "2", "--d-model", "32", "--batches", "1", "--prompt", "6",
                "--new", "2", "--repeats", "1", "--systems", "--doc", "", "--timeline", "2"])
    rows = [r for r in out["rows"] if "timeline_batch" in r]
    assert [(r["timeline_batch"], r["pdl"]) for r in rows] == [(2, False), (2, True)]
    for row in rows:
        assert row["device_kind"] == "CPU" and row["kernels"] > 2
        assert sum(v["count"] for v in row["per_name"].values()) == row["kernels"]
        assert 0 <= row["gaps_us"] < row["span_us"]
        assert row["span_us"] >= max(v["mean_us"] for v in row["per_name"].values())
    assert "VLMAMBA_PDL" not in os.environ


def test_decode_report_gives_per_kernel_times_only_for_plain_launches():
    """With programmatic dependent launch the recorded kernel spans include their waits, so the
    report quotes per-kernel times from the plain capture and only the span from the other."""
    from benchmarks.decode import report

    def row(pdl, span, per):
        return {"system": "ours", "timeline_batch": 1, "pdl": pdl, "device_kind": "CUDA", "kernels": 4,
                "span_us": span, "gaps_us": 3.0, "per_name": per}

    result = {"machine": {"gpu": "GPU", "torch": "t", "date": "d"}, "config": {"d_model": 8, "n_layer": 1,
              "padded_vocab_size": 16}, "dtype": "bfloat16", "prompt": 4, "new": 2, "command": "c",
              "rows": [row(False, 2800.0, {"_mixer_in_kernel": {"count": 2, "mean_us": 22.9}}),
                       row(True, 2700.0, {"_ssu_kernel": {"count": 2, "mean_us": 26.3}})]}
    text = report(result, [1])
    assert "kernels launched plainly: 4 kernels, 2.800 ms" in text and "_mixer_in_kernel 2 × 22.9 µs" in text
    assert "With programmatic dependent launch: 2.700 ms" in text and "_ssu_kernel" not in text


def test_decode_report_reads_pdl_rows_from_before_the_prefetch_ahead():
    """--merge can bring --pdl-ab rows written before the prefetch ahead existed (no "ahead"):
    the report reads them as without it and lists only batches that have all three settings."""
    from benchmarks.decode import report

    def row(b, pdl, ms, **extra):
        return {"system": "ours", "pdl_ab_batch": b, "pdl": pdl, "step_ms": ms, **extra}

    result = {"machine": {"gpu": "GPU", "torch": "t", "date": "d"}, "config": {"d_model": 8, "n_layer": 1,
              "padded_vocab_size": 16}, "dtype": "bfloat16", "prompt": 4, "new": 2, "command": "c",
              "rows": [row(1, False, 2.8), row(1, True, 2.7),  # an old run: plain and PDL only
                       row(4, False, 2.9, ahead=False), row(4, True, 2.8, ahead=False), row(4, True, 2.6, ahead=True)]}
    text = report(result, [1])
    assert "| 4 | 2.900 | 2.800 | 2.600 | +11.5% |" in text and "\n| 1 | " not in text


def test_decode_clock_starts_at_the_first_decode_step():
    """A peer's generate calls its forward once for the prefill, then once per step: the clock
    wrapped with skip=1 starts at the second call and not again; a span needs a start."""
    from benchmarks.decode import DecodeClock

    clock, seen = DecodeClock("cpu"), []
    forward = clock.marking(seen.append, skip=1)
    forward("prefill")
    assert clock.start is None
    forward("step 1")
    start = clock.start
    forward("step 2")
    assert start is not None and clock.start == start and seen == ["prefill", "step 1", "step 2"]
    assert clock.span() >= 0
    clock.reset()
    with pytest.raises(RuntimeError):
        clock.span()
