"""``vlmamba bench``: a load generator for any OpenAI-compatible vision-language server.

Streams every request and measures time to first token (TTFT), inter-token latency (ITL, the
gaps between streamed chunks), end-to-end latency, request and output-token throughput, and
errors by status. ``--turns N`` runs N-turn conversations (each turn resends the history, as
OpenAI clients do) and reports TTFT per turn index: with a session state cache it stays flat.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx
from tqdm import tqdm

WORDS = "what color is the circle square triangle where how many shapes are there describe image".split()


@dataclass
class Result:
    turn: int
    status: int
    ttft: float | None = None
    headers: float | None = None  # seconds to the response's status and headers (the handler has returned)
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""
    conversation: int = 0  # its index among the run's conversations


@functools.lru_cache(maxsize=512)  # deterministic; callers may build them ahead of a timed run
def make_image_url(size: int, seed: int) -> str:
    from model.data.shapes import make_sample

    buf = io.BytesIO()
    make_sample("test", seed).image().resize((size, size)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user_turn(args, rng: random.Random, images: list[str]) -> dict:
    text = " ".join(rng.choice(WORDS) for _ in range(args.prompt_words)) + "?"
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


async def one_request(client: httpx.AsyncClient, args, messages: list, turn: int, session: str) -> Result:
    body = {"model": args.model, "messages": messages, "stream": True, "max_tokens": args.max_tokens,
            "temperature": 0, "ignore_eos": args.ignore_eos, "stream_options": {"include_usage": True},
            "session_id": session}
    t0 = time.perf_counter()
    res = Result(turn, 0)
    try:
        return await _stream(client, body, res, t0)
    except httpx.TransportError:  # refused, reset, cut off mid-stream: counted, and the run goes on
        res.status, res.e2e = 0, time.perf_counter() - t0
        return res


async def _stream(client: httpx.AsyncClient, body: dict, res: Result, t0: float) -> Result:
    last, chunks = None, []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        res.status, res.headers = r.status_code, time.perf_counter() - t0
        if r.status_code != 200:
            await r.aread()
            return res
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            delta = (event.get("choices") or [{}])[0].get("delta", {}).get("content")
            if delta:
                now = time.perf_counter()
                res.ttft = res.ttft if res.ttft is not None else now - t0
                if last is not None:
                    res.itl.append(now - last)
                last = now
                chunks.append(delta)
            if event.get("usage"):
                u = event["usage"]
                res.output_tokens, res.prompt_tokens = u["completion_tokens"], u["prompt_tokens"]
                res.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            if "error" in event:
                res.status = 500
    res.e2e, res.text = time.perf_counter() - t0, "".join(chunks)
    return res


def conversation_images(args, idx: int) -> list[str]:
    """The data URLs of conversation ``idx``'s images (its first turn), the same in every run."""
    return [make_image_url(args.image_size, idx * 7 + k) for k in range(args.images_per_request)]


def _encode_images(args, share: tuple[int, int]) -> None:
    """Encode the PNGs of a client's share of the conversations ahead of its run (they are cached)."""
    for i in range(share[0], args.num_requests, share[1]):
        conversation_images(args, i)


async def conversation(client, args, idx: int, bar) -> list[Result]:
    rng = random.Random(args.seed * 100003 + idx)
    images = conversation_images(args, idx)
    messages, out, session = [], [], f"bench-{args.seed}-{idx}"
    for turn in range(args.turns):
        messages.append(user_turn(args, rng, images if turn == 0 else []))
        res = await one_request(client, args, messages, turn, session)
        res.conversation = idx
        out.append(res)
        bar.update(1)
        if res.status != 200:
            break
        messages.append({"role": "assistant", "content": res.text})
    return out


