"""A tiny OpenAI-compatible server on loopback whose replies a test chooses (a fake judge, a busy server)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class FakeOpenAI:
    """``reply(body) -> (status, text, headers)`` answers each POST /v1/chat/completions; ``calls`` keeps
    (time, body) of every request."""

    def __init__(self, reply: Callable[[dict], tuple[int, str, dict]], model: str = "fake-judge"):
        self.calls: list[tuple[float, dict]] = []
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": model, "object": "model"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.calls.append((time.monotonic(), body))
            status, text, headers = reply(body)
            if status != 200:
                return JSONResponse({"error": {"message": text, "type": "x", "param": None, "code": None}},
                                    status_code=status, headers=headers)
            return {"id": "c", "object": "chat.completion", "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}]}

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("fake server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
