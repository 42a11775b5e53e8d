"""Typed errors of the p-video-avatar API: each carries the HTTP status and the body, never the key."""

from __future__ import annotations

from typing import Any


class AvatarflowError(Exception):
    """Base of every error this package raises on purpose. `bad_input`: the request or a setting
    was refused before anything was made (the CLI's exit code 2; otherwise 1)."""

    bad_input: bool = False


class BadSetting(AvatarflowError, ValueError):
    """A flag or setting the operator gave is refused; the message names it, its value and what
    is allowed."""

    bad_input = True


class DeployError(AvatarflowError, RuntimeError):
    """The Prefect set-up did not come out as asked."""


class TooManyStarts(AvatarflowError):
    """A flow run put back in the queue after each crash (avatarflow.automations) that crashed
    too often: it crashes on its own (out of memory, say), not with a worker. Final."""


class APIError(AvatarflowError):
    """An answer from the API that is not a success."""

    status_code: int | None = None

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        body: Any = None,
        request_id: str | None = None,
    ):
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code
        self.body = body
        self.request_id = request_id

    def __str__(self) -> str:
        code = f"HTTP {self.status_code}: " if self.status_code else ""
        rid = f" (request {self.request_id})" if self.request_id else ""
        return f"{code}{self.args[0]}{rid}"


class BadRequest(APIError):
    status_code = 400
    bad_input = True


class Unauthorized(APIError):
    status_code = 401


class Forbidden(APIError):
    status_code = 403


class NotFound(APIError):
    """Unknown id, or a request record past its 1-hour retention."""

    status_code = 404


class InsufficientCredits(APIError):
    status_code = 406


class JobFailed(APIError):
    """The job ended FAILED (HTTP 422); `error` is the API's own text. Final: never retried."""

    status_code = 422

    @property
    def error(self) -> str:
        return str(self.args[0])


class RateLimited(APIError):
    status_code = 429

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(APIError):
    """HTTP 5xx."""


class APITimeout(APIError):
    """No answer in time."""


class TransportError(APIError):
    """The connection failed or was cut."""


class SubmitNotSent(TransportError):
    """The submit never reached the API (the connection was refused): no job exists."""


class AmbiguousSubmit(APIError):
    """A submit whose answer was lost after the body was sent: a job may exist and be billed.

    Reconcile through the request history; never POST again blindly.
    """

    def __init__(self, message: str, *, sent_at: float, **kw: Any):
        super().__init__(message, **kw)
        self.sent_at = sent_at


class DeadlineExceeded(AvatarflowError):
    """Polling gave up at its overall deadline; the job may still finish: resume it later."""

    def __init__(self, request_id: str, waited_s: float, last_status: str | None):
        super().__init__(
            f"request {request_id} not final after {waited_s:.0f} s (last status {last_status}); "
            f"resume it with: avatarflow resume {request_id}"
        )
        self.request_id = request_id
        self.last_status = last_status


ERRORS_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    406: InsufficientCredits,
    422: JobFailed,
    429: RateLimited,
}
