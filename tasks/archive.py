"""archive: stream the output to S3, verify it, write the manifest; or answer from the cache."""

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from avatarflow.manifest import Archived
from avatarflow.pipeline import Context, Finished, Plan, Steps
from avatarflow.spec import VideoRequest
from avatarflow.tasks.policy import transient_only


@task(name="cache-lookup", cache_policy=NO_CACHE)
async def cache_lookup_task(ctx: Context, plan: Plan) -> Any:
    """The archived video, in a state named `Cached` so the UI shows the hit; else None."""
    archived = await Steps().look_up(ctx, plan)
    if archived is None:
        return None
    get_run_logger().info("cache hit: %s (request %s)", archived.s3_uri, archived.manifest["request_id"])
    return Completed(name="Cached", data=archived, message=f"archived as {archived.s3_uri}")


@task(name="archive", retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only, cache_policy=NO_CACHE)
async def archive_task(
    ctx: Context, request: VideoRequest, plan: Plan, finished: Finished, timings: dict[str, float]
) -> Archived:
    archived = await Steps().archive(ctx, request, plan, finished, timings)
    get_run_logger().info("archived %s (%d bytes, sha256 %s)", archived.s3_uri, archived.size, archived.sha256)
    return archived
