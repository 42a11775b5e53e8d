"""script: a brief becomes the spoken script (an LLM on the same queue, exactly once, cached)."""

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from avatarflow.brief import Script
from avatarflow.pipeline import Context, Steps
from avatarflow.spec import VideoRequest
from avatarflow.tasks.policy import transient_only


@task(name="script", retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only, cache_policy=NO_CACHE)
async def script_task(ctx: Context, request: VideoRequest) -> Script:
    script = await Steps().script(ctx, request)
    get_run_logger().info("script by %s (%s, request %s): %s", script.model, "archived" if script.cached else "written",
                          script.request_id, script.text)
    return script
