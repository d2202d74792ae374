from benchmarks.vision import main
from model.demo import DEMO_CHECKPOINT


def test_vision_benchmark_tiny_cpu(tmp_path):
    doc = tmp_path / "p.md"
    out = main(["--checkpoint", str(DEMO_CHECKPOINT), "--device", "cpu", "--batches", "1", "3", "--repeats", "1",
                "--doc", str(doc)])
    assert [r["batch"] for r in out["rows"]] == [1, 3]
    assert all(r["images_per_s"] > 0 and r["tower_ms"] > 0 and r["connector_ms"] > 0 for r in out["rows"])
    assert "## Image encoding" in doc.read_text() and "| 3 |" in doc.read_text()
