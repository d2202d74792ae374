import json

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
