"""The fleet on real parts: a Prefect server of its own on PostgreSQL, two process workers, the
deployments of prefect.yaml (`python -m avatarflow.deploy`: limit, pool, crash automation), the
real local API and SeaweedFS. A 20-row content calendar runs from its deployment, each row a
linked child run on the pool; mid-batch a worker is SIGKILLed with the flow runs it started (a
new one starts) and the Prefect server is restarted. Every row completes, with exactly one job at
the API per row; the killed children are set CRASHED, go back to the queue and complete (the
same run resumes the row's request through the ledger). A rerun for the same calendar and day dispatches nothing and submits nothing.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter

import psutil
import pytest

from avatarflow.local.services.common import signal_group
from bench.fleet_rig import DAY, Fleet, calendar_rows, manifest_of, put_calendar, wait_batch, worker_env

ROWS = 20
SEED0 = 900_000


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, local_api, s3_settings):
    home = tmp_path_factory.mktemp("fleet")
    prefix = f"fleet-{uuid.uuid4().hex[:6]}"
    env = worker_env(dict(os.environ), local_api.base_url, local_api.api_key, s3_settings, prefix, home)
    for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING"):
        env.pop(k, None)
    f = Fleet(home, env)
    f.prefix = prefix
    try:
        f.start_server()
        f.deploy(600)
        for _ in range(2):
            f.start_worker()
        f.wait_workers(2)
        yield f
    finally:
        f.stop()


def _worker_of(fleet: Fleet, run: dict) -> int | None:
    """The worker (pid) whose flow-run process runs `run` (the process worker's child)."""
    pid = str(run.get("infrastructure_pid") or "").rsplit(":", 1)[-1]
    try:
        parent = psutil.Process(int(pid)).ppid()
    except (ValueError, psutil.NoSuchProcess):
        return None
    return parent if parent in {w.pid for w in fleet.workers} else None


def test_rows_outlive_a_killed_worker_and_a_restarted_server(fleet, api, s3, s3_bucket):
    api.set_faults({"min_processing_time": 15})  # children stay RUNNING long enough to be killed
    rows = calendar_rows(ROWS, SEED0)
    calendar = put_calendar(s3, s3_bucket, fleet.prefix, rows)
    params = {"calendar": calendar, "today": DAY, "max_concurrency": 8}
    jobs_before = set(api.stats()["jobs"])
    batch = fleet.create_run("avatar_batch/content-calendar", params)

    # wait until the worker that does not run the batch runs children, then kill it with them
    deadline, victim = time.time() + 240, None
    while time.time() < deadline and victim is None:
        batch_run = fleet.run_state(batch["id"])
        assert batch_run["state_type"] not in ("FAILED", "CRASHED", "COMPLETED"), batch_run["state"]
        batch_worker = _worker_of(fleet, batch_run)
        running = [c for c in fleet.children(batch["id"]) if c["state_type"] == "RUNNING"]
        others = [w for c in running if (w := _worker_of(fleet, c)) and w != batch_worker]
        if batch_worker and others:
            victim = others[0]
        else:
            time.sleep(1)
    assert victim, "no child ran on the other worker"
    doomed = [c["id"] for c in fleet.children(batch["id"]) if _worker_of(fleet, c) == victim]
    w = next(w for w in fleet.workers if w.pid == victim)
    signal_group(w)
    fleet.workers.remove(w)
    fleet.killed.append(victim)
    fleet.start_worker()
    fleet.restart_server()

    final = wait_batch(fleet, batch["id"], 900)
    assert final.get("state_type") == "COMPLETED", final.get("state")
    manifest = manifest_of(s3, s3_bucket, fleet.prefix, batch["id"])
    assert manifest["completed"] == ROWS, [r for r in manifest["rows"] if r["status"] != "completed"]
    assert all(r["s3_uri"] and r["request_id"] for r in manifest["rows"])

    # one job per row at the API (a row's seed names its job)
    new_jobs = [j for rid, j in api.stats()["jobs"].items() if rid not in jobs_before]
    per_seed = Counter(j["seed"] for j in new_jobs)
    assert {r["seed"]: per_seed[r["seed"]] for r in rows} == {r["seed"]: 1 for r in rows}, per_seed
    assert len(new_jobs) == ROWS

    # the killed children were set CRASHED (the heartbeat automation), went back to the queue (the
    # crash requeue) and completed: the same runs picked up where they stopped
    children = fleet.children(batch["id"])
    states = {c["id"]: c["state_type"] for c in children}
    assert doomed and all(states.get(c) == "COMPLETED" for c in doomed), {c: states.get(c) for c in doomed}
    crashed = [c for c in doomed if "CRASHED" in _states(fleet, c)]
    assert crashed and all(_states(fleet, c)[-1] == "COMPLETED" for c in crashed), [_states(fleet, c) for c in doomed]
    assert len(children) >= ROWS and all(c["parent_task_run_id"] for c in children), "each child is linked to the batch"

    # the report artifact: a grid of thumbnails with status, cost and link per row
    arts = fleet.api("POST", "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [batch["id"]]}}}).json()
    report = next(a for a in arts if a["key"] == "avatar-batch-report")["data"]
    assert report.count("![line") == ROWS and report.count("[video](") == ROWS and "completed" in report

    # a rerun for the same calendar and day: nothing dispatched, nothing submitted
    jobs_mid = set(api.stats()["jobs"])
    rerun = fleet.create_run("avatar_batch/content-calendar", params)
    final = wait_batch(fleet, rerun["id"], 300)
    assert final.get("state_type") == "COMPLETED", final.get("state")
    again = manifest_of(s3, s3_bucket, fleet.prefix, rerun["id"])
    assert again["completed"] == ROWS and all(r["cache_hit"] for r in again["rows"])
    assert fleet.children(rerun["id"]) == [] and set(api.stats()["jobs"]) == jobs_mid
    api.reset()


def test_row_seeds_are_reproducible_per_calendar_day_and_line():
    from datetime import date

    from avatarflow.fleet import batch_key, row_seed

    k1 = batch_key("s3://b/cal.csv", date(2026, 12, 1))
    assert row_seed(k1, 3) == row_seed(batch_key("s3://b/cal.csv", date(2026, 12, 1)), 3)
    assert row_seed(k1, 3) != row_seed(k1, 4) and row_seed(k1, 3) != row_seed(batch_key("s3://b/cal.csv", date(2026, 12, 2)), 3)
    assert json.dumps(row_seed(k1, 1)).isdigit()


def test_a_run_left_pending_by_a_dead_worker_goes_back_to_the_queue(fleet):
    """A worker took a run (PENDING) and died before starting it: the automation of `avatarflow
    deploy` for its flow puts it back to SCHEDULED, and a live worker runs it. Without it the run
    stays PENDING for ever (the bench's rerun of a batch did). A batch run has its own, sooner
    window; here it waits in a paused queue of its own, so that only the automation moves it."""
    from avatarflow.automations import (
        BATCH_FLOWS,
        BATCH_PENDING_AUTOMATION,
        ensure_automation,
        pending_automation,
    )

    async def short_windows():  # the test's own windows: 20 s and 25 s
        await ensure_automation(pending_automation(20))
        await ensure_automation(pending_automation(25, BATCH_FLOWS, BATCH_PENDING_AUTOMATION))

    _on_server(fleet, short_windows)
    later = "2099-01-01T00:00:00Z"  # no worker takes it on its own
    dep = fleet.deployment("avatar_watch/bucket-watch")
    run = fleet.api("POST", f"/deployments/{dep['id']}/create_flow_run",
                    json={"parameters": {"prefix": "pending-test/"}, "state": {"type": "SCHEDULED",
                          "state_details": {"scheduled_time": later}}}).json()
    batch = _running_unattended(fleet, fleet.deployment("avatar_batch/content-calendar"),
                                {"calendar": "s3://nowhere/none.csv", "today": DAY}, state="PENDING")
    _set_state(fleet, run, "PENDING")
    deadline, states = time.time() + 180, {"PENDING"}
    while time.time() < deadline and "PENDING" in states:
        time.sleep(3)
        states = {fleet.run_state(x["id"])["state_type"] for x in (run, batch)}
    assert fleet.run_state(batch["id"])["state_type"] == "SCHEDULED", "the batch run was not put back in the queue"
    assert fleet.run_state(run["id"])["state_type"] != "PENDING", "still PENDING: nothing put it back in the queue"
    final = wait_batch(fleet, run["id"], 180)
    assert final["state_type"] == "COMPLETED", final["state"]


def _on_server(fleet: Fleet, call):
    """`call()` (a coroutine function of the Prefect client) against the fleet's server."""
    import asyncio

    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    async def run():
        with temporary_settings(updates={PREFECT_API_URL: fleet.server.api_url,
                                         PREFECT_API_AUTH_STRING: fleet.server.auth_string}):
            return await call()

    return asyncio.run(run())


def test_deploy_deletes_the_automations_it_retired_and_installs_the_others(fleet):
    """A server set up by an earlier `avatarflow deploy` keeps the automations it had: among them
    the batch's second requeue (on its silence), which acted late over a batch run a worker had
    taken again. `avatarflow deploy` deletes it, and installs the others."""
    from prefect.client.orchestration import get_client

    from avatarflow.automations import BATCH_HEARTBEAT_AUTOMATION, all_automations, crash_automation, ensure_automation
    from avatarflow.automations import install

    async def names() -> set[str]:
        async with get_client() as client:
            return {a.name for a in await client.read_automations()}

    async def redeploy():
        await ensure_automation(crash_automation().model_copy(update={"name": BATCH_HEARTBEAT_AUTOMATION}))
        before = await names()
        installed = await install()
        return before, installed, await names()

    before, installed, after = _on_server(fleet, redeploy)
    assert BATCH_HEARTBEAT_AUTOMATION in before and BATCH_HEARTBEAT_AUTOMATION not in after, after
    assert set(installed) == {a.name for a in all_automations()} <= after


def test_crashed_runs_of_the_deployments_go_back_to_the_queue_and_a_script_s_run_does_not(fleet):
    """The bench: a batch run whose worker was SIGKILLed ended CRASHED and stayed so, its rows
    waiting for a rerun by hand; a crashed row's run waited for its batch to dispatch the row
    again, and while the batch's own worker was dead nobody did. The automation of `avatarflow
    deploy` puts a crashed run of any avatarflow deployment back to SCHEDULED; a crashed run of no
    deployment (a script's, tagged alike) stays CRASHED: no worker would take it."""
    later = {"type": "SCHEDULED", "state_details": {"scheduled_time": "2099-01-01T00:00:00Z"}}
    runs = {}
    for name, params in (("avatar_batch/content-calendar", {"calendar": "s3://nowhere/none.csv", "today": DAY}),
                         ("avatar_video/on-demand", {"request": {"image": "none.jpg", "voice_script": "x"}}),
                         (None, {})):
        if name is None:
            run = fleet.api("POST", "/flow_runs/", json={"flow_id": fleet.deployment("avatar_video/on-demand")["flow_id"],
                                                         "name": "a-script-run", "tags": ["avatarflow"],
                                                         "state": later}).json()
        else:
            run = fleet.api("POST", f"/deployments/{fleet.deployment(name)['id']}/create_flow_run",
                            json={"parameters": params, "state": later}).json()
        _set_state(fleet, run, "CRASHED")
        runs[name] = run["id"]
    deadline = time.time() + 120
    while time.time() < deadline and any(fleet.run_state(runs[n])["state_type"] == "CRASHED" for n in runs if n):
        time.sleep(2)
    for name in ("avatar_batch/content-calendar", "avatar_video/on-demand"):
        states = _states(fleet, runs[name])
        assert states[states.index("CRASHED"):][1:2] == ["SCHEDULED"], f"{name}: {states}"
    assert fleet.run_state(runs[None])["state_type"] == "CRASHED"


def _states(fleet: Fleet, run_id: str) -> list[str]:
    """The run's state types, oldest first."""
    return [h["type"] for h in sorted(fleet.history(run_id), key=lambda h: h["timestamp"])]


def _running_unattended(fleet: Fleet, dep: dict | None, params: dict, *, restart_first: bool = False,
                        state: str = "RUNNING") -> dict:
    """A run of the deployment `dep` (with `params`) set to `state` on a paused queue of its own,
    so that no worker takes it when it is put back; without `dep`, a run of no deployment
    (`params`: the flow run's fields) set RUNNING. `restart_first`: the Prefect server restarts
    between the run's creation and its start (its Running event follows a Scheduled event of
    the server's previous life)."""
    later = {"type": "SCHEDULED", "state_details": {"scheduled_time": "2099-01-01T00:00:00Z"}}
    if dep is None:
        run = fleet.api("POST", "/flow_runs/", json={**params, "state": later}).json()
    else:
        held = f"held-{uuid.uuid4().hex[:6]}"
        r = fleet.api("POST", f"/work_pools/{dep['work_pool_name']}/queues", json={"name": held, "is_paused": True})
        assert r.status_code == 201, r.text
        run = fleet.api("POST", f"/deployments/{dep['id']}/create_flow_run",
                        json={"parameters": params, "state": later, "work_queue_name": held}).json()
    if restart_first:
        time.sleep(8)  # the Scheduled event stored (the server writes events every few seconds)
        fleet.restart_server()
    _set_state(fleet, run, state)
    return run


def _set_state(fleet: Fleet, run: dict, state: str = "RUNNING") -> None:
    r = fleet.api("POST", f"/flow_runs/{run['id']}/set_state", json={"state": {"type": state}, "force": True})
    assert r.status_code in (200, 201) and r.json()["status"] == "ACCEPT", r.text


def test_a_batch_run_whose_heartbeats_stop_after_a_server_restart_goes_back_to_the_queue(fleet):
    """The bench: the batch run's worker was killed after the Prefect server had restarted; the
    heartbeat automation set the run CRASHED, but the requeue (reactive, on the Crashed event)
    did not fire: the server holds an event until it has seen the one it follows, and the
    Running event it followed came before the restart. The local server counts the events of its
    previous life as seen (prefect_ordering), so the one requeue there is, on the Crashed event,
    puts the batch run back to SCHEDULED, where it stays until a worker takes it (its queue is
    paused here): the crash detector does not set a waiting run CRASHED for good (the bench, when
    a requeue came before the detector's window)."""
    dep = fleet.deployment("avatar_batch/content-calendar")
    run = _running_unattended(fleet, dep, {"calendar": "s3://nowhere/none.csv", "today": DAY})
    related = [{"prefect.resource.id": f"prefect.deployment.{dep['id']}", "prefect.resource.role": "deployment"}] + [
        {"prefect.resource.id": f"prefect.tag.{t}", "prefect.resource.role": "tag"} for t in dep["tags"]]
    beat = {"id": str(uuid.uuid4()), "occurred": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "event": "prefect.flow-run.heartbeat", "related": related,
            "resource": {"prefect.resource.id": f"prefect.flow-run.{run['id']}", "prefect.resource.name": run["name"]}}
    r = fleet.api("POST", "/events", json=[beat])
    assert r.status_code in (200, 202, 204), r.text
    beat_at = time.time()
    time.sleep(5)
    fleet.restart_server()  # the Running event is now from before the restart; no heartbeat follows
    while time.time() < beat_at + 150:  # past the crash detector's window and the requeue's
        time.sleep(5)
    states = _states(fleet, run["id"])
    assert "SCHEDULED" in states[states.index("RUNNING"):], f"the batch run did not go back to the queue: {states}"
    assert states[-1] == "SCHEDULED", f"the requeued batch run did not stay in the queue: {states}"


def test_a_row_run_killed_before_its_first_heartbeat_is_crashed_and_a_foreign_run_is_not(fleet):
    """The bench: children killed seconds after they started RUNNING sent no heartbeat, so the
    crash detector (armed by a heartbeat) never saw them: RUNNING for half an hour, their rows
    waiting. The Running event arms it too, for avatarflow's runs (tag `avatarflow`): a run of
    someone else's on the same server without heartbeats (a script's, no heartbeat setting) is
    left alone."""
    dep = fleet.deployment("avatar_video/on-demand")
    ours = _running_unattended(fleet, dep, {"request": {"image": "none.jpg", "voice_script": "x"}})
    theirs = _running_unattended(fleet, None, {"flow_id": dep["flow_id"], "name": "a-script-run"})
    deadline = time.time() + 150
    while time.time() < deadline and fleet.run_state(ours["id"])["state_type"] == "RUNNING":
        time.sleep(5)
    assert "CRASHED" in _states(fleet, ours["id"]), "a run killed before its first heartbeat stayed RUNNING"
    assert fleet.run_state(theirs["id"])["state_type"] == "RUNNING"


def test_a_row_run_started_after_a_server_restart_and_killed_before_its_first_heartbeat_is_crashed(fleet):
    """The bench: a child queued before the Prefect server restarted and started after it was
    killed before its first heartbeat, and stayed RUNNING for half an hour. The server holds a
    state event until it has seen the one it follows, and remembered the events it had seen in
    memory only: the Running event waited for the Scheduled event of the server's previous life
    (15 minutes), and the crash detector was never armed. The local server remembers them across
    a restart (avatarflow.local.services.prefect_ordering)."""
    dep = fleet.deployment("avatar_video/on-demand")
    run = _running_unattended(fleet, dep, {"request": {"image": "none.jpg", "voice_script": "x"}}, restart_first=True)
    deadline = time.time() + 150
    while time.time() < deadline and fleet.run_state(run["id"])["state_type"] == "RUNNING":
        time.sleep(5)
    assert "CRASHED" in _states(fleet, run["id"]), \
        "a run started after a server restart and killed before its first heartbeat stayed RUNNING"
