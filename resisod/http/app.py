"""The HTTP gateway: the seed's REST API, an OpenAI-compatible API, health and metrics.

It is one more client of resisod over its socket: every request becomes a daemon job, so
there is one scheduling path and no second queue here.
"""
from __future__ import annotations

import base64
import hmac
import json
import time
from typing import Any, Literal, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from typing import Annotated

from ..protocol import Code, Op
from . import console
from .aclient import AsyncDaemon, DaemonError, Unreachable
from .metrics import GatewayMetrics

STATUS_HTTP = {Code.BAD_REQUEST: 400, Code.CONTEXT_OVERFLOW: 400, Code.TOO_LARGE: 413,
               Code.NOT_FOUND: 404, Code.MODEL_NOT_FOUND: 404, Code.QUEUE_FULL: 429,
               Code.ENGINE_UNAVAILABLE: 503, Code.SHUTTING_DOWN: 503, Code.TIMEOUT: 504,
               Code.STORAGE_FULL: 507, Code.GPU_OOM: 507}
SEED_STATUS = {"running": "processing"}  # the seed API calls a running job "processing"


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")


class BodyLimit:
    """Count the body bytes as they are read, chunked or not, and stop at the limit.

    A `Content-Length` over the limit is refused before anything is read (in `guard`); this
    catches the bodies that do not announce their length, or lie about it."""

    def __init__(self, app: Any, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        await self.app(scope, counted, send)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        self.status, self.code, self.message, self.headers = status, code, message, headers


def from_daemon(exc: DaemonError) -> ApiError:
    status = STATUS_HTTP.get(exc.code, 500 if exc.code == Code.ENGINE_ERROR else 400)
    headers = {"Retry-After": "1"} if exc.code == Code.QUEUE_FULL else None
    return ApiError(status, exc.code, exc.message, headers)


# --- request bodies (their schemas are the OpenAPI document) -----------------------------
# integers travel as msgpack (64-bit); the daemon checks the real ranges
Int = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
class LlmGenerate(BaseModel):
    prompt: str
    model: Optional[str] = None
    temperature: Optional[float] = None
    max_tokens: Optional[Int] = None
    stream: bool = False
    system: Optional[str] = None
    seed: Optional[Seed] = None


class TtsSynthesize(BaseModel):
    text: str
    voice: Optional[str] = None
    speed: Optional[float] = None


class ImageGenerate(BaseModel):
    prompt: str
    width: Optional[Int] = None
    height: Optional[Int] = None
    use_turbo: bool = False
    steps: Optional[Int] = None
    seed: Optional[Seed] = None
    negative_prompt: Optional[str] = None
    guidance_scale: Optional[float] = None


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatCompletion(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    max_tokens: Optional[Int] = None
    max_completion_tokens: Optional[Int] = None
    stream: bool = False
    stop: Optional[str | list[str]] = None
    seed: Optional[Seed] = None


class Speech(BaseModel):
    model: str = "tts"
    input: str
    voice: Optional[str] = None
    speed: Optional[float] = None
    response_format: Optional[Literal["wav", "pcm", "mp3", "opus", "aac", "flac"]] = None


class ImageGeneration(BaseModel):
    prompt: str
    model: Optional[str] = None
    n: int = Field(default=1, ge=1, le=4)
    size: Optional[str] = None
    response_format: Literal["url", "b64_json"] = "url"
    seed: Optional[Seed] = None


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _clean(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ev.items() if k not in ("v", "rid", "event", "data")}


def create_app(socket_path: str, http_cfg: dict[str, Any]) -> FastAPI:
    daemon = AsyncDaemon(socket_path)
    metrics = GatewayMetrics()
    app = FastAPI(title="resiso", version="1", description="resiso HTTP gateway: the seed "
                  "REST API and an OpenAI-compatible API over resisod.")

    @app.on_event("startup")
    async def _start() -> None:
        await daemon.start()

    @app.on_event("shutdown")
    async def _stop() -> None:
        await daemon.close()

    if http_cfg.get("cors_origins"):
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=http_cfg["cors_origins"],
                           allow_methods=["*"], allow_headers=["*"])

    api_key = http_cfg.get("api_key") or ""
    max_body = http_cfg.get("max_body_bytes", 1 << 20)
    app.add_middleware(BodyLimit, max_body=max_body)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        if api_key and request.url.path != "/api/health" and not console.public(request.url.path):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
                return _error(request, 401, "unauthorized", "missing or wrong bearer token")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body:
            return _error(request, 413, Code.TOO_LARGE,
                          f"request body over {max_body} bytes")
        response = await call_next(request)
        route = request.scope.get("route")  # the template, not the id-bearing path
        metrics.http(getattr(route, "path", "other"), request.method, response.status_code,
                     time.perf_counter() - t0)
        return response

    def _error(request: Request, status: int, code: str, message: str,
               headers: dict | None = None) -> JSONResponse:
        if request.url.path.startswith("/v1/"):
            kind = "invalid_request_error" if status < 500 else "server_error"
            body: dict[str, Any] = {"error": {"message": message, "type": kind,
                                              "param": None, "code": code}}
        else:
            body = {"status": "error", "error": {"code": code, "message": message}}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return _error(request, 413, Code.TOO_LARGE, exc.detail)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(DaemonError)
    async def _daemon_error(request: Request, exc: DaemonError) -> JSONResponse:
        e = from_daemon(exc)
        return _error(request, e.status, e.code, e.message, e.headers)

    @app.exception_handler(Unreachable)
    async def _unreachable(request: Request, exc: Unreachable) -> JSONResponse:
        return _error(request, 503, "unreachable", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        msg = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}"
                        for e in errs[:5])
        return _error(request, 422, Code.BAD_REQUEST, msg or "invalid request")

    async def finish(kind: str, job: Any) -> dict[str, Any]:
        final = await job.wait()
        metrics.job(kind, final)
        if final.get("event") == "error":
            raise from_daemon(DaemonError(final))
        if final.get("event") == "cancelled":
            raise ApiError(409, Code.CANCELLED, f"job {job.task_id} was cancelled")
        return final

    # --- seed API ----------------------------------------------------------------------------
    @app.post("/api/llm/generate")
    async def llm_generate(body: LlmGenerate) -> Any:
        params = _drop_none({"prompt": body.prompt, "model": body.model,
                             "temperature": body.temperature, "max_tokens": body.max_tokens,
                             "system": body.system, "seed": body.seed})
        job = await daemon.submit("llm", params, partials=body.stream)
        if not body.stream:
            final = await finish("llm", job)
            return {"task_id": job.task_id, "result": final.get("result", ""),
                    "status": final.get("status"), **_clean(final)}

        async def sse() -> Any:
            # text goes out as UTF-8 rather than \u escapes, as OpenAI's streams do; the
            # response declares it (Starlette adds charset=utf-8 to text/event-stream)
            try:
                async for ev in job.events():
                    if ev["event"] == "token":
                        yield f"data: {json.dumps({'task_id': job.task_id, 'token': ev['text']}, ensure_ascii=False)}\n\n"
                    elif ev["event"] == "result":
                        metrics.job("llm", ev)
                        yield f"data: {json.dumps({**_clean(ev), 'done': True}, ensure_ascii=False)}\n\n"
                    elif ev["event"] in ("error", "cancelled"):
                        metrics.job("llm", ev)
                        yield f"data: {json.dumps({'task_id': job.task_id, 'done': True, 'status': 'failed', 'error': {'code': ev.get('code', ev['event']), 'message': ev.get('message', '')}}, ensure_ascii=False)}\n\n"
            finally:
                if job.final is None:  # the HTTP client went away mid-stream
                    await job.cancel()
        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/api/tts/synthesize")
    async def tts_synthesize(body: TtsSynthesize) -> Any:
        job = await daemon.submit("tts", _drop_none({"text": body.text, "voice": body.voice,
                                                     "speed": body.speed}), partials=False)
        final = await finish("tts", job)
        return {"task_id": job.task_id, "audio_url": f"/audio/{job.task_id}.wav",
                "status": final.get("status"), "duration_ms": final.get("duration_ms"),
                "size_bytes": final.get("size_bytes"),
                "generation_time_ms": final.get("generation_time_ms"),
                "cached": final.get("cached"), "domain": final.get("domain"),
                "voice": final.get("voice")}

    async def result_file(task_id: str, media: str) -> Response:
        rec = await daemon.call(Op.GET, task_id=task_id, data=True)
        if rec.get("status") != "completed" or "data" not in rec:
            raise ApiError(404, Code.NOT_FOUND, f"{task_id} has no finished result file")
        parts, got = [rec["data"]], len(rec["data"])
        while got < rec["data_size"]:  # the daemon hands large files over in chunks
            more = (await daemon.call(Op.GET, task_id=task_id, data=True, offset=got))["data"]
            if not more:
                break
            parts.append(more)
            got += len(more)
        return Response(b"".join(parts), media_type=media)

    @app.get("/audio/{task_id}.wav")
    async def audio_file(task_id: str) -> Response:
        return await result_file(task_id, "audio/wav")

    @app.post("/api/image/generate")
    async def image_generate(body: ImageGenerate) -> Any:
        params = _drop_none(body.model_dump())
        job = await daemon.submit("image", params, stream=False)
        metrics.submitted("image")
        return {"task_id": job.task_id, "status": "queued",
                "estimated_time_ms": job.accepted.get("estimated_time_ms"),
                "position": job.accepted.get("position")}

    @app.get("/api/image/progress/{task_id}")
    async def image_progress(task_id: str) -> Any:
        rec = await daemon.call(Op.GET, task_id=task_id)
        status = SEED_STATUS.get(rec["status"], rec["status"])
        out: dict[str, Any] = {"task_id": task_id, "status": status,
                               "progress": rec.get("progress") or 0.0,
                               "estimated_time_remaining_ms":
                                   rec.get("estimated_time_remaining_ms", 0)}
        if "position" in rec:
            out["position"] = rec["position"]
        if rec["status"] == "completed":
            out.update(image_url=f"/images/{task_id}.png",
                       generation_time_ms=rec.get("generation_time_ms"),
                       size_bytes=rec.get("size_bytes"), width=rec.get("width"),
                       height=rec.get("height"), seed=rec.get("seed"))
        if rec.get("error"):
            out["error"] = rec["error"]
        return out

    @app.get("/images/{task_id}.png")
    async def image_file(task_id: str) -> Response:
        return await result_file(task_id, "image/png")

    @app.delete("/api/jobs/{task_id}")
    async def cancel_job(task_id: str) -> Any:
        res = await daemon.call(Op.CANCEL, task_id=task_id)
        return {"task_id": task_id, "status": res.get("status"),
                "cancelled": res.get("cancelled")}

    @app.get("/api/health")
    async def health() -> Any:
        try:
            st = await daemon.call(Op.STATUS)
        except Unreachable as exc:
            return JSONResponse({"status": "unavailable", "daemon": "unreachable",
                                 "error": str(exc)}, status_code=503)
        domains = {n: {"kind": d["kind"], "state": d["state"], "reason": d["reason"]}
                   for n, d in st["domains"].items()}
        ok = all(d["state"] == "ready" for d in domains.values())
        return {"status": "ok" if ok else "degraded", "daemon": "reachable",
                "version": st["version"], "domains": domains}

    # --- OpenAI-compatible API -------------------------------------------------------------
    @app.get("/v1/models")
    async def models() -> Any:
        st = await daemon.call(Op.STATUS)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": f"resiso:{n}"}
                for n, d in st["domains"].items() for m in d.get("models", [d["model"]])]
        # the names of other APIs that resiso answers to, with what serves them
        kinds = {d["kind"] for d in st["domains"].values()}
        for alias, target in st.get("aliases", {}).get("models", {}).items():
            if target in st["domains"] or target in kinds:
                data.append({"id": alias, "object": "model", "created": 0,
                             "owned_by": f"resiso:{target}", "alias_of": target})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletion) -> Any:
        params = _drop_none({
            "messages": [m.model_dump() for m in body.messages],
            "model": None if body.model in ("", "default") else body.model,
            "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
            "max_tokens": body.max_completion_tokens or body.max_tokens, "stop": body.stop})
        job = await daemon.submit("llm", params, partials=body.stream)
        created, cid = int(time.time()), f"chatcmpl-{job.task_id}"
        if not body.stream:
            final = await finish("llm", job)
            return {"id": cid, "object": "chat.completion", "created": created,
                    "model": body.model, "choices": [{
                        "index": 0, "finish_reason": final.get("finish_reason", "stop"),
                        "message": {"role": "assistant", "content": final.get("result", "")}}],
                    "usage": {"prompt_tokens": final.get("prompt_tokens", 0),
                              "completion_tokens": final.get("completion_tokens", 0),
                              "total_tokens": final.get("prompt_tokens", 0) +
                              final.get("completion_tokens", 0)}}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return "data: " + json.dumps({
                "id": cid, "object": "chat.completion.chunk", "created": created,
                "model": body.model, "choices": [{"index": 0, "delta": delta,
                                                  "finish_reason": finish}]},
                ensure_ascii=False) + "\n\n"

        async def sse() -> Any:
            # UTF-8 on the wire, as in the seed stream above
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for ev in job.events():
                    if ev["event"] == "token":
                        yield chunk({"content": ev["text"]})
                    elif ev["event"] == "result":
                        metrics.job("llm", ev)
                        yield chunk({}, ev.get("finish_reason", "stop"))
                    elif ev["event"] in ("error", "cancelled"):
                        metrics.job("llm", ev)
                        yield "data: " + json.dumps({"error": {
                            "message": ev.get("message", "cancelled"), "type": "server_error",
                            "param": None, "code": ev.get("code", "cancelled")}},
                            ensure_ascii=False) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if job.final is None:
                    await job.cancel()
        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/audio/speech")
    async def speech(body: Speech) -> Response:
        if body.response_format not in (None, "wav"):
            raise ApiError(400, Code.BAD_REQUEST, f"response_format {body.response_format!r} "
                           f"is not supported; resiso produces 'wav'")
        job = await daemon.submit("tts", _drop_none({"text": body.input, "voice": body.voice,
                                                     "speed": body.speed, "model": body.model}),
                                  partials=False)
        await finish("tts", job)
        return await result_file(job.task_id, "audio/wav")

    @app.post("/v1/images/generations")
    async def images(body: ImageGeneration) -> Any:
        params: dict[str, Any] = _drop_none({"prompt": body.prompt, "model": body.model})
        if body.size:
            try:
                w, h = (int(x) for x in body.size.lower().split("x"))
            except ValueError:
                raise ApiError(400, Code.BAD_REQUEST, f"size must be WIDTHxHEIGHT, got "
                               f"{body.size!r}")
            params.update(width=w, height=h)
        data = []
        for i in range(body.n):
            p = {**params, **({"seed": body.seed + i} if body.seed is not None else {})}
            job = await daemon.submit("image", p, partials=False)
            await finish("image", job)
            if body.response_format == "b64_json":
                rec = await daemon.call(Op.GET, task_id=job.task_id, data=True)
                data.append({"b64_json": base64.b64encode(rec["data"]).decode()})
            else:
                data.append({"url": f"/images/{job.task_id}.png"})
        return {"created": int(time.time()), "data": data}

    @app.get("/metrics")
    async def prometheus() -> Response:
        try:
            st = await daemon.call(Op.STATUS)
        except Unreachable:
            st = None
        body, ctype = metrics.render(st)
        return Response(body, media_type=ctype)

    app.include_router(console.router(daemon))  # the web console at /ui
    return app
