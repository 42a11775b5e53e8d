"""portrait: fetched, checked (format, size, bomb guard, orientation, a face) and staged."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from avatarflow.inputs import PortraitInput, prepare_portrait
from avatarflow.spec import VideoRequest
from avatarflow.store import Store
from avatarflow.tasks.policy import transient_only


@task(name="portrait", retries=2, retry_delay_seconds=2, retry_condition_fn=transient_only, cache_policy=NO_CACHE)
async def portrait_task(request: VideoRequest, store: Store) -> PortraitInput:
    return await prepare_portrait(request, store)
