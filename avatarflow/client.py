"""Async client of the p-video-avatar API: submit, status, result, download, history, wait.

GETs are retried on 429, 5xx and transport errors (backoff with jitter, `Retry-After` and
`x-rate-limit-reset-at-utc` honoured). The submit POST is never retried: each POST is a billed job.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from avatarflow.contract import (
    EXPECTED_DURATION_S,
    FINAL_STATUSES,
    MODEL_SLUG,
    AvatarRequest,
    HistoryRecord,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
    history_rows,
    parse_request,
)
from avatarflow.errors import (
    ERRORS_BY_STATUS,
    AmbiguousSubmit,
    APIError,
    APITimeout,
    DeadlineExceeded,
    RateLimited,
    ServerError,
    SubmitNotSent,
    TransportError,
)

DEFAULT_BASE_URL = "https://api.segmind.com"
DEFAULT_HISTORY_URL = "https://api.spotprod.segmind.com"

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_RETRIES = 5
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 120.0
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
DOWNLOAD_CHUNK = 1 << 20

DEADLINE_FACTOR = 10.0
POLL_FINE_INTERVAL_S = 2.0
POLL_MAX_INTERVAL_S = 15.0


def poll_offsets(expected_s: float) -> Iterator[float]:
    """Seconds after submit at which to poll: sparse early, every 2 s around the expected end,
    then growing by half each time up to 15 s. For 100 s: 50, 75, 90, 96, 98 ... 108, 111, ..."""
    e = max(expected_s, 1.0)
    for frac in (0.5, 0.75, 0.9):
        if frac * e >= POLL_FINE_INTERVAL_S:
            yield frac * e
    t = max(0.96 * e, POLL_FINE_INTERVAL_S)
    while t <= 1.08 * e:
        yield t
        t += POLL_FINE_INTERVAL_S
    step = POLL_FINE_INTERVAL_S
    while True:
        step = min(step * 1.5, POLL_MAX_INTERVAL_S)
        t += step
        yield t


def backoff_delay(attempt: int, response: httpx.Response | None = None) -> float:
    """Full-jitter exponential backoff, overridden by what the server asks for."""
    asked = _server_delay(response) if response is not None else None
    if asked is not None:
        return min(asked, RETRY_AFTER_MAX_S) + random.uniform(0, 0.25)
    return random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt)) + 0.05


def _server_delay(response: httpx.Response) -> float | None:
    delays = []
    ra = response.headers.get("retry-after")
    if ra:
        try:
            delays.append(float(ra))
        except ValueError:
            try:
                delays.append((parsedate_to_datetime(ra) - datetime.now(timezone.utc)).total_seconds())
            except (TypeError, ValueError):
                pass
    reset = response.headers.get("x-rate-limit-reset-at-utc")
    if reset:
        try:
            at = datetime.fromisoformat(reset.replace("Z", "+00:00"))
            if at.tzinfo is None:
                at = at.replace(tzinfo=timezone.utc)
            delays.append((at - datetime.now(timezone.utc)).total_seconds())
        except ValueError:
            pass
    return max(0.0, max(delays)) if delays else None


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:2000]


def _message(body: Any, response: httpx.Response) -> str:
    if isinstance(body, dict):
        for key in ("error", "message", "detail", "msg"):
            if body.get(key):
                return str(body[key])
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return response.reason_phrase or "error"


def _raise_for_status(response: httpx.Response, request_id: str | None = None) -> None:
    if response.is_success:
        return
    if response.is_redirect or 300 <= response.status_code < 400:
        location = response.headers.get("location", "")
        target = urllib.parse.urlsplit(str(response.url.join(location))).netloc if location else ""
        raise APIError(
            f"redirect (HTTP {response.status_code}) to {target or 'no location'} refused: API calls do not "
            "follow redirects, the key goes only to the configured API and history hosts",
            status_code=response.status_code, request_id=request_id,
        )
    body = _body(response)
    message = _message(body, response)
    code = response.status_code
    if code == 429:
        raise RateLimited(message, retry_after=_server_delay(response), status_code=code, body=body, request_id=request_id)
    cls = ERRORS_BY_STATUS.get(code) or (ServerError if code >= 500 else APIError)
    raise cls(message, status_code=code, body=body, request_id=request_id)


def _origin(url: str) -> tuple[str, str, int]:
    u = httpx.URL(url)
    return (u.scheme, (u.host or "").lower(), u.port or (443 if u.scheme == "https" else 80))


def _loopback(host: str) -> bool:
    h = host.strip("[]").lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _check_api_url(name: str, url: str, has_key: bool) -> None:
    """An API or history base URL: http(s); the key only over https or http to loopback."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{name}={url!r} is not allowed; allowed: an https:// URL (http:// only to a loopback address)")
    if has_key and parts.scheme == "http" and not _loopback(parts.hostname):
        raise ValueError(
            f"{name}={url!r}: the API key is not sent over plain http to a non-loopback host; "
            "allowed: https://, or http:// to a loopback address (127.0.0.1, ::1, localhost)")


