"""The fleet bench's rig: a worker that exits by itself is replaced, as a supervisor would."""

import subprocess

from bench.fleet_rig import Fleet


def test_a_worker_that_exited_by_itself_is_replaced(tmp_path, monkeypatch):
    """The fleet bench: two of Prefect's workers exited under load (a run still being submitted
    came back in their next poll); the chaos replaced only the workers it killed, and the rest
    of the run had one worker, which the chaos then killed every minute."""
    fleet = Fleet(tmp_path, {})
    started: list[subprocess.Popen] = []

    def start_worker() -> subprocess.Popen:
        w = subprocess.Popen(["sleep", "30"], start_new_session=True)
        fleet.workers.append(w)
        started.append(w)
        return w

    monkeypatch.setattr(fleet, "start_worker", start_worker)
    alive = start_worker()
    gone = subprocess.Popen(["true"], start_new_session=True)
    gone.wait()
    fleet.workers.append(gone)
    try:
        assert fleet.replace_exited() == [gone.pid]
        assert fleet.exited == [gone.pid] and gone not in fleet.workers
        assert len(fleet.workers) == 2 and all(w.poll() is None for w in fleet.workers) and alive in fleet.workers
        assert fleet.replace_exited() == []
    finally:
        for w in started:
            w.kill()
            w.wait()


def test_transitions_read_starts_and_requeues_from_a_state_history():
    """The bench's evidence for the automations: a requeue over a RUNNING run is counted apart
    from a requeue of a run left PENDING, and each start is timed from its PENDING."""
    from bench.fleet_rig import transitions

    def at(s: int) -> str:
        return f"2026-12-02T01:{s // 60:02d}:{s % 60:02d}Z"

    history = [{"type": t, "timestamp": at(s)} for t, s in (
        ("PENDING", 20), ("SCHEDULED", 0), ("RUNNING", 50), ("SCHEDULED", 140), ("PENDING", 150),
        ("SCHEDULED", 460), ("PENDING", 470), ("RUNNING", 482), ("CRASHED", 600), ("SCHEDULED", 601), ("PENDING", 610),
        ("RUNNING", 615), ("COMPLETED", 735))]
    assert transitions(history) == {"starts": [30.0, 12.0, 5.0], "requeued_live": [90.0], "requeued_pending": [310.0],
                                    "completions": [120.0]}
