"""submit, exactly once: the ledger resumes a known request; a lost answer is reconciled."""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from avatarflow.client import SegmindClient
from avatarflow.jobs import Job, Plan, submit_once
from avatarflow.store import Store


@task(name="submit", cache_policy=NO_CACHE)
async def submit_task(client: SegmindClient, store: Store, plan: Plan) -> Job:
    logger = get_run_logger()
    job = await submit_once(client, store, plan, log=logger.info)
    logger.info("request %s (%s)", job.request_id, "resumed" if job.resumed else "submitted")
    return job
