"""avatarflow.fleet's decisions that need no server: when a child run is taken as never started,
which child a batch run started again goes on from (a fake Prefect client)."""

import asyncio
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import prefect.client.orchestration
import prefect.deployments
import pytest

from avatarflow import fleet
from avatarflow.fleet import never_started
from tests.unit.fakes import FakeStore


def test_a_child_waiting_in_the_pools_queue_is_not_dispatched_again():
    """SCHEDULED is a place in the work pool's queue (workers take runs as their `--limit`
    allows): cancelling it would only send the row to the back of the queue."""
    assert not never_started("SCHEDULED", 3600.0, 300.0)
    assert not never_started("PAUSED", 3600.0, 300.0)


def test_a_child_a_worker_took_and_never_started_is_dispatched_again():
    assert never_started("PENDING", 301.0, 300.0)
    assert not never_started("PENDING", 299.0, 300.0)
    assert not never_started("RUNNING", 3600.0, 300.0)


class FakePrefect:
    """run_deployment and the client run_row uses: each dispatched child's state from `states`
    (in order; the last repeats), as (type, message, age in minutes), or a list of them: that
    child's states, one a read (the last stays); what was dispatched, read, cancelled and
    crashed; no child sends heartbeats."""

    def __init__(self, monkeypatch, states):
        from prefect.exceptions import ObjectNotFound

        self.states, self.dispatched, self.read, self.cancelled, self.runs = list(states), [], [], [], {}
        self.crashed, self.beats_asked, self.then = [], [], {}
        fake = self

        async def run_deployment(name, *, idempotency_key, **kw):
            fake.dispatched.append(idempotency_key)
            entry = fake.states[min(len(fake.dispatched), len(fake.states)) - 1]
            first, *later = entry if isinstance(entry, list) else [entry]
            run_id = fake.add(uuid.uuid4(), *first)
            fake.then[str(run_id)] = later
            return SimpleNamespace(id=run_id)

        class Client:
            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc):
                return False

            async def read_flow_run(self, run_id):
                fake.read.append(str(run_id))
                if str(run_id) not in fake.runs:
                    raise ObjectNotFound(None)
                state = fake.runs[str(run_id)]
                if fake.then.get(str(run_id)):  # the next read sees the next state
                    fake.add(run_id, *fake.then[str(run_id)].pop(0))
                return SimpleNamespace(state=state)

            async def read_artifacts(self, **kw):
                return []

            async def set_flow_run_state(self, run_id, state, force=False):
                (fake.crashed if state.type.value == "CRASHED" else fake.cancelled).append(str(run_id))
                fake.add(run_id, state.type.value, state.message)

            async def read_events(self, filter=None, limit=100):  # no heartbeat, ever
                fake.beats_asked.append(filter)
                return SimpleNamespace(events=[], total=0)

        monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment)
        monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda: Client())
        monkeypatch.setattr(fleet.random, "uniform", lambda a, b: 0.0)  # no backoff between children

    def add(self, run_id, kind, message=None, minutes=0):
        self.runs[str(run_id)] = SimpleNamespace(type=SimpleNamespace(value=kind), message=message,
                                                 timestamp=datetime.now(timezone.utc) - timedelta(minutes=minutes))
        return run_id


def _run_row(store, line=3):
    return asyncio.run(asyncio.wait_for(fleet.run_row(
        store=store, request={"image": "x.jpg", "voice_script": "x"}, line=line, key="k", options={},
        run_name="row", log=lambda m: None, poll_s=0.01), timeout=10))


def test_a_child_pending_since_before_the_batch_started_again_is_dispatched_again(monkeypatch):
    """The fleet bench: a batch run started again (its worker died) re-found a child a dead
    worker had left PENDING, and timed it from then: every restart (every few minutes) reset
    the timer, and the row waited 30 minutes. How long a child has waited is its state's age."""
    fake = FakePrefect(monkeypatch, [("PENDING", None, 30), ("FAILED", "JobFailed: the API failed it", 0)])
    out = _run_row(FakeStore())
    assert fake.dispatched == ["k:3:1", "k:3:2"] and len(fake.cancelled) == 1
    assert out["status"] == "failed" and "JobFailed" in out["error"]


