"""poll: an async wait shaped by the expected duration; FAILED is final, 404 goes to the history."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from avatarflow.ledger import Job
from avatarflow.pipeline import Context, Finished, Plan, Steps
from avatarflow.tasks.policy import transient_only


@task(name="poll", retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only, cache_policy=NO_CACHE)
async def poll_task(ctx: Context, plan: Plan, job: Job, resubmit_expired: bool) -> tuple[Job, Finished]:
    return await Steps().wait(ctx, plan, job, resubmit_expired)