class _KeyAuth(httpx.Auth):
    """Adds `x-api-key` only to requests for the configured API and history origins."""

    def __init__(self, key: str, origins: set[tuple[str, str, int]]):
        self._key, self._origins = key, origins

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        request.headers.pop("x-api-key", None)
        if self._key and _origin(str(request.url)) in self._origins:
            request.headers["x-api-key"] = self._key
        yield request


@dataclass(frozen=True)
class PollEvent:
    """One status answer seen while waiting."""

    request_id: str
    status: str
    elapsed_s: float
    polls: int


class SegmindClient:
    """Async client; the key travels only in `x-api-key` to the API and history hosts."""

    def __init__(
        self,
        api_key: str = "",
        base_url: str = DEFAULT_BASE_URL,
        history_url: str | None = None,
        *,
        timeout: httpx.Timeout | float | None = None,
        max_retries: int = MAX_RETRIES,
        transport: httpx.AsyncBaseTransport | None = None,
        limiter: Callable[[], Awaitable[Any]] | None = None,
    ):
        """Explicit arguments only (avatarflow.config reads the environment). `history_url`
        defaults to the vendor's history host for the vendor's API, else to `base_url`.

        The key goes only to the origins of `base_url` and `history_url`, over https or over
        http to a loopback address (ValueError otherwise); API calls never follow a redirect
        (a 3xx is an APIError naming the status and the target host). Output downloads
        (`stream_output`) follow redirects and never carry the key.

        `limiter`, when given, is awaited before every API request (not output downloads):
        the hook for an account-wide rate limit shared by many workers."""
        self._api_key = api_key or ""
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        default_history = DEFAULT_HISTORY_URL if self.base_url == DEFAULT_BASE_URL else self.base_url
        self.history_url = (history_url or default_history).rstrip("/")
        for name, url in (("base_url", self.base_url), ("history_url", self.history_url)):
            _check_api_url(name, url, bool(self._api_key))
        self.max_retries = max_retries
        self._limiter = limiter
        if timeout is None:
            timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        auth = _KeyAuth(self._api_key, {_origin(self.base_url), _origin(self.history_url)})
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport, follow_redirects=False, auth=auth)
        self._downloads = httpx.AsyncClient(timeout=timeout, transport=transport, follow_redirects=True)

    def __repr__(self) -> str:
        return f"SegmindClient(base_url={self.base_url!r}, history_url={self.history_url!r}, api_key=***)"

    async def __aenter__(self) -> SegmindClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._downloads.aclose()

    @property
    def _headers(self) -> dict[str, str]:
        """No key here: `_KeyAuth` adds it to requests for the API and history origins only."""
        return {}

    async def _get(self, url: str, *, params: dict | None = None, request_id: str | None = None) -> httpx.Response:
        """GET with retries on 429, 5xx and transport errors."""
        attempt = 0
        while True:
            if self._limiter is not None:
                await self._limiter()
            try:
                response = await self._http.get(url, params=params, headers=self._headers)
            except httpx.TimeoutException as e:
                error: APIError = APITimeout(f"GET {url} timed out: {type(e).__name__}", request_id=request_id)
                response = None
            except httpx.TransportError as e:
                error = TransportError(f"GET {url} failed: {type(e).__name__}: {e}", request_id=request_id)
                response = None
            else:
                if response.status_code not in RETRYABLE_STATUS:
                    _raise_for_status(response, request_id)
                    return response
                try:
                    _raise_for_status(response, request_id)
                except APIError as e:
                    error = e
            if attempt >= self.max_retries:
                raise error
            await asyncio.sleep(backoff_delay(attempt, response))
            attempt += 1

    async def take_slot(self) -> None:
        """Wait for a slot of the account's rate limit (the `limiter` hook), if one is set."""
        if self._limiter is not None:
            await self._limiter()

    async def submit(self, request: AvatarRequest | dict[str, Any], *, slot_taken: bool = False) -> SubmitResponse:
        """POST /v2/p-video-avatar once. Anything after the body may have left (timeout, reset,
        cancellation, a 5xx, an answer that does not parse) raises AmbiguousSubmit: reconcile
        through the history, never repost. `slot_taken`: the caller already took a rate slot."""
        if not isinstance(request, AvatarRequest):
            request = parse_request(request)
        url = f"{self.base_url}/v2/{MODEL_SLUG}"
        if not slot_taken:
            await self.take_slot()
        sent_at = time.time()
        try:
            response = await self._http.post(url, json=request.body(), headers=self._headers)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise SubmitNotSent(f"submit not sent, could not connect to {self.base_url}: {type(e).__name__}") from None
        except (httpx.TimeoutException, httpx.TransportError) as e:
            raise AmbiguousSubmit(
                f"submit answer lost ({type(e).__name__}); a job may exist: reconcile through the request history",
                sent_at=sent_at,
            ) from None
        if response.status_code >= 500:
            raise AmbiguousSubmit(
                f"submit got HTTP {response.status_code}; a job may exist",
                sent_at=sent_at, status_code=response.status_code, body=_body(response),
            )
        _raise_for_status(response)
        try:
            return SubmitResponse.model_validate(response.json())
        except ValueError:
            raise AmbiguousSubmit(
                f"submit answer did not parse (HTTP {response.status_code}); a job may exist",
                sent_at=sent_at, status_code=response.status_code, body=_body(response),
            ) from None

    async def status(self, request_id: str) -> StatusResponse:
        """GET /v2/requests/{id}/status; FAILED raises JobFailed with the API's error."""
        r = await self._get(f"{self.base_url}/v2/requests/{request_id}/status", request_id=request_id)
        return StatusResponse.model_validate(r.json())

    async def result(self, request_id: str) -> ResultResponse:
        """GET /v2/requests/{id}: the final body, with the output URL and metrics."""
        r = await self._get(f"{self.base_url}/v2/requests/{request_id}", request_id=request_id)
        return ResultResponse.model_validate(r.json())

    async def history(self, request_id: str) -> HistoryRecord:
        """One request from the history, at any age."""
        r = await self._get(
            f"{self.history_url}/inference-request/request-history/{request_id}", request_id=request_id
        )
        body = r.json()
        if isinstance(body, dict) and isinstance(body.get("data"), dict):
            body = body["data"]
        return HistoryRecord.model_validate(body)

    async def history_list(
        self,
        *,
        model_name: str | None = MODEL_SLUG,
        status: str | None = None,
        from_date: str | None = None,
        to_date: str | None = None,
        page: int = 1,
        per_page: int = 100,
    ) -> list[HistoryRecord]:
        """One page of the history list, filtered by model, status and dates (YYYY-MM-DD)."""
        params = {"page": page, "per_page": per_page, "model_name": model_name, "status": status,
                  "from_date": from_date, "to_date": to_date, "sort_by": "created_at", "sort_order": "desc"}
        r = await self._get(
            f"{self.history_url}/inference-request/request-history",
            params={k: v for k, v in params.items() if v is not None},
        )
        return history_rows(r.json())

    async def find_submitted(
        self, request: AvatarRequest, *, since: float, max_pages: int = 5
    ) -> HistoryRecord | None:
        """The history row of a job posted with exactly this body at or after `since` (epoch s)."""
        body = request.body()
        day = datetime.fromtimestamp(since, timezone.utc).date()
        for page in range(1, max_pages + 1):
            rows = await self.history_list(
                from_date=(day - timedelta(days=1)).isoformat(),
                to_date=(datetime.now(timezone.utc).date() + timedelta(days=1)).isoformat(),
                page=page,
            )
            for row in rows:
                if isinstance(row.request_body, dict) and _same_body(row.request_body, body):
                    return row
            if len(rows) < 100:
                return None
        return None

    @asynccontextmanager
    async def stream_output(self, url: str) -> AsyncIterator[httpx.Response]:
        """Stream an output file; output URLs need no key, so none is sent."""
        attempt = 0
        while True:
            try:
                async with self._downloads.stream("GET", url) as response:
                    if response.status_code in RETRYABLE_STATUS and attempt < self.max_retries:
                        await asyncio.sleep(backoff_delay(attempt, response))
                        attempt += 1
                        continue
                    if not response.is_success:
                        await response.aread()
                        _raise_for_status(response)
                    try:
                        yield response
                    except (httpx.TimeoutException, httpx.TransportError) as e:
                        # cut off while the caller read the body: a context manager cannot yield
                        # again (retrying here raised RuntimeError), so surface it typed
                        raise TransportError(f"download of {url} cut off: {type(e).__name__}") from None
                    return
            except (httpx.TimeoutException, httpx.TransportError) as e:
                if attempt >= self.max_retries:
                    raise TransportError(f"download of {url} failed: {type(e).__name__}") from None
                await asyncio.sleep(backoff_delay(attempt))
                attempt += 1

    async def wait(
        self,
        request_id: str,
        *,
        submitted_at: float | None = None,
        expected_s: float = EXPECTED_DURATION_S,
        deadline_s: float | None = None,
        on_status: Callable[[PollEvent], Awaitable[None] | None] | None = None,
    ) -> ResultResponse:
        """Poll on a schedule shaped by the expected duration until COMPLETED; then the result.

        FAILED raises JobFailed (final); 404 raises NotFound; transient errors are retried until
        the overall deadline (default: ten times the expected duration), then DeadlineExceeded.
        """
        start = submitted_at if submitted_at is not None else time.time()
        deadline = start + (deadline_s if deadline_s is not None else DEADLINE_FACTOR * expected_s)
        polls, last = 0, None
        offsets = poll_offsets(expected_s)
        while True:
            now = time.time()
            target = next(offsets)
            while start + target < now - POLL_FINE_INTERVAL_S and polls > 0:
                target = next(offsets)
            await asyncio.sleep(max(0.0, min(start + target, deadline) - time.time()))
            polls += 1
            try:
                st = await self.status(request_id)
                last = st.status
            except (ServerError, RateLimited, APITimeout, TransportError):
                st = None
            if st is not None and on_status is not None:
                maybe = on_status(PollEvent(request_id, st.status, time.time() - start, polls))
                if asyncio.iscoroutine(maybe):
                    await maybe
            if st is not None and st.status in FINAL_STATUSES:
                return await self.result(request_id)
            if time.time() >= deadline:
                raise DeadlineExceeded(request_id, time.time() - start, last)


def _same_body(sent: dict[str, Any], ours: dict[str, Any]) -> bool:
    keys = set(sent) | set(ours)
    defaults = AvatarRequest.model_fields
    for k in keys:
        a = sent.get(k, getattr(defaults.get(k), "default", None))
        b = ours.get(k, getattr(defaults.get(k), "default", None))
        if a != b:
            return False
    return True
