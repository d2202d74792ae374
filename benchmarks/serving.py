"""Serving throughput and latency: the HTTP server against the engine's own offline throughput.

1. ``vlmamba serve`` starts in its own process (random weights at the preset's shape by default)
   and ``vlmamba bench``'s client (server/bench.py) drives it over HTTP: at each concurrency level,
   streaming requests of one image and a short text, ``--max-tokens`` output tokens (ignore_eos,
   greedy), that many requests in flight (closed loop). Then ``--conversations`` conversations of
   ``--turns`` turns each, all in flight, for TTFT per turn index (the session state cache should
   keep it flat). The server is then stopped, so its GPU memory is free.
2. The same model is loaded in this process and an :class:`server.engine.Engine` with the same
   settings runs the same requests: the server's prompts, tokenized and preprocessed ahead of
   time, the same images (and image digests), the same concurrency, closed loop.

server/offline = server output tok/s / offline output tok/s: what HTTP, image decoding,
tokenizing and streaming cost (target >= 0.85). Every level is warmed up with requests of other
prompts first, so no measured prompt is ever served from the state cache.

    python -m benchmarks.serving                 # the 2.8B preset on cuda: JSON + docs/performance.md
    python -m benchmarks.serving --checkpoint model/checkpoints/shapes-demo --no-random-weights --device cpu \\
        --concurrency 1 2 --num-requests 4 --max-tokens 4 --turns 3 --conversations 2 --image-size 64
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from benchmarks.common import PRESET, machine, markdown_table, write_json, write_section
from server.engine.engine import Observer

ROOT = Path(__file__).resolve().parents[1]
TTFT_TARGET_MS = 80.0
RATIO_TARGET = 0.85


# ---- the server, in its own process -------------------------------------------------------------
class ServerError(RuntimeError):
    pass


class ServerProcess:
    """``vlmamba serve`` as a subprocess on a free loopback port; stopped (and reaped) on exit."""

    def __init__(self, args, max_num_seqs: int):
        self.args, self.max_num_seqs = args, max_num_seqs
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(args.server_log or _temp_log())
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def command(self) -> list[str]:
        a = self.args
        cmd = [sys.executable, "-m", "server.cli", "--log-level", a.server_log_level, "serve",
               "--checkpoint", str(Path(a.checkpoint).resolve()), "--device", a.device, "--dtype", a.dtype,
               "--backend", a.backend, "--host", "127.0.0.1", "--port", str(self.port),
               "--max-num-seqs", str(self.max_num_seqs), "--max-prefill-seqs", str(a.max_prefill_seqs),
               "--state-cache-gb", str(a.state_cache_gb), "--max-queue", str(max(256, 2 * self.max_num_seqs)),
               "--max-model-len", str(a.max_model_len), "--grace-period", "5", "--no-webui"]
        return cmd + ["--random-weights"] * a.random_weights + ["--no-cuda-graphs"] * a.no_cuda_graphs + [
            "--prefill-graph-tokens", str(a.prefill_graph_tokens)]

    def __enter__(self) -> "ServerProcess":
        # The benchmark fixes the whole configuration: no VLMAMBA_* setting leaks in from outside.
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLMAMBA_")} | {"PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.args.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"the server exited with code {self.proc.returncode} while starting "
                                  f"(log: {self.log_path})\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ServerError(f"the server was not healthy after {self.args.startup_timeout:.0f} s "
                          f"(log: {self.log_path})\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM (the server drains, then exits), SIGKILL if it has not exited in time."""
        if self.proc is None or self.proc.poll() is not None:
            self.returncode = None if self.proc is None else self.proc.returncode
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=60)
        self.returncode = self.proc.returncode

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        if exc_type is not None:  # e.g. the server died mid-run: its log says why
            print(f"server log: {self.log_path}\n{self.log_tail()}", file=sys.stderr)
        elif not self.args.server_log:
            self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no server log)"
        return "--- server log (last lines) ---\n" + "\n".join(text)


def _temp_log() -> str:
    fd, path = tempfile.mkstemp(prefix="vlmamba-serving-", suffix=".log")
    os.close(fd)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- load through server/bench.py's client ------------------------------------------------------
