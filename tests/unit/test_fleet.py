"""avatarflow.fleet's decisions that need no server: when a child run is taken as never started."""

from avatarflow.fleet import never_started


def test_a_child_waiting_in_the_pools_queue_is_not_dispatched_again():
    """SCHEDULED is a place in the work pool's queue (workers take runs as their `--limit`
    allows): cancelling it would only send the row to the back of the queue."""
    assert not never_started("SCHEDULED", 3600.0, 300.0)
    assert not never_started("PAUSED", 3600.0, 300.0)


def test_a_child_a_worker_took_and_never_started_is_dispatched_again():
    assert never_started("PENDING", 301.0, 300.0)
    assert not never_started("PENDING", 299.0, 300.0)
    assert not never_started("RUNNING", 3600.0, 300.0)


def test_a_child_pending_since_before_the_batch_started_again_is_dispatched_again(monkeypatch):
    """The fleet bench: a batch run started again (its worker died) re-found a child a dead
    worker had left PENDING, and timed it from then: every restart (every few minutes) reset
    the timer, and the row waited 30 minutes. How long a child has waited is its state's age."""
    import asyncio
    import uuid
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    import prefect.client.orchestration
    import prefect.deployments

    from avatarflow import fleet
    from tests.unit.fakes import FakeStore

    dispatched, cancelled, runs = [], [], {}

    async def run_deployment(name, *, idempotency_key, **kw):
        dispatched.append(idempotency_key)
        run_id = uuid.uuid4()
        first = len(dispatched) == 1
        runs[run_id] = SimpleNamespace(
            type=SimpleNamespace(value="PENDING" if first else "FAILED"),
            message=None if first else "JobFailed: the API failed it",
            timestamp=datetime.now(timezone.utc) - timedelta(minutes=30 if first else 0))
        return SimpleNamespace(id=run_id)

    class Client:
        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        async def read_flow_run(self, run_id):
            return SimpleNamespace(state=runs[run_id])

        async def read_artifacts(self, **kw):
            return []

        async def set_flow_run_state(self, run_id, state, force=False):
            cancelled.append(run_id)

    monkeypatch.setattr(prefect.deployments, "run_deployment", run_deployment)
    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda: Client())
    monkeypatch.setattr(fleet.random, "uniform", lambda a, b: 0.0)  # no backoff between children
    out = asyncio.run(asyncio.wait_for(fleet.run_row(
        store=FakeStore(), request={"image": "x.jpg", "voice_script": "x"}, line=3, key="k", options={},
        run_name="row", log=lambda m: None, poll_s=0.01), timeout=10))
    assert dispatched == ["k:3:1", "k:3:2"] and len(cancelled) == 1
    assert out["status"] == "failed" and "JobFailed" in out["error"]
