"""Prefect set-up for avatarflow (what `avatarflow deploy` does), through the Prefect client:

1. the global concurrency limit ``avatarflow-api`` with slot decay: the account's requests per
   minute, held across every worker (:func:`ensure_concurrency_limit`);
2. the process work pool ``avatarflow-process`` (:func:`ensure_work_pool`);
3. the crash detector (:func:`ensure_crash_automation`): an automation that marks a flow run
   CRASHED when its heartbeats stop (its worker died); the batch then dispatches the row again;
4. the deployments of deployments/prefect.yaml (``prefect deploy --all``), then read back through
   the client and checked against the file (entrypoint, work pool, parameters, schedules,
   triggers): :func:`deploy_all` raises :class:`DeployError` naming what is missing or different.

The Prefect server is the one of PREFECT_API_URL, else the local one of `avatarflow local
prefect-up` (:func:`api_url`)."""

from __future__ import annotations

import asyncio
import importlib.resources
import os
import random
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from avatarflow.errors import AvatarflowError

WORK_POOL = "avatarflow-process"
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
CRASH_AUTOMATION = "avatarflow: flow run crashed (heartbeats stopped)"
PENDING_AUTOMATION = "avatarflow: flow run stuck in Pending (its worker died)"
PENDING_S = 120  # a worker that took a run starts it within seconds
BATCH_AUTOMATION = "avatarflow: batch run crashed (its worker died): run it again"
BATCH_TAG = "batch"  # the tag of the content-calendar deployment (prefect.yaml)
BATCH_HEARTBEAT_AUTOMATION = "avatarflow: batch run silent (heartbeats stopped): run it again"
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the deployments' runs (Prefect's minimum)
MISSED_HEARTBEATS = 3
BATCH_SILENT_S = HEARTBEAT_S * MISSED_HEARTBEATS - 15  # before the crash detector's 90 s
# prefect.yaml ships in the package (the repository's deployments/ is avatarflow.deployments).
PREFECT_FILE = Path(str(importlib.resources.files("avatarflow.deployments") / "prefect.yaml"))


class DeployError(AvatarflowError, RuntimeError):
    """The Prefect set-up did not come out as asked."""


def api_url() -> str:
    """PREFECT_API_URL, else the running local server of `avatarflow local prefect-up`."""
    from avatarflow.config import prefect_api_url

    url = prefect_api_url()
    if url:
        return url
    from avatarflow.local.services.prefect_server import prefect_status

    server, alive = prefect_status()
    if not alive or server is None:
        raise DeployError("no Prefect server: set PREFECT_API_URL, or start one with `avatarflow local prefect-up`")
    return server.api_url


