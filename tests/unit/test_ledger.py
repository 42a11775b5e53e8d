"""The exactly-once ledger, two runs interleaved step by step (in-memory store and client).

The first four tests are the four races a review found in the first ledger (avatarflow/jobs.py);
each failed on that code and passes on avatarflow/ledger.py. Every test asserts the promise
itself: one POST per fingerprint, and every billed request id recorded in the ledger."""

from __future__ import annotations

import asyncio
import time

import pytest

from avatarflow.contract import AvatarRequest
from avatarflow.errors import RateLimited, SubmitNotSent
from avatarflow.ledger import Ledger, StoreUnsafe, SubmitUnresolved
from tests.unit.fakes import WHO, FakeClient, FakeStore, Posted, as_run, fingerprint_of

LEASE = 0.3
REQUEST = AvatarRequest(image="https://example.com/p.jpg", voice_script="Hello there.", seed=7)
FP = fingerprint_of(REQUEST.body())


def ledger(store: FakeStore, **kw) -> Ledger:
    opts = {"lease_seconds": LEASE, "follow_interval_seconds": 0.02, "reconcile_tries": 2, "reconcile_interval_seconds": 0.02}
    return Ledger(store, **{**opts, **kw})


async def submit(store: FakeStore, client: FakeClient, *, replace_request: str | None = None, **kw):
    return await ledger(store, **kw).submit(
        client, FP, REQUEST, record={"seed": 7}, replace_request=replace_request, log=lambda _m: None
    )


def recorded_ids(store: FakeStore) -> set[str]:
    entry = store.objects[store.ledger_key(FP)][0]
    return {entry["request_id"], *entry.get("orphaned", [])}


def stale_entry(store: FakeStore, state: str, *, age: float = 10 * LEASE) -> None:
    then = time.time() - age
    store.objects[store.ledger_key(FP)] = (
        {"fingerprint": FP, "state": state, "owner": "dead", "claimed_at": then, "renewed_at": then,
         "posting_at": then, "body": REQUEST.body()},
        "e0",
    )


async def test_a_slot_wait_longer_than_the_lease_does_not_let_a_second_run_post():
    """Race 1: the claim was written before the rate-limit slot was taken."""
    store, client = FakeStore(), FakeClient()
    b_posted = client.posting_event("B")
    client.slot_waits["A"] = b_posted  # A waits for a slot until B has posted: longer than the lease

    async def a():
        await asyncio.sleep(0)
        return await as_run("A", submit(store, client))

    async def b():
        await asyncio.sleep(LEASE / 10)  # A asks first
        return await as_run("B", submit(store, client))

    ja, jb = await asyncio.wait_for(asyncio.gather(a(), b()), 10)
    assert len(client.posts) == 1
    assert ja.request_id == jb.request_id == client.posts[0].request_id


async def test_a_slower_racer_cannot_remove_a_fresh_claim():
    """Race 2: the takeover of a stale claim deleted whatever was there, on an earlier read."""
    store, client = FakeStore(), FakeClient(plan={"B": ["hang"]})
    stale_entry(store, "claimed")
    store.write_gates["B"] = store.read_event("C")  # B writes after C has read the stale claim
    store.write_gates["C"] = client.posting_event("B")  # C writes after B is posting

    async def release_b():
        await asyncio.sleep(LEASE * 2)
        client.release.setdefault("B", asyncio.Event()).set()

    jb, jc, _ = await asyncio.wait_for(
        asyncio.gather(as_run("B", submit(store, client)), as_run("C", submit(store, client)), release_b()), 10
    )
    assert len(client.posts) == 1, [p.who for p in client.posts]
    assert jb.request_id == jc.request_id


async def test_no_billed_request_id_is_ever_overwritten():
    """Race 3: the request id was written unconditionally over another run's. Here A's POST
    goes out, then A is cut off from the store (no renewal) while its answer is slow and the
    history does not show its job yet: B takes the claim over and posts too (unavoidable), and
    both billed ids must stay in the ledger."""
    store, client = FakeStore(), FakeClient(plan={"A": ["hang"]}, hidden={"A"})
    partition = asyncio.Event()

    async def a():
        WHO.set("A")
        task = asyncio.ensure_future(submit(store, client))
        await client.posting_event("A").wait()
        store.write_gates["A"] = partition  # A's store writes hang from here
        return await task

    async def b():
        await client.posting_event("A").wait()
        job = await as_run("B", submit(store, client))
        partition.set()
        client.release.setdefault("A", asyncio.Event()).set()
        return job

    ja, jb = await asyncio.wait_for(asyncio.gather(asyncio.create_task(a()), b()), 10)
    assert len(client.posts) == 2
    assert recorded_ids(store) == {p.request_id for p in client.posts}, "a billed job was lost"
    assert ja.request_id == jb.request_id, "both runs follow one request"


@pytest.mark.parametrize("answer", ["5xx", "unparseable", "reset"])
async def test_an_ambiguous_answer_is_reconciled_never_reposted(answer):
    """Race 4: a 5xx, an answer that does not parse or a reset after the body left deleted the
    claim, so a rerun posted again."""
    store, client = FakeStore(), FakeClient(plan={"A": [answer]})
    ja = await as_run("A", submit(store, client))
    jb = await as_run("B", submit(store, client))
    assert len(client.posts) == 1
    assert ja.request_id == jb.request_id == client.posts[0].request_id


