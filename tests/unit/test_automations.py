"""The automations `avatarflow deploy` installs: one requeue per way a run is lost, so that no
late action of one undoes the work of another."""

from __future__ import annotations

import inspect

from avatarflow.automations import BATCH_TAG, PENDING_S, TAG, TAGGED, all_automations
from avatarflow.fleet import run_row


def _requeues(a) -> bool:
    return any(getattr(x, "type", None) == "change-flow-run-state" and x.state.value == "SCHEDULED" for x in a.actions)


def _matches(a, tag: str) -> bool:
    related = a.trigger.match_related
    specs = related if isinstance(related, list) else [related]
    ids = [s.get("prefect.resource.id") for s in specs if s]
    return not ids or any(TAGGED.format(tag=tag) in (i if isinstance(i, list) else [i]) for i in ids)


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
    requeues = [a.name for a in all_automations() if _requeues(a) and _on_a_lost_run(a) and _matches(a, BATCH_TAG)]
    assert len(requeues) == 1, requeues


def test_the_pending_requeue_acts_before_the_batch_cancels_a_child_that_never_started():
    """A run a dead worker took goes back to the queue after `PENDING_S`, long enough for a start
    on a busy machine (the bench's requeue at 120 s fired over children still starting); the
    batch's own guard (cancel and dispatch again) is for servers without the automations, later."""
    (pending,) = [a for a in all_automations() if "prefect.flow-run.Pending" in a.trigger.after]
    assert _requeues(pending) and _matches(pending, TAG)
    assert pending.trigger.within.total_seconds() == PENDING_S >= 300
    assert inspect.signature(run_row).parameters["start_timeout_s"].default > PENDING_S

