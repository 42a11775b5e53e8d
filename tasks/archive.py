"""archive: stream the output to S3, verify it, write the manifest; or answer from the cache."""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from avatarflow.client import SegmindClient
from avatarflow.jobs import Archived, Finished, Plan, archive_output, from_cache
from avatarflow.spec import VideoRequest
from avatarflow.store import Store
from tasks.policy import transient_only


@task(name="cache-lookup", cache_policy=NO_CACHE)
async def cache_lookup_task(store: Store, plan: Plan) -> Archived | None:
    if plan.seed_random:
        return None
    manifest = await store.cached(plan.fingerprint)
    if manifest is None:
        return None
    get_run_logger().info("cache hit: %s (request %s)", manifest["video"]["s3_uri"], manifest["request_id"])
    return await from_cache(store, manifest, plan.fingerprint)


@task(name="archive", retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only, cache_policy=NO_CACHE)
async def archive_task(
    client: SegmindClient, store: Store, request: VideoRequest, plan: Plan, finished: Finished,
    timings: dict[str, float], backend: str,
) -> Archived:
    archived = await archive_output(client, store, request, plan, finished, timings=timings, backend=backend)
    get_run_logger().info("archived %s (%d bytes, sha256 %s)", archived.s3_uri, archived.size, archived.sha256)
    return archived
