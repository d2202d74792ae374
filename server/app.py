"""The FastAPI application: thin routes over ChatService, the engine and the metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server import errors
from server.errors import BodyTooLarge, ModelNotFound, Unauthorized, Unavailable
from server.heap import freeze_startup_heap
from server.protocol import ChatCompletionRequest
from server.settings import ServerSettings
from server.threads import name_os_thread

log = logging.getLogger(__name__)


def load_model(settings: ServerSettings):
    import torch

    from model.checkpoint_vlm import load_vlmamba
    from model.demo import DEMO_CHECKPOINT

    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[settings.dtype]
    path = Path(settings.checkpoint or DEMO_CHECKPOINT)
    model, proc = load_vlmamba(path, device=device, dtype=dtype, backend=settings.backend,
                               random_weights=settings.random_weights)
    return model, proc, settings.served_model_name or path.name


class BodyLimit:
    """ASGI middleware: 413 for bodies over the limit, by Content-Length or while streaming in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen, replaced, app_started = 0, False, False

        async def counted():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge()
            return msg

        async def guarded(msg):
            # The framework may catch _TooLarge while it parses the body and answer 400 instead:
            # once the body went over, our 413 replaces the response the app starts.
            nonlocal replaced, app_started
            if replaced:
                return
            if seen > self.max_bytes and not app_started:
                replaced = True
                return await self._reject(send)
            app_started = app_started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, guarded)
        except _TooLarge:
            if not (replaced or app_started):
                await self._reject(send)

    async def _reject(self, send):
        resp = errors.error_response(BodyTooLarge(f"request body exceeds {self.max_bytes} bytes"))
        await send({"type": "http.response.start", "status": resp.status_code,
                    "headers": [(k.encode(), v.encode()) for k, v in resp.headers.items()]})
        await send({"type": "http.response.body", "body": resp.body})


class _TooLarge(Exception):
    pass


