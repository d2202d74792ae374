"""Decode and prefill throughput of a Mamba-2.8B-shaped LM: our engine against mamba-ssm and transformers.

All models hold the same random bf16 weights (ours are copied into the peers where the names
allow), prompts are random token ids, decoding is greedy with no early stop. Each system is
warmed up once at exactly the shapes it is timed at (mamba-ssm recaptures its CUDA graph when
max_length changes). Definitions, the same for every system:

- prefill tok/s = b * prompt / (time of one forward over the (b, prompt) batch); ours through
  the engine's prefill path, which replays a CUDA graph for batches of up to 2048 (padded)
  tokens and launches eagerly beyond (the JSON also has the eager figure, prefill_eager_tok_s);
- decode tok/s  = b * new / (time from the end of the prefill to the last token), the new - 1
  decode steps after the prefill's token. Ours (engine): requests through
  :class:`server.engine.Engine` (admission, batched prefill, CUDA-graph decode, per-request
  sampling and detokenizing), from the host holding every prompt's first token to the last
  reply. The graph loops (ours: the engine's captured decode step, with the greedy argmax
  inside it, in a plain loop, the same work mamba-ssm's ``generate`` does; mamba-ssm's
  ``generate(cg=True)``; transformers' ``generate``): from the first decode step, queued once
  the prefill is (a CUDA event recorded as it is queued, so the device's span; wall time on a
  CPU), to the end of the call (:class:`DecodeClock`). Subtracting a prefill timed on its own
  from a whole call's time instead overstated our graph loop by 2.5-3.2 % at 16-64 x 768
  tokens, where the prefill takes longer than the decode (docs/performance.md);
- prefill latency (``--prefill-shapes``, ours only): one prefill of each batch x prompt shape
  launched eagerly and on the engine's path, which shows what the prefill graphs save where the
  host's launches, not the GPU, bound a prefill;
- programmatic dependent launch (``--pdl-ab``, ours only): one decode step replayed from a CUDA
  graph (eagerly on a CPU) with the decode kernels launched plainly (``VLMAMBA_PDL=0``), with
  programmatic dependent launch but without the prefetch of the next weights ahead
  (``kernels.triton._pdl.PREFETCH_AHEAD``), and with both, captured and timed alternately in
  this process;
- prefill scan loops (``--scan-ab``, ours only): one prefill of each batch x prompt shape
  through the whole LM, replayed from a CUDA graph, with the scan kernel's own choice and with
  each of its loops forced (:data:`SCAN_LOOPS`), captured and timed alternately;
- decode timeline (``--timeline``, ours only): the kernels of one decode step replayed from a
  CUDA graph as the profiler sees them: how many, first start to last end, the gaps between
  them, and the mean time of each kind.

    python -m benchmarks.decode                      # the 2.8B shape on cuda, JSON + docs/performance.md
    python -m benchmarks.decode --device cpu --layers 2 --d-model 64 --batches 1 2 --prompt 16 --new 4 --doc ''
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import PRESET, machine, markdown_table, sync, timed, write_json, write_section
from model.config import MambaConfig


def lm_config(args) -> MambaConfig:
    cfg = _preset_config().llm
    if args.layers or args.d_model:
        cfg = MambaConfig(d_model=args.d_model or cfg.d_model, n_layer=args.layers or cfg.n_layer,
                          vocab_size=cfg.vocab_size)
    return cfg


def build_ours(cfg: MambaConfig, device, dtype, backend):
    """A VL-Mamba with this LM and a tiny vision tower (text-only prompts never run it)."""
    from model.factory import create_vlmamba, tiny_vision_config
    from model.processor import VLMambaProcessor

    tok = VLMambaProcessor.from_pretrained(PRESET, _preset_config()).tokenizer
    with torch.device(device):
        model, proc = create_vlmamba(tiny_vision_config(), cfg, tok, connector="mlp", dtype=dtype, device=device)
    model.set_backend(backend)
    return model, proc


def _preset_config():
    from model.checkpoint_vlm import load_config

    return load_config(PRESET)


# ---- ours -------------------------------------------------------------------------------------
def ours_prefill(model, ids, state, repeats):
    """The LM's prefill launched eagerly, kernel by kernel."""
    slots = torch.arange(ids.shape[0], device=ids.device)
    fn = lambda: model.llm(ids, state=state, slots=slots, last_only=True)
    fn()
    return timed(fn, ids.device, repeats)


