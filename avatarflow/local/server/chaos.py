"""Test knobs of the local API: fault injection, a per-key rate limit and request counters.

Faults are set at start (CLI flags) or at run time with `POST /_local/faults`, a JSON object:

    {"submit": {"429": 0.5, "500": 0.1, "502": 0, "504": 0, "drop": 0.1},   # per endpoint
     "status": {...}, "result": {...}, "history": {...}, "files": {...}, "sync": {...},
     "fail_rate": 0.2,                # jobs end FAILED ("local: injected failure")
     "submit_drop_after_accept": 1.0, # the job is queued, then the answer is cut off
     "submit_delay": 5.0,             # the job is queued, the answer comes this late
     "count": 2,                      # only the next 2 injected faults fire, then all clear
     "retry_after": 1.0,              # Retry-After of injected and real 429s
     "min_processing_time": 20,       # settings: a job is PROCESSING at least this long
     "requests_per_minute": 50, "retention": 3600}

Endpoints: submit, status, result, history, files, sync. `drop` cuts the connection midway
through a response. `POST /_local/reset` restores the start-up settings and clears counters.

Every value is checked before any is applied (:func:`validate_knobs`): a bad one is refused
with its name, its value and what is allowed, and leaves the current knobs as they were.
Ranges: rates 0 to 1; `count` a whole number 0 or more (or null); `retry_after` 0 to 3600 s;
`submit_delay` 0 to 300 s; `min_processing_time` 0 to 3600 s; `requests_per_minute` a whole number 0 to
100000 per minute; `retention` 0 to 604800 s.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import defaultdict, deque
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from avatarflow.errors import BadSetting

ENDPOINTS = ("submit", "status", "result", "history", "files", "sync")
FAULT_KINDS = ("429", "500", "502", "504", "drop")


class KnobError(BadSetting):
    """A bad fault or setting: ``field`` (e.g. ``status.500``), its value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={_show(value)} is not allowed; allowed: {allowed}")


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(field: str, value: Any, low: float, high: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise KnobError(field, value, what)
    return float(value)


def _whole(field: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise KnobError(field, value, f"a whole number from {low} to {high}")
    return value


RATE = "a rate, a number from 0 to 1"
_SECONDS_MAX = {"retry_after": 3600.0, "submit_delay": 300.0, "min_processing_time": 3600.0,
                "retention": 604800.0}


def validate_knobs(body: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(faults, settings) of a ``POST /_local/faults`` body, every value checked; nothing is
    applied here. KnobError names the first bad field, its value and what is allowed."""
    if not isinstance(body, dict):
        raise KnobError("body", type(body).__name__, "a JSON object of fault knobs and settings")
    known = [*Faults.model_fields, *Settings.model_fields]
    faults: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for name, value in body.items():
        if name in ENDPOINTS:
            if not isinstance(value, dict):
                raise KnobError(name, value, f"an object of fault rates by kind ({', '.join(FAULT_KINDS)})")
            rates = {}
            for kind, rate in value.items():
                if kind not in FAULT_KINDS:
                    raise KnobError(f"{name}.{kind}", kind, f"a fault kind: {', '.join(FAULT_KINDS)}")
                rates[kind] = _number(f"{name}.{kind}", rate, 0, 1, RATE)
            faults[name] = rates
        elif name in ("fail_rate", "submit_drop_after_accept"):
            faults[name] = _number(name, value, 0, 1, RATE)
        elif name == "count":
            faults[name] = None if value is None else _whole(name, value, 0, 1_000_000)
        elif name in ("retry_after", "submit_delay"):
            top = _SECONDS_MAX[name]
            faults[name] = _number(name, value, 0, top, f"seconds, a number from 0 to {top:g}")
        elif name in ("min_processing_time", "retention"):
            top = _SECONDS_MAX[name]
            settings[name] = _number(name, value, 0, top, f"seconds, a number from 0 to {top:g}")
        elif name == "requests_per_minute":
            settings[name] = _whole(name, value, 0, 100_000)
        else:
            raise KnobError(str(name), name, f"a fault knob: {', '.join(known)}")
    return faults, settings


class Faults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    submit: dict[str, float] = Field(default_factory=dict)
    status: dict[str, float] = Field(default_factory=dict)
    result: dict[str, float] = Field(default_factory=dict)
    history: dict[str, float] = Field(default_factory=dict)
    files: dict[str, float] = Field(default_factory=dict)
    sync: dict[str, float] = Field(default_factory=dict)
    fail_rate: float = 0.0
    submit_drop_after_accept: float = 0.0
    submit_delay: float = 0.0
    count: int | None = None
    retry_after: float = 1.0


class Settings(BaseModel):
    min_processing_time: float = 0.0
    requests_per_minute: int = 0
    retention: float = 3600.0


class Chaos:
    """The current faults and settings, the counters, and the rate limiter; thread-safe."""

    def __init__(self, settings: Settings, faults: Faults | None = None, seed: int | None = None):
        self._initial = (settings.model_copy(), (faults or Faults()).model_copy())
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.settings = self._initial[0].model_copy()
            self.faults = self._initial[1].model_copy()
            self.requests: dict[str, int] = defaultdict(int)
            self.codes: dict[str, int] = defaultdict(int)
            self.by_endpoint_code: dict[str, int] = defaultdict(int)
            self.submit_times: list[float] = []
            self.request_times: list[float] = []
            self.api_request_times: list[float] = []
            self._windows: dict[str, deque[float]] = defaultdict(deque)

    def configure(self, body: Any) -> None:
        """Apply a ``POST /_local/faults`` body: settings keys update the settings, fault keys (if
        any) replace the faults. All or nothing: KnobError before anything changes."""
        faults, settings = validate_knobs(body)
        new_faults = Faults.model_validate(faults) if faults else None
        with self._lock:
            if settings:
                self.settings = self.settings.model_copy(update=settings)
            if new_faults is not None:
                self.faults = new_faults

    def _fire(self, rate: float) -> bool:
        if rate <= 0 or self.faults.count == 0:
            return False
        if self._random.random() >= rate:
            return False
        if self.faults.count is not None:
            self.faults.count -= 1
        return True

    def count(self, endpoint: str, code: int | None = None) -> None:
        with self._lock:
            if code is None:
                self.requests[endpoint] += 1
                now = time.time()
                self.request_times.append(now)
                if endpoint != "files":
                    self.api_request_times.append(now)
                if endpoint == "submit":
                    self.submit_times.append(now)
            else:
                self.codes[str(code)] += 1
                self.by_endpoint_code[f"{endpoint}:{code}"] += 1

    def fault_for(self, endpoint: str) -> str | None:
        """The fault to inject into this request, if any: '429', '500', '502', '504' or 'drop'."""
        with self._lock:
            rates = getattr(self.faults, endpoint)
            for kind in FAULT_KINDS:
                if self._fire(rates.get(kind, 0.0)):
                    return kind
        return None

    def roll(self, name: str) -> bool:
        """Whether a job-level fault ('fail_rate', 'submit_drop_after_accept') fires now."""
        with self._lock:
            return self._fire(getattr(self.faults, name))

    def seconds_to_wait(self, key: str) -> float | None:
        """Seconds until the key's 60 s window frees a slot, when over the limit; else None."""
        with self._lock:
            limit = self.settings.requests_per_minute
            if limit <= 0:
                return None
            now = time.time()
            window = self._windows[key]
            while window and window[0] <= now - 60:
                window.popleft()
            if len(window) >= limit:
                return max(0.05, window[0] + 60 - now)
            window.append(now)
            return None

    def stats(self, jobs: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self.requests),
                "codes": dict(self.codes),
                "by_endpoint_code": dict(self.by_endpoint_code),
                "submit_times": list(self.submit_times),
                "request_times": list(self.request_times),
                "api_request_times": list(self.api_request_times),
                "settings": self.settings.model_dump(),
                "faults": self.faults.model_dump(),
                "jobs": jobs,
            }


def reset_at_header(seconds: float) -> str:
    at = datetime.fromtimestamp(time.time() + seconds, timezone.utc)
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")
