"""submit, exactly once: the ledger resumes a known request; a lost answer is reconciled."""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from avatarflow.ledger import Job
from avatarflow.pipeline import Context, Plan, Steps


@task(name="submit", cache_policy=NO_CACHE)
async def submit_task(ctx: Context, plan: Plan) -> Job:
    job = await Steps().submit(ctx, plan)
    get_run_logger().info("request %s (%s)", job.request_id, "resumed" if job.resumed else "submitted")
    return job
