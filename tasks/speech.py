"""speech: the script (literal or a template over a row's fields), or a checked, staged recording."""

from prefect import task
from prefect.cache_policies import NO_CACHE

from avatarflow.inputs import SpeechInput, prepare_speech
from avatarflow.spec import VideoRequest
from avatarflow.store import Store
from avatarflow.tasks.policy import transient_only


@task(name="speech", retries=2, retry_delay_seconds=2, retry_condition_fn=transient_only, cache_policy=NO_CACHE)
async def speech_task(request: VideoRequest, store: Store) -> SpeechInput:
    return await prepare_speech(request, store)
