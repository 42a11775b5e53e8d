"""The polling schedule: few requests for a 100 s job, tight near the expected end."""

import itertools

from avatarflow.client import backoff_delay, poll_offsets


def _polls_until(done_at: float, expected: float) -> tuple[int, float]:
    for n, t in enumerate(poll_offsets(expected), start=1):
        if t >= done_at:
            return n, t - done_at
    raise AssertionError


def test_a_100_s_job_takes_at_most_15_polls_and_is_seen_within_2_s():
    for done_at in (95.0, 98.0, 100.0, 103.0, 107.0):
        polls, slack = _polls_until(done_at, 100.0)
        assert polls <= 15, (done_at, polls)
        assert slack <= 2.0 + 1e-9, (done_at, slack)


def test_schedule_is_increasing_and_backs_off_to_15_s():
    ts = list(itertools.islice(poll_offsets(100.0), 40))
    assert all(b > a for a, b in zip(ts, ts[1:]))
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    assert max(gaps) <= 25.0 and gaps[-1] == 15.0


def test_short_jobs_poll_early():
    assert next(iter(poll_offsets(3.0))) <= 3.0


def test_backoff_honours_retry_after_and_reset_header():
    import httpx
    from datetime import datetime, timedelta, timezone

    r = httpx.Response(429, headers={"Retry-After": "3"})
    assert 3.0 <= backoff_delay(0, r) <= 3.3
    at = (datetime.now(timezone.utc) + timedelta(seconds=5)).isoformat()
    r2 = httpx.Response(429, headers={"x-rate-limit-reset-at-utc": at})
    assert 4.0 <= backoff_delay(0, r2) <= 5.5
    assert 0 < backoff_delay(3) <= 4.05
