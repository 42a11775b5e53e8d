"""When to ask whether a job is done, and the one loop that asks.

The plan is a belief over (queue wait, processing time) from the duration model's prediction,
conditioned on every answer seen (QUEUED at t: the queue wait is longer than t; PROCESSING at t:
it started by t; any non-final answer: not done at t). Polls are dense (every `gap_s`) across
the likely end and sparse elsewhere: none before it, backing off after it. `next_poll` is a pure
function of the prediction and the answers; `poll_until` asks at its times until a final answer.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

from avatarflow.contract import EXPECTED_DURATION_S
from avatarflow.duration import MIN_QUEUE_SPREAD_S, Prediction, fixed_prediction
from avatarflow.errors import (
    APITimeout,
    DeadlineExceeded,
    RateLimited,
    ServerError,
    TransportError,
)

DEADLINE_FACTOR = 10.0  # a wait gives up after this many times the predicted duration
MIN_DEADLINE_S = 60.0  # ... and never sooner than this


@dataclass(frozen=True)
class PlanConfig:
    """`gap_s`: polls this far apart where the end is likely (slack about half of it);
    `window` the quantiles of the end that make "likely"; `window_polls` the most polls spent
    across that window (a wide, cold window gets wider gaps instead of more polls); after it,
    gaps grow by `late_growth` up to `late_max_gap_s`."""

    gap_s: float = 3.0
    window: tuple[float, float] = (0.02, 0.98)
    window_polls: int = 7
    late_growth: float = 1.5
    late_max_gap_s: float = 30.0
    min_gap_s: float = 0.5
    result_from: float = 0.01  # poll the result endpoint once P(done) reaches this
    grid: int = 41


DEFAULT_PLAN = PlanConfig()


@dataclass(frozen=True)
class Answer:
    """A non-final answer: its status (QUEUED, PROCESSING, or anything else not final) at `at`
    seconds after submit."""

    at: float
    status: str


@dataclass(frozen=True)
class Poll:
    at: float  # seconds after submit
    endpoint: str  # "result" (carries the status; saves a round trip when done) or "status"
    phase: str  # "window", "late"


def _normal_grid(mean: float, sd: float, n: int, low: float) -> tuple[list[float], list[float]]:
    sd = max(sd, 1e-6)
    xs = [mean + sd * (-4.0 + 8.0 * i / (n - 1)) for i in range(n)]
    ws = [math.exp(-0.5 * ((x - mean) / sd) ** 2) for x in xs]
    xs = [max(x, low) for x in xs]
    return xs, ws


def end_distribution(pred: Prediction, answers: Iterable[Answer] = (), *, grid: int = 41,
                     not_done: bool = False) -> list[tuple[float, float]]:
    """The end time's distribution [(t, weight)], sorted, weights summing to 1, given the status
    answers (QUEUED at t: queue wait > t; PROCESSING at t: queue wait <= t). With `not_done`, also
    conditioned on the job not being done at each answer. Empty if the answers rule out every
    point (the model was wrong: the caller is then "late")."""
    qs, qw = _normal_grid(pred.queue_s, pred.queue_spread_s, grid, 0.0)
    ps, pw = _normal_grid(pred.processing_s, pred.processing_spread_s, grid, 0.1 * pred.processing_s)
    answers = list(answers)
    q_lo = max((a.at for a in answers if a.status == "QUEUED"), default=-math.inf)
    q_hi = min((a.at for a in answers if a.status == "PROCESSING"), default=math.inf)
    t_min = max((a.at for a in answers), default=-math.inf) if not_done else -math.inf
    queue = [(q, w) for q, w in zip(qs, qw) if q_lo < q <= q_hi]
    if not queue and q_lo < q_hi:  # re-anchor the queue wait on what the answers say
        if q_hi < math.inf:  # started by q_hi, sooner than modelled: anywhere since the last QUEUED
            a = max(q_lo, 0.0)
            queue = [(a + (q_hi - a) * (i + 0.5) / grid, 1.0) for i in range(grid)]
        else:  # still QUEUED past the modelled wait: the rest of it, half-normal beyond q_lo
            sd = max(pred.queue_spread_s, 0.25 * (q_lo - pred.queue_s), MIN_QUEUE_SPREAD_S)
            queue = [(q_lo + sd * 4.0 * (i + 0.5) / grid, math.exp(-0.5 * (4.0 * (i + 0.5) / grid) ** 2))
                     for i in range(grid)]
    out: dict[float, float] = {}
    for q, wq in queue:
        for p, wp in zip(ps, pw):
            t = q + p
            if t > t_min:
                out[t] = out.get(t, 0.0) + wq * wp
    total = sum(out.values())
    if total <= 0:
        return []
    return sorted((t, w / total) for t, w in out.items())


def _quantile(dist: list[tuple[float, float]], p: float) -> float:
    acc = 0.0
    for t, w in dist:
        acc += w
        if acc >= p:
            return t
    return dist[-1][0]


def _cdf(dist: list[tuple[float, float]], t: float) -> float:
    return sum(w for x, w in dist if x <= t)


def window(pred: Prediction, answers: Iterable[Answer] = (), cfg: PlanConfig = DEFAULT_PLAN) -> tuple[float, float] | None:
    """(start, end) of the likely end, given the status answers; None when they rule it out."""
    dist = end_distribution(pred, answers, grid=cfg.grid)
    if not dist:
        return None
    return _quantile(dist, cfg.window[0]), _quantile(dist, cfg.window[1])


def next_poll(pred: Prediction, answers: Iterable[Answer] = (), now: float = 0.0,
              cfg: PlanConfig = DEFAULT_PLAN) -> Poll:
    """When to ask next (seconds after submit), given the prediction and the non-final answers
    so far. No poll before the window; the first one gap into it (at its end when it is
    narrower), then every gap across it (re-anchored by the answers: a job
    still QUEUED moves the window later, PROCESSING pins its start); after it, growing gaps."""
    answers = sorted(answers, key=lambda a: a.at)
    last = answers[-1].at if answers else -math.inf
    earliest = max(now, last + cfg.min_gap_s)
    likely = window(pred, answers, cfg)
    if likely:
        lo, hi = likely
        gap = max(cfg.gap_s, (hi - lo) / max(cfg.window_polls - 1, 1))
    else:  # the answers contradict the model: late since the first answer it cannot explain
        k = next(k for k in range(1, len(answers) + 1) if window(pred, answers[:k], cfg) is None)
        lo = hi = answers[k - 1].at
        gap = cfg.gap_s
    if last < lo:  # the first poll one gap into the window (a poll at its very start finds little)
        at = max(earliest, min(lo + gap, hi))
        phase = "window"
    elif last < hi:
        at = max(earliest, last + gap)
        phase = "window"
    else:
        late = sum(1 for a in answers if a.at >= hi)
        cap = max(gap, min(cfg.late_max_gap_s, 0.1 * max(pred.seconds, hi)))
        at = max(earliest, last + min(cap, gap * cfg.late_growth ** late))
        phase = "late"
    p_done = _cdf(end_distribution(pred, answers, grid=cfg.grid, not_done=True), at) if likely else 1.0
    return Poll(at=at, endpoint="result" if p_done >= cfg.result_from or phase == "late" else "status", phase=phase)


@dataclass(frozen=True)
class PollEvent:
    """One status answer seen while waiting."""

    request_id: str
    status: str
    elapsed_s: float
    polls: int


class Schedule(TypedDict, total=False):
    """When a wait asks, every key optional. `submitted_at` (epoch s; default: now); `prediction`
    (else `expected_seconds`, else the vendor's typical time), re-read from `predict()` before each
    poll when given (a model that learns while the job runs); `deadline_s` (default: ten times the
    prediction, at least a minute); `on_status` called with each answer; `plan` the plan's knobs."""

    submitted_at: float | None
    prediction: Prediction | None
    predict: Callable[[], Prediction | Awaitable[Prediction]] | None
    expected_seconds: float | None
    deadline_s: float | None
    on_status: Callable[[PollEvent], Awaitable[None] | None] | None
    plan: PlanConfig


Ask = Callable[[Poll], Awaitable[tuple[str, Any]]]


async def poll_until(request_id: str, ask: Ask, **schedule: Unpack[Schedule]) -> Any:
    """Ask at the plan's times until `ask` returns (status, final) with a final answer, and return
    it. A GET whose retries are spent is a missed poll, asked again at the plan's next time; past
    the deadline, DeadlineExceeded."""
    unknown = set(schedule) - set(Schedule.__annotations__)
    if unknown:
        raise TypeError(f"unknown schedule keys {sorted(unknown)}; allowed: {sorted(Schedule.__annotations__)}")
    plan = schedule.get("plan", DEFAULT_PLAN)
    submitted_at, expected = schedule.get("submitted_at"), schedule.get("expected_seconds")
    predict, on_status = schedule.get("predict"), schedule.get("on_status")
    start = submitted_at if submitted_at is not None else time.time()
    pred = schedule.get("prediction") or fixed_prediction(expected if expected is not None else EXPECTED_DURATION_S)
    deadline_s = schedule.get("deadline_s")
    deadline = start + (deadline_s if deadline_s is not None else max(DEADLINE_FACTOR * pred.seconds, MIN_DEADLINE_S))
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
