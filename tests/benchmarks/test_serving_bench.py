"""The serving benchmark runs end to end on the CPU with the demo model: a real server process,
the offline engine on the same requests, and its section in the performance doc."""

import json
import sys

import pytest

from benchmarks.serving import ServerError, main

DEMO = ["--checkpoint", "model/checkpoints/shapes-demo", "--no-random-weights", "--device", "cpu", "--quiet"]


def test_serving_benchmark_demo_model_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server process: one thread, as the test process
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nintro stays\n\n<!-- decode:start -->\ndecode table\n<!-- decode:end -->\n")
    out = main(DEMO + ["--concurrency", "1", "2", "--num-requests", "4", "--max-tokens", "4", "--turns", "3",
                       "--conversations", "2", "--image-size", "64", "--doc", str(doc),
                       "--out", str(tmp_path / "r.json")])
    levels = out["levels"]
    assert [(r["concurrency"], r["requests"]) for r in levels] == [(1, 4), (2, 4)]
    for r in levels:
        s, off = r["server"], r["offline"]
        print(r["concurrency"], s["output_tokens_per_s"], off["output_tokens_per_s"], r["ratio"])
        assert s["succeeded"] == s["requests"] == 4 and not s["errors_by_status"]
        assert s["output_tokens_per_s"] > 0 and off["output_tokens_per_s"] > 0 and r["ratio"] > 0
        assert off["requests"] == 4 and off["output_tokens"] == 4 * 4  # ignore_eos: max_tokens each
        assert s["ttft_s"]["p50"] > 0 and s["itl_s"]["p99"] >= s["itl_s"]["p50"] > 0 and off["ttft_s"]["p50"] > 0
        # Warm-up used other prompts: nothing measured came from the state cache, on either side.
        assert s["cached_tokens_mean"] == off["cached_tokens_mean"] == 0
        assert r["prompt_tokens_mean"] > 64  # the image's visual tokens and the text
        # The server's histograms split the client's TTFT into nested parts: all of them positive.
        split = s["ttft_split"]
        assert split["prepare_ms"] > 0 and split["engine_ms"] > 0 and split["rest_ms"] > 0
        assert split["before_ms"] > 0  # the way back ("after") is less the headers' own, so it may dip below 0
        assert split["before_ms"] + split["after_ms"] == pytest.approx(split["rest_ms"])
        assert split["prepare_ms"] + split["engine_ms"] < 1000 * s["ttft_s"]["mean"]
        # Both sides prefilled every measured request once, whole (nothing cached), in batches.
        for b in (s["batching"], off["batching"]):
            assert 1 <= b["prefills"] <= 4 and b["seqs_per_prefill"] * b["prefills"] == pytest.approx(4)
            assert b["tokens_per_prefill"] * b["prefills"] == pytest.approx(4 * r["prompt_tokens_mean"])
        assert s["batching"]["image_fetch_ms"] > 0
        if sys.platform.startswith("linux"):  # CPU by process and thread, from /proc, under the OS names
            procs = {k.split(" (")[0]: v for k, v in s["cpu"]["processes"].items()}
            assert {"client", "vlmamba-serve", "vlmamba-engine"} <= set(procs) and procs["vlmamba-engine"] > 0
            assert 0 < procs["client"] < 2
            assert s["cpu"]["busiest_threads"][0][1] > 0
            assert any(name == "vlmamba-engine/engine" for name, _ in s["cpu"]["busiest_threads"])
    assert out["ttft_one_request_ms"] == pytest.approx(1000 * levels[0]["server"]["ttft_s"]["p50"])
    assert out["server_exit_code"] is not None  # the server process was stopped before the offline part

    mt = out["multi_turn"]
    assert mt["succeeded"] == mt["requests"] == 6
    assert len(mt["ttft_by_turn_s"]) == 3 and all(t["p50"] > 0 for t in mt["ttft_by_turn_s"])
    cached, prompt = mt["cached_tokens_by_turn"], mt["prompt_tokens_by_turn"]
    assert cached[0] == 0 and 0 < cached[1] < cached[2] and cached[2] < prompt[2]

    assert json.loads((tmp_path / "r.json").read_text())["levels"][1]["ratio"] == levels[1]["ratio"]
    text = doc.read_text()
    assert "intro stays" in text and "<!-- decode:start -->\ndecode table\n<!-- decode:end -->" in text
    section = text[text.index("<!-- serving:start -->"):text.index("<!-- serving:end -->")]
    assert "| concurrency | requests | server req/s" in section and "\n| 2 | 4 |" in section
    assert "TTFT at one request (concurrency 1, p50)" in section and "target ≤ 80 ms" in section
    assert "| concurrency | client TTFT mean (ms) | way in (ms) | prepare (ms) | engine (ms) | way back (ms)" in section
    assert "| concurrency | processes | busiest threads |" in section
    assert "| concurrency | prefills, server / offline | sequences per prefill |" in section
    assert "| turn | TTFT p50 (ms)" in section and "\n| 2 |" in section.split("### TTFT per turn")[1]


def test_a_server_that_fails_to_start_is_reported_with_its_log(tmp_path):
    log = tmp_path / "server.log"
    with pytest.raises(ServerError, match="exited with code") as err:
        main(DEMO[:1] + [str(tmp_path / "missing")] + DEMO[2:] + ["--concurrency", "1", "--doc", "",
                                                                  "--server-log", str(log)])
    assert "server log" in str(err.value) and log.read_text()
