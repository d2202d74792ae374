"""The browser chat page: ``GET /`` serves ``static/index.html``; its CSS and JS live under ``/static/``.

Plain files, no build step and nothing fetched from other origins, so the page works offline.
The page only talks to this server's own OpenAI-compatible API (``/v1/models``,
``/v1/chat/completions``), so it needs no routes of its own and no access to the engine.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

# The page may load its own files and talk to its own server; images may also be data:/blob: URLs
# (picked files) or http(s) URLs the user pasted (shown as a preview). Nothing else.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data: blob: http: https:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": _CSP, "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff"}


def mount_webui(app: FastAPI) -> None:
    """Add the chat page at ``/`` and its assets at ``/static/`` to ``app``."""

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
