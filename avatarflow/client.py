"""Async client of the p-video-avatar API: submit, status, result, download, history, wait.

One retry policy for every GET (status, result, history, the output download): 429, 5xx and
transport errors are retried up to `max_retries` times with full-jitter backoff, `Retry-After`
and `x-rate-limit-reset-at-utc` honoured. The submit POST is never retried: each POST is a
billed job. `wait` polls the request record or the request history through the one poll loop
(avatarflow.poll), at the times the duration model's prediction gives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Self, Unpack

import httpx

from avatarflow.api_http import (
    RETRYABLE_STATUS,
    KeyAuth,
    backoff_delay,
    check_api_url,
    origin,
    parse_utc,
    raise_for_status,
    response_body,
)
from avatarflow.contract import (
    FINAL_STATUSES,
    MODEL_SLUG,
    AvatarRequest,
    LlmRequest,
    parse_request,
)
from avatarflow.errors import (
    AmbiguousSubmit,
    APIError,
    APITimeout,
    JobFailed,
    SubmitNotSent,
    TransportError,
)
from avatarflow.poll import Poll, Schedule, poll_until
from avatarflow.responses import (
    HistoryRecord,
    ResultResponse,
    StatusResponse,
    SubmitResponse,
    history_rows,
)

DEFAULT_BASE_URL = "https://api.segmind.com"
DEFAULT_HISTORY_URL = "https://api.spotprod.segmind.com"

MAX_RETRIES = 5
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
DOWNLOAD_CHUNK = 1 << 20


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
            check_api_url(name, url, bool(self._api_key))
        self.max_retries = max_retries
        self._limiter = limiter
        if timeout is None:
            timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        auth = KeyAuth(self._api_key, {origin(self.base_url), origin(self.history_url)})
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport, follow_redirects=False, auth=auth)
        self._downloads = httpx.AsyncClient(timeout=timeout, transport=transport, follow_redirects=True)

    def __repr__(self) -> str:
        return f"SegmindClient(base_url={self.base_url!r}, history_url={self.history_url!r}, api_key=***)"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._downloads.aclose()

    async def _get(self, url: str, *, params: dict | None = None, request_id: str | None = None) -> httpx.Response:
        """GET with retries on 429, 5xx and transport errors."""
        attempt = 0
        while True:
            if self._limiter is not None:
                await self._limiter()
            try:
                response = await self._http.get(url, params=params)
            except httpx.TimeoutException as e:
                error: APIError = APITimeout(f"GET {url} timed out: {type(e).__name__}", request_id=request_id)
                response = None
            except httpx.TransportError as e:
                error = TransportError(f"GET {url} failed: {type(e).__name__}: {e}", request_id=request_id)
                response = None
            else:
                if response.status_code not in RETRYABLE_STATUS:
                    raise_for_status(response, request_id)
                    return response
                try:
                    raise_for_status(response, request_id)
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
            response = await self._http.post(url, json=request.body())
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
                sent_at=sent_at, status_code=response.status_code, body=response_body(response),
            )
        raise_for_status(response)
        try:
            return SubmitResponse.model_validate(response.json())
        except ValueError:
            raise AmbiguousSubmit(
                f"submit answer did not parse (HTTP {response.status_code}); a job may exist",
                sent_at=sent_at, status_code=response.status_code, body=response_body(response),
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
        day = datetime.fromtimestamp(since, UTC).date()
        for page in range(1, max_pages + 1):
            rows = await self.history_list(
                model_name=request.slug,
                from_date=(day - timedelta(days=1)).isoformat(),
                to_date=(datetime.now(UTC).date() + timedelta(days=1)).isoformat(),
                page=page,
            )
            for row in rows:
                if (isinstance(row.request_body, dict) and _sameresponse_body(row.request_body, body, type(request))
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
                        raise_for_status(response)
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

    async def wait(self, request_id: str, *, via: str = "record",
                   **schedule: Unpack[Schedule]) -> ResultResponse | HistoryRecord:
        """Poll until COMPLETED, when the plan says (`schedule`: avatarflow.poll.Schedule).

        `via="record"` asks the request record and returns the result: polls where the job may be
        done go to the result endpoint, which carries the status (a finished job costs one
        request); 404 raises NotFound (the record expired: wait `via="history"`). `via="history"`
        asks the request history, which keeps every request at any age, and returns the
        COMPLETED row. FAILED raises JobFailed (final); transient errors are retried by the GET's
        policy, then at the plan's next poll, until the deadline, then DeadlineExceeded.
        """
        asks = {"record": self._ask_record, "history": self._ask_history}
        if via not in asks:
            raise ValueError(f"via={via!r} is not allowed; allowed: 'record' or 'history'")
        ask = asks[via]
        return await poll_until(request_id, lambda poll: ask(request_id, poll), **schedule)

    async def _ask_record(self, request_id: str, poll: Poll) -> tuple[str, ResultResponse | None]:
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

    async def _ask_history(self, request_id: str, poll: Poll) -> tuple[str, HistoryRecord | None]:
        row = await self.history(request_id)
        state = (row.state or "UNKNOWN").upper()
        if state == "FAILED":
            raise JobFailed(row.error or "FAILED", request_id=request_id)
        return state, (row if state == "COMPLETED" else None)


def _sameresponse_body(sent: dict[str, Any], ours: dict[str, Any], model: type[Any] = AvatarRequest) -> bool:
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
    at = parse_utc(stamp)
    return at is not None and at.timestamp() < since