def draining_server(config, grace: float):
    """A uvicorn server with a drain phase: on SIGTERM/SIGINT the app answers new requests with 503
    while running ones finish (up to ``grace`` seconds), then uvicorn shuts down as usual."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app = config.app
            if getattr(app.state, "draining", False) or not hasattr(app.state, "engine"):
                return super().handle_exit(sig, frame)
            app.state.draining = True
            log.info("draining: refusing new requests, letting %d running finish", app.state.engine.num_running())
            asyncio.get_event_loop().create_task(self._drain(app.state.engine, sig, frame))

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if not self.should_exit:  # started: what this process holds from now on lives as long as it
                freeze_startup_heap("server process")

        async def _drain(self, engine, sig, frame):
            deadline = time.monotonic() + grace
            while (engine.num_running() or engine.num_waiting()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # let the last events reach their clients
            super().handle_exit(sig, frame)

    return _Server(config)


async def _start_engine(settings: ServerSettings, loaded, cfg, metrics):
    """The engine in its own process when the server loads the model itself (the default), else
    in a thread of this one. Returns ``(engine, processor, model name)`` once the engine runs."""
    from server.engine import Engine, EngineProcess

    if loaded is None and not settings.no_engine_process:
        engine = EngineProcess(partial(load_model, settings), cfg, metrics)
        await asyncio.to_thread(engine.start)  # the child loads the model; this process never touches CUDA
        proc, name, device = engine.processor, engine.model_name, engine.device
    else:
        model, proc, name = loaded or load_model(settings)
        engine = Engine(model, proc, cfg, metrics)
        engine.start()
        device = engine.device
    log.info("serving %s on %s with %d state slots (engine %s)", name, device, settings.max_num_seqs,
             f"process {engine.pid}" if isinstance(engine, EngineProcess) else "thread")
    return engine, proc, name


def create_app(settings: ServerSettings, loaded=None) -> FastAPI:
    """``loaded``: an already loaded ``(model, processor, name)`` (tests share one model); the
    engine then runs in a thread of this process."""
    from server.engine import EngineConfig
    from server.images import ImageFetcher, ImageLimits
    from server.metrics import Metrics
    from server.serving import ChatService, prepare_image

    # Built before the model loads, so that inconsistent limits fail at once.
    limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                         timeout_s=settings.image_fetch_timeout, allow_private=settings.allow_private_image_urls,
                         allowed_domains=tuple(d.strip() for d in (settings.image_domains or "").split(",")
                                               if d.strip()),
                         max_decoding_pixels=settings.max_decoding_pixels)
    state = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Image decoding and tokenizing run in these threads, under their own names (top -H, profilers).
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="vlmamba-worker", initializer=name_os_thread))
        metrics = Metrics()
        cfg = EngineConfig(settings.max_num_seqs, settings.max_prefill_seqs, int(settings.state_cache_gb * 2**30),
                           cuda_graphs=not settings.no_cuda_graphs, state_dtype=settings.state_dtype,
                           prefill_graph_tokens=settings.prefill_graph_tokens)
        engine, proc, name = await _start_engine(settings, loaded, cfg, metrics)
        metrics.attach(engine)
        fetcher = ImageFetcher(limits, prepare=partial(prepare_image, proc))
        metrics.watch_decoding(fetcher.budget)
        app.state.engine = engine  # for operators' hooks and tests (e.g. fault injection)
        state.update(engine=engine, metrics=metrics, name=name, started=int(time.time()),
                     chat=ChatService(engine, proc, fetcher, settings, metrics, name))
        yield
        await asyncio.to_thread(engine.shutdown)
        await fetcher.aclose()

    app = FastAPI(title="vlmamba-serve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for VL-Mamba vision-language models.")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    errors.install(app)
    keys = [k.encode() for k in settings.api_keys]

    def api_key(authorization: str | None = Header(default=None)) -> str | None:
        if not keys:
            return None
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        # The scheme is case-insensitive (RFC 9110); a bare key without it is not a bearer credential.
        token = credentials.strip().encode() if scheme.lower() == "bearer" else b""
        # Compare against every key in constant time; never log the key.
        if not any([hmac.compare_digest(token, k) for k in keys]):
            raise Unauthorized("missing or invalid API key (send 'Authorization: Bearer KEY')")
        return token.decode()

    open_or_key = (lambda: None) if not settings.protect_health else api_key

    @app.post("/v1/chat/completions", summary="Create a chat completion (OpenAI-compatible)")
    async def chat_completions(body: ChatCompletionRequest, request: Request, key: str | None = Depends(api_key),
                               x_session_id: str | None = Header(default=None, max_length=256)):
        if getattr(app.state, "draining", False):
            raise Unavailable("the server is shutting down; retry on another replica")
        if not state["engine"].alive:
            raise Unavailable("the engine is not running; retry on another replica")
        chat = state["chat"]
        chat.check(body)
        chat.admit()
        rid, queue = await chat.submit(body, key, x_session_id)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(chat.stream(rid, queue, include), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answer = await chat.complete(rid, queue, request.is_disconnected)
        if answer is None:  # the client hung up and its request was aborted: nobody to answer
            return Response(status_code=499)
        return JSONResponse(answer)

    def model_card() -> dict:
        return {"id": state["name"], "object": "model", "created": state["started"], "owned_by": "vlmamba-serve"}

    @app.get("/v1/models", summary="List the served model")
    async def models(key: str | None = Depends(api_key)):
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", summary="The served model, by its id")
    async def model(model_id: str, key: str | None = Depends(api_key)):
        if model_id != state["name"]:
            raise ModelNotFound(f"the model {model_id[:100]!r} is not served here; this server serves "
                                f"{state['name']!r}", param="model")
        return model_card()

    @app.get("/health", summary="200 once the model is loaded and the engine loop is alive")
    async def health(_: None = Depends(open_or_key)):
        engine = state.get("engine")
        if engine is None or not engine.alive:
            raise Unavailable("model not loaded or engine stopped")
        if getattr(app.state, "draining", False):
            raise Unavailable("draining for shutdown")
        return {"status": "ok", "running": engine.num_running(), "waiting": engine.num_waiting(),
                "slots_used": engine.slots_used()}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics(_: None = Depends(open_or_key)):
        return Response(state["metrics"].render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if not settings.no_webui:
        from server.webui import mount_webui

        mount_webui(app)
    return app
