"""The web console at /ui: a page, one script and one stylesheet (resisod/http/ui/), and the
few JSON routes it needs beyond the public API: the live feed, one job with its parameters,
and the gallery of kept results.

The page and its files hold no data, so they load without the API key (`public`); the page
asks for the key when an API call answers 401 and sends it as a Bearer header, the feed
included (it is read with fetch, not EventSource, so that it can carry the header).
"""
from __future__ import annotations

import asyncio
import json
from importlib import resources
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response, StreamingResponse

from ..protocol import Op
from .feed import Feed

UI_FILES = {"index.html": "text/html; charset=utf-8",
            "console.js": "text/javascript; charset=utf-8",
            "console.css": "text/css; charset=utf-8"}
KEEPALIVE_S = 15.0  # a comment line now and then, so proxies keep an idle feed open
GALLERY_SCAN = 1000  # completed jobs looked through for images and audio


def public(path: str) -> bool:
    return path == "/ui" or path.startswith("/ui/")


def _ui_file(name: str) -> bytes:
    return (resources.files(__package__) / "ui" / name).read_bytes()


def _links(rec: dict[str, Any]) -> dict[str, Any]:
    """The gateway URLs of a finished job's files."""
    if rec.get("status") != "completed":
        return {}
    if rec.get("kind") == "image":
        return {"image_url": f"/images/{rec['task_id']}.png"}
    if rec.get("kind") == "tts":
        return {"audio_url": f"/audio/{rec['task_id']}.wav"}
    return {}


def router(daemon: Any) -> APIRouter:
    r = APIRouter(include_in_schema=False)
    feed = Feed(daemon)
    r.feed = feed  # type: ignore[attr-defined]  # for tests and introspection

    def page(name: str) -> Response:
        # read per request: the files are small, and an edited page shows on reload
        return Response(_ui_file(name), media_type=UI_FILES[name],
                        headers={"Cache-Control": "no-cache"})

    @r.get("/ui")
    @r.get("/ui/")
    async def index() -> Response:
        return page("index.html")

    @r.get("/ui/{name}")
    async def asset(name: str) -> Response:
        if name not in UI_FILES:
            raise HTTPException(404, f"no console file {name!r}")
        return page(name)

    @r.get("/api/console/feed")
    async def live() -> StreamingResponse:
        async def sse() -> Any:
            q = feed.subscribe()
            try:
                while True:
                    try:
                        msg = await asyncio.wait_for(q.get(), KEEPALIVE_S)
                    except asyncio.TimeoutError:
                        yield ": idle\n\n"
                        continue
                    yield f"data: {json.dumps(msg, ensure_ascii=False, default=str)}\n\n"
            finally:
                feed.unsubscribe(q)
        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})

    @r.get("/api/jobs/{task_id}")
    async def job(task_id: str) -> Any:
        rec = await daemon.call(Op.GET, task_id=task_id, params=True)
        out = {k: v for k, v in rec.items() if k not in ("v", "rid", "event")}
        return {**out, **_links(out)}

    @r.get("/api/gallery")
    async def gallery(limit: int = 60) -> Any:
        res = await daemon.call(Op.JOBS, limit=GALLERY_SCAN, state="completed")
        items = [{**j, **_links(j)} for j in res.get("jobs", [])
                 if j.get("kind") in ("image", "tts")]
        return {"items": items[:max(1, min(limit, 500))]}

    return r
