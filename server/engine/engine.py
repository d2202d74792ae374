"""The engine loop: admit -> prefill (batched, right-padded) -> one batched decode step, repeat.

Runs in its own thread: in the server's engine process (``server/engine/process.py``), or in
the server's own process with ``--no-engine-process``. Each iteration:

1. ``_take_new``: move submitted requests into the waiting queue, apply aborts;
2. ``_admit``: give waiting requests free slots, filling each slot from the session state
   cache (or zeroing it);
3. ``_prefill``: encode the new requests' images in one batch and prefill the uncached prompt
   suffixes in one right-padded batch; sample each first token on the device;
4. ``_decode``: one ``step`` for every running sequence, the ones just prefilled included,
   slots passed as indices. Sampled tokens stay on the device and feed the next step
   directly: the host reads a step's tokens (and the prefill's first tokens) only after it has
   launched the step they feed, while the device runs it (one step of lookahead), so
   detokenizing, stop checks and delivery overlap the GPU, and a prefill is followed on the
   device by the next step with no wait for the host in between. A sequence that finishes has
   therefore mostly had one extra step run on its slot: harmless, since its output is dropped
   and the slot is either cached as "prompt + the tokens fed" (``EngineRequest.fed``: what it
   then holds) or reset before reuse. When the work in flight takes every row to its
   max_tokens, no further step is launched (the slots then hold all but the last token, and
   ``fed`` says so);
5. prompts' end states (after prefill) and finished requests' final states go to the session
   state cache; finished requests free their slot.

Lookahead is off for batches with presence/frequency penalties, which need every previous
token on the host before sampling.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.generate import SequenceDecoder, logits_mask, pick_tokens, to_device, to_host
from server.engine.state_cache import StateCache, prefix_hashes, prompt_items
from server.engine.types import EngineOutput, EngineRequest, EngineStats
from server.threads import name_os_thread

log = logging.getLogger(__name__)


@dataclass
class _Inflight:
    """A launched prefill or decode step whose sampled tokens the host has not read yet."""

    reqs: list[EngineRequest]
    tokens: torch.Tensor  # (b,) long on the device: feeds the next step (a graph's output: valid until its replay)
    host: torch.Tensor  # (b,) copy on the host (pinned on CUDA), valid once `done` has fired
    done: object  # torch.cuda.Event or None


@dataclass
class EngineConfig:
    max_num_seqs: int = 16
    max_prefill_seqs: int = 8
    state_cache_bytes: int = 1 << 30
    cuda_graphs: bool = True  # replay decode steps, short prefills and image encoding from CUDA graphs (CUDA only)
    prefill_graph_tokens: int = 2048  # prefills of up to this many padded tokens replay graphs; 0: all eager
    encoder_graph_images: int = 8  # image batches of up to this many replay graphs; 0: all eager
    state_dtype: str = "float32"  # storage of the SSM states: float32 or bfloat16

    def __post_init__(self):
        if self.state_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"state_dtype must be float32 or bfloat16, got {self.state_dtype!r}")


class Observer:
    """Hooks the server implements (its metrics; the engine process's outbox); all no-ops here.
    Called from the engine thread with plain numbers, so they can be recorded and replayed elsewhere."""

    def on_first_token(self, ttft_s: float, queue_s: float) -> None: ...
    def on_token(self, gap_s: float) -> None: ...
    def on_finish(self, e2e_s: float, out: EngineOutput) -> None: ...
    def on_step(self, batch_size: int) -> None: ...
    def on_prefill(self, batch_size: int, tokens: int) -> None:
        """A prefill was launched: ``batch_size`` sequences, ``tokens`` prompt tokens in all (cached ones not)."""
    def on_iteration_end(self) -> None:
        """Every output of one engine iteration has been delivered."""


class Engine:
    def __init__(self, model, processor, config: EngineConfig | None = None, observer: Observer | None = None):
        self.model, self.processor = model, processor
        self.config = config or EngineConfig()
        self.observer = observer or Observer()
        self.device = model.llm.backbone.embedding.weight.device
        use_graphs = self.config.cuda_graphs and self.device.type == "cuda"
        self._mask = logits_mask(model.llm.config.padded_vocab_size, len(processor.tokenizer),
                                 (processor.image_token_id,), self.device)
        # With graphs, one extra slot past the engine's own takes the writes of padding rows.
        self.state = model.allocate_state(self.config.max_num_seqs + use_graphs,
                                          ssm_dtype=getattr(torch, self.config.state_dtype))
        self.graphs = self.prefill_graphs = self.encoder_graphs = None
        if use_graphs:
            from model.graphs import GraphDecoder, GraphPrefill

            scratch = self.config.max_num_seqs
            # The decode graphs mask the logits and take their argmax: greedy batches sample nothing more.
            self.graphs = GraphDecoder(model, self.state, scratch, self.config.max_num_seqs, self._mask).capture()
            if self.config.prefill_graph_tokens > 0:
                self.prefill_graphs = GraphPrefill(model.llm, self.state, scratch,
                                                   min(self.config.max_prefill_seqs, self.config.max_num_seqs),
                                                   self.config.prefill_graph_tokens).capture()
        self.cache = StateCache(self.config.state_cache_bytes)
        self.free_slots = list(range(self.config.max_num_seqs))[::-1]
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self._incoming: deque[EngineRequest] = deque()
        self._aborts: set[str] = set()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.fault_hook: Callable[[str, list[EngineRequest]], None] | None = None  # tests inject failures here
        self.steps = self.batched_steps = self.max_batch = 0
        self.last_heartbeat = time.monotonic()
        # Launched work whose tokens the host has not read, oldest first: at most the decode step
        # in flight and a prefill launched after it (each row in one of them at most).
        self._pending: list[_Inflight] = []
        self._slots: tuple[tuple[int, ...], torch.Tensor | None] = ((), None)  # the decode batch's slots on the device
        # Host buffers for sampled tokens, used in turn: one for each pending launch and one for the next.
        self._pinned = [torch.empty(self.config.max_num_seqs, dtype=torch.long, pin_memory=True)
                        for _ in range(3)] if self.device.type == "cuda" else None
        self._turn = 0
        if use_graphs and self.config.encoder_graph_images > 0:
            self.encoder_graphs = self._capture_encoder()
        if self.device.type == "cuda":
            self.warm_up()

    def _capture_encoder(self):
        """Graphs of the image encoder at the processor's pixel shape; None (eager) if it cannot be
        captured (an encoder that synchronizes with the host, say)."""
        from PIL import Image

        from model.graphs import GraphEncoder

        pix = self.processor.preprocess_images([Image.new("RGB", (64, 64))])
        try:
            return GraphEncoder(self.model.encode_images, tuple(pix.shape[1:]), pix.dtype, self.device,
                                self.config.encoder_graph_images).capture()
        except Exception:  # noqa: BLE001 - encoding still works eagerly
            log.warning("image encoder could not be captured in CUDA graphs; encoding eagerly", exc_info=True)
            return None

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run the prefill once at each kind of shape serving meets, so that no request waits for
        a kernel to be compiled: Triton compiles a kernel per launch configuration (the scan picks
        one by batch size) and per length class (1, a multiple of 16, any other), which cost a
        second or more each on first use. Uses slots from 0 and zeroes them again; the cache and
        the metrics see nothing."""
        cap = min(self.config.max_prefill_seqs, self.config.max_num_seqs)
        slots = torch.arange(cap, device=self.device)
        from PIL import Image

        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "warm-up"}]}]
        with_image = self.processor.tokenize(self.processor.apply_chat_template(msgs), 1)
        pix = self.processor.preprocess_images([Image.new("RGB", (64, 64))]).to(self.device)
        for b in range(1, cap + 1):  # every prefill batch size: the scans pick a launch configuration by it
            for l in (1, 17, 32):
                lengths = torch.full((b,), l, device=self.device)
                lengths[-1] = max(1, l - 3)  # ragged, as batched prompts are
                self.model(torch.zeros(b, l, dtype=torch.long, device=self.device), None, state=self.state,
                           slots=slots[:b], lengths=lengths, last_only=True)
            self.model(torch.tensor([with_image] * b, device=self.device), pix.expand(b, *pix.shape[1:]),
                       state=self.state, slots=slots[:b], lengths=torch.full((b,), len(with_image), device=self.device),
                       last_only=True)
        self.state.reset(slots.tolist())

    # ---- public, thread-safe -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vlmamba-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def add_request(self, req: EngineRequest) -> None:
        with self._cv:
            self._incoming.append(req)
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._aborts.add(request_id)
            self._cv.notify()

    def num_waiting(self) -> int:
        return len(self._incoming) + len(self.waiting)

    def num_running(self) -> int:
        return len(self.running)

    def slots_used(self) -> int:
        return self.config.max_num_seqs - len(self.free_slots)

    def stats(self) -> EngineStats:
        c = self.cache
        return EngineStats(self.num_running(), self.num_waiting(), self.slots_used(), self.config.max_num_seqs,
                           c.bytes, len(c), c.hits, c.misses, c.evictions)

    # ---- the loop --------------------------------------------------------------------------
    def _run(self) -> None:
        name_os_thread()
        while True:
            with self._cv:
                while not (self._stop or self._incoming or self.waiting or self.running or self._aborts):
                    self.last_heartbeat = time.monotonic()
                    self._cv.wait(timeout=1.0)
                if self._stop:
                    break
                self._take_new()
            self.last_heartbeat = time.monotonic()
            with torch.inference_mode():
                self._iteration()
            self.observer.on_iteration_end()
        for req in list(self.waiting) + self.running:
            self._fail(req, "server shutting down")

    def _iteration(self) -> None:
        new = self._admit()
        if new:
            self._guarded("prefill", new, lambda: self._prefill(new))
        pending = {id(r) for inf in self._pending for r in inf.reqs}
        ready = [r for r in self.running if r.last_token is not None or id(r) in pending]
        steps = self.steps
        if ready:
            self._guarded("decode", ready, lambda: self._decode(ready))
        if self.steps == steps:  # no step launched (every row at its end, or gone): read what is in flight
            self._drain()

    def _guarded(self, phase: str, reqs: list[EngineRequest], fn) -> None:
        """A failing batch fails its own requests only; the engine and other requests carry on."""
        try:
            if self.fault_hook is not None:
                self.fault_hook(phase, reqs)
            fn()
        except Exception as e:  # noqa: BLE001 - one bad batch must not kill the server
            log.exception("engine %s failed for %d requests", phase, len(reqs))
            if phase == "decode":  # a step that failed midway leaves nothing to read (every row of
                self._pending = []  # it failed); a failed prefill leaves the step in flight as it is
                self._settle()
            for r in reqs:
                self._fail(r, f"internal error during {phase}: {type(e).__name__}")

    def _settle(self) -> None:
        """After launches were dropped unread: let the device finish them, so that no copy of
        their tokens lands in a host buffer after a later launch has taken that buffer."""
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
            except Exception:  # noqa: BLE001 - a broken device fails the next launch, and its requests
                log.exception("the device did not finish the dropped launches")

    def _take_new(self) -> None:
        self.waiting.extend(self._incoming)
        self._incoming.clear()
        if self._aborts:
            for r in [r for r in list(self.waiting) + self.running if r.request_id in self._aborts]:
                r.aborted = True
                self._release(r)
                if r in self.waiting:
                    self.waiting.remove(r)
                self.observer.on_finish(time.monotonic() - r.arrival, EngineOutput(
                    r.request_id, finished=True, finish_reason="abort", **_spent(r)))
            self._aborts.clear()

    # ---- phases ----------------------------------------------------------------------------
    def _admit(self) -> list[EngineRequest]:
        new = []
        while self.waiting and self.free_slots and len(new) < self.config.max_prefill_seqs:
            req = self.waiting.popleft()
            req.slot = self.free_slots.pop()
            req.admit_time = time.monotonic()
            self._restore(req)
            req.decoder = SequenceDecoder(self.processor.tokenizer, req.params,
                                          tuple(self.processor.eos_token_ids), self.device)
            self.running.append(req)
            new.append(req)
        return new

    def _cache_items(self, req: EngineRequest) -> list:
        return prompt_items(req.prompt_ids, self.processor.image_token_id, [im.digest for im in req.images],
                            self.processor.num_image_tokens)

    def _restore(self, req: EngineRequest) -> None:
        """Load the longest cached prefix (leaving at least one token to prefill) into the slot."""
        hashes = prefix_hashes(req.scope, self._cache_items(req))
        req.prompt_key = req.chain = hashes[-1]
        hit = self.cache.lookup(req.scope, hashes, len(req.prompt_ids) - 1)
        if hit is None:
            req.cached_tokens = 0
            self.state.reset([req.slot])
        else:
            req.cached_tokens, saved = hit
            self.state.write(req.slot, saved)

    def _prefill(self, reqs: list[EngineRequest]) -> None:
        suffixes = [r.prompt_ids[r.cached_tokens:] for r in reqs]
        images = self._suffix_images(reqs)
        lengths = to_device([len(s) for s in suffixes], self.device, torch.long)
        pad = int(self.processor.image_token_id == 0)  # padding must not read as image positions
        ids = torch.full((len(reqs), max(len(s) for s in suffixes)), pad, dtype=torch.long)
        for i, s in enumerate(suffixes):
            ids[i, : len(s)] = torch.tensor(s)
        slots = to_device([r.slot for r in reqs], self.device, torch.long)
        n_image = sum(s.count(self.processor.image_token_id) for s in suffixes)
        self.observer.on_prefill(len(reqs), sum(len(s) for s in suffixes))
        logits = self.prefill_logits(to_device(ids, self.device), self._pixels(images), slots, lengths, n_image)
        # The prompt's end: a resume point even if the reply does not re-tokenize the same.
        self._cache_states([(r, r.prompt_key, len(r.prompt_ids), r.slot) for r in reqs])
        # The first tokens stay on the device for the step that follows; the host reads them once
        # that step is launched (or, if none is, at the end of the iteration).
        first = pick_tokens(logits, [r.decoder for r in reqs], self._mask)
        self._pending.append(self._launch_copy(reqs, first))

    def prefill_logits(self, ids: torch.Tensor, pixel_values: torch.Tensor | None, slots: torch.Tensor,
                       lengths: torch.Tensor | None, n_image: int | None = None) -> torch.Tensor:
        """Prefill right-padded ids (b, l) with their images into the slots -> last logits (b, V):
        the image encoder and the LM from CUDA graphs where a bucket holds the batch. ``n_image``:
        the image positions in ids, counted on the host (else on the device, which waits)."""
        if pixel_values is None:
            image_embeds = None
        elif self.encoder_graphs is not None:
            image_embeds = self.encoder_graphs.run(pixel_values)
        else:
            image_embeds = self.model.encode_images(pixel_values)
        embeds = self.model.embed(ids, image_embeds, n_image)
        if self.prefill_graphs is not None:
            return self.prefill_graphs.run(embeds, slots, lengths)
        return self.model.llm(inputs_embeds=embeds, state=self.state, slots=slots, lengths=lengths, last_only=True)

    def _pixels(self, images: list[torch.Tensor]) -> torch.Tensor | None:
        """The images' pixel_values on the device, (i, 3, H, W) float32: uint8 ones are copied as
        such (a quarter of the bytes) and normalized there."""
        if not images:
            return None
        if all(px.dtype == torch.uint8 for px in images):
            return self.processor.normalize_pixels(to_device(torch.stack(images), self.device))
        return to_device(torch.stack([px if px.is_floating_point() else self.processor.normalize_pixels(px)
                                      for px in images]), self.device)

    def _suffix_images(self, reqs: list[EngineRequest]) -> list[torch.Tensor]:
        """Pixel values of the images whose placeholders lie in the uncached suffixes, in order.
        A cached prefix ends on text, so it covers whole images only."""
        per, out = self.processor.num_image_tokens, []
        for r in reqs:
            n_cached = r.prompt_ids[: r.cached_tokens].count(self.processor.image_token_id) // per
            out += [im.pixel_values for im in r.images[n_cached:]]
        return out

    def _decode(self, reqs: list[EngineRequest]) -> None:
        if self._end_in_flight(reqs):
            return  # a step after it would only make tokens past max_tokens
        tokens = self._next_tokens(reqs)
        key = tuple(r.slot for r in reqs)
        if key != self._slots[0]:  # the batch changed: copy its slots over once
            self._slots = (key, to_device(key, self.device, torch.long))
        slots = self._slots[1]
        if self.graphs is not None:  # the graph masks the logits and takes their argmax itself
            logits = self.graphs.step(tokens, slots, slots_key=key)
            mask, argmax = None, self.graphs.argmax
        else:
            logits = self.model.step(tokens, state=self.state, slots=slots)
            mask, argmax = self._mask, None
        for r in reqs:
            r.fed += 1
        self.steps += 1
        self.batched_steps += len(reqs) > 1
        self.max_batch = max(self.max_batch, len(reqs))
        self.observer.on_step(len(reqs))
        lookahead = not any(r.params.presence_penalty or r.params.frequency_penalty for r in reqs)
        if not lookahead:
            self._drain()  # penalties count every earlier token: read them before sampling
        sampled = pick_tokens(logits, [r.decoder for r in reqs], mask, argmax)
        cur = self._launch_copy(reqs, sampled)
        self._drain()  # host work of the earlier launches overlaps this step on the device
        self._pending = [cur]
        if not lookahead:
            self._drain()

    def _end_in_flight(self, reqs: list[EngineRequest]) -> bool:
        """Whether the tokens in flight take every request to its max_tokens."""
        pending = {id(r) for inf in self._pending for r in inf.reqs}
        return all(id(r) in pending and len(r.decoder.token_ids) + 1 >= r.params.max_tokens for r in reqs)

    def _next_tokens(self, reqs: list[EngineRequest]) -> torch.Tensor:
        """(b,) tokens to feed: each row's from the work in flight on the device (the step before,
        or the prefill), else the host's last token."""
        pend = self._pending
        if not pend:
            return to_device([r.last_token for r in reqs], self.device, torch.long)
        if len(pend) == 1 and len(pend[0].reqs) == len(reqs) and all(a is b for a, b in zip(pend[0].reqs, reqs)):
            return pend[0].tokens
        pos, src = {}, []
        for inf in pend:
            base = sum(len(t) for t in src)
            pos.update((id(r), base + i) for i, r in enumerate(inf.reqs))
            src.append(inf.tokens[: len(inf.reqs)])
        src = src[0] if len(src) == 1 else torch.cat(src)
        idx = to_device([pos.get(id(r), -1) for r in reqs], self.device, torch.long)
        host = to_device([0 if id(r) in pos else r.last_token for r in reqs], self.device, torch.long)
        return torch.where(idx >= 0, src[idx.clamp(min=0)], host)

    def _launch_copy(self, reqs: list[EngineRequest], tokens: torch.Tensor) -> _Inflight:
        if self._pinned is None:
            return _Inflight(reqs, tokens, tokens, None)
        # Three buffers: the ones of the (at most two) launches still pending are not reused.
        buf = self._pinned[self._turn][: tokens.shape[0]]
        self._turn = (self._turn + 1) % len(self._pinned)
        if self.graphs is not None and tokens is self.graphs.argmax:
            done = self.graphs.copy_out(buf)  # on a side stream: the next step does not wait for it
        else:
            done = to_host(tokens, buf)
        return _Inflight(reqs, tokens, buf, done)

    def _drain(self) -> None:
        """Read every pending launch's tokens, oldest first. Launches whose tokens cannot be read
        fail their own requests only; nothing raises out of here (it also runs outside a phase's
        guard, at the end of an iteration)."""
        pending, self._pending = self._pending, []
        for inf in pending:
            try:
                self._consume(inf)
            except Exception as e:  # noqa: BLE001 - one launch's failure must not take the others down
                log.exception("reading the tokens of %d sequences failed", len(inf.reqs))
                live = {id(r) for r in self.running}
                for r in inf.reqs:
                    if id(r) in live:
                        self._fail(r, f"internal error reading tokens: {type(e).__name__}")

    def _consume(self, inf: _Inflight) -> None:
        """Read a launch's tokens on the host and deliver them (rows gone since are skipped)."""
        if inf.done is not None:
            inf.done.synchronize()
        live = {id(r) for r in self.running}
        pairs = [(r, t) for r, t in zip(inf.reqs, inf.host.tolist())
                 if id(r) in live and not r.aborted and not r.decoder.finished]
        self._deliver(pairs)

    def _cache_states(self, items: list[tuple[EngineRequest, bytes, int, int]]) -> None:
        """Store slots' states in the session cache, each item (request, key, items covered,
        slot); only the states the cache still holds after the whole batch are copied out of
        their slots."""
        stores = [(r.scope, r.session_id, key, n) for r, key, n, _ in items]
        self.cache.store_many(stores, self.state.bytes_per_slot, lambda i: self.state.read(items[i][3]))

    def _deliver(self, pairs: list[tuple[EngineRequest, int]]) -> None:
        """Hand each request its token. A request whose delivery fails (its detokenizer, its
        sink) fails alone; the others of the batch carry on."""
        now = time.monotonic()
        done = []
        for req, tok in pairs:
            try:
                text = req.decoder.accept(tok)
                if req.first_token_time is None:
                    req.first_token_time = now
                    self.observer.on_first_token(now - req.arrival, max(0.0, (req.admit_time or now) - req.arrival))
                else:
                    self.observer.on_token(now - req.last_token_time)
                req.last_token_time = now
                req.last_token = tok
                if req.decoder.finished:
                    done.append((req, text))
                else:
                    self._final_key(req)  # hash the tokens fed so far while the device runs the next step
                    if text:
                        req.sink(EngineOutput(req.request_id, text, [tok]))
            except Exception as e:  # noqa: BLE001
                log.exception("delivering a token of request %s failed", req.request_id)
                self._fail(req, f"internal error delivering a token: {type(e).__name__}")
        ends = [(req, self._final_key(req), len(req.prompt_ids) + req.fed, req.slot) for req, _ in done]
        for req, text in done:
            try:
                self._finish(req, text, now)
            except Exception:  # noqa: BLE001 - it is released and answered; only its final output was lost
                log.exception("delivering the final output of request %s failed", req.request_id)
        if ends:
            # After the replies, which then do not wait for the copies (~3 ms at 64-256 rows). The
            # freed slots keep their states until the next iteration admits anyone, and a follow-up
            # turn is admitted no earlier. The replies are out, so a failure only loses the entries.
            try:
                self._cache_states(ends)
            except Exception:  # noqa: BLE001 - the requests are done; the cache is an optimisation
                log.exception("could not keep the final states of %d sequences in the session cache", len(ends))

    def _final_key(self, req: EngineRequest) -> bytes:
        """The cache key of what the slot holds: the prompt and the tokens fed so far. The chain
        grows by the tokens fed since the last call (one per step), so a request that ends does
        not hash all of its tokens at once (256 x 127 tokens: ~13 ms of host time)."""
        new = req.decoder.token_ids[req.hashed: req.fed]
        if new:
            req.chain = prefix_hashes(req.scope, new, req.chain)[-1]
            req.hashed += len(new)
        return req.chain

    def _finish(self, req: EngineRequest, text: str, now: float) -> None:
        dec = req.decoder
        out = EngineOutput(req.request_id, text, [dec.token_ids[-1]], True, dec.finish_reason, len(req.prompt_ids),
                           len(dec.token_ids), req.cached_tokens)
        self._release(req)
        req.answered = True
        try:
            self.observer.on_finish(now - req.arrival, out)
        finally:  # the reply goes out even if the metrics fail
            req.sink(out)

    def _fail(self, req: EngineRequest, message: str) -> None:
        self._release(req)
        if req.answered:  # its final output is out: one request, one final output
            return
        if req in self.waiting:
            self.waiting.remove(req)
        req.answered = True
        out = EngineOutput(req.request_id, finished=True, finish_reason="error", error=message, **_spent(req))
        try:
            self.observer.on_finish(time.monotonic() - req.arrival, out)
            req.sink(out)
        except Exception:  # noqa: BLE001 - called from the engine's error paths, which must not raise
            log.exception("delivering the failure of request %s failed", req.request_id)

    def _release(self, req: EngineRequest) -> None:
        if req in self.running:
            self.running.remove(req)
        if req.slot is not None:
            self.free_slots.append(req.slot)
            req.slot = None


def _spent(req: EngineRequest) -> dict:
    """The tokens a request that ends early (aborted, failed) used: its prompt once admitted (the
    prefill runs in the step that admits it), and the tokens it generated."""
    if req.decoder is None:  # still waiting: nothing ran
        return {"prompt_tokens": 0, "completion_tokens": 0}
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.decoder.token_ids)}