async def test_a_cancelled_post_keeps_the_claim_and_a_rerun_adopts_the_job():
    """Race 4, cancellation: the run is cancelled while its POST is in flight (the job exists)."""
    store, client = FakeStore(), FakeClient(plan={"A": ["hang"]})
    task = asyncio.ensure_future(as_run("A", submit(store, client)))
    await client.posting_event("A").wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.objects[store.ledger_key(FP)][0]["state"] == "posting"
    jb = await asyncio.wait_for(as_run("B", submit(store, client)), 10)
    assert len(client.posts) == 1 and jb.request_id == client.posts[0].request_id


async def test_an_unresolved_answer_stays_claimed_until_the_history_shows_the_job():
    store, client = FakeStore(), FakeClient(plan={"A": ["reset"]}, hidden={"A"})
    with pytest.raises(SubmitUnresolved):
        await as_run("A", submit(store, client))
    assert store.objects[store.ledger_key(FP)][0]["state"] == "posting"
    client.show("A")
    jb = await asyncio.wait_for(as_run("B", submit(store, client)), 10)
    assert len(client.posts) == 1 and jb.request_id == client.posts[0].request_id


async def test_a_slow_answer_longer_than_the_lease_is_not_taken_over():
    store, client = FakeStore(), FakeClient(plan={"A": ["hang"]})
    task = asyncio.ensure_future(as_run("A", submit(store, client)))
    await client.posting_event("A").wait()
    follower = asyncio.ensure_future(as_run("B", submit(store, client)))
    await asyncio.sleep(LEASE * 4)  # four lease times of waiting: A renews, B follows
    assert not follower.done()
    client.release["A"].set()
    ja, jb = await asyncio.wait_for(asyncio.gather(task, follower), 10)
    assert len(client.posts) == 1 and ja.request_id == jb.request_id


async def test_a_dead_holder_mid_post_is_adopted_from_the_history():
    store, client = FakeStore(), FakeClient()
    stale_entry(store, "posting", age=3 * LEASE)
    client.posts.append(Posted("req-dead", REQUEST.body(), time.time() - 2 * LEASE, "dead"))
    job = await as_run("B", submit(store, client))
    assert job.request_id == "req-dead" and len(client.posts) == 1


async def test_a_dead_holder_before_post_is_taken_over():
    store, client = FakeStore(), FakeClient()
    stale_entry(store, "claimed")
    job = await as_run("B", submit(store, client))
    assert len(client.posts) == 1 and job.request_id == client.posts[0].request_id


async def test_rate_limited_submit_keeps_the_claim_and_retries():
    store, client = FakeStore(), FakeClient(plan={"A": ["429", "429", "ok"]})
    job = await as_run("A", submit(store, client))
    assert job.request_id == client.posts[0].request_id and len(client.posts) == 1


async def test_a_refused_connection_releases_the_claim():
    store, client = FakeStore(), FakeClient(plan={"A": ["refused"]})
    with pytest.raises(SubmitNotSent):
        await as_run("A", submit(store, client))
    assert store.ledger_key(FP) not in store.objects
    assert (await as_run("B", submit(store, client))).request_id == client.posts[0].request_id


async def test_too_many_429s_release_the_claim():
    store, client = FakeStore(), FakeClient(plan={"A": ["429"] * 5})
    with pytest.raises(RateLimited):
        await as_run("A", submit(store, client))
    assert store.ledger_key(FP) not in store.objects and not client.posts


async def test_a_store_that_ignores_conditions_is_refused_before_any_post():
    store, client = FakeStore(ignores_conditions=True), FakeClient()
    with pytest.raises(StoreUnsafe, match="conditional writes"):
        await as_run("A", submit(store, client))
    assert not client.posts
    job = await as_run("A", submit(store, client, require_conditional=False))
    assert job.request_id == client.posts[0].request_id


async def test_many_racers_one_post_and_the_index_finds_the_entry():
    store, client = FakeStore(), FakeClient()
    jobs = await asyncio.wait_for(
        asyncio.gather(*(as_run(f"R{i}", submit(store, client)) for i in range(12))), 10
    )
    assert len(client.posts) == 1 and len({j.request_id for j in jobs}) == 1
    found = await ledger(store).find(jobs[0].request_id)
    assert found and found["fingerprint"] == FP and found["seed"] == 7


async def test_replace_request_resubmits_once_for_an_expired_output():
    store, client = FakeStore(), FakeClient()
    first = await as_run("A", submit(store, client))
    racers = [as_run(w, submit(store, client, replace_request=first.request_id)) for w in ("B", "C")]
    second, third = await asyncio.wait_for(asyncio.gather(*racers), 10)
    assert len(client.posts) == 2 and second.request_id == third.request_id != first.request_id
    entry = store.objects[store.ledger_key(FP)][0]
    assert entry["replaced_request_id"] == first.request_id


async def test_a_store_hiccup_while_renewing_does_not_lose_the_lease():
    store, client = FakeStore(), FakeClient(plan={"A": ["hang"]}, hidden={"A"})
    task = asyncio.ensure_future(as_run("A", submit(store, client)))
    await client.posting_event("A").wait()
    store.hiccups["A"] = 1  # A's next renewal fails; the ones after it must still happen
    follower = asyncio.ensure_future(as_run("B", submit(store, client)))
    await asyncio.sleep(LEASE * 4)
    assert not follower.done(), "B took over a claim whose holder is alive"
    client.release["A"].set()
    ja, jb = await asyncio.wait_for(asyncio.gather(task, follower), 10)
    assert len(client.posts) == 1 and ja.request_id == jb.request_id