def bench_args(args, url: str, seed: int, num_requests: int, concurrency: int, turns: int = 1):
    """The namespace ``vlmamba bench`` would parse, with this run's values."""
    from server.bench import add_bench_parser

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    b = parser.parse_args(["bench"])
    vars(b).update(server=url, seed=seed, num_requests=num_requests, concurrency=concurrency, turns=turns,
                   max_tokens=args.max_tokens, image_size=args.image_size, prompt_words=args.prompt_words,
                   images_per_request=1, ignore_eos=True, timeout=args.request_timeout, quiet=args.quiet,
                   processes=-(-concurrency // args.streams_per_client))
    return b


def drive(bargs, on_start=None) -> tuple[list, dict]:
    """Run ``vlmamba bench``'s client; the summary gets ``client_cpu``: cores its processes used.
    ``on_start()``: called as the clients start."""
    from server.bench import run_clients, summarize

    results, duration, cpu = run_clients(bargs, on_start)
    summary = summarize(results, duration, bargs)
    summary.pop("config")
    summary["client_cpu"] = cpu / duration
    return results, summary


def _seed(args, phase: int, level: int) -> int:
    """Distinct prompts per phase (0 measured, 1 warm-up, 2 multi-turn) and level: no cross-run cache hits."""
    return args.seed * 1000 + phase * 100 + level


# The server's histograms (sum and count) that split the client's TTFT.
SPLIT = {f"vlmamba_{name}_seconds_{part}" for name in ("request_prepare", "time_to_first_token")
         for part in ("sum", "count")}
# And those that say how the engine batched the prefills, and how long images took to fetch.
BATCHING = {f"vlmamba_{name}_{part}" for name in ("prefill_batch_size", "prefill_batch_tokens", "image_fetch_seconds")
            for part in ("sum", "count")}


def server_histograms(url: str) -> dict[str, float]:
    """The server's request-preparation and TTFT histogram sums and counts, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name in SPLIT | BATCHING}


def batching(before: dict, after: dict) -> dict:
    """Prefills over a level, from the server's histograms: ``prefills``, the mean sequences and
    tokens per prefill, and the mean time to fetch (and decode and resize) an image."""
    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0)
    n, images = delta("vlmamba_prefill_batch_size_count"), delta("vlmamba_image_fetch_seconds_count")
    return {"prefills": int(n), "seqs_per_prefill": delta("vlmamba_prefill_batch_size_sum") / n if n else None,
            "tokens_per_prefill": delta("vlmamba_prefill_batch_tokens_sum") / n if n else None,
            "image_fetch_ms": 1000 * delta("vlmamba_image_fetch_seconds_sum") / images if images else None}


def ttft_split(before: dict, after: dict, client: dict) -> dict | None:
    """Where the client's mean TTFT went, from the server's histograms over the same requests and
    the client's own times (``client``: its summary): ``prepare_ms`` (handler start to the
    engine: image decoding, template, tokenizing, preprocessing), ``engine_ms`` (hand-off to the
    first token, in the engine process: the trip there, queueing and the prefill) and the rest,
    ``rest_ms``, in two: ``before_ms``, the client's time to the response headers (sent once the
    handler has handed the request over) less ``prepare_ms`` (the request's way in and its
    parsing, and the headers' way out), and ``after_ms``, the time from the headers to the first
    token seen less ``engine_ms`` (the first token's way out, less the headers'; it can be
    slightly negative)."""
    mean = lambda name: ((after[f"{name}_sum"] - before[f"{name}_sum"])
                         / max(after[f"{name}_count"] - before[f"{name}_count"], 1))
    ttft, headers = client["ttft_s"]["mean"], client["headers_s"]["mean"]
    if ttft is None or headers is None or not SPLIT <= set(after):
        return None
    prepare, engine = mean("vlmamba_request_prepare_seconds"), mean("vlmamba_time_to_first_token_seconds")
    return {"prepare_ms": 1000 * prepare, "engine_ms": 1000 * engine, "rest_ms": 1000 * (ttft - prepare - engine),
            "before_ms": 1000 * (headers - prepare), "after_ms": 1000 * (ttft - headers - engine)}


def thread_cpu(pid: int) -> dict[tuple[int, int], tuple[str, float]]:
    """CPU seconds (user + system) of every thread of the processes below ``pid`` (the server and
    the engine process; the clients count their own), by (process id, thread id) -> ("process
    name/thread name", seconds), from /proc (Linux; {} elsewhere)."""
    tick, out = os.sysconf("SC_CLK_TCK"), {}
    for proc in _descendants(pid):
        st = _stat(f"/proc/{proc}/stat")
        for task in _listdir(f"/proc/{proc}/task") if st else []:
            tst = _stat(f"/proc/{proc}/task/{task}/stat")
            if tst:
                out[(proc, int(task))] = (f"{st[0]}/{tst[0]}", (tst[1] + tst[2]) / tick)
    return out


def _descendants(pid: int) -> list[int]:
    parent = {}
    for entry in _listdir("/proc"):
        st = _stat(f"/proc/{entry}/stat") if entry.isdigit() else None
        if st:
            parent[int(entry)] = st[3]
    found, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _stat(path: str) -> tuple[str, int, int, int] | None:
    """(name, utime, stime, parent pid) from a /proc stat file, or None if it is gone."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    name, rest = text[text.index("(") + 1: text.rindex(")")], text[text.rindex(")") + 2:].split()
    return name, int(rest[11]), int(rest[12]), int(rest[1])


def cpu_use(before: dict, after: dict, seconds: float, top: int = 4) -> dict:
    """The busiest threads over an interval (share of one core each) and the processes' totals."""
    used = {k: (name, after[k][1] - before.get(k, (name, 0.0))[1]) for k, (name, _) in after.items()}
    busiest = sorted(used.values(), key=lambda v: -v[1])[:top]
    per_proc: dict[str, float] = {}
    for (proc, _), (name, sec) in used.items():
        key = f"{name.split('/')[0]} ({proc})"
        per_proc[key] = per_proc.get(key, 0.0) + sec
    return {"busiest_threads": [[name, round(sec / seconds, 3)] for name, sec in busiest],
            "processes": {k: round(sec / seconds, 3) for k, sec in per_proc.items()}}


def serve_levels(args, url: str, levels: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for i, (c, n) in enumerate(levels):
        drive(bench_args(args, url, _seed(args, 1, i), c, c))
        bargs = bench_args(args, url, _seed(args, 0, i), n, c)
        before, start = server_histograms(url), {}
        results, s = drive(bargs, lambda: start.update(cpu=thread_cpu(os.getpid()), t=time.monotonic()))
        if start["cpu"]:  # the server process and the engine process; the client processes count their own
            s["cpu"] = cpu_use(start["cpu"], thread_cpu(os.getpid()), time.monotonic() - start["t"])
            s["cpu"]["processes"][f"client ({bargs.processes} processes)"] = round(s.pop("client_cpu"), 3)
        after = server_histograms(url)
        s["ttft_split"], s["batching"] = ttft_split(before, after, s), batching(before, after)
        ok = [r for r in results if r.status == 200]
        s["prompt_tokens"] = [r.prompt_tokens for r in results]
        s["cached_tokens_mean"] = sum(r.cached_tokens for r in ok) / max(len(ok), 1)
        for k in ("ttft_by_turn_s", "cached_tokens_by_turn"):
            s.pop(k)
        rows.append({"concurrency": c, "requests": n, "server": s})
        print(f"server c={c}: {s['output_tokens_per_s']:.1f} output tok/s, TTFT p50 "
              f"{_ms(s['ttft_s']['p50'])} ms, {s['succeeded']}/{s['requests']} ok", flush=True)
        if not ok:  # a throughput of failures measures nothing: stop with the cause in the server log
            raise ServerError(f"every request at concurrency {c} failed: {s['errors_by_status']}")
    return rows


def serve_multi_turn(args, url: str) -> dict:
    c = args.conversations
    results, s = drive(bench_args(args, url, _seed(args, 2, 0), c, c, args.turns))
    ok = [r for r in results if r.status == 200]
    per_turn = lambda t, f: [f(r) for r in ok if r.turn == t]
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    return {"conversations": c, "turns": args.turns, "succeeded": s["succeeded"], "requests": s["requests"],
            "errors_by_status": s["errors_by_status"],
            "ttft_by_turn_s": [s["ttft_by_turn_s"][str(t)] for t in range(args.turns)],
            "prompt_tokens_by_turn": [mean(per_turn(t, lambda r: r.prompt_tokens)) for t in range(args.turns)],
            "cached_tokens_by_turn": [mean(per_turn(t, lambda r: r.cached_tokens)) for t in range(args.turns)]}


# ---- the same requests through the engine, in-process ------------------------------------------
def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def workload(args, encode, seed: int, n: int) -> list[tuple[list[int], list]]:
    """The server's requests of ``vlmamba bench --seed seed``, encoded as the server encodes them."""
    import random

    from server.bench import conversation_images, user_turn

    bargs = bench_args(args, "", seed, n, 1)
    out = []
    for idx in range(n):  # as server/bench.py's ``conversation`` builds its first turn
        rng = random.Random(seed * 100003 + idx)
        message = user_turn(bargs, rng, conversation_images(bargs, idx))
        out.append(encode_message(encode, message))
    return out


def encode_message(encode, message: dict):
    """An OpenAI user message with data-URL images -> (prompt ids, [ImageInput]), via the server's code."""
    from server.images import ImageLimits, decode_image

    parts, images = [], []
    for p in message["content"]:
        if p["type"] == "text":
            parts.append({"type": "text", "text": p["text"]})
        else:
            parts.append({"type": "image"})
            payload = p["image_url"]["url"].partition(",")[2]
            images.append(decode_image(base64.b64decode(payload), ImageLimits(), "image"))
    return encode([{"role": message["role"], "content": parts}], images)


class PrefillCounter(Observer):
    """The offline engine's observer: its prefills, for the same figures as the server's histograms."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.prefills = self.seqs = self.tokens = 0

    def summary(self) -> dict:
        n = self.prefills
        return {"prefills": n, "seqs_per_prefill": self.seqs / n if n else None,
                "tokens_per_prefill": self.tokens / n if n else None}

    def on_prefill(self, batch_size: int, tokens: int) -> None:
        self.prefills, self.seqs, self.tokens = self.prefills + 1, self.seqs + batch_size, self.tokens + tokens


def closed_loop(engine, prompts: list, concurrency: int, args, tag: str) -> dict:
    """Keep ``concurrency`` requests in the engine, submitting the next when one finishes."""
    from model.sampling import SamplingParams
    from server.bench import _pcts
    from server.engine import EngineRequest

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    lock, done, reqs, outs = threading.Lock(), threading.Event(), [], []
    bar = tqdm(total=len(prompts), desc=f"offline c={concurrency}", disable=args.quiet)

    def submit() -> None:  # called with the lock held
        ids, images = prompts[len(reqs)]
        reqs.append(EngineRequest(f"{tag}-{len(reqs)}", ids, images, params, sink))
        engine.add_request(reqs[-1])

    def sink(out) -> None:  # the engine thread
        if not out.finished:
            return
        with lock:
            outs.append((time.monotonic(), out))
            bar.update(1)
            if len(reqs) < len(prompts):
                submit()
            elif len(outs) == len(prompts):
                done.set()

    t0 = time.monotonic()
    with lock:
        for _ in range(min(concurrency, len(prompts))):
            submit()
    if not done.wait(timeout=args.level_timeout):
        raise RuntimeError(f"the engine did not finish {len(prompts)} requests in {args.level_timeout:.0f} s")
    bar.close()
    failed = [o.error for _, o in outs if o.error]
    if failed:
        raise RuntimeError(f"{len(failed)} offline requests failed: {failed[0]}")
    duration = max(t for t, _ in outs) - t0
    tokens = sum(o.completion_tokens for _, o in outs)
    return {"requests": len(outs), "duration_s": duration, "request_throughput": len(outs) / duration,
            "output_tokens_per_s": tokens / duration, "output_tokens": tokens,
            "ttft_s": _pcts([r.first_token_time - r.arrival for r in reqs]),
            "cached_tokens_mean": sum(o.cached_tokens for _, o in outs) / len(outs)}


def offline_levels(args, levels: list[tuple[int, int]], max_num_seqs: int) -> list[dict]:
    from model.checkpoint_vlm import load_vlmamba
    from server.engine import Engine, EngineConfig
    from server.serving import ChatService, prepare_image

    model, proc = load_vlmamba(args.checkpoint, device=args.device, dtype=torch_dtype(args.dtype, args.device),
                               backend=args.backend, random_weights=args.random_weights)
    service = ChatService(None, proc, None, None, None, "")

    def encode(messages, images):  # the server's preprocessing and tokenizing
        return service._encode(messages, [prepare_image(proc, im) for im in images])

    cfg = EngineConfig(max_num_seqs, args.max_prefill_seqs, int(args.state_cache_gb * 2**30),
                       cuda_graphs=not args.no_cuda_graphs, prefill_graph_tokens=args.prefill_graph_tokens)
    counter = PrefillCounter()
    engine = Engine(model, proc, cfg, observer=counter)
    engine.start()
    rows = []
    try:
        for i, (c, n) in enumerate(levels):
            closed_loop(engine, workload(args, encode, _seed(args, 1, i), c), c, args, f"warm{i}")
            prompts = workload(args, encode, _seed(args, 0, i), n)
            counter.reset()
            row = closed_loop(engine, prompts, c, args, f"level{i}")
            rows.append(row | {"prompt_tokens": [len(ids) for ids, _ in prompts], "batching": counter.summary()})
            print(f"offline c={c}: {rows[-1]['output_tokens_per_s']:.1f} output tok/s", flush=True)
    finally:
        engine.shutdown()
    return rows


def combine(levels: list[dict], offline: list[dict]) -> None:
    """Attach the offline numbers and the ratio to each level; the prompts must be the server's."""
    for row, off in zip(levels, offline):
        server_lengths, offline_lengths = row["server"].pop("prompt_tokens"), off.pop("prompt_tokens")
        if row["server"]["succeeded"] == row["requests"] and server_lengths != offline_lengths:
            raise RuntimeError(f"concurrency {row['concurrency']}: the offline prompts differ from the server's "
                               f"({offline_lengths[:4]} vs {server_lengths[:4]} tokens)")
        row["prompt_tokens_mean"] = sum(offline_lengths) / len(offline_lengths)
        row["offline"] = off
        row["ratio"] = row["server"]["output_tokens_per_s"] / off["output_tokens_per_s"]


# ---- report -------------------------------------------------------------------------------------
def _ms(v) -> str:
    return "–" if v is None else f"{1000 * v:.1f}"


def report(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    weights = f"random {result['dtype']} weights" if cfg["random_weights"] else f"{result['dtype']} weights"
    text = [f"Machine: {m.get('gpu') or 'CPU'} ({m['cpu_count']} CPU cores), torch {m['torch']}, {m['date']}. "
            f"Model: `{Path(cfg['checkpoint']).name}`, {weights}. Each request: one {cfg['image_size']} px PNG "
            f"and {cfg['prompt_words']} words ({result['levels'][0]['prompt_tokens_mean']:.0f} prompt tokens), "
            f"{cfg['max_tokens']} output tokens (ignore_eos, greedy), streamed. Engine: {result['max_num_seqs']} "
            f"state slots, {cfg['max_prefill_seqs']} prefills per step, "
            f"{'CUDA-graph' if cfg['device'].startswith('cuda') and not cfg['no_cuda_graphs'] else 'eager'} decode. "
            f"Command: `{result['command']}`.", "",
            "Server: `vlmamba serve` in its own process, driven over HTTP by `vlmamba bench`'s client, "
            f"`concurrency` requests in flight, in ceil(concurrency / {cfg['streams_per_client']}) client processes. Offline: the same engine in-process with the same prompts, "
            "tokenized and preprocessed ahead of time, same concurrency. TTFT and ITL are the server's, seen "
            "by the client.", ""]
    header = ["concurrency", "requests", "server req/s", "server output tok/s", "offline output tok/s",
              "server/offline", "TTFT p50 / p90 / p99 (ms)", "ITL p50 (ms)"]
    rows = [[r["concurrency"], r["requests"], r["server"]["request_throughput"], r["server"]["output_tokens_per_s"],
             r["offline"]["output_tokens_per_s"], f"{r['ratio']:.2f}",
             " / ".join(_ms(r["server"]["ttft_s"][q]) for q in ("p50", "p90", "p99")),
             _ms(r["server"]["itl_s"]["p50"])] for r in result["levels"]]
    text.append(markdown_table(header, rows))
    split = [r for r in result["levels"] if r["server"].get("ttft_split")]
    if split:
        text += ["", "Where the server's mean TTFT goes (the server's own histograms over the measured requests): "
                 "prepare = handler start to the engine (image decoding, chat template, tokenizing, preprocessing); "
                 "engine = from there to the first token in the engine process (the trip there, queueing, the "
                 "prefill); way in = the client's time to the response headers less prepare (the headers' way "
                 "back included); way back = the rest, from the first token in the engine to the client (the "
                 "headers' way back taken off). Offline: the engine's mean TTFT "
                 "in-process.", "",
                 markdown_table(["concurrency", "client TTFT mean (ms)", "way in (ms)", "prepare (ms)", "engine (ms)",
                                 "way back (ms)", "offline TTFT mean (ms)"],
                                [[r["concurrency"], _ms(r["server"]["ttft_s"]["mean"])]
                                 + [f"{r['server']['ttft_split'][k]:.1f}"
                                    for k in ("before_ms", "prepare_ms", "engine_ms", "after_ms")]
                                 + [_ms(r["offline"]["ttft_s"]["mean"])] for r in split])]
    batched = [r for r in result["levels"] if r["server"].get("batching") and r["offline"].get("batching")]
    if batched:
        f = lambda v, fmt: "–" if v is None else format(v, fmt)
        text += ["", "How the prefills were batched (the server's histograms; the offline engine's own count) and "
                 "the server's mean time to fetch, decode and resize an image:", "",
                 markdown_table(["concurrency", "prefills, server / offline", "sequences per prefill",
                                 "tokens per prefill", "image fetch (ms)"],
                                [[r["concurrency"],
                                  f"{r['server']['batching']['prefills']} / {r['offline']['batching']['prefills']}",
                                  " / ".join(f(b["seqs_per_prefill"], ".2f")
                                             for b in (r["server"]["batching"], r["offline"]["batching"])),
                                  " / ".join(f(b["tokens_per_prefill"], ".0f")
                                             for b in (r["server"]["batching"], r["offline"]["batching"])),
                                  f(r["server"]["batching"]["image_fetch_ms"], ".1f")] for r in batched])]
    cpu = [r for r in result["levels"] if r["server"].get("cpu")]
    if cpu:
        text += ["", "CPU while each level ran, in cores (/proc; the client processes count their own): each "
                 "process (`client`: the benchmark's HTTP client), then the server's busiest threads (`vlmamba-serve/vlmamba-serve` is the server's event "
                 "loop, `vlmamba-engine/engine` the engine loop)."]
        text += ["", markdown_table(["concurrency", "processes", "busiest threads"], [
            [r["concurrency"], ", ".join(f"{k} {v:.2f}" for k, v in r["server"]["cpu"]["processes"].items()),
             ", ".join(f"{n} {v:.2f}" for n, v in r["server"]["cpu"]["busiest_threads"])] for r in cpu])]
    text += ["", verdicts(result)]
    if result.get("multi_turn"):
        text += ["", multi_turn_table(result["multi_turn"])]
    return "\n".join(text)


def verdicts(result: dict) -> str:
    lines = []
    t = result["ttft_one_request_ms"]
    if t is not None:
        lines.append(f"TTFT at one request (concurrency 1, p50): **{t:.1f} ms** — target ≤ {TTFT_TARGET_MS:.0f} ms: "
                     f"{'met' if t <= TTFT_TARGET_MS else 'missed'}.")
    met = [str(r["concurrency"]) for r in result["levels"] if r["ratio"] >= RATIO_TARGET]
    missed = [str(r["concurrency"]) for r in result["levels"] if r["ratio"] < RATIO_TARGET]
    status = "met at every level" if not missed else f"missed at concurrency {', '.join(missed)}" + (
        f", met at {', '.join(met)}" if met else "")
    lines.append(f"Server/offline output throughput, target ≥ {RATIO_TARGET:.2f}: {status}.")
    errors = {r["concurrency"]: r["server"]["errors_by_status"] for r in result["levels"]
              if r["server"]["errors_by_status"]}
    if errors:
        lines.append(f"Failed server requests by concurrency and status: {errors}.")
    return "\n".join(lines)


def multi_turn_table(mt: dict) -> str:
    head = (f"### TTFT per turn\n\n{mt['conversations']} conversations of {mt['turns']} turns, all in flight; each "
            f"turn resends the whole history (the image in turn 0), with a session id. Cached tokens: prompt "
            f"tokens the session state cache resumed from ({mt['succeeded']}/{mt['requests']} requests ok).\n")
    rows = [[t, _ms(p["p50"]), _ms(p["p90"]), mt["prompt_tokens_by_turn"][t], mt["cached_tokens_by_turn"][t]]
            for t, p in enumerate(mt["ttft_by_turn_s"])]
    return head + "\n" + markdown_table(["turn", "TTFT p50 (ms)", "TTFT p90 (ms)", "prompt tokens (mean)",
                                         "cached tokens (mean)"], rows)


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(PRESET), help="checkpoint or preset directory (default: the "
                    "Mamba-2.8B + SigLIP-SO400M preset, model/configs/vlmamba-2.8b-so400m)")
    ap.add_argument("--random-weights", action=argparse.BooleanOptionalAction, default=True,
                    help="initialise randomly from config.json (default: on; the preset has no weights)")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    ap.add_argument("--backend", default="auto", help="kernel backend: auto, cuda, triton, ref")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly, in the server and offline")
    ap.add_argument("--prefill-graph-tokens", type=int, default=2048, help="largest prefill (padded tokens) "
                                                                            "replayed from a CUDA graph; 0: eager")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="requests in flight, per level")
    ap.add_argument("--num-requests", type=int, help="requests per level (default: max(8, 4 x concurrency))")
    ap.add_argument("--prompt-words", type=int, default=16, help="words of text per request")
    ap.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (ignore_eos)")
    ap.add_argument("--image-size", type=int, default=384, help="image side in pixels")
    ap.add_argument("--turns", type=int, default=10, help="turns per conversation in the multi-turn run (0: skip)")
    ap.add_argument("--conversations", type=int, default=8, help="conversations of the multi-turn run, all in flight")
    ap.add_argument("--streams-per-client", type=int, default=8, help="streams per client process: a level of "
                    "concurrency c runs ceil(c / this) client processes, so the client keeps up with the server")
    ap.add_argument("--max-prefill-seqs", type=int, default=8, help="new sequences prefilled together per step")
    ap.add_argument("--state-cache-gb", type=float, default=1.0, help="session state cache, GiB")
    ap.add_argument("--max-model-len", type=int, default=16384, help="the server's prompt + completion limit "
                    "(long conversations stay under it)")
    ap.add_argument("--seed", type=int, default=0, help="seed of prompts")
    ap.add_argument("--startup-timeout", type=float, default=900, help="seconds for the server to become healthy")
    ap.add_argument("--request-timeout", type=float, default=600, help="seconds per server request")
    ap.add_argument("--level-timeout", type=float, default=1800, help="seconds per offline level")
    ap.add_argument("--server-log", help="keep the server's log here (default: a temporary file, kept on failure)")
    ap.add_argument("--server-log-level", default="INFO", help="the server's --log-level")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--out", help="JSON file")
    ap.add_argument("--doc", help="markdown file for the section (default docs/performance.md on CUDA, none on CPU; "
                                  "'' for none)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    levels = [(c, args.num_requests or max(8, 4 * c)) for c in args.concurrency]
    max_num_seqs = max(args.concurrency + [args.conversations if args.turns else 1])
    result = {"benchmark": "serving", "command": "python -m benchmarks.serving " + " ".join(argv),
              "config": vars(args).copy(), "max_num_seqs": max_num_seqs,
              "dtype": str(torch_dtype(args.dtype, args.device)).removeprefix("torch."),
              "ttft_target_ms": TTFT_TARGET_MS, "ratio_target": RATIO_TARGET}
    with ServerProcess(args, max_num_seqs) as server:
        result["levels"] = serve_levels(args, server.url, levels)
        result["multi_turn"] = serve_multi_turn(args, server.url) if args.turns and args.conversations else None
    result["server_exit_code"] = server.returncode
    combine(result["levels"], offline_levels(args, levels, max_num_seqs))
    one = [r for r in result["levels"] if r["concurrency"] == 1]
    p50 = one[0]["server"]["ttft_s"]["p50"] if one else None
    result["ttft_one_request_ms"] = None if p50 is None else 1000 * p50
    result["machine"] = machine(args.device)
    result["table"] = report(result)
    write_json(result, args.out)
    doc = args.doc if args.doc is not None else ("docs/performance.md" if args.device.startswith("cuda") else None)
    write_section("serving", "## Serving: HTTP server against the offline engine\n\n" + result["table"], doc or None)
    return result


if __name__ == "__main__":
    # A SIGTERM (e.g. a job's time limit) unwinds like Ctrl-C, so the server process is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
