"""The account's request limit in Prefect: a global concurrency limit with slot decay that every
worker's API request takes slots of, counted in hundredths of a request, and the limiter that
waits for them (`avatarflow deploy` makes the limit; the flows take its slots)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from avatarflow.errors import DeployError

CONCURRENCY_LIMIT = "avatarflow-api"
REQUESTS_PER_MINUTE = 50
# The limit counts in hundredths of a request: Prefect keeps a limit's taken slots as a whole
# number and, at every update (a request let through or denied), subtracts floor(decay x seconds
# since the last update); what is below one slot is lost. With one slot a request and requests
# coming faster than one per 1/decay seconds (many processes asking), nearly all the decay was
# lost: 120/min let through 66/min (tests/integration/test_rate_limit_fleet.py). In hundredths, an update
# loses less than a hundredth of a request.
SLOTS_PER_REQUEST = 100
# A request denied a slot of a limit without decay asks again after this.
RETRY_FLOOR_S = 2.0


def limit_slots(requests_per_minute: int, burst: float | None = None) -> tuple[float, float]:
    """(limit, slot_decay_per_second), in requests, of a global concurrency limit that lets at
    most `requests_per_minute` requests through in ANY 60 s window.

    A limit with slot decay is a token bucket: `limit` requests taken at once (the burst), freed
    at `slot_decay_per_second`. A 60 s window can see the burst plus a minute of decay, so the
    two share the budget: burst + 60 x decay = requests_per_minute. While the limit binds (the
    bucket empty) it lets through 60 x decay = requests_per_minute - burst a minute, so the
    default burst is a twentieth of it (a fifth let 80 % through), and at least one request
    plus half a second of the rate: a bucket of exactly one request is empty when a token falls
    due, so the decay until the winning waiter's request arrives (the server's round trip, a
    busy event loop) was lost: the fleet bench's binding minutes let through 22 of 24
    (tests/unit/test_request_limit.py simulates Prefect's arithmetic)."""
    if requests_per_minute < 1:
        raise ValueError(f"requests_per_minute={requests_per_minute} is not allowed; allowed: 1 or more")
    if burst is None:
        burst = min(float(requests_per_minute), max(1 + requests_per_minute / 120, requests_per_minute / 20))
    if not 1 <= burst <= requests_per_minute:
        raise ValueError(f"burst={burst} is not allowed; allowed: 1 to {requests_per_minute}")
    if burst == requests_per_minute:  # all at once, then a minute to refill
        return burst, requests_per_minute / 60.0
    return burst, (requests_per_minute - burst) / 60.0


async def ensure_concurrency_limit(requests_per_minute: int = REQUESTS_PER_MINUTE, burst: float | None = None,
                                   name: str = CONCURRENCY_LIMIT) -> dict[str, Any]:
    """Create or update the global concurrency limit `name` with slot decay; read back. On the
    server it counts SLOTS_PER_REQUEST slots a request (limit and decay scaled); the answer is in
    requests (limit: the burst, slot_decay_per_second: requests a second)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectNotFound

    limit, decay = limit_slots(requests_per_minute, burst)
    slots, slots_decay = round(limit * SLOTS_PER_REQUEST), decay * SLOTS_PER_REQUEST
    async with get_client() as client:
        try:
            await client.read_global_concurrency_limit_by_name(name)
            await client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=slots, slot_decay_per_second=slots_decay, active=True))
        except ObjectNotFound:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=slots, slot_decay_per_second=slots_decay, active=True))
        got = await client.read_global_concurrency_limit_by_name(name)
    if got.limit != slots or abs((got.slot_decay_per_second or 0) - slots_decay) > 1e-6:
        raise DeployError(f"concurrency limit {name}: the server has limit={got.limit}, decay="
                          f"{got.slot_decay_per_second}; asked limit={slots}, decay={slots_decay}")
    return {"name": got.name, "limit": got.limit / SLOTS_PER_REQUEST,
            "slot_decay_per_second": (got.slot_decay_per_second or 0) / SLOTS_PER_REQUEST,
            "slots_per_request": SLOTS_PER_REQUEST, "requests_per_minute": requests_per_minute}


def slots_per_request(limit: Any) -> int:
    """The slots one API request takes of the global concurrency limit `limit` (as read from
    the server): SLOTS_PER_REQUEST for a limit `avatarflow deploy` made (its burst is at least
    one request), 1 for one made before it counted in hundredths (run `avatarflow deploy` again
    to get the full rate)."""
    size = int(getattr(limit, "limit", 0) or 0)
    return SLOTS_PER_REQUEST if size >= SLOTS_PER_REQUEST else 1


def retry_wait(active_slots: float, limit: float, occupy: float, decay: float) -> float:
    """How long a request denied a slot waits before asking again: until the limit's slots
    (as the server reports them now, decayed) have room for it, plus a little jitter.

    Not Prefect's Retry-After: it is (slots asked + slots denied lately) / decay, a queue
    position, so each waiter comes back about once per token, tokens fall due while every
    waiter sleeps and, the bucket holding one (burst 1), are lost: at 12/min the bench used
    66 to 74 % of the limit; 4 waiters at 30/min got 10 of 15.5 in 30 s
    (tests/integration/test_rate_limit_fleet.py). Each waiter asks again when a token is due; those that
    lose the race read the limit again (two requests to the server per waiter per token)."""
    if decay <= 0:
        return RETRY_FLOOR_S
    due = max(0.0, (active_slots + occupy - limit) / decay)
    return due + random.uniform(0.0, min(0.25, 0.1 * occupy / decay))


def request_limiter(name: str | None) -> Any:
    """An async callable that waits for one request's slots of the limit `name`; None when
    `name` is None. How many slots a request takes is read from the server once per process
    (:func:`slots_per_request`); a denied request reads the limit and asks again when a token is
    due (:func:`retry_wait`). A limit that does not exist limits nothing."""
    if not name:
        return None
    known: dict[str, float] = {}

    async def take_slot() -> None:
        import httpx
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        async with get_client() as client:
            if not known:
                try:
                    gcl = await client.read_global_concurrency_limit_by_name(name)
                except ObjectNotFound:
                    return
                known["occupy"] = slots_per_request(gcl)
            while True:
                try:
                    await client.increment_concurrency_slots(names=[name], slots=int(known["occupy"]),
                                                             mode="rate_limit")
                    return
                except httpx.HTTPStatusError as e:
                    if e.response.status_code == 404:  # the limit is gone: nothing to wait for
                        return
                    if e.response.status_code != 423:
                        raise
                try:
                    gcl = await client.read_global_concurrency_limit_by_name(name)
                except ObjectNotFound:
                    return
                await asyncio.sleep(retry_wait(gcl.active_slots, gcl.limit, known["occupy"],
                                               float(gcl.slot_decay_per_second or 0.0)))

    return take_slot