@pytest.mark.parametrize("known", [True, False])
def test_a_batch_run_started_again_reads_a_rows_child_in_flight_instead_of_dispatching_it(monkeypatch, known):
    """The fleet bench: a batch run started again (its worker died) dispatched each of its 90
    rows in flight again, found by the idempotency key: 90 flow runs created from the deployment
    at once (a tenth of the Prefect server's CPU) where 90 reads of the recorded child do. A
    child the server no longer knows is dispatched anew (the next attempt)."""
    fake = FakePrefect(monkeypatch, [("FAILED", "JobFailed: the API failed it", 0)])
    store = FakeStore()
    child = uuid.uuid4()
    if known:
        fake.add(child, "FAILED", "JobFailed: the API failed it")
    asyncio.run(store.put_json(fleet.row_record_key(store, "k", 3), {
        "line": 3, "status": "running", "attempts": 2, "flow_run_id": str(child), "run_name": "row-retry-1"}))
    out = _run_row(store)
    assert fake.read[0] == str(child)
    assert fake.dispatched == ([] if known else ["k:3:3"])
    assert out["status"] == "failed" and out["attempts"] == (2 if known else 3)
    assert out["run_name"] == ("row-retry-1" if known else "row-retry-2")


def test_a_running_child_is_lost_only_when_it_has_been_silent_past_the_window():
    """RUNNING for a while is a video being made; RUNNING with no heartbeat (nor state) for
    `silent_s` is a dead worker's child that the crash automation missed."""
    assert fleet.lost("RUNNING", state_age_s=900.0, beat_age_s=None, silent_s=300.0)
    assert fleet.lost("RUNNING", state_age_s=900.0, beat_age_s=301.0, silent_s=300.0)
    assert not fleet.lost("RUNNING", state_age_s=900.0, beat_age_s=20.0, silent_s=300.0)
    assert not fleet.lost("RUNNING", state_age_s=200.0, beat_age_s=None, silent_s=300.0)
    assert not fleet.lost("RUNNING", state_age_s=900.0, beat_age_s=None, silent_s=None)  # no heartbeats expected
    assert not fleet.lost("PENDING", state_age_s=900.0, beat_age_s=None, silent_s=300.0)


def test_a_running_child_whose_heartbeats_stopped_and_that_no_automation_crashed_is_dispatched_again(monkeypatch):
    """The fleet bench: five children were killed with their worker a minute into the run; the
    Prefect server restarted around the crash detector's window, and the automation never set
    them CRASHED: RUNNING for 45 minutes, the batch waiting on them, the bench's tail stuck. The
    batch's own check reads the child's heartbeats: silent past `silent_s`, the child is set
    CRASHED, and (no automation putting it back here) the row is dispatched again."""
    fake = FakePrefect(monkeypatch, [("RUNNING", None, 30), ("FAILED", "JobFailed: the API failed it", 0)])
    out = asyncio.run(asyncio.wait_for(fleet.run_row(
        store=FakeStore(), request={"image": "x.jpg", "voice_script": "x"}, line=3, key="k", options={},
        run_name="row", log=lambda m: None, poll_s=0.01, silent_s=300.0, requeue_grace_s=0.0), timeout=10))
    assert fake.dispatched == ["k:3:1", "k:3:2"] and fake.crashed == [fake.read[0]]
    assert fake.beats_asked and out["status"] == "failed" and "JobFailed" in out["error"]


def test_a_crashed_child_that_the_automation_puts_back_in_the_queue_is_followed_not_dispatched_again(monkeypatch):
    """The fleet bench: a crashed child waited for its batch to dispatch the row again, and the
    batch's own worker was dead 5 times a run: nobody did. Prefect puts a crashed run of a
    deployment back in the queue itself (avatarflow.automations); the batch follows that run to
    its end, and dispatches no second child of the row."""
    fake = FakePrefect(monkeypatch, [[("CRASHED", "no heartbeat for 90 s"), ("SCHEDULED",), ("RUNNING",),
                                      ("FAILED", "JobFailed: the API failed it")]])
    out = _run_row(FakeStore())
    assert fake.dispatched == ["k:3:1"] and out["attempts"] == 1
    assert out["status"] == "failed" and "JobFailed" in out["error"]


def test_a_child_left_crashed_past_the_requeue_s_grace_is_dispatched_again(monkeypatch):
    """No automation put it back (a server that has none, an event lost): the batch dispatches the
    row again, as before."""
    fake = FakePrefect(monkeypatch, [("CRASHED", "no heartbeat for 90 s", 5), ("FAILED", "JobFailed: the API failed it", 0)])
    out = _run_row(FakeStore())
    assert fake.dispatched == ["k:3:1", "k:3:2"] and out["status"] == "failed" and "JobFailed" in out["error"]


def test_a_child_that_crashed_too_often_fails_its_row_at_once(monkeypatch):
    """A run put back after each crash ends FAILED after `MAX_STARTS` starts (a crash of its
    own, not a worker's): the row fails with it, with no further child to crash the same way."""
    fake = FakePrefect(monkeypatch, [("FAILED", "TooManyStarts: this run has started 9 times", 0)])
    out = _run_row(FakeStore())
    assert fake.dispatched == ["k:3:1"] and out["status"] == "failed" and "TooManyStarts" in out["error"]
