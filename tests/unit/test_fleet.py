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