def client_settings(url: str) -> dict[Any, str]:
    """Prefect settings of a client of the server at `url`: the URL and, for the local server
    (or from PREFECT_API_AUTH_STRING), its auth string."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    from avatarflow.local.services.prefect_server import client_auth

    auth = client_auth(url)
    return {PREFECT_API_URL: url, **({PREFECT_API_AUTH_STRING: auth} if auth else {})}


def limit_slots(requests_per_minute: int, burst: int | None = None) -> tuple[int, float]:
    """(limit, slot_decay_per_second) of a global concurrency limit that lets at most
    `requests_per_minute` requests through in ANY 60 s window.

    A limit with slot decay is a token bucket: `limit` slots taken at once (the burst), freed at
    `slot_decay_per_second`. A 60 s window can see the burst plus a minute of decay, so the two
    share the budget: burst + 60 x decay = requests_per_minute. While the limit binds (the bucket
    empty) it lets through 60 x decay = requests_per_minute - burst a minute, so the default burst
    is a twentieth of it (at least 1): 95 % of the rate while it binds (a fifth let 80 % through)."""
    if requests_per_minute < 1:
        raise ValueError(f"requests_per_minute={requests_per_minute} is not allowed; allowed: 1 or more")
    burst = max(1, requests_per_minute // 20) if burst is None else burst
    if not 1 <= burst <= requests_per_minute:
        raise ValueError(f"burst={burst} is not allowed; allowed: 1 to {requests_per_minute}")
    if burst == requests_per_minute:  # all at once, then a minute to refill
        return burst, requests_per_minute / 60.0
    return burst, (requests_per_minute - burst) / 60.0


async def ensure_concurrency_limit(requests_per_minute: int = REQUESTS_PER_MINUTE, burst: int | None = None,
                                   name: str = CONCURRENCY_LIMIT) -> dict[str, Any]:
    """Create or update the global concurrency limit `name` with slot decay; read back. On the
    server it counts SLOTS_PER_REQUEST slots a request (limit and decay scaled); the answer is in
    requests (limit: the burst, slot_decay_per_second: requests a second)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    limit, decay = limit_slots(requests_per_minute, burst)
    slots, slots_decay = limit * SLOTS_PER_REQUEST, decay * SLOTS_PER_REQUEST
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
    return {"name": got.name, "limit": got.limit // SLOTS_PER_REQUEST,
            "slot_decay_per_second": (got.slot_decay_per_second or 0) / SLOTS_PER_REQUEST,
            "slots_per_request": SLOTS_PER_REQUEST, "requests_per_minute": requests_per_minute}


async def ensure_work_pool(name: str = WORK_POOL) -> bool:
    """The process work pool; True when it was created now."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    async with get_client() as client:
        try:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True
        except ObjectAlreadyExists:
            return False


def crash_automation(within_s: float = HEARTBEAT_S * MISSED_HEARTBEATS) -> Any:
    """Prefect's recipe for runs whose process died: a flow run that sent a heartbeat and then,
    within `within_s`, neither another heartbeat nor a final state, is set CRASHED."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=CRASH_AUTOMATION,
        description="Flow runs whose heartbeats stopped (their worker died) are set CRASHED, so the "
                    "avatarflow batch dispatches their rows again.",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within_s:.0f} s: its worker is gone")],
    )


def pending_automation(within_s: float = PENDING_S) -> Any:
    """A flow run a worker took (PENDING) and then did not start within `within_s` (the worker
    died between the two) goes back to SCHEDULED, for another worker: without it, such a run
    (a batch, or a row) stays PENDING for ever."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=PENDING_AUTOMATION,
        description="Flow runs taken by a worker that died before starting them go back to the queue.",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.Pending"},
            expect={"prefect.flow-run.Running", "prefect.flow-run.Scheduled", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled", "prefect.flow-run.Cancelling",
                    "prefect.flow-run.Crashed"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, force=True,
                                    message=f"not started {within_s:.0f} s after a worker took it: back in the queue")],
    )


def crashed_batch_automation(tag: str = BATCH_TAG) -> Any:
    """A batch run (a flow run tagged `tag`) that CRASHED (its worker died; the heartbeat
    automation says so) goes back to SCHEDULED, and a live worker runs it again: the same flow
    run picks up where it stopped (archived rows from their records, in-flight rows' children
    found again by their idempotency keys). Without it the batch stays CRASHED, and its rows
    wait for someone to rerun it. Rows' own runs are not requeued: the batch dispatches them
    again."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=BATCH_AUTOMATION,
        description="Batch runs whose worker died go back to the queue; the batch resumes its rows.",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{tag}"},
            expect={"prefect.flow-run.Crashed"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, force=True,
                                    message="the batch run crashed (its worker died): back in the queue")],
    )