async def run(args, share: tuple[int, int] = (0, 1)) -> tuple[list[Result], float]:
    """Run the conversations; ``share`` (k, n): only this client's share of them, of n clients
    (conversations k, k + n, ...; concurrency and request rate split evenly)."""
    k, n = share
    indices = range(k, args.num_requests, n)
    concurrency = _split(args.concurrency or args.num_requests, k, n)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency, 64), max_keepalive_connections=max(concurrency, 20))
    async with httpx.AsyncClient(base_url=args.server, headers=headers, timeout=args.timeout, limits=limits) as client:
        sem = asyncio.Semaphore(max(concurrency, 1))
        rng = random.Random(args.seed if n == 1 else args.seed * 1009 + k)
        bar = tqdm(total=len(indices) * args.turns, desc="bench", disable=args.quiet or n > 1)

        async def gated(i: int):
            async with sem:
                return await conversation(client, args, i, bar)

        t0, tasks = time.perf_counter(), []
        for i in indices:
            tasks.append(asyncio.create_task(gated(i)))
            if args.request_rate:  # Poisson arrivals (a share of a Poisson process is one)
                await asyncio.sleep(rng.expovariate(args.request_rate / n))
        results = [r for conv in await asyncio.gather(*tasks) for r in conv]
        bar.close()
        return results, time.perf_counter() - t0


def _split(total: int, k: int, n: int) -> int:
    return total // n + (k < total % n)


def run_clients(args, on_start=None) -> tuple[list[Result], float, float]:
    """:func:`run` in ``args.processes`` client processes at once (one: in this one). A Python HTTP
    client spends ~60 us of CPU per streamed chunk, so one process falls behind a server streaming
    thousands of chunks a second and the latencies it measures grow with its own backlog.
    Returns (results, seconds, CPU seconds the clients used while they ran). ``on_start()`` is
    called as the clients start (the processes are up and have their images)."""
    # No more processes than conversations or than streams in flight (each runs at least one).
    n = max(1, min(getattr(args, "processes", 1) or 1, args.num_requests, args.concurrency or args.num_requests))
    args.processes = n
    if n == 1:
        _encode_images(args, (0, 1))  # before the clock starts, as each client process does
        if on_start is not None:
            on_start()
        cpu = time.process_time()
        results, duration = asyncio.run(run(args))
        return results, duration, time.process_time() - cpu
    import multiprocessing as mp
    import queue
    import threading

    ctx = mp.get_context("spawn")
    ready, out = ctx.Barrier(n + 1), ctx.Queue()
    conf = {k: v for k, v in vars(args).items() if k != "func"}
    procs = [ctx.Process(target=_client_main, args=(conf, (k, n), ready, out), name=f"vlmamba-bench-{k}",
                         daemon=True) for k in range(n)]
    for p in procs:
        p.start()
    try:
        try:
            ready.wait(timeout=120)  # every client has its images: start together
        except threading.BrokenBarrierError:
            pass  # a client failed first: every client reports, the failed one with its error
        if on_start is not None:
            on_start()
        t0, got = time.monotonic(), []
        while len(got) < n:
            try:
                got.append(out.get(timeout=1.0))
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and out.empty():
                    got += ["a client process exited without a result"] * (n - len(got))
        duration = time.monotonic() - t0
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = sorted((g for g in got if isinstance(g, str)), key=lambda e: e.startswith("BrokenBarrierError"))
    if errors:
        raise RuntimeError(f"a client process failed: {errors[0]}")
    results = sorted((r for results, _ in got for r in results), key=lambda r: (r.conversation, r.turn))
    return results, duration, sum(cpu for _, cpu in got)


def _client_main(conf: dict, share: tuple[int, int], ready, out) -> None:
    try:
        from server.threads import name_os_thread

        name_os_thread("bench-client")
        args = argparse.Namespace(**conf)
        try:
            _encode_images(args, share)
        except BaseException:
            ready.abort()  # nobody waits for this client
            raise
        ready.wait(timeout=120)
        cpu = time.process_time()
        results, _ = asyncio.run(run(args, share))
        out.put((results, time.process_time() - cpu))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        out.put(f"{type(e).__name__}: {e}")