def engine_prefill(engine, ids, repeats):
    """The engine's prefill path: replayed from a CUDA graph where a batch x length bucket holds it."""
    slots = torch.arange(ids.shape[0], device=ids.device)
    fn = lambda: engine.prefill_logits(ids, None, slots, None)
    fn()
    return timed(fn, ids.device, repeats)


def prefill_times(model, engine, ids, repeats) -> tuple[float, float, bool]:
    """Seconds of one prefill of ids launched eagerly and on the engine's path, and whether that
    path replays a graph for it."""
    state = model.allocate_state(ids.shape[0], ssm_dtype=engine.state.ssm.dtype)
    t_eager, _ = ours_prefill(model, ids, state, repeats)
    del state
    t_engine, _ = engine_prefill(engine, ids, repeats)
    graphed = engine.prefill_graphs is not None and engine.prefill_graphs.bucket(*ids.shape) is not None
    return t_eager, t_engine, graphed


def engine_generate(engine, prompts: list[list[int]], new: int) -> tuple[float, float]:
    """Run the prompts through the engine; returns (seconds to the last first token, total seconds)."""
    from model.sampling import SamplingParams
    from server.engine import EngineRequest

    done, lock, left = threading.Event(), threading.Lock(), [len(prompts)]

    def sink(out):
        if out.finished:
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    reqs = [EngineRequest(f"b{i}", p, [], params, sink) for i, p in enumerate(prompts)]
    t0 = time.monotonic()
    for r in reqs:
        engine.add_request(r)
    if not done.wait(timeout=600):
        raise RuntimeError("engine did not finish the batch in 10 minutes")
    t1 = time.monotonic()
    errors = [r.request_id for r in reqs if r.decoder is None or len(r.decoder.token_ids) != new]
    if errors:
        raise RuntimeError(f"{len(errors)} requests did not produce {new} tokens")
    return max(r.first_token_time for r in reqs) - t0, t1 - t0


