"""A Segmind-compatible p-video-avatar API on loopback: the embedded default, reached over HTTP
like the vendor's service (v2 submit/status/result, v1 sync, output files, request history)."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from pydantic import ValidationError

from avatarflow.contract import MODEL_SLUG, ContractError, LlmRequest, explain, parse_request
from avatarflow.errors import BadSetting
from avatarflow.local.server.chaos import ENDPOINTS, Chaos, Faults, KnobError, Settings, reset_at_header
from avatarflow.local.server.queue import JobQueue, LocalJob

log = logging.getLogger("avatarflow.local")
API_ENDPOINTS = frozenset({"submit", "status", "result", "history", "sync"})
LOCAL_PREFIX = "/_local"
OPEN_LOCAL_PATHS = frozenset({"/_local/health"})
# The knob routes' bodies are small JSON objects: anything larger is refused (413) while read.
MAX_KNOB_BODY = 16 * 1024


@dataclass
class ServerConfig:
    """``admin_keys``: when given, the only keys ``/_local/*`` accepts (and they open nothing
    else); when empty, ``/_local/*`` takes the API keys."""

    data_dir: Path
    api_keys: list[str] = field(repr=False)
    admin_keys: list[str] = field(default_factory=list, repr=False)
    workers: int = 2
    settings: Settings = field(default_factory=Settings)
    faults: Faults = field(default_factory=Faults)
    credits: float = 100.0


def endpoint_of(method: str, path: str) -> str | None:
    """The API endpoint a request is counted (and faulted) as: a POST to any model's slug
    (the avatar model or an LLM) is a submit."""
    if method == "POST" and path.startswith("/v2/") and path.count("/") == 2:
        return "submit"
    if path == f"/v1/{MODEL_SLUG}" and method == "POST":
        return "sync"
    if path.startswith("/v2/requests/"):
        return "status" if path.endswith("/status") else "result"
    if path.startswith("/inference-request/request-history"):
        return "history"
    if path.startswith("/files/"):
        return "files"
    return None


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _is_local(path: str) -> bool:
    return path == LOCAL_PREFIX or path.startswith(LOCAL_PREFIX + "/")


def _key_in(key: str, keys: set[str]) -> bool:
    """Constant-time membership (every key compared)."""
    found = False
    for k in keys:
        found |= hmac.compare_digest(key.encode(), k.encode())
    return found


class ChaosMiddleware:
    """Counts requests, checks keys and the rate limit, injects faults: all before the routes.
    ``/_local/*`` (but ``/_local/health``) needs an admin key, or an API key when none is set."""

    def __init__(self, app: Any, chaos: Chaos, keys: list[str], admin_keys: list[str] | None = None):
        self.app, self.chaos, self.keys = app, chaos, set(keys)
        self.admin_keys = set(admin_keys or ()) or self.keys

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _is_local(scope["path"]) and scope["path"] not in OPEN_LOCAL_PATHS:
            key = dict(scope["headers"]).get(b"x-api-key", b"").decode("latin-1")
            if not _key_in(key, self.admin_keys):
                return await _json(401, {"error": "missing or invalid key (x-api-key) for /_local/*"})(
                    scope, receive, send)
            return await self.app(scope, receive, send)
        endpoint = endpoint_of(scope["method"], scope["path"])
        if endpoint is None:
            return await self.app(scope, receive, send)
        self.chaos.count(endpoint)
        codes: list[int] = []

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                codes.append(message["status"])
                self.chaos.count(endpoint, message["status"])
            await send(message)

        if endpoint in API_ENDPOINTS:
            headers = dict(scope["headers"])
            key = headers.get(b"x-api-key", b"").decode()
            if key not in self.keys:
                return await _json(401, {"error": "missing or invalid API key (x-api-key)"})(scope, receive, counted)
            wait = self.chaos.seconds_to_wait(key)
            if wait is not None:
                return await self._too_many(wait)(scope, receive, counted)
        fault = self.chaos.fault_for(endpoint)
        if fault == "drop":
            return await _drop(counted)
        if fault == "429":
            return await self._too_many(self.chaos.faults.retry_after)(scope, receive, counted)
        if fault:
            return await _json(int(fault), {"error": f"local: injected HTTP {fault}"})(scope, receive, counted)
        if endpoint == "submit" and (self.chaos.roll("submit_drop_after_accept") or self.chaos.faults.submit_delay > 0):
            return await self._answer_late(scope, receive, counted)
        await self.app(scope, receive, counted)

    def _too_many(self, seconds: float) -> JSONResponse:
        return _json(429, {"error": "rate limit exceeded"},
                     {"Retry-After": f"{max(1, round(seconds))}", "x-rate-limit-reset-at-utc": reset_at_header(seconds)})

    async def _answer_late(self, scope: dict, receive: Any, send: Any) -> None:
        """Queue the job, then answer late, or cut the connection instead of answering."""
        held: list[dict] = []

        async def hold(message: dict) -> None:
            held.append(message)

        await self.app(scope, receive, hold)
        if self.chaos.faults.submit_delay > 0:
            await asyncio.sleep(self.chaos.faults.submit_delay)
            for message in held:
                await send(message)
            return
        await _drop(send)


async def _drop(send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
    await send({"type": "http.response.body", "body": b'{"request_id": "', "more_body": True})
    raise ConnectionAbortedError("local: injected connection drop")


def _status_body(job: LocalJob) -> tuple[int, dict[str, Any]]:
    if job.status == "FAILED":
        return 422, {"request_id": job.request_id, "status": "FAILED", "error": job.error}
    return 200, {"request_id": job.request_id, "status": job.status}


def _not_found(request_id: str) -> JSONResponse:
    return _json(404, {"error": f"request {request_id} not found or expired"})


def _date(value: str | None, name: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ContractError(f"{name}={value!r} is not a date; allowed: YYYY-MM-DD", [name]) from None


def create_app(config: ServerConfig) -> FastAPI:
    chaos = Chaos(config.settings, config.faults)
    app = FastAPI(title="avatarflow local p-video-avatar API", docs_url=None, redoc_url=None)
    state: dict[str, JobQueue] = {}

    def queue() -> JobQueue:
        if "q" not in state:
            state["q"] = JobQueue(config.data_dir, config.workers, chaos, config.credits)
        return state["q"]

    @app.on_event("shutdown")
    async def _close() -> None:
        if "q" in state:
            await state["q"].close()

    async def parse(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, _json(400, {"error": "body is not valid JSON", "fields": ["body"]})
        if not isinstance(body, dict):
            return None, _json(400, {"error": "body must be a JSON object", "fields": ["body"]})
        try:
            return (parse_request(body), body), None
        except ContractError as e:
            return None, _json(400, {"error": str(e), "fields": e.fields})

    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @app.post(f"/v2/{MODEL_SLUG}")
    async def submit(request: Request) -> Response:
        parsed, error = await parse(request)
        if error:
            return error
        job = queue().submit(*parsed)
        b = base(request)
        return _json(200, {"request_id": job.request_id, "status": "QUEUED",
                           "status_url": f"{b}/v2/requests/{job.request_id}/status",
                           "response_url": f"{b}/v2/requests/{job.request_id}"})

    @app.get("/v2/requests/{request_id}/status")
    async def status(request_id: str) -> Response:
        job = queue().get(request_id)
        if job is None:
            return _not_found(request_id)
        return _json(*_status_body(job))

    @app.get("/v2/requests/{request_id}")
    async def result(request_id: str, request: Request) -> Response:
        job = queue().get(request_id)
        if job is None:
            return _not_found(request_id)
        if job.status != "COMPLETED":
            return _json(*_status_body(job))
        if job.answer is not None:
            return _json(200, {"request_id": job.request_id, "status": "COMPLETED", "output": job.answer,
                               "metrics": queue().metrics(job)})
        url = f"{base(request)}/files/{job.request_id}.mp4"
        return _json(200, {
            "request_id": job.request_id, "status": "COMPLETED", "output": url,
            "video": {"url": url, "content_type": "video/mp4", "file_name": f"{job.request_id}.mp4",
                      "file_size": job.output.stat().st_size if job.output else None},
            "metrics": queue().metrics(job),
        })

    @app.post("/v2/{slug}")
    async def submit_llm(slug: str, request: Request) -> Response:
        """Any other slug is an LLM, served by the local writer (not a language model)."""
        if slug == "requests":
            return _json(405, {"error": "POST is not allowed here"})
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _json(400, {"error": "body is not valid JSON", "fields": ["body"]})
        if not isinstance(body, dict):
            return _json(400, {"error": "body must be a JSON object", "fields": ["body"]})
        try:
            llm = LlmRequest.model_validate({**body, "model": slug})
        except ValidationError as e:
            return _json(400, {"error": str(explain(e)), "fields": explain(e).fields})
        job = queue().submit(llm, body)
        b = base(request)
        return _json(200, {"request_id": job.request_id, "status": "QUEUED",
                           "status_url": f"{b}/v2/requests/{job.request_id}/status",
                           "response_url": f"{b}/v2/requests/{job.request_id}"})

    @app.post(f"/v1/{MODEL_SLUG}")
    async def sync(request: Request) -> Response:
        parsed, error = await parse(request)
        if error:
            return error
        job = queue().submit(*parsed)
        await job.done.wait()
        if job.status == "FAILED":
            return _json(422, {"request_id": job.request_id, "status": "FAILED", "error": job.error})
        return FileResponse(job.output, media_type="video/mp4", headers={"x-request-id": job.request_id})

    @app.get("/files/{name}")
    async def files(name: str) -> Response:
        rid = name.removesuffix(".mp4")
        job = queue().history(rid)
        if (job is None or job.status != "COMPLETED" or job.output is None or not job.output.exists()
                or "/" in name):
            return _json(404, {"error": f"file {name} not found"})
        return FileResponse(job.output, media_type="video/mp4")

    @app.get("/inference-request/request-history/{request_id}")
    async def history_one(request_id: str, request: Request) -> Response:
        job = queue().history(request_id)
        if job is None:
            return _not_found(request_id)
        return _json(200, job.history_row(base(request)))

    @app.get("/inference-request/request-history")
    async def history_list(
        request: Request, page: int = 1, per_page: int = 20, from_date: str | None = None,
        to_date: str | None = None, model_name: str | None = None, status: str | None = None,
        sort_by: str = "created_at", sort_order: str = "desc",
    ) -> Response:
        try:
            if page < 1:
                raise ContractError(f"page={page} is out of range; allowed: 1 or more", ["page"])
            if not 1 <= per_page <= 100:
                raise ContractError(f"per_page={per_page} is out of range; allowed: 1 to 100", ["per_page"])
            if status and status.upper() not in ("COMPLETED", "FAILED", "PENDING"):
                raise ContractError(f"status={status!r} is not allowed; allowed: COMPLETED, FAILED, PENDING", ["status"])
            start, end = _date(from_date, "from_date"), _date(to_date, "to_date")
        except ContractError as e:
            return _json(400, {"error": str(e), "fields": e.fields})
        b = base(request)
        rows = [j.history_row(b) for j in queue().jobs.values()]
        if model_name:
            rows = [r for r in rows if model_name.lower() in r["model_name"]]
        if status:
            rows = [r for r in rows if r["model_status"] == status.upper()]
        if start or end:
            day = lambda r: datetime.fromisoformat(r["created_at"]).date()  # noqa: E731
            rows = [r for r in rows if (not start or day(r) >= start) and (not end or day(r) <= end)]
        key = sort_by if sort_by in ("created_at", "updated_at", "latency_ms", "credits_deduction") else "created_at"
        rows.sort(key=lambda r: (r.get(key) is None, r.get(key) or 0), reverse=sort_order != "asc")
        total = len(rows)
        page_rows = rows[(page - 1) * per_page: page * per_page]
        return _json(200, {"data": page_rows, "page": page, "per_page": per_page, "total": total})

    @app.get("/_local/health")
    async def health() -> Response:
        return _json(200, {"ok": True})

    @app.get("/_local/stats")
    async def stats() -> Response:
        return _json(200, chaos.stats(queue().summary()))

    @app.post("/_local/faults")
    async def faults(request: Request) -> Response:
        body, error = await knob_body(request)
        if error:
            return error
        try:
            chaos.configure(body)
        except KnobError as e:
            return _json(400, {"error": f"faults: {e}", "fields": [e.field]})
        return _json(200, {"faults": chaos.faults.model_dump(), "settings": chaos.settings.model_dump()})

    @app.post("/_local/reset")
    async def reset(request: Request) -> Response:
        body, error = await knob_body(request, empty_ok=True)
        if error:
            return error
        if body:
            field_ = next(iter(body)) if isinstance(body, dict) else "body"
            return _json(400, {"error": f"reset: {field_} is not allowed; allowed: an empty body or {{}}",
                               "fields": [field_]})
        chaos.reset()
        return _json(200, {"ok": True})

    return ChaosMiddleware(app, chaos, config.api_keys, config.admin_keys)


async def knob_body(request: Request, *, empty_ok: bool = False) -> tuple[Any, Response | None]:
    """The JSON body of a knob route: application/json only (415), at most MAX_KNOB_BODY bytes
    (413, counted while read, whatever Content-Length says), valid JSON (400)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        return None, _json(415, {"error": f"content-type {ctype or 'none'!r} is not allowed; allowed: application/json"})
    too_big = _json(413, {"error": f"body is larger than {MAX_KNOB_BODY} bytes; allowed: up to {MAX_KNOB_BODY}"})
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_KNOB_BODY):
        return None, too_big
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_KNOB_BODY:
            return None, too_big
    if not data.strip() and empty_ok:
        return None, None
    try:
        return json.loads(bytes(data)), None
    except (ValueError, RecursionError) as e:
        reason = "nested too deep" if isinstance(e, RecursionError) else "not valid JSON"
        return None, _json(400, {"error": f"body is {reason}; allowed: a JSON object", "fields": ["body"]})


def check_loopback(host: str) -> None:
    """Refuse to bind anything but loopback."""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise BadSetting(f"host={host!r} is not a loopback address; allowed: 127.0.0.0/8, ::1, localhost")


def serve(host: str, port: int, config: ServerConfig) -> None:
    import uvicorn

    check_loopback(host)
    if not config.api_keys:
        raise BadSetting("no API key: give --api-key or set AVATARFLOW_LOCAL_API_KEY")
    if set(config.admin_keys) & set(config.api_keys):
        raise BadSetting("an admin key is also an API key: give the admin key a value of its own")
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", access_log=False)


__all__ = ["ServerConfig", "create_app", "serve", "check_loopback", "ENDPOINTS"]
