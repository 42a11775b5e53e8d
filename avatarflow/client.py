"""Async client of the p-video-avatar API: submit, status, result, download, history, wait.

One retry policy for every GET (status, result, history, the output download): 429, 5xx and
transport errors are retried up to `max_retries` times with full-jitter backoff, `Retry-After`
and `x-rate-limit-reset-at-utc` honoured. The submit POST is never retried: each POST is a
billed job. One poll loop (`wait` on the request record, `wait_history` on the request history)
asks when the duration model's plan says (avatarflow.duration); a GET whose retries are spent is
a missed poll, asked again at the plan's next time, until the deadline.
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
    LlmRequest,
    HistoryRecord,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
    history_rows,
    parse_request,
)
from avatarflow.duration import DEFAULT_PLAN, Answer, PlanConfig, Poll, Prediction, fixed_prediction, next_poll
from avatarflow.errors import (
    ERRORS_BY_STATUS,
    AmbiguousSubmit,
    APIError,
    APITimeout,
    DeadlineExceeded,
    JobFailed,
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

DEADLINE_FACTOR = 10.0  # the wait gives up after this many times the predicted duration
MIN_DEADLINE_S = 60.0  # ... and never sooner than this


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


def is_loopback_host(host: str | None) -> bool:
    """True for 'localhost' and loopback IP literals (no DNS: a name is not resolved)."""
    if not host:
        return False
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
    if has_key and parts.scheme == "http" and not is_loopback_host(parts.hostname):
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

    async def submit(self, request: AvatarRequest | LlmRequest | dict[str, Any], *,
                     slot_taken: bool = False) -> SubmitResponse:
        """POST /v2/p-video-avatar once. Anything after the body may have left (timeout, reset,
        cancellation, a 5xx, an answer that does not parse) raises AmbiguousSubmit: reconcile
        through the history, never repost. `slot_taken`: the caller already took a rate slot."""
        if not isinstance(request, (AvatarRequest, LlmRequest)):
            request = parse_request(request)
        url = f"{self.base_url}/v2/{request.slug}"
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
        self, request: AvatarRequest | LlmRequest, *, since: float, max_pages: int = 5
    ) -> HistoryRecord | None:
        """The history row of a job posted with exactly this body at or after `since` (epoch s);
        a row stamped earlier is another, older job with the same body."""
        body = request.body()
        day = datetime.fromtimestamp(since, timezone.utc).date()
        for page in range(1, max_pages + 1):
            rows = await self.history_list(
                model_name=request.slug,
                from_date=(day - timedelta(days=1)).isoformat(),
                to_date=(datetime.now(timezone.utc).date() + timedelta(days=1)).isoformat(),
                page=page,
            )
            for row in rows:
                if (isinstance(row.request_body, dict) and _same_body(row.request_body, body, type(request))
                        and not _before(row.created_at, since)):
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
        prediction: Prediction | None = None,
        predict: Callable[[], Prediction | Awaitable[Prediction]] | None = None,
        expected_s: float | None = None,
        deadline_s: float | None = None,
        on_status: Callable[[PollEvent], Awaitable[None] | None] | None = None,
        plan: PlanConfig = DEFAULT_PLAN,
    ) -> ResultResponse:
        """Poll the request record until COMPLETED and return the result.

        When to ask comes from `prediction` (re-read from `predict()` before each poll, so a
        model that learns while this job runs is used), else `expected_s`, else the vendor's
        typical time. Polls where the job may be done go to the result endpoint, which carries
        the status: a finished job costs one request. FAILED raises JobFailed (final); 404 raises
        NotFound (the record expired: `wait_history`); transient errors are retried by the GET's
        policy, then at the plan's next poll, until the deadline (default: ten times the
        prediction, at least a minute), then DeadlineExceeded.
        """

        async def ask(poll: Poll) -> tuple[str, ResultResponse | None]:
            if poll.endpoint == "result":
                r = await self.result(request_id)
            else:
                st = await self.status(request_id)
                if st.status not in FINAL_STATUSES:
                    return st.status, None
                r = await self.result(request_id)
            if r.status == "FAILED":  # a FAILED body under a 2xx: final all the same
                raise JobFailed(r.error or "FAILED", status_code=422, body=r.model_dump(), request_id=request_id)
            return r.status, (r if r.status == "COMPLETED" else None)

        return await self._poll(request_id, ask, submitted_at, prediction, predict, expected_s, deadline_s,
                                on_status, plan)

    async def wait_history(
        self,
        request_id: str,
        *,
        submitted_at: float | None = None,
        prediction: Prediction | None = None,
        predict: Callable[[], Prediction | Awaitable[Prediction]] | None = None,
        expected_s: float | None = None,
        deadline_s: float | None = None,
        on_status: Callable[[PollEvent], Awaitable[None] | None] | None = None,
        plan: PlanConfig = DEFAULT_PLAN,
    ) -> HistoryRecord:
        """The same loop on the request history (any age: for a record that expired, 404):
        returns the COMPLETED row; FAILED raises JobFailed with the row's error."""

        async def ask(poll: Poll) -> tuple[str, HistoryRecord | None]:
            row = await self.history(request_id)
            state = (row.state or "UNKNOWN").upper()
            if state == "FAILED":
                raise JobFailed(row.error or "FAILED", request_id=request_id)
            return state, (row if state == "COMPLETED" else None)

        return await self._poll(request_id, ask, submitted_at, prediction, predict, expected_s, deadline_s,
                                on_status, plan)

    async def _poll(self, request_id: str, ask: Callable[[Poll], Awaitable[tuple[str, Any]]],
                    submitted_at: float | None, prediction: Prediction | None,
                    predict: Callable[[], Prediction | Awaitable[Prediction]] | None, expected_s: float | None,
                    deadline_s: float | None, on_status: Callable[[PollEvent], Awaitable[None] | None] | None,
                    plan: PlanConfig) -> Any:
        """The one poll loop: ask at the plan's times until `ask` returns a final answer."""
        start = submitted_at if submitted_at is not None else time.time()
        pred = prediction or fixed_prediction(expected_s if expected_s is not None else EXPECTED_DURATION_S)
        if deadline_s is None:
            deadline_s = max(DEADLINE_FACTOR * pred.seconds, MIN_DEADLINE_S)
        deadline = start + deadline_s
        answers: list[Answer] = []
        polls, last, tried = 0, None, -float("inf")
        while True:
            if predict is not None:
                fresh = predict()
                pred = (await fresh) if asyncio.iscoroutine(fresh) else fresh
            poll = next_poll(pred, answers, now=max(time.time() - start, tried + plan.gap_s), cfg=plan)
            await asyncio.sleep(max(0.0, min(start + poll.at, deadline) - time.time()))
            polls += 1
            tried = time.time() - start
            try:
                status, final = await ask(poll)
            except (ServerError, RateLimited, APITimeout, TransportError):
                status, final = None, None  # the GET's retries are spent: a missed poll
            if status is not None:
                last = status
                if on_status is not None:
                    maybe = on_status(PollEvent(request_id, status, tried, polls))
                    if asyncio.iscoroutine(maybe):
                        await maybe
                if final is not None:
                    return final
                answers.append(Answer(tried, status))
            if time.time() >= deadline:
                raise DeadlineExceeded(request_id, time.time() - start, last)


def _same_body(sent: dict[str, Any], ours: dict[str, Any], model: type[Any] = AvatarRequest) -> bool:
    keys = set(sent) | set(ours)
    defaults = model.model_fields
    for k in keys:
        a = sent.get(k, getattr(defaults.get(k), "default", None))
        b = ours.get(k, getattr(defaults.get(k), "default", None))
        if a != b:
            return False
    return True


def _before(stamp: str | None, since: float) -> bool:
    """Whether an ISO timestamp of the history is earlier than `since`; unknown counts as not."""
    if not stamp:
        return False
    try:
        at = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return False
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    return at.timestamp() < since