def silent_batch_automation(tag: str = BATCH_TAG, within_s: float = BATCH_SILENT_S) -> Any:
    """A batch run (tagged `tag`) whose heartbeats stop goes back to SCHEDULED after
    `within_s`, before the crash detector would set it CRASHED: the requeue on the Crashed event
    alone is not enough, because the server holds an event until it has seen the one it follows,
    and after a server restart the run's Running event (before the restart) is never seen again:
    the Crashed event waited, and the batch stayed CRASHED (the fleet bench). Heartbeat events
    follow nothing. The requeued run starts on a live worker within seconds and beats again, so
    the crash detector's window is met."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=BATCH_HEARTBEAT_AUTOMATION,
        description="Batch runs whose heartbeats stopped (their worker died) go back to the queue.",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{tag}"},
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, force=True,
                                    message=f"no heartbeat for {within_s:.0f} s: its worker is gone; back in the queue")],
    )


async def ensure_silent_batch_automation(tag: str = BATCH_TAG, within_s: float = BATCH_SILENT_S) -> str:
    """Create (or replace) the requeue of batch runs whose heartbeats stopped; its id."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for old in await client.read_automations_by_name(BATCH_HEARTBEAT_AUTOMATION):
            await client.delete_automation(old.id)
        return str(await client.create_automation(silent_batch_automation(tag, within_s)))


async def ensure_crashed_batch_automation(tag: str = BATCH_TAG) -> str:
    """Create (or replace) the requeue of crashed batch runs; its id."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for old in await client.read_automations_by_name(BATCH_AUTOMATION):
            await client.delete_automation(old.id)
        return str(await client.create_automation(crashed_batch_automation(tag)))


async def ensure_pending_automation(within_s: float = PENDING_S) -> str:
    """Create (or replace) the requeue of runs stuck in PENDING; its id."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for old in await client.read_automations_by_name(PENDING_AUTOMATION):
            await client.delete_automation(old.id)
        return str(await client.create_automation(pending_automation(within_s)))


async def ensure_crash_automation(within_s: float = HEARTBEAT_S * MISSED_HEARTBEATS) -> str:
    """Create (or replace) the crash detector; its id."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for old in await client.read_automations_by_name(CRASH_AUTOMATION):
            await client.delete_automation(old.id)
        return str(await client.create_automation(crash_automation(within_s)))


def _expected(prefect_file: Path) -> list[dict[str, Any]]:
    import yaml

    return list(yaml.safe_load(prefect_file.read_text()).get("deployments") or [])


async def check_deployments(prefect_file: Path = PREFECT_FILE) -> list[str]:
    """Read each deployment of `prefect_file` back from the server and compare; their names."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    problems, names = [], []
    async with get_client() as client:
        for want in _expected(prefect_file):
            flow_name = want["entrypoint"].rsplit(":", 1)[1]
            full = f"{flow_name}/{want['name']}"
            try:
                got = await client.read_deployment_by_name(full)
            except ObjectNotFound:
                problems.append(f"{full}: not on the server")
                continue
            names.append(full)
            if got.entrypoint != want["entrypoint"]:
                problems.append(f"{full}: entrypoint {got.entrypoint!r}, want {want['entrypoint']!r}")
            pool = (want.get("work_pool") or {}).get("name")
            if pool and got.work_pool_name != pool:
                problems.append(f"{full}: work pool {got.work_pool_name!r}, want {pool!r}")
            for k, v in (want.get("parameters") or {}).items():
                if (got.parameters or {}).get(k) != v:
                    problems.append(f"{full}: parameter {k}={(got.parameters or {}).get(k)!r}, want {v!r}")
            if len(got.schedules or []) != len(want.get("schedules") or []):
                problems.append(f"{full}: {len(got.schedules or [])} schedules, want {len(want.get('schedules') or [])}")
            if want.get("triggers"):
                autos = await client.read_resource_related_automations(f"prefect.deployment.{got.id}")
                if len(autos) < len(want["triggers"]):
                    problems.append(f"{full}: {len(autos)} trigger automations, want {len(want['triggers'])}")
    if problems:
        raise DeployError("deployments not as prefect.yaml says:\n  " + "\n  ".join(problems))
    return names