class DecodeClock:
    """When a generation's first decode step is queued (:meth:`mark`, or a callable wrapped by
    :meth:`marking`) and how long from there to the end of the call (:meth:`span`): CUDA events
    on a GPU, so the device's span with the prefill left out but every idle gap between steps
    counted; wall time on a CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.start, self.calls = None, 0

    def reset(self) -> None:
        self.start, self.calls = None, 0

    def mark(self) -> None:
        if self.start is None:
            if self.cuda:
                self.start = torch.cuda.Event(enable_timing=True)
                self.start.record()
            else:
                self.start = time.perf_counter()

    def marking(self, fn, skip: int = 0):
        """``fn`` that marks the start when called the ``skip`` + 1-th time since :meth:`reset`."""
        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == skip + 1:
                self.mark()
            return fn(*args, **kwargs)
        return call

    def span(self) -> float:
        if self.start is None:
            raise RuntimeError("no decode step was marked")
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self.start.elapsed_time(end) / 1e3
        return time.perf_counter() - self.start


def timed_decode(fn, clock: DecodeClock, device, repeats: int) -> tuple[float, float, object]:
    """Median total seconds and median decode seconds (``clock``'s span) of ``repeats`` calls of fn,
    and the last result."""
    totals, spans, out = [], [], None
    for _ in range(repeats):
        sync(device)
        clock.reset()
        t0 = time.perf_counter()
        out = fn()
        spans.append(clock.span())
        totals.append(time.perf_counter() - t0)
    return sorted(totals)[len(totals) // 2], sorted(spans)[len(spans) // 2], out


def graph_loop(engine, model, ids, new, clock: DecodeClock | None = None):
    """The engine's prefill, then ``new`` greedy steps replayed from the engine's decode graphs
    (``clock`` marked as the first is queued)."""
    b = ids.shape[0]
    slots = torch.arange(b, device=ids.device)
    engine.state.reset(slots)
    tok = engine.prefill_logits(ids, None, slots, None).argmax(-1)
    key = tuple(range(b))
    if clock is not None:
        clock.mark()
    for _ in range(new - 1):
        if engine.graphs is not None:
            engine.graphs.step(tok, slots, slots_key=key)  # the engine's form: slots copied once
            tok = engine.graphs.argmax  # taken inside the graph, as the engine's greedy rows do
        else:
            tok = model.step(tok, state=engine.state, slots=slots).argmax(-1)
    return tok


def bench_ours(args, cfg, device, dtype) -> tuple[list[dict], object]:
    from server.engine import Engine, EngineConfig

    model, proc = build_ours(cfg, device, dtype, args.backend)
    top = max(args.batches + [b for b, _ in args.prefill_shapes])  # the state pool holds every batch timed
    engine = Engine(model, proc, EngineConfig(max_num_seqs=top, max_prefill_seqs=top, state_cache_bytes=1 << 30,
                                              cuda_graphs=not args.no_graphs, state_dtype=args.state_dtype))
    name = "ours" if args.state_dtype == "float32" else f"ours-{args.state_dtype}-state"
    engine.start()
    if args.profile:
        profile_steps(model, device, args.profile)
    if args.profile_prefill:
        profile_prefill(model, device, args.profile_prefill, args.prompt)
    rows = []
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b, l in args.prefill_shapes:
            ids = torch.randint(2, len(proc.tokenizer), (b, l), generator=gen).to(device)
            t_eager, t_engine, graphed = prefill_times(model, engine, ids, args.repeats)
            rows.append({"system": name, "prefill_shape": [b, l], "eager_ms": t_eager * 1e3,
                         "engine_ms": t_engine * 1e3, "graph": graphed})
            print(rows[-1], flush=True)
        for b in args.batches:
            ids = torch.randint(2, len(proc.tokenizer), (b, args.prompt), generator=gen)
            prompts = ids.tolist()
            ids = ids.to(device)
            t_eager, t_pre, graphed = prefill_times(model, engine, ids, args.repeats)
            engine.config.max_prefill_seqs = b
            engine_generate(engine, prompts, args.new)  # warm-up at these shapes
            torch.cuda.reset_peak_memory_stats() if torch.device(device).type == "cuda" else None
            runs = [engine_generate(engine, prompts, args.new) for _ in range(args.repeats)]
            first, total = sorted(runs, key=lambda r: r[1])[len(runs) // 2]
            clock = DecodeClock(device)
            graph_loop(engine, model, ids, args.new)
            t_loop, t_dec, _ = timed_decode(lambda: graph_loop(engine, model, ids, args.new, clock), clock, device,
                                            args.repeats)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else None
            rows.append({"system": name, "batch": b, "peak_gib_engine_run": peak, "prefill_s": t_pre,
                         "prefill_tok_s": b * args.prompt / t_pre, "prefill_eager_tok_s": b * args.prompt / t_eager,
                         "prefill_graph": graphed,
                         "engine_decode_tok_s": b * args.new / (total - first), "engine_total_s": total,
                         "loop_decode_tok_s": b * args.new / t_dec, "loop_total_s": t_loop,
                         "loop_decode_s": t_dec})
            print(rows[-1], flush=True)
    engine.shutdown()
    rows.append({"system": name, "state_bytes_per_sequence": engine.state.bytes_per_slot,
                 "state_dtype": args.state_dtype})
    return rows, model


@contextlib.contextmanager
def pdl_setting(on: bool, ahead: bool = True):
    """VLMAMBA_PDL and the prefetch ahead (``kernels.triton._pdl.PREFETCH_AHEAD``) set for the
    block (the kernels read both when launched or captured), then restored to what they were."""
    import kernels.triton._pdl as pdl_module

    before, ahead_before = os.environ.get("VLMAMBA_PDL"), pdl_module.PREFETCH_AHEAD
    os.environ["VLMAMBA_PDL"] = "1" if on else "0"
    pdl_module.PREFETCH_AHEAD = ahead
    try:
        yield
    finally:
        pdl_module.PREFETCH_AHEAD = ahead_before
        if before is None:
            os.environ.pop("VLMAMBA_PDL", None)
        else:
            os.environ["VLMAMBA_PDL"] = before


def replayable(fn, device):
    """``fn``, or on a GPU the replay of a CUDA graph captured from it (run under inference mode)."""
    from model.graphs import capture_graphs

    if torch.device(device).type != "cuda":
        return fn
    graph, _ = capture_graphs(device, [0], lambda _: fn())[0]
    return graph.replay


def _decode_inputs(model, device, b):
    """A state pool of ``b`` slots, their indices and ``b`` token ids for one decode step."""
    return (model.allocate_state(b), torch.arange(b, device=device),
            torch.zeros(b, dtype=torch.long, device=device))


PDL_SETTINGS = ((False, False), (True, False), (True, True))  # (PDL, prefetch ahead)


def pdl_ab(model, device, batches, rounds: int = 2, steps: int = 300) -> list[dict]:
    """ms per decode step at each batch with the decode kernels launched plainly, with
    programmatic dependent launch, and with it and the prefetch ahead (:data:`PDL_SETTINGS`; the
    kernels read them when a graph is captured), alternating ``rounds`` times; the best of the
    rounds per setting."""
    rows = []
    for b in batches:
        state, slots, tok = _decode_inputs(model, device, b)
        best = {}
        for _ in range(rounds):
            for on, ahead in PDL_SETTINGS:
                with pdl_setting(on, ahead), torch.inference_mode():
                    step = replayable(lambda: model.step(tok, state=state, slots=slots), device)
                    step()
                    t, _ = timed(lambda: [step() for _ in range(steps)], device)
                best[on, ahead] = min(best.get((on, ahead), float("inf")), t / steps * 1e3)
        rows += [{"system": "ours", "pdl_ab_batch": b, "pdl": on, "ahead": ahead, "step_ms": ms}
                 for (on, ahead), ms in best.items()]
        print(rows[-len(PDL_SETTINGS):], flush=True)
    return rows


# Scan loops that --scan-ab forces, as kernels.triton.selective_scan._config returns them: the
# chunked scan (one sequence) and the 16-channel "seq" loop with 16 steps per chunk (2-3 sequences).
SCAN_LOOPS = {"chunked": ("chunked", 4, 32, 4, None), "seq16": ("seq", 16, 16, 2, None)}


def scan_ab(model, device, shapes, rounds: int = 2, repeats: int = 10) -> list[dict]:
    """ms of one prefill of each (batch, length) through the whole LM (replayed from a CUDA graph
    on a GPU), with the scan kernel's own configuration ("auto") and with each of SCAN_LOOPS
    forced; the kernels read the configuration when a graph is captured, so every setting is
    captured afresh, alternating ``rounds`` times; the best of the rounds per setting."""
    import kernels.triton.selective_scan as scan

    own = scan._config
    rows = []
    gen = torch.Generator().manual_seed(0)
    try:
        for b, l in shapes:
            ids = torch.randint(2, model.config.vocab_size, (b, l), generator=gen).to(device)
            state, slots = model.allocate_state(b), torch.arange(b, device=device)
            best = {}
            for _ in range(rounds):
                for name, loop in {"auto": None, **SCAN_LOOPS}.items():
                    scan._config = own if loop is None else (lambda *_, loop=loop: loop)
                    with torch.inference_mode():
                        fn = replayable(lambda: model(ids, state=state, slots=slots, last_only=True), device)
                        fn()
                        t, _ = timed(lambda: [fn() for _ in range(repeats)], device)
                    best[name] = min(best.get(name, float("inf")), t / repeats * 1e3)
            auto = own(b, model.config.d_inner, model.config.d_state)
            rows += [{"system": "ours", "scan_ab_shape": [b, l], "scan": name, "auto_is": list(auto), "ms": ms}
                     for name, ms in best.items()]
            print(rows[-len(best):], flush=True)
    finally:
        scan._config = own
    return rows


def timeline(model, device, batches) -> list[dict]:
    """The kernels of one decode step per batch replayed from a CUDA graph, as the profiler
    records them (on a CPU: the operators of one eager step), captured with programmatic
    dependent launch off and on: count, span from the first start to the last end, the idle
    gaps between consecutive ones, and count and mean µs per name. With it on, a kernel starts
    early and waits for the one before, so its recorded time includes that wait; the per-name
    times mean what each kernel costs only with it off."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    kind = "CUDA" if cuda else "CPU"
    rows = []
    for b in batches:
        state, slots, tok = _decode_inputs(model, device, b)
        for on in (False, True):
            with pdl_setting(on), torch.inference_mode():
                step = replayable(lambda: model.step(tok, state=state, slots=slots), device)
                for _ in range(3):
                    step()
                sync(device)
                with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                    step()
                    sync(device)
            events = sorted((e for e in prof.events() if e.device_type.name == kind and
                             (cuda or e.cpu_parent is None)), key=lambda e: e.time_range.start)
            gaps, end, per = 0.0, None, {}
            for e in events:  # idle time: starts past the latest end so far
                if end is not None:
                    gaps += max(0, e.time_range.start - end)
                end = e.time_range.end if end is None else max(end, e.time_range.end)
                n, total = per.get(e.name, (0, 0.0))
                per[e.name] = (n + 1, total + e.time_range.end - e.time_range.start)
            rows.append({"system": "ours", "timeline_batch": b, "pdl": on, "device_kind": kind,
                         "kernels": len(events), "span_us": end - events[0].time_range.start if events else 0.0,
                         "gaps_us": gaps,
                         "per_name": {k: {"count": n, "mean_us": t / n}
                                      for k, (n, t) in sorted(per.items(), key=lambda kv: -kv[1][1])}})
            print({k: v for k, v in rows[-1].items() if k != "per_name"}, flush=True)
    return rows


def profile_steps(model, device, batches, steps: int = 5) -> None:
    """Print the kernels of eager decode steps, most GPU time first (where a step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    for b in batches:
        state = model.allocate_state(b)
        slots, tok = torch.arange(b, device=device), torch.zeros(b, dtype=torch.long, device=device)
        with torch.inference_mode():
            model.step(tok, state=state, slots=slots)
            sync(device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    model.step(tok, state=state, slots=slots)
                sync(device)
        print(f"--- profile: {steps} eager decode steps at batch {b}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
        del state


def profile_prefill(model, device, batches, length: int) -> None:
    """Print the kernels of one prefill forward, most GPU time first."""
    from torch.profiler import ProfilerActivity, profile

    for b in batches:
        state = model.allocate_state(b)
        slots, ids = torch.arange(b, device=device), torch.randint(2, 300, (b, length), device=device)
        with torch.inference_mode():
            model.llm(ids, state=state, slots=slots, last_only=True)
            sync(device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model.llm(ids, state=state, slots=slots, last_only=True)
                sync(device)
        print(f"--- profile: prefill of {b} x {length}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
        del state


# ---- peers ------------------------------------------------------------------------------------
def bench_mamba_ssm(args, cfg, ours_model, device) -> list[dict]:
    from mamba_ssm.models.config_mamba import MambaConfig as PeerConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.utils.generation import InferenceParams

    peer = MambaLMHeadModel(PeerConfig(d_model=cfg.d_model, n_layer=cfg.n_layer, vocab_size=cfg.vocab_size,
                                       ssm_cfg={"layer": "Mamba1"}, rms_norm=True, residual_in_fp32=True,
                                       fused_add_norm=True, pad_vocab_size_multiple=cfg.pad_vocab_size_multiple),
                            device=device, dtype=torch.bfloat16).eval()
    peer.load_state_dict(ours_model.llm.state_dict())
    rows, gen = [], torch.Generator().manual_seed(1)
    parity = logits_parity(peer, ours_model, device)
    with torch.inference_mode():
        for b in args.batches:
            ids = torch.randint(2, 300, (b, args.prompt), generator=gen).to(device)

            def prefill():
                return peer(ids, inference_params=InferenceParams(max_seqlen=args.prompt + args.new,
                                                                  max_batch_size=b), num_last_tokens=1)

            prefill()
            t_pre, _ = timed(prefill, device, args.repeats)
            gen_fn = lambda: peer.generate(ids, max_length=args.prompt + args.new, cg=True, top_k=1)
            gen_fn()  # captures its decode graph for (b, 1), which every call then runs for each step
            clock = DecodeClock(device)
            callables = peer._decoding_cache.callables
            callables[b, 1] = clock.marking(callables[b, 1])
            t_gen, t_dec, out = timed_decode(gen_fn, clock, device, args.repeats)
            assert out.shape == (b, args.prompt + args.new), out.shape
            rows.append({"system": "mamba-ssm", "batch": b, "prefill_s": t_pre, "prefill_tok_s": b * args.prompt / t_pre,
                         "loop_decode_tok_s": b * args.new / t_dec, "loop_total_s": t_gen, "loop_decode_s": t_dec,
                         "loop_decode_tok_s_by_subtraction": b * args.new / (t_gen - t_pre)})
            print(rows[-1], flush=True)
    cache = peer.allocate_inference_cache(1, args.prompt + args.new)
    per_seq = sum(t.numel() * t.element_size() for pair in cache.values() for t in pair)
    rows.append({"system": "mamba-ssm", "parity": parity, "state_bytes_per_sequence": per_seq,
                 "state_dtype": "bfloat16"})
    return rows


def logits_parity(peer, ours_model, device) -> dict:
    """Last-position logits of one (2, 256) batch: our fast path vs mamba-ssm vs our reference path."""
    ids = torch.randint(2, 300, (2, 256), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.inference_mode():
        p = peer(ids).logits[:, -1].float()
        fast = ours_model.llm(ids, last_only=True).float()
        backend = ours_model.llm.backbone.layers[0].mixer.backend
        ours_model.set_backend("ref")
        ref = ours_model.llm(ids, last_only=True).float()
        ours_model.set_backend(backend)
    scale = ref.abs().max().item()
    return {"scale": scale, "ours_vs_ref_max_abs": (fast - ref).abs().max().item(),
            "mamba_ssm_vs_ref_max_abs": (p - ref).abs().max().item(),
            "ours_vs_mamba_ssm_max_abs": (fast - p).abs().max().item(),
            "argmax_agree_ours_ref": bool((fast.argmax(-1) == ref.argmax(-1)).all())}


def bench_transformers(args, cfg, device) -> list[dict]:
    from transformers import MambaConfig as HFConfig, MambaForCausalLM

    hf_cfg = HFConfig(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, vocab_size=cfg.padded_vocab_size,
                      state_size=cfg.d_state, expand=cfg.expand, conv_kernel=cfg.d_conv, time_step_rank=cfg.dt_rank,
                      use_mambapy=False)
    with torch.device(device):
        model = MambaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    rows, gen = [], torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for b in [b for b in args.batches if b <= args.transformers_max_batch]:
            ids = torch.randint(2, 300, (b, args.prompt), generator=gen).to(device)
            prefill = lambda: model(ids, logits_to_keep=1)
            prefill()
            t_pre, _ = timed(prefill, device, 1)
            gen_fn = lambda: model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                            pad_token_id=0)
            gen_fn()
            clock = DecodeClock(device)
            model.forward = clock.marking(model.forward, skip=1)  # its first forward is the prefill
            t_gen, t_dec, _ = timed_decode(gen_fn, clock, device, 1)
            del model.forward
            rows.append({"system": "transformers", "batch": b, "prefill_s": t_pre,
                         "prefill_tok_s": b * args.prompt / t_pre, "loop_decode_tok_s": b * args.new / t_dec,
                         "loop_total_s": t_gen, "loop_decode_s": t_dec})
            print(rows[-1], flush=True)
    return rows


# ---- report -----------------------------------------------------------------------------------
def report(result: dict, batches: list[int]) -> str:
    rows_by = {}
    for r in result["rows"]:
        if "batch" in r:
            rows_by[(r["system"], r["batch"])] = r
    header = ["system"] + [f"decode tok/s B={b}" for b in batches] + [f"prefill tok/s B={b}" for b in batches]
    table = []
    for system, key in (("ours (engine)", ("ours", "engine_decode_tok_s")), ("ours (graph loop)", ("ours", "loop_decode_tok_s")),
                        ("ours, bf16 state (engine)", ("ours-bfloat16-state", "engine_decode_tok_s")),
                        ("ours, bf16 state (graph loop)", ("ours-bfloat16-state", "loop_decode_tok_s")),
                        ("mamba-ssm generate(cg=True)", ("mamba-ssm", "loop_decode_tok_s")),
                        ("transformers generate", ("transformers", "loop_decode_tok_s"))):
        name, field = key
        if not any((name, b) in rows_by for b in batches):
            continue
        dec = [rows_by.get((name, b), {}).get(field) for b in batches]
        pre = [rows_by.get((name, b), {}).get("prefill_tok_s") for b in batches]
        table.append([system] + dec + pre)
    m = result["machine"]
    peaks = [f"B={r['batch']}: {r['peak_gib_engine_run']:.1f} GiB" for r in result["rows"]
             if r.get("system") == "ours" and r.get("peak_gib_engine_run")]
    text = [f"Machine: {m.get('gpu') or 'CPU'}, torch {m['torch']}, triton {m.get('triton', '–')}, {m['date']}. "
            f"Model: d_model {result['config']['d_model']}, {result['config']['n_layer']} layers, vocab "
            f"{result['config']['padded_vocab_size']}, random {result['dtype']} weights; prompt {result['prompt']}, "
            f"{result['new']} new tokens, greedy. Command: `{result['command']}`.", "", markdown_table(header, table)]
    eager = [f"B={r['batch']}: {r['prefill_eager_tok_s']:,.0f} tok/s" for r in result["rows"]
             if r.get("system") == "ours" and "prefill_eager_tok_s" in r]
    graphed = [str(r["batch"]) for r in result["rows"] if r.get("system") == "ours" and r.get("prefill_graph")]
    if eager:
        text += ["", f"Our prefill runs the engine's path: replayed from a CUDA graph at B={', '.join(graphed) or 'none'} "
                     f"(batch x length buckets of up to 2048 tokens), launched eagerly otherwise. The same prefill "
                     f"launched eagerly: {', '.join(eager)}.", ""]
    for r in result["rows"]:
        if "parity" in r:
            p = r["parity"]
            text += ["", f"Logits parity on the same weights (last position, 2 × 256 tokens, logit scale "
                          f"{p['scale']:.3g}): ours (Triton) vs reference {p['ours_vs_ref_max_abs']:.3g}, mamba-ssm vs "
                          f"reference {p['mamba_ssm_vs_ref_max_abs']:.3g}, ours vs mamba-ssm "
                          f"{p['ours_vs_mamba_ssm_max_abs']:.3g}; greedy tokens agree: {p['argmax_agree_ours_ref']}.", ""]
        if "state_bytes_per_sequence" in r:
            text += [f"Recurrent state per sequence ({r['system']}: all layers, conv in the model dtype, SSM "
                         f"states in {r['state_dtype']}): {r['state_bytes_per_sequence'] / 2**20:.1f} MiB — constant "
                         f"in the sequence length."]
    shapes = [r for r in result["rows"] if r.get("system", "").startswith("ours") and "prefill_shape" in r]
    if shapes:
        text += ["", "Prefill latency, launched eagerly and on the engine's path (a CUDA graph where a bucket "
                     "holds the batch), same inputs:", "",
                 markdown_table(["system", "batch x prompt", "eager ms", "engine ms", "from a graph"],
                                [[r["system"], f"{r['prefill_shape'][0]} x {r['prefill_shape'][1]}", r["eager_ms"],
                                  r["engine_ms"], "yes" if r["graph"] else "no"] for r in shapes])]
    ab = {(r["pdl_ab_batch"], r["pdl"], r.get("ahead", False)): r["step_ms"] for r in result["rows"]
          if "pdl_ab_batch" in r}  # rows from before the prefetch ahead have no "ahead"
    if ab:
        text += ["", "One decode step of ours replayed from a CUDA graph, the decode kernels launched plainly, "
                     "with programmatic dependent launch (PDL), and with PDL and the prefetch of the next weights "
                     "ahead (`--pdl-ab`, alternating in one process, best of the rounds):", "",
                 markdown_table(["batch", "plain ms", "PDL ms", "PDL + ahead ms", "gain over plain"],
                                [[b] + [f"{ab[(b, *s)]:.3f}" for s in PDL_SETTINGS] +
                                 [f"{ab[b, False, False] / ab[b, True, True] - 1:+.1%}"]
                                 for b in sorted({k[0] for k in ab}) if all((b, *s) in ab for s in PDL_SETTINGS)])]
    scans = [r for r in result["rows"] if "scan_ab_shape" in r]
    if scans:
        names = list(dict.fromkeys(r["scan"] for r in scans))
        by = {(tuple(r["scan_ab_shape"]), r["scan"]): r for r in scans}
        shapes_ab = list(dict.fromkeys(tuple(r["scan_ab_shape"]) for r in scans))
        text += ["", "One prefill through the whole LM replayed from a CUDA graph, with the scan's own choice "
                     "(auto) and each loop forced (`--scan-ab`, alternating in one process, best of the rounds; ms):",
                 "", markdown_table(["batch x prompt", "auto picks"] + names,
                                    [[f"{b} x {l}", by[(b, l), names[0]]["auto_is"][0]] +
                                     [f"{by[(b, l), n]['ms']:.2f}" for n in names] for b, l in shapes_ab])]
    lines = {(r["timeline_batch"], r["pdl"]): r for r in result["rows"]
             if "timeline_batch" in r and r["device_kind"] == "CUDA"}
    for b in sorted({b for b, _ in lines}):
        off, on = lines.get((b, False)), lines.get((b, True))
        if off:
            top = ", ".join(f"{k[:32]} {v['count']} × {v['mean_us']:.1f} µs" for k, v in list(off["per_name"].items())[:6])
            text += ["", f"Timeline of one decode step at B={b} replayed from a CUDA graph (`--timeline`), kernels "
                         f"launched plainly: {off['kernels']} kernels, {off['span_us'] / 1e3:.3f} ms from the first "
                         f"start to the last end, {off['gaps_us']:.0f} µs of gaps between them; by time: {top}."]
        if on:
            text += [f"With programmatic dependent launch: {on['span_us'] / 1e3:.3f} ms (its kernels start early "
                     f"and wait for the one before, so their spans overlap)."]
    if peaks:
        text += ["", "Peak GPU memory of our engine runs (weights + state pool for 256 + activations): " +
                 ", ".join(peaks) + "."]
    return "\n".join(text)


def _shape(text: str) -> tuple[int, int]:
    """'16x768' -> (16, 768)."""
    try:
        b, l = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxLENGTH such as 16x768, got {text!r}") from None
    if b < 1 or l < 1:
        raise argparse.ArgumentTypeError(f"batch and length must be positive, got {text!r}")
    return b, l


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    ap.add_argument("--prompt", type=int, default=768)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backend", default="auto", help="our kernels: auto (Triton on CUDA), triton, cuda, ref")
    ap.add_argument("--no-graphs", action="store_true", help="decode eagerly (no CUDA graphs)")
    ap.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="storage of our SSM states (the peers keep theirs in the model dtype, bf16)")
    ap.add_argument("--systems", nargs="*", default=["ours", "mamba-ssm", "transformers"],
                    help="what to run: ours, mamba-ssm, transformers")
    ap.add_argument("--merge", nargs="*", default=[], help="JSON results of earlier runs (same shapes) to include "
                                                           "in the table, e.g. a peer measured in another process")
    ap.add_argument("--transformers-max-batch", type=int, default=16, help="its torch path is slow beyond this")
    ap.add_argument("--profile", type=int, nargs="*", default=[], help="print a kernel profile of decode steps "
                                                                        "at these batch sizes")
    ap.add_argument("--profile-prefill", type=int, nargs="*", default=[], help="print a kernel profile of one "
                                                                                "prefill at these batch sizes")
    ap.add_argument("--prefill-shapes", nargs="*", default=None, metavar="BxL", type=_shape,
                    help="also time single prefills of these batch x prompt shapes, eagerly and on the engine's "
                         "path (default on CUDA: 1x128 1x256 1x768 4x384 16x768)")
    ap.add_argument("--pdl-ab", type=int, nargs="*", default=[], metavar="B",
                    help="also time one graph-replayed decode step of ours at these batch sizes with the decode "
                         "kernels launched plainly, with programmatic dependent launch, and with it and the "
                         "prefetch of the next weights ahead, alternately")
    ap.add_argument("--scan-ab", nargs="*", default=[], metavar="BxL", type=_shape,
                    help="also time one prefill of ours per batch x prompt shape, replayed from a CUDA graph, with "
                         "the scan's own configuration and each of its loops forced, alternately")
    ap.add_argument("--timeline", type=int, nargs="*", default=[], metavar="B",
                    help="also record the kernels of one graph-replayed decode step of ours at these batch sizes")
    ap.add_argument("--layers", type=int, default=0, help="override n_layer (smoke runs)")
    ap.add_argument("--d-model", type=int, default=0, help="override d_model (smoke runs)")
    ap.add_argument("--out", default=None, help="JSON file")
    ap.add_argument("--doc", default=None, help="markdown file for the table (default docs/performance.md on "
                                                "CUDA, none on CPU; '' for none)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.prefill_shapes is None:
        args.prefill_shapes = [(1, 128), (1, 256), (1, 768), (4, 384), (16, 768)] if device.type == "cuda" else []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = lm_config(args)
    result = {"benchmark": "decode", "machine": machine(device), "config": {**cfg.to_dict(),
              "padded_vocab_size": cfg.padded_vocab_size}, "prompt": args.prompt, "new": args.new, "dtype": str(dtype).removeprefix("torch."),
              "command": "python -m benchmarks.decode " + shlex.join(argv if argv is not None else __import__("sys").argv[1:]),
              "rows": []}
    partial = lambda: write_json(result, args.out, quiet=True)  # a run cut short keeps what it measured
    if "ours" in args.systems:
        rows, ours = bench_ours(args, cfg, device, dtype)
        result["rows"] += rows
        partial()
    else:  # the peers still take our weights
        ours = build_ours(cfg, device, dtype, args.backend)[0]
    if args.pdl_ab:
        result["rows"] += pdl_ab(ours, device, args.pdl_ab)
        partial()
    if args.scan_ab:
        result["rows"] += scan_ab(ours.llm, device, args.scan_ab)
        partial()
    if args.timeline:
        result["rows"] += timeline(ours, device, args.timeline)
        partial()
    if "mamba-ssm" in args.systems and device.type == "cuda":
        try:
            result["rows"] += bench_mamba_ssm(args, cfg, ours, device)
        except ImportError as e:
            result["rows"].append({"system": "mamba-ssm", "skipped": f"not installed: {e}"})
        partial()
    del ours
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    if "transformers" in args.systems:
        result["rows"] += bench_transformers(args, cfg, device)
    for path in args.merge:
        other = json.loads(Path(path).read_text())
        assert (other["prompt"], other["new"]) == (args.prompt, args.new), f"{path} was measured at other shapes"
        result["rows"] += other["rows"]
    result["table"] = report(result, args.batches)
    write_json(result, args.out)
    doc = args.doc if args.doc is not None else (None if device.type != "cuda" else "docs/performance.md")
    write_section("decode", "## LM decode and prefill\n\n" + result["table"], doc or None)
    return result


if __name__ == "__main__":
    main()
