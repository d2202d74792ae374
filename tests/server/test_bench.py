import json

import pytest

from server.cli import main
from server.settings import ServerSettings
from tests.server.live import LiveServer


def test_bench_measures_a_live_server_and_multi_turn_cache(demo, tmp_path, capsys):
    model, proc = demo
    with LiveServer(ServerSettings(max_num_seqs=8), (model, proc, "shapes-demo")) as srv:
        out = tmp_path / "bench.json"
        rc = main(["bench", "--server", srv.url, "--num-requests", "6", "--concurrency", "3", "--max-tokens", "6",
                   "--image-size", "64", "--turns", "3", "--out", str(out), "--quiet"])
        assert rc == 0
        s = json.loads(out.read_text())
        assert s["requests"] == s["succeeded"] == 18 and not s["errors_by_status"]
        assert s["output_tokens_per_s"] > 0 and s["ttft_s"]["p50"] > 0 and s["itl_s"]["p99"] >= s["itl_s"]["p50"]
        assert all(r["output_tokens"] == 6 for r in s["results"])  # ignore_eos: fixed output length
        cached = s["cached_tokens_by_turn"]
        assert cached["0"] == 0 and cached["1"] > 64 and cached["2"] > cached["1"]
        assert "| turn | TTFT p50" in capsys.readouterr().out
        # Poisson arrivals, and errors are counted by status (a wrong key on a keyed server).
        assert main(["bench", "--server", srv.url, "--num-requests", "3", "--request-rate", "20", "--max-tokens", "2",
                     "--image-size", "32", "--quiet"]) == 0
    with LiveServer(ServerSettings(api_key="k"), (model, proc, "m")) as srv:
        out = tmp_path / "err.json"
        assert main(["bench", "--server", srv.url, "--num-requests", "2", "--max-tokens", "2", "--quiet",
                     "--out", str(out)]) == 1
        assert json.loads(out.read_text())["errors_by_status"] == {"401": 2}


def test_bench_shares_the_conversations_among_client_processes(demo, tmp_path):
    """--processes 2 runs the same conversations as one process would, split between two."""
    model, proc = demo
    runs = {}
    with LiveServer(ServerSettings(max_num_seqs=8), (model, proc, "shapes-demo")) as srv:
        for n in (1, 2):
            out = tmp_path / f"p{n}.json"
            assert main(["bench", "--server", srv.url, "--num-requests", "5", "--concurrency", "3", "--max-tokens", "3",
                         "--image-size", "48", "--turns", "2", "--processes", str(n), "--out", str(out),
                         "--quiet"]) == 0
            runs[n] = json.loads(out.read_text())
    one, two = runs[1], runs[2]
    assert two["requests"] == two["succeeded"] == 10 and two["duration_s"] > 0 and two["output_tokens_per_s"] > 0
    # The same prompts (same seeds per conversation), whichever process ran them, in the same order.
    key = lambda s: [(r["conversation"], r["turn"], r["prompt_tokens"]) for r in s["results"]]
    assert key(one) == key(two) and [c for c, _, _ in key(two)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert two["cached_tokens_by_turn"]["1"] > 0  # each conversation's turns ran in order, in one process
    assert two["config"]["processes"] == 2
    # Never more client processes than streams in flight: each one runs at least one.
    with LiveServer(ServerSettings(max_num_seqs=8), (model, proc, "shapes-demo")) as srv:
        out = tmp_path / "p.json"
        assert main(["bench", "--server", srv.url, "--num-requests", "4", "--concurrency", "2", "--max-tokens", "2",
                     "--image-size", "32", "--processes", "4", "--out", str(out), "--quiet"]) == 0
        assert json.loads(out.read_text())["config"]["processes"] == 2
    # A client process that fails reports why (a port no socket takes fails before any request).
    with pytest.raises(RuntimeError, match="a client process failed"):
        main(["bench", "--server", "http://127.0.0.1:99999", "--num-requests", "2", "--processes", "2", "--quiet",
              "--image-size", "16", "--max-tokens", "1"])


def test_bench_counts_connection_failures_and_finishes_the_run(tmp_path, capsys):
    # Refused connections are errors of the run, not the end of it: every request is tried.
    out = tmp_path / "refused.json"
    assert main(["bench", "--server", "http://127.0.0.1:1", "--num-requests", "3", "--concurrency", "1", "--quiet",
                 "--image-size", "16", "--max-tokens", "1", "--out", str(out)]) == 1
    summary = json.loads(out.read_text())
    assert summary["requests"] == 3 and summary["succeeded"] == 0 and summary["errors_by_status"] == {"connection": 3}
    assert "errors {'connection': 3}" in capsys.readouterr().out
