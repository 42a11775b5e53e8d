"""poll: an async wait shaped by the expected duration; FAILED is final, 404 goes to the history."""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from avatarflow import progress
from avatarflow.client import PollEvent, SegmindClient
from avatarflow.jobs import Finished, Job, Plan, await_job
from avatarflow.store import Store
from tasks.policy import transient_only


@task(name="poll", retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only, cache_policy=NO_CACHE)
async def poll_task(
    client: SegmindClient, store: Store, plan: Plan, job: Job, expected_s: float, resubmit_expired: bool
) -> tuple[Job, Finished]:
    logger = get_run_logger()

    def on_status(event: PollEvent) -> None:
        logger.info("request %s: %s after %.1f s (poll %d)", event.request_id, event.status, event.elapsed_s, event.polls)
        progress.publish(event)

    return await await_job(
        client, store, plan, job, expected_s=expected_s, resubmit_expired=resubmit_expired,
        on_status=on_status, log=logger.info,
    )
