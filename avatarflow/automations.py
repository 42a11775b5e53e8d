"""The automations `avatarflow deploy` installs so that nothing waits on a dead worker: runs whose
heartbeats stop are CRASHED, crashed runs go back to the queue and pick up where they stopped,
and runs a dead worker took and never started go back too.

One requeue per way a run is lost, never two: an action is late by as much as the server's event
pipeline lags (83 s under the fleet bench's load), and a second requeue of one crash forced
SCHEDULED over the run a worker had taken again: Prefect's worker, handed its own running run,
exited with all its runs."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

CRASH_AUTOMATION = "avatarflow: flow run crashed (heartbeats stopped)"
PENDING_AUTOMATION = "avatarflow: flow run stuck in Pending (its worker died)"
PENDING_S = 300  # a start takes seconds, minutes on a saturated machine (the bench: over 120 s)
BATCH_PENDING_AUTOMATION = "avatarflow: batch run stuck in Pending (its worker died)"
BATCH_PENDING_S = 120  # sooner: while the batch run waits, no row is dispatched
BATCH_FLOWS = ("avatar_batch",)
ROW_FLOWS = ("avatar_video", "avatar_resume", "avatar_watch")  # every other avatarflow flow
CRASHED_AUTOMATION = "avatarflow: flow run crashed (its worker died): run it again"
TAG = "avatarflow"  # the tag of every avatarflow deployment (prefect.yaml)
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the deployments' runs (Prefect's minimum)
MISSED_HEARTBEATS = 3
BATCH_HEARTBEAT_AUTOMATION = "avatarflow: batch run silent (heartbeats stopped): run it again"
BATCH_AUTOMATION = "avatarflow: batch run crashed (its worker died): run it again"
# Installed by earlier versions, deleted by `avatarflow deploy`: the batch's second requeue (on its
# silence, for Crashed events held after a server restart; avatarflow.local.services.prefect_ordering
# keeps them flowing now), and its requeue on Crashed, now CRASHED_AUTOMATION's for every run (two
# would requeue one batch run twice).
RETIRED = (BATCH_HEARTBEAT_AUTOMATION, BATCH_AUTOMATION)
TAGGED = "prefect.tag.{tag}"


def _silent_for(within_s: float) -> Any:
    """A trigger: an avatarflow flow run (tagged `TAG`) that started RUNNING or sent a heartbeat, and then
    neither another heartbeat nor a final state within `within_s`. The Running event arms it
    too: a run killed before its first heartbeat stayed RUNNING for ever (the fleet bench). The
    tag keeps it to avatarflow's runs, which beat (prefect.yaml); a run without heartbeats (a
    script's, the CLI's) would be set CRASHED while it runs."""
    from prefect.events.schemas.automations import EventTrigger, Posture

    return EventTrigger(
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "tag", "prefect.resource.id": TAGGED.format(tag=TAG)},
        after={"prefect.flow-run.heartbeat", "prefect.flow-run.Running"},
        expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=within_s),
    )


def crash_automation(within_s: float = HEARTBEAT_S * MISSED_HEARTBEATS) -> Any:
    """Prefect's recipe for runs whose process died: an avatarflow flow run that started or
    sent a heartbeat and then, within `within_s`, neither another heartbeat nor a final state,
    is set CRASHED."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore

    return AutomationCore(
        name=CRASH_AUTOMATION,
        description="Flow runs whose heartbeats stopped (their worker died) are set CRASHED (and so go "
                    "back to the queue).",
        trigger=_silent_for(within_s),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within_s:.0f} s: its worker is gone")],
    )


def pending_automation(within_s: float = PENDING_S, flows: tuple[str, ...] = ROW_FLOWS,
                       name: str = PENDING_AUTOMATION) -> Any:
    """A run of one of avatarflow's `flows` that a worker took (PENDING) and then did not start
    within `within_s` (the worker died between the two) goes back to SCHEDULED, for another
    worker: without it, such a run (a batch, or a row) stays PENDING for ever. One automation per
    flow, so that no two requeue one run; others' runs on the server are left alone."""
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=name,
        description="Flow runs taken by a worker that died before starting them go back to the queue.",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=[{"prefect.resource.role": "tag", "prefect.resource.id": TAGGED.format(tag=TAG)},
                           {"prefect.resource.role": "flow", "prefect.resource.name": list(flows)}],
            after={"prefect.flow-run.Pending"},
            expect={"prefect.flow-run.Running", "prefect.flow-run.Scheduled", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled", "prefect.flow-run.Cancelling",
                    "prefect.flow-run.Crashed"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[_back_in_the_queue(f"not started {within_s:.0f} s after a worker took it")],
    )


def batch_pending_automation(within_s: float = BATCH_PENDING_S) -> Any:
    """A batch run left PENDING goes back sooner than a row's: it dispatches every row, and one
    left PENDING for 5 minutes stopped the fleet bench's dispatch (4 to 13 requests a minute of 20)."""
    return pending_automation(within_s, BATCH_FLOWS, BATCH_PENDING_AUTOMATION)


def crashed_automation() -> Any:
    """A run of an avatarflow deployment that CRASHED (its worker died; the heartbeat automation
    says so) goes back to SCHEDULED, and a live worker runs it again: the same flow run picks up
    where it stopped (a row's request resumed from the ledger; a batch's archived rows from their
    records, its in-flight children read again by the ids recorded). Rows' runs too: left to the
    batch, a crashed row waited while the batch's own worker was dead (the fleet bench: 9 to 16
    requests a minute of 20 over its last 90 rows). Runs of no deployment (a script's) are left
    alone: no worker would take them. The only requeue of a crash: it acts on a run still CRASHED
    however late it comes, as nothing else puts the run back (the batch dispatches a row again
    only after `fleet.REQUEUE_GRACE_S`). A run that crashes on its own is started at most
    `fleet.MAX_STARTS` times (`MAX_BATCH_STARTS` for a batch). After a server restart the
    Crashed event is held until the server has seen the one it follows; the local server counts
    the events of its previous life as seen (avatarflow.local.services.prefect_ordering; README:
    automations after a restart)."""
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=CRASHED_AUTOMATION,
        description="Runs of avatarflow deployments whose worker died go back to the queue and pick up "
                    "where they stopped.",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related=[{"prefect.resource.role": "tag", "prefect.resource.id": TAGGED.format(tag=TAG)},
                           {"prefect.resource.role": "deployment"}],
            expect={"prefect.flow-run.Crashed"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[_back_in_the_queue("the run crashed (its worker died)")],
    )


def _back_in_the_queue(why: str) -> Any:
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState

    return ChangeFlowRunState(state=StateType.SCHEDULED, force=True, message=f"{why}: back in the queue")


def all_automations() -> list[Any]:
    """What `avatarflow deploy` installs, in order."""
    return [crash_automation(), pending_automation(), batch_pending_automation(), crashed_automation()]


async def _delete_named(client: Any, name: str) -> None:
    for old in await client.read_automations_by_name(name):
        await client.delete_automation(old.id)


async def ensure_automation(automation: Any, client: Any = None) -> str:
    """Create `automation`, replacing any of its name; its id."""
    from prefect.client.orchestration import get_client

    if client is None:
        async with get_client() as client:
            return await ensure_automation(automation, client)
    await _delete_named(client, automation.name)
    return str(await client.create_automation(automation))


async def install() -> dict[str, str]:
    """Delete the retired automations and install all the others: {name: id}."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for name in RETIRED:
            await _delete_named(client, name)
        return {a.name: await ensure_automation(a, client) for a in all_automations()}
