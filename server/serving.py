"""Chat completions: HTTP request -> engine request -> a response body or an SSE stream."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator

from model.errors import InvalidRequest, PromptTooLong
from model.sampling import SamplingParams
from server.engine import EngineOutput, EngineRequest, ImageInput
from server.errors import EngineFailure, QueueFull
from server.protocol import (ChatCompletionRequest, chunk_body, completion_body, completion_id, content_chunk_sse, sse,
                             usage_dict)

log = logging.getLogger(__name__)
_warned_fields: set[str] = set()
KNOWN = set(ChatCompletionRequest.model_fields)

MAX_STOP_CHARS = 256  # per stop sequence


def prepare_image(processor, image) -> ImageInput:
    """A decoded RGB image -> the engine's input: the processor's resized pixels, as uint8 where
    the processor allows (the engine normalizes them on its device: a quarter of the bytes to
    hash here and to send to the engine process), and their digest. Runs in the image fetcher's
    decoding thread, so a request holds its images at the model's size from then on."""
    px = processor.preprocess_images([image], normalize=False)[0]
    return ImageInput(px, hashlib.sha256(px.numpy().tobytes()).hexdigest()[:32])


def scope_of(api_key: str | None) -> str:
    """Cache scope of a caller: a digest of the API key (never the key itself)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32] if api_key else ""


class ChatService:
    def __init__(self, engine, processor, fetcher, settings, metrics, model_name: str):
        self.engine, self.processor, self.fetcher = engine, processor, fetcher
        self.settings, self.metrics, self.model_name = settings, metrics, model_name
        self.pending = 0  # admitted, still fetching or tokenizing, not yet in the engine
        self._handoff: Handoff | None = None  # engine -> event loop delivery, made on the serving loop

    # ---- validation and admission ------------------------------------------------------------
    def check(self, req: ChatCompletionRequest) -> None:
        unknown = set(req.model_extra or ()) - _warned_fields
        if unknown:
            _warned_fields.update(unknown)
            log.info("ignoring unsupported request fields: %s", ", ".join(sorted(unknown)))
        s = self.settings
        if req.stream_options is not None and not req.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
        if req.n not in (None, 1):
            raise InvalidRequest("n > 1 is not supported", param="n")
        if req.logprobs:
            raise InvalidRequest("logprobs are not supported", param="logprobs")
        if req.tools:
            raise InvalidRequest("tools are not supported by this model", param="tools")
        if len(req.messages) > s.max_messages:
            raise InvalidRequest(f"too many messages: {len(req.messages)} > {s.max_messages}", param="messages")
        chars = sum(len(m.content) if isinstance(m.content, str) else
                    sum(len(p.text) for p in m.content if p.type == "text") if m.content else 0 for m in req.messages)
        if chars > s.max_text_chars:
            raise InvalidRequest(f"too much text: {chars} characters > {s.max_text_chars}", param="messages")
        n_images = sum(1 for m in req.messages if isinstance(m.content, list) for p in m.content
                       if p.type == "image_url")
        if n_images > s.max_images_per_request:
            raise InvalidRequest(f"too many images: {n_images} > {s.max_images_per_request}", param="messages")

    def admit(self) -> None:
        """Reserve a queue place before any image is fetched; 429 when the queue is full."""
        if self.engine.num_waiting() + self.pending >= self.settings.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise QueueFull(f"the server's queue is full ({self.settings.max_queue} waiting); retry shortly")
        self.pending += 1

    # ---- building the engine request -----------------------------------------------------------
    async def _images_and_messages(self, req: ChatCompletionRequest):
        urls, messages = [], []
        for m in req.messages:
            role = "system" if m.role == "developer" else m.role
            if isinstance(m.content, list):
                parts = []
                for p in m.content:
                    if p.type == "text":
                        parts.append({"type": "text", "text": p.text})
                    else:
                        parts.append({"type": "image"})
                        urls.append(p.image_url.url)
                messages.append({"role": role, "content": parts})
            else:
                messages.append({"role": role, "content": m.content or ""})
        # One failed image fails the request: the task group cancels the other fetches then
        # (a plain gather would leave them downloading after the error has gone out).
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._fetch(u)) for u in urls]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return messages, [t.result() for t in tasks]

    async def _fetch(self, url: str):
        try:
            got = await self.fetcher.fetch(url)
        except Exception as e:
            self.metrics.fetch_failures.labels(getattr(e, "code", None) or type(e).__name__).inc()
            raise
        self.metrics.fetch.observe(got.seconds)
        return got.image

    def _encode(self, messages: list[dict], images: list[ImageInput]) -> tuple[list[int], list[ImageInput]]:
        """Runs in a worker thread: chat template and tokenizing (the images were prepared as
        they were decoded, :func:`prepare_image`)."""
        # Text that mentions the image marker keeps it as text: only image parts are placeholders.
        text = self.processor.apply_chat_template(self.processor.escape_markers(messages))
        return self.processor.tokenize(text, len(images)), images

    def _params(self, req: ChatCompletionRequest, prompt_len: int) -> SamplingParams:
        room = self.settings.max_model_len - prompt_len
        if room < 1:
            raise PromptTooLong(f"the prompt has {prompt_len} tokens; the limit is {self.settings.max_model_len} "
                                "including the completion", param="messages")
        asked = req.max_completion_tokens or req.max_tokens
        if asked is not None and asked > room:
            raise PromptTooLong(f"prompt ({prompt_len}) + max_tokens ({asked}) exceeds max_model_len "
                                f"({self.settings.max_model_len})", param="max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise InvalidRequest("at most 4 stop sequences", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            # The engine matches stop strings on every token it detokenizes, in the loop all requests share.
            raise InvalidRequest(f"stop sequences may be at most {MAX_STOP_CHARS} characters", param="stop")
        return SamplingParams(max_tokens=asked or min(room, self.settings.default_max_tokens),
                              temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, seed=req.seed,
                              stop=tuple(stop), presence_penalty=req.presence_penalty or 0.0,
                              frequency_penalty=req.frequency_penalty or 0.0, ignore_eos=req.ignore_eos)

    async def submit(self, req: ChatCompletionRequest, api_key: str | None, session_id: str | None):
        """Fetch, encode and hand the request to the engine. Returns (request_id, output queue)."""
        start = time.monotonic()
        try:
            messages, images = await self._images_and_messages(req)
            ids, inputs = await asyncio.to_thread(self._encode, messages, images)
            params = self._params(req, len(ids))
        finally:
            self.pending -= 1
        self.metrics.prepare.observe(time.monotonic() - start)
        queue = asyncio.Queue()
        rid = completion_id()
        handoff = self._handoff_for(asyncio.get_running_loop())
        sink = lambda out: handoff.put(queue, out)
        self.engine.add_request(EngineRequest(rid, ids, inputs, params, sink, scope=scope_of(api_key),
                                              session_id=session_id or req.session_id))
        return rid, queue

    # ---- responses ------------------------------------------------------------------------------
    async def complete(self, rid: str, queue: asyncio.Queue, disconnected=None) -> dict | None:
        """Collect the whole answer; ``disconnected`` (async, -> bool) is polled so a client that
        hangs up frees its slot even though nothing is being streamed to it (then: None)."""
        text, checked = [], time.monotonic()
        try:
            while True:
                try:
                    out: EngineOutput = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    out = None
                if disconnected is not None and time.monotonic() - checked > 0.5:
                    checked = time.monotonic()
                    if await disconnected():  # not an error of the server's: nothing to raise or log
                        self.engine.abort(rid)
                        return None
                if out is None:
                    continue
                text.append(out.text)
                if out.finished:
                    break
        except asyncio.CancelledError:
            self.engine.abort(rid)
            raise
        if out.error:
            raise EngineFailure(f"generation failed: {out.error}")
        usage = usage_dict(out.prompt_tokens, out.completion_tokens, out.cached_tokens)
        return completion_body(rid, self.model_name, "".join(text), out.finish_reason, usage)

    def _handoff_for(self, loop) -> "Handoff":
        if self._handoff is None or self._handoff.loop is not loop:
            self._handoff = Handoff(loop)
        return self._handoff

    async def stream(self, rid: str, queue: asyncio.Queue, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        content = content_chunk_sse(rid, self.model_name, created)
        finished = False
        try:
            yield sse(chunk_body(rid, self.model_name, created, {"role": "assistant", "content": ""}))
            while True:
                out: EngineOutput = coalesce(await queue.get(), queue)
                finished = out.finished
                if out.error:
                    err = {"message": f"generation failed: {out.error}", "type": "server_error", "param": None,
                           "code": "internal_error"}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    break
                if out.text:
                    yield content(out.text)
                if out.finished:
                    yield sse(chunk_body(rid, self.model_name, created, {}, out.finish_reason))
                    if include_usage:
                        usage = usage_dict(out.prompt_tokens, out.completion_tokens, out.cached_tokens)
                        yield sse(chunk_body(rid, self.model_name, created, {}, usage=usage, with_choice=False))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                self.engine.abort(rid)  # the client went away (or the stream broke): free the slot


class Handoff:
    """Engine thread (or engine process reader) -> event loop delivery, one loop wake-up per batch of outputs.

    The engine emits one output per running request per step; waking the loop for each one
    (a self-pipe write and a callback apiece) made the loop, not the GPU, the limit at high
    concurrency. Outputs gather here and the first of a batch schedules one flush.
    """

    def __init__(self, loop):
        self.loop = loop
        self.items: list = []
        self.lock = threading.Lock()

    def put(self, queue: asyncio.Queue, out: EngineOutput) -> None:
        with self.lock:
            self.items.append((queue, out))
            first = len(self.items) == 1
        if first:
            self.loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, out in items:
            queue.put_nowait(out)


def coalesce(out: EngineOutput, queue: asyncio.Queue) -> EngineOutput:
    """Merge the outputs already waiting behind ``out`` into one (text joined, last one's ending):
    a stream that fell behind catches up in one SSE chunk instead of one per token."""
    while not (out.finished or out.error) and not queue.empty():
        nxt = queue.get_nowait()
        nxt.text, nxt.token_ids = out.text + nxt.text, out.token_ids + nxt.token_ids
        out = nxt
    return out
