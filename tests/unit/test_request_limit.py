"""The request limit's shape (avatarflow.request_limit) against Prefect's slot arithmetic,
simulated exactly: taken slots are a whole number, decayed by floor(decay x seconds since the
last grant) and never below 0; a request is let through only if its slots fit under the limit."""

import bisect
import math

import pytest

from avatarflow.request_limit import SLOTS_PER_REQUEST, limit_slots, retry_wait


class Bucket:
    """A global concurrency limit with slot decay, as Prefect's server computes it."""

    def __init__(self, limit: int, decay: float) -> None:
        self.limit, self.decay, self.active, self.updated = limit, decay, 0, 0.0

    def active_at(self, t: float) -> int:
        return max(0, self.active - math.floor(self.decay * (t - self.updated)))

    def take(self, t: float, slots: int) -> bool:
        now = self.active_at(t)
        if now + slots > self.limit:
            return False  # a denial changes nothing (its transaction is rolled back)
        self.active, self.updated = now + slots, t
        return True


def granted_in(requests_per_minute: int, late_s: float, seconds: float = 1200.0) -> list[float]:
    """Grant times of waiters that always want a request and ask `late_s` after the next
    token is due (the server's round trip, a busy event loop)."""
    limit, decay = limit_slots(requests_per_minute)
    bucket = Bucket(round(limit * SLOTS_PER_REQUEST), decay * SLOTS_PER_REQUEST)
    t, granted = 0.0, []
    while t < seconds:
        if bucket.take(t, SLOTS_PER_REQUEST):
            granted.append(t)
            continue
        t += max(retry_wait(bucket.active_at(t), bucket.limit, SLOTS_PER_REQUEST, bucket.decay), 0.001) + late_s
    return granted


@pytest.mark.parametrize("per_minute", [12, 24, 60, 120])
def test_waiters_that_ask_a_little_late_lose_no_token(per_minute):
    """The fleet bench's binding minutes let through 22 of 24: with a bucket of exactly one
    request, the decay due while the winning waiter's request was on its way was lost."""
    _, decay = limit_slots(per_minute)
    granted = granted_in(per_minute, late_s=0.3)
    assert len(granted) >= 0.99 * decay * 1200.0, (len(granted), decay * 1200.0)


def test_the_limit_lets_through_most_of_the_rate_while_it_binds():
    for per_minute in (24, 60, 120, 600):
        _, decay = limit_slots(per_minute)
        assert 60 * decay >= 0.94 * per_minute, per_minute


@pytest.mark.parametrize("per_minute", [1, 12, 24, 60, 120, 600])
def test_no_sixty_seconds_see_more_than_the_rate(per_minute):
    granted = granted_in(per_minute, late_s=0.0)
    busiest = max(bisect.bisect_right(granted, t + 60.0 - 1e-9) - i for i, t in enumerate(granted))
    assert busiest <= per_minute, (busiest, per_minute)
