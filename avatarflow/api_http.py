"""The HTTP rules of the API client: the backoff between retries, an answer's status as a library
error, and where the key may travel (https, or http to loopback; only to the configured origins)."""

from __future__ import annotations

import ipaddress
import random
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from avatarflow.errors import ERRORS_BY_STATUS, APIError, BadSetting, RateLimited, ServerError

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 120.0


def parse_utc(stamp: str | None) -> datetime | None:
    """An ISO 8601 time (a trailing Z, or none: UTC); None when absent or unreadable."""
    if not stamp:
        return None
    try:
        at = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


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
                delays.append((parsedate_to_datetime(ra) - datetime.now(UTC)).total_seconds())
            except (TypeError, ValueError):
                pass
    at = parse_utc(response.headers.get("x-rate-limit-reset-at-utc"))
    if at is not None:
        delays.append((at - datetime.now(UTC)).total_seconds())
    return max(0.0, max(delays)) if delays else None


def response_body(response: httpx.Response) -> Any:
    """The answer's JSON, else the start of its text."""
    try:
        return response.json()
    except ValueError:
        return response.text[:2000]


def _error_message(body: Any, response: httpx.Response) -> str:
    if isinstance(body, dict):
        for key in ("error", "message", "detail", "msg"):
            if body.get(key):
                return str(body[key])
    if isinstance(body, str) and body.strip():
        return body.strip()[:500]
    return response.reason_phrase or "error"


def raise_for_status(response: httpx.Response, request_id: str | None = None) -> None:
    """A non-2xx answer as the library error of its status (a 3xx refused: no redirects)."""
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
    body = response_body(response)
    message = _error_message(body, response)
    code = response.status_code
    if code == 429:
        raise RateLimited(message, retry_after=_server_delay(response), status_code=code, body=body, request_id=request_id)
    cls = ERRORS_BY_STATUS.get(code) or (ServerError if code >= 500 else APIError)
    raise cls(message, status_code=code, body=body, request_id=request_id)


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, the port filled in."""
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


def check_api_url(name: str, url: str, has_key: bool) -> None:
    """An API or history base URL: http(s); the key only over https or http to loopback."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadSetting(f"{name}={url!r} is not allowed; allowed: an https:// URL (http:// only to a loopback address)")
    if has_key and parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise BadSetting(
            f"{name}={url!r}: the API key is not sent over plain http to a non-loopback host; "
            "allowed: https://, or http:// to a loopback address (127.0.0.1, ::1, localhost)")


class KeyAuth(httpx.Auth):
    """Adds `x-api-key` only to requests for the configured API and history origins."""

    def __init__(self, key: str, origins: set[tuple[str, str, int]]):
        self._key, self._origins = key, origins

    def auth_flow(self, request: httpx.Request) -> Iterator[httpx.Request]:
        request.headers.pop("x-api-key", None)
        if self._key and origin(str(request.url)) in self._origins:
            request.headers["x-api-key"] = self._key
        yield request