def _pcts(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]
    return {"mean": statistics.fmean(xs), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def summarize(results: list[Result], duration: float, args) -> dict:
    ok = [r for r in results if r.status == 200]
    errors: dict[str, int] = {}
    for r in results:
        if r.status != 200:
            key = "connection" if r.status == 0 else str(r.status)
            errors[key] = errors.get(key, 0) + 1
    per_turn = {t: [r.ttft for r in ok if r.turn == t and r.ttft is not None] for t in range(args.turns)}
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("api_key", "func")},
        "requests": len(results), "succeeded": len(ok), "errors_by_status": errors, "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration,
        "ttft_s": _pcts([r.ttft for r in ok if r.ttft is not None]),
        "headers_s": _pcts([r.headers for r in ok if r.headers is not None]),
        "itl_s": _pcts([g for r in ok for g in r.itl]), "e2e_s": _pcts([r.e2e for r in ok if r.e2e is not None]),
        "ttft_by_turn_s": {str(t): _pcts(v) for t, v in per_turn.items()},
        "cached_tokens_by_turn": {str(t): statistics.fmean([r.cached_tokens for r in ok if r.turn == t] or [0])
                                  for t in range(args.turns)},
    }


def format_table(s: dict) -> str:
    ms = lambda v: "-" if v is None else f"{1000 * v:.1f}"
    rows = [f"requests: {s['succeeded']}/{s['requests']} ok, errors {s['errors_by_status'] or 'none'}",
            f"throughput: {s['request_throughput']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tok/s",
            "| metric (ms) | mean | p50 | p90 | p99 |", "|---|---|---|---|---|"]
    for name in ("ttft_s", "itl_s", "e2e_s"):
        p = s[name]
        rows.append(f"| {name[:-2]} | {ms(p['mean'])} | {ms(p['p50'])} | {ms(p['p90'])} | {ms(p['p99'])} |")
    if len(s["ttft_by_turn_s"]) > 1:
        rows += ["| turn | TTFT p50 (ms) | cached prompt tokens (mean) |", "|---|---|---|"]
        rows += [f"| {t} | {ms(p['p50'])} | {s['cached_tokens_by_turn'][t]:.0f} |" for t, p in s["ttft_by_turn_s"].items()]
    return "\n".join(rows)


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="load-test a running server (throughput, TTFT, inter-token latency)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--server", default="http://127.0.0.1:8000", help="server base URL")
    b.add_argument("--api-key", help="bearer key if the server needs one")
    b.add_argument("--model", default="default", help="model name to send")
    b.add_argument("--num-requests", type=int, default=64, help="conversations to run")
    b.add_argument("--concurrency", type=int, help="conversations in flight at once (default: all)")
    b.add_argument("--request-rate", type=float, help="start conversations as a Poisson process at this rate per s")
    b.add_argument("--images-per-request", type=int, default=1, help="images in the first turn")
    b.add_argument("--image-size", type=int, default=384, help="image side in pixels")
    b.add_argument("--prompt-words", type=int, default=16, help="words of text per user turn")
    b.add_argument("--max-tokens", type=int, default=128, help="output tokens per turn")
    b.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="stop at end-of-sequence (default: always generate --max-tokens)")
    b.add_argument("--turns", type=int, default=1, help="turns per conversation (TTFT is reported per turn)")
    b.add_argument("--timeout", type=float, default=600, help="seconds per request")
    b.add_argument("--processes", type=int, default=1, help="client processes sharing the conversations and the "
                   "concurrency (one Python client keeps up with a few thousand streamed chunks a second)")
    b.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals")
    b.add_argument("--out", help="write the JSON summary here")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    results, duration, _ = run_clients(args)
    summary = summarize(results, duration, args)
    print(format_table(summary))
    print(json.dumps({k: summary[k] for k in ("request_throughput", "output_tokens_per_s", "ttft_s")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary | {"results": [asdict(r) | {"text": None} for r in results]}, f, indent=2)
    return 0 if summary["succeeded"] == summary["requests"] else 1
