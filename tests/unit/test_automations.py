"""The automations `avatarflow deploy` installs: one requeue per way a run is lost, so that no
late action of one undoes the work of another."""

from __future__ import annotations

import inspect
from collections import Counter

from avatarflow.automations import BATCH_AUTOMATION, PENDING_S, RETIRED, TAG, TAGGED, all_automations
from avatarflow.fleet import run_row


def _requeues(a) -> bool:
    return any(getattr(x, "type", None) == "change-flow-run-state" and x.state.value == "SCHEDULED" for x in a.actions)


def _related(a, key: str, role: str) -> list[str]:
    """The values of `key` that the trigger asks of a related resource of `role`."""
    related = a.trigger.match_related
    specs = [s for s in (related if isinstance(related, list) else [related]) if s]
    return [v for s in specs if role in s.get("prefect.resource.role", []) for v in s.get(key, [])]


def _matches(a, *tags: str) -> bool:
    """The trigger would take a run with `tags`."""
    ids = _related(a, "prefect.resource.id", "tag")
    return not ids or any(TAGGED.format(tag=t) in ids for t in tags)


def _on_a_lost_run(a) -> bool:
    """Its trigger fires because a run crashed or stopped beating (not because it stayed PENDING)."""
    t = a.trigger
    return "prefect.flow-run.heartbeat" in t.after or (
        t.posture.value == "Reactive" and "prefect.flow-run.Crashed" in t.expect)


def test_a_crashed_batch_run_is_put_back_in_the_queue_by_one_automation_only():
    """The fleet bench: a batch run whose worker died was requeued by two automations (on its
    Crashed event, and on its silence). A worker retook it after the first; the second acted 83 s
    late (the server's event pipeline lags under load) and forced SCHEDULED over the live run;
    the worker was handed its own running run and Prefect's worker exited, with all its runs."""
    requeues = [a.name for a in all_automations() if _requeues(a) and _on_a_lost_run(a) and _matches(a, TAG, "batch")]
    assert len(requeues) == 1, requeues


def test_a_crashed_run_of_any_avatarflow_deployment_is_put_back_in_the_queue_by_one_automation():
    """The fleet bench: a row's run killed with its worker waited for its batch to dispatch the
    row again, and while the batch's own worker was dead (5 times a run) nobody did: 9 to 16
    requests a minute of 20 in the last 90 rows. A crashed run of any avatarflow deployment goes
    back to the queue by itself, once; a run of no deployment (a script's) is left alone, as no
    worker would take it. The batch's earlier automation (batch runs only) is retired, else a
    batch run would be requeued twice."""
    requeues = [a for a in all_automations() if _requeues(a) and _on_a_lost_run(a) and _matches(a, TAG)]
    assert len(requeues) == 1, [a.name for a in requeues]
    related = requeues[0].trigger.match_related
    assert any(s.get("prefect.resource.role") == ["deployment"] for s in related), related
    assert BATCH_AUTOMATION in RETIRED and BATCH_AUTOMATION not in {a.name for a in all_automations()}


def _flows(a) -> set[str]:
    return set(_related(a, "prefect.resource.name", "flow"))


def test_each_flow_s_runs_left_pending_are_put_back_by_one_automation_and_a_batch_run_soonest():
    """A run a dead worker took (PENDING) goes back to the queue: a row's after `PENDING_S`, long
    enough for a start on a busy machine (a requeue at 120 s fired over children still starting,
    and the batch's own guard, cancel and dispatch again, comes later still, for servers without
    the automation); a batch run's sooner: the one batch run dispatches every row, and a batch run
    left PENDING for 300 s stopped the bench's dispatch for 5 minutes (4 to 13 requests a minute
    of 20). One automation per flow, so that no two requeue one run."""
    from flows.avatar_batch import avatar_batch
    from flows.avatar_resume import avatar_resume
    from flows.avatar_video import avatar_video
    from flows.avatar_watch import avatar_watch

    pending = [a for a in all_automations() if "prefect.flow-run.Pending" in a.trigger.after]
    assert all(_requeues(a) and _matches(a, TAG) for a in pending)
    by_flow = Counter(f for a in pending for f in _flows(a))
    assert by_flow == Counter({f.name: 1 for f in (avatar_batch, avatar_resume, avatar_video, avatar_watch)})
    window = {f: a.trigger.within.total_seconds() for a in pending for f in _flows(a)}
    assert window["avatar_video"] == PENDING_S >= 300 and window["avatar_batch"] <= 120
    assert inspect.signature(run_row).parameters["start_timeout_s"].default > PENDING_S
