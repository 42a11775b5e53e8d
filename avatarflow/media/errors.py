"""MediaError, the one refusal of a media input: it names the field, the (shortened) value, the
problem and what is allowed; plus the decode errors PyAV raises on hostile files."""

from __future__ import annotations

from typing import Any

from avatarflow.errors import AvatarflowError


def shorten(value: Any, limit: int = 80) -> str:
    """`value` as text of at most `limit` characters; a data: URI cut to its header."""
    s = str(value)
    if s.startswith("data:"):
        head = s.split(",", 1)[0]
        return f"{head},...({len(s)} chars)" if len(s) > limit else s
    return s if len(s) <= limit else s[: limit - 3] + "..."


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


class MediaError(AvatarflowError, ValueError):
    """A media input we cannot use.

    ``field`` ('image' or 'audio'), ``value`` (the shortened reference, or None), ``problem``,
    ``allowed``; ``transient`` is True for failures worth retrying (timeouts, HTTP 5xx/429).
    """

    def __init__(self, field: str, problem: str, *, value: Any = None, allowed: str | None = None,
                 transient: bool = False):
        self.bad_input = not transient  # a source out of reach for now is not bad input
        self.field = field
        self.value = None if value is None else shorten(value)
        self.problem = problem
        self.allowed = allowed
        self.transient = transient
        where = f"{field}={self.value!r}" if self.value is not None and self.value != field else field
        msg = f"{where}: {problem}"
        if allowed:
            msg += f"; allowed: {allowed}"
        super().__init__(msg)

    def __reduce__(self):  # picklable (Prefect ships exceptions between processes)
        return (_rebuild_media_error, (self.field, self.problem, self.value, self.allowed,
                                       self.transient))


def _rebuild_media_error(field: str, problem: str, value: Any, allowed: str | None,
                         transient: bool) -> MediaError:
    return MediaError(field, problem, value=value, allowed=allowed, transient=transient)


def too_large(field: str, value: str, size: int | None, max_bytes: int) -> MediaError:
    """The refusal of a source over its byte cap (`size` when known)."""
    got = f" ({human_size(size)})" if size is not None else ""
    return MediaError(field, f"is too large{got}", value=value, allowed=f"at most {human_size(max_bytes)}")


def av_errors() -> tuple[type[BaseException], ...]:
    """What PyAV may raise while opening or decoding a damaged or hostile file."""
    import av

    return (av.error.FFmpegError, ValueError, OSError, EOFError, IndexError, KeyError,
            TypeError, RuntimeError, AttributeError)