async def deploy_all(url: str, prefect_file: Path = PREFECT_FILE) -> list[str]:
    """`prefect --no-prompt deploy --all` over `prefect_file` (Prefect's
    own reading of prefect.yaml: pull steps, triggers, schedules), then every deployment read
    back and checked through the client; the deployments' names."""
    import anyio

    env = {**os.environ, **{s.name: v for s, v in client_settings(url).items()}, "COLUMNS": "200"}
    prefect = str(Path(sys.executable).with_name("prefect"))
    proc = await anyio.to_thread.run_sync(lambda: subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
        env=env, capture_output=True, text=True, timeout=600))
    try:
        return await check_deployments(prefect_file)
    except DeployError as e:
        raise DeployError(f"{e}\nprefect deploy exited {proc.returncode}:\n{proc.stdout[-2000:]}\n"
                          f"{proc.stderr[-2000:]}") from None


async def setup(url: str, *, requests_per_minute: int = REQUESTS_PER_MINUTE, burst: int | None = None,
                register_blocks: Any = None, log: Any = print) -> dict[str, Any]:
    """Everything `avatarflow deploy` does, in order, against the server at `url`.
    `register_blocks()`: registers the blocks and returns their names (the CLI passes
    blocks.register's; the library does not import blocks/)."""
    from prefect.settings import temporary_settings

    out: dict[str, Any] = {"blocks": []}
    with temporary_settings(updates=client_settings(url)):
        if register_blocks is not None:
            out["blocks"] = list(register_blocks())
            for name in out["blocks"]:
                log(f"block       {name}")
        out["limit"] = await ensure_concurrency_limit(requests_per_minute, burst)
        lim = out["limit"]
        log(f"limit       {lim['name']}: {lim['requests_per_minute']}/min in any minute "
            f"(burst {lim['limit']}, then {lim['slot_decay_per_second']:.3f}/s; "
            f"{lim['slots_per_request']} slots a request)")
        out["work_pool_created"] = await ensure_work_pool()
        log(f"work pool   {WORK_POOL}{' (created)' if out['work_pool_created'] else ''}")
        out["crash_automation"] = await ensure_crash_automation()
        log(f"automation  {CRASH_AUTOMATION}")
        out["pending_automation"] = await ensure_pending_automation()
        log(f"automation  {PENDING_AUTOMATION}")
        out["batch_automation"] = await ensure_crashed_batch_automation()
        log(f"automation  {BATCH_AUTOMATION}")
        out["batch_heartbeat_automation"] = await ensure_silent_batch_automation()
        log(f"automation  {BATCH_HEARTBEAT_AUTOMATION}")
        out["deployments"] = await deploy_all(url)
        for name in out["deployments"]:
            log(f"deployment  {name}")
    return out


def main(argv: list[str] | None = None) -> None:  # `python -m avatarflow.deploy`: no blocks (the CLI's `deploy` registers them)
    import argparse
    import asyncio

    ap = argparse.ArgumentParser(description="The concurrency limit, work pool, crash automation and deployments.")
    ap.add_argument("--requests-per-minute", type=int, default=REQUESTS_PER_MINUTE)
    ap.add_argument("--burst", type=int, default=None)
    args = ap.parse_args(argv)
    asyncio.run(setup(api_url(), requests_per_minute=args.requests_per_minute, burst=args.burst))


if __name__ == "__main__":
    main()


def slots_per_request(limit: Any) -> int:
    """The slots one API request takes of the global concurrency limit `limit` (as read from
    the server): SLOTS_PER_REQUEST for a limit `avatarflow deploy` made, 1 for one made before
    it counted in hundredths (run `avatarflow deploy` again to get the full rate)."""
    size = int(getattr(limit, "limit", 0) or 0)
    return SLOTS_PER_REQUEST if size >= SLOTS_PER_REQUEST and size % SLOTS_PER_REQUEST == 0 else 1


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
