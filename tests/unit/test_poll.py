"""avatarflow.poll: the poll plan on a fake clock (no timed tests) and the wait's arguments."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from datetime import UTC

import pytest

from avatarflow.api_http import backoff_delay
from avatarflow.duration import (
    DurationModel,
    Observation,
    Prediction,
    Speech,
    fixed_prediction,
)
from avatarflow.poll import DEFAULT_PLAN, Answer, Poll, next_poll, window

COST = 3.0  # the local vendor-like mode's default at 720p

def poll_plan(pred: Prediction, *, until: float | None = None, max_polls: int = 200) -> list[Poll]:
    """The plan's whole schedule on a fake clock, every answer non-final (QUEUED before the
    predicted queue wait, PROCESSING after); stops at the first poll at or past `until`."""
    until = until if until is not None else 3 * pred.seconds + 30
    answers: list[Answer] = []
    polls: list[Poll] = []
    while len(polls) < max_polls:
        poll = next_poll(pred, answers, now=polls[-1].at if polls else 0.0)
        polls.append(poll)
        if poll.at >= until:
            break
        answers.append(Answer(poll.at, "QUEUED" if poll.at < pred.queue_s else "PROCESSING"))
    return polls

def simulate(pred: Prediction, end_s: float, *, queue_s: float | None = None) -> tuple[int, float, int]:
    """(requests, slack, polls) for a job ending at `end_s` (out of the queue at `queue_s`),
    polled by the plan on a fake clock: requests count the poll that sees COMPLETED and the
    extra result request a status poll needs then."""
    queue_s = queue_s if queue_s is not None else min(pred.queue_s, end_s)
    answers: list[Answer] = []
    now, polls = 0.0, 0
    while True:
        poll = next_poll(pred, answers, now=now)
        polls += 1
        now = poll.at
        if now >= end_s:
            return polls + (1 if poll.endpoint == "status" else 0), now - end_s, polls
        answers.append(Answer(now, "QUEUED" if now < queue_s else "PROCESSING"))

def _jobs(rng: random.Random, n: int, *, jitter: float = 0.01, queue: float = 3.0, qj: float = 1.0):
    """(speech seconds, queue wait, processing) of jobs lasting 20..300 s, log-uniformly."""
    out = []
    for _ in range(n):
        total = math.exp(rng.uniform(math.log(20), math.log(300)))
        speech = (total - queue) / COST
        out.append((speech, queue + rng.uniform(-qj, qj), COST * speech * (1 + rng.gauss(0, jitter))))
    return out

def _model(jobs) -> DurationModel:
    return DurationModel(
        Observation(id=f"w{i}", at=float(i), resolution="720p", speech_s=s, exact=True, queue_s=q,
                    processing_s=p, total_s=q + p)
        for i, (s, q, p) in enumerate(jobs)
    )

def _run(model: DurationModel, jobs) -> tuple[list[int], list[float]]:
    requests, slack = [], []
    for s, q, p in jobs:
        pred = model.predict("720p", Speech(s, True))
        polls, late, _ = simulate(pred, q + p, queue_s=q)
        requests.append(1 + polls)  # + the submit
        slack.append(late)
    return requests, slack

def _p95(xs: list[float]) -> float:
    return sorted(xs)[math.ceil(0.95 * len(xs)) - 1]

def test_warm_plan_is_silent_before_the_window_dense_across_it_and_backs_off_after():
    model = _model(_jobs(random.Random(1), 5))
    pred = model.predict("720p", Speech(60.0, True))
    lo, hi = window(pred)
    assert lo < pred.seconds < hi and hi - lo < 15
    plan = poll_plan(pred, until=pred.seconds + 200)
    first = plan[0]  # one gap into the window (or its end): a poll at its very start finds little
    assert first.at == pytest.approx(min(lo + DEFAULT_PLAN.gap_s, hi)) and first.endpoint == "result"
    times = [p.at for p in plan]
    gaps = [b - a for a, b in zip(times, times[1:])]
    in_window = [g for p, g in zip(plan, gaps) if p.at < hi]
    assert in_window and all(g == pytest.approx(DEFAULT_PLAN.gap_s) for g in in_window)
    late = [g for p, g in zip(plan, gaps) if p.phase == "late"]
    assert all(b >= a - 1e-9 for a, b in zip(late, late[1:])) and late[-1] > 3 * DEFAULT_PLAN.gap_s  # growing
    assert max(late) <= DEFAULT_PLAN.late_max_gap_s + 1e-9
    assert all(p.endpoint == "result" for p in plan)  # the result GET carries the status

def test_far_from_the_end_the_plan_is_sparse():
    """A 300 s job: nothing in its first 290 s; a 20 s job: its first poll near 20 s."""
    model = _model(_jobs(random.Random(2), 5))
    long = poll_plan(model.predict("720p", Speech(99.0, True)), until=320)
    short = poll_plan(model.predict("720p", Speech(5.7, True)), until=40)
    assert long[0].at > 285 and sum(1 for p in long if p.at < 300) <= 3
    assert 15 < short[0].at < 23

def test_still_queued_moves_the_window_later_and_processing_pins_it():
    pred = _model(_jobs(random.Random(3), 8)).predict("720p", Speech(30.0, True))
    base = window(pred)
    # the job is still QUEUED 10 s after its expected queue wait: the end moves as much later
    queued = [Answer(pred.queue_s + 10, "QUEUED")]
    lo, hi = window(pred, queued)
    assert lo > base[0] + 8
    nxt = next_poll(pred, queued, now=queued[0].at)
    assert nxt.at == pytest.approx(min(lo + DEFAULT_PLAN.gap_s, hi)) and nxt.at > base[0] + 8
    # then PROCESSING 2 s later: it started in those 2 s, so the end is within 2 s + the spread
    pinned = queued + [Answer(pred.queue_s + 12, "PROCESSING")]
    lo2, hi2 = window(pred, pinned)
    assert lo2 >= pred.queue_s + 10 + pred.processing_s - 3 * pred.processing_spread_s
    assert hi2 - lo2 < hi - lo + 1e-9

def test_a_job_past_its_window_or_unexplained_backs_off():
    pred = _model(_jobs(random.Random(4), 5)).predict("720p", Speech(10.0, True))
    for answers in ([Answer(5.0, "PROCESSING"), Answer(500.0, "PROCESSING")],  # far past the window
                    [Answer(5.0, "PROCESSING"), Answer(500.0, "QUEUED")]):  # contradicts the model
        p1 = next_poll(pred, answers, now=500.0)
        p2 = next_poll(pred, answers + [Answer(p1.at, "PROCESSING")], now=p1.at)
        p3 = next_poll(pred, answers + [Answer(p1.at, "PROCESSING"), Answer(p2.at, "PROCESSING")], now=p2.at)
        assert p1.phase == p2.phase == p3.phase == "late"
        assert p3.at - p2.at >= p2.at - p1.at >= p1.at - 500.0 > 0

def test_still_queued_far_past_the_model_re_anchors_the_queue_wait():
    pred = _model(_jobs(random.Random(4), 5)).predict("720p", Speech(10.0, True))
    lo, hi = window(pred, [Answer(500.0, "QUEUED")])
    assert 500 + 0.9 * pred.processing_s < lo < hi

def test_warm_goals_hold_on_a_fake_clock():
    """After 5 jobs: at most 4 API requests a job on average, slack median < 2 s, p95 < 5 s."""
    rng = random.Random(5)
    requests, slack = _run(_model(_jobs(rng, 5)), _jobs(rng, 300))
    assert statistics.mean(requests) <= 4.0
    assert statistics.median(slack) < 2.0 and _p95(slack) < 5.0

def test_cold_plan_spends_at_most_8_requests():
    rng = random.Random(6)
    requests, slack = _run(DurationModel(), _jobs(rng, 300))
    assert max(requests) <= 8
    assert statistics.median(slack) < 5.0

def test_an_early_end_is_caught_by_the_first_poll_in_one_request():
    pred = fixed_prediction(100.0)
    lo, hi = window(pred)
    first = poll_plan(pred)[0].at
    assert lo < first < hi
    polls, slack, result_polls = simulate(pred, 1.0)  # done long before anything expected
    assert (polls, result_polls) == (1, 1) and slack == pytest.approx(first - 1.0)

def test_backoff_honours_retry_after_and_reset_header():
    from datetime import datetime, timedelta

    import httpx

    r = httpx.Response(429, headers={"Retry-After": "3"})
    assert 3.0 <= backoff_delay(0, r) <= 3.3
    at = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
    r2 = httpx.Response(429, headers={"x-rate-limit-reset-at-utc": at})
    assert 4.0 <= backoff_delay(0, r2) <= 5.5
    assert 0 < backoff_delay(3) <= 4.05

def test_wait_refuses_an_unknown_source_or_schedule_key():
    """A misspelt keyword fails before any request, never silently ignored."""
    from avatarflow.client import SegmindClient

    async def main():
        async with SegmindClient(base_url="http://127.0.0.1:9") as client:
            with pytest.raises(TypeError, match="expected_secs"):
                await client.wait("rid", expected_secs=1)
            with pytest.raises(ValueError, match="via='records'"):
                await client.wait("rid", via="records")

    asyncio.run(main())
