"""One video's steps as Prefect tasks: the pipeline chains them, the flows hand them over."""

from __future__ import annotations

from prefect.states import State

from avatarflow.brief import Script
from avatarflow.inputs import PortraitInput, SpeechInput
from avatarflow.ledger import Job
from avatarflow.manifest import Archived
from avatarflow.pipeline import Context, Finished, Plan, Steps
from avatarflow.spec import VideoRequest
from avatarflow.tasks.archive import archive_task, cache_lookup_task
from avatarflow.tasks.poll import poll_task
from avatarflow.tasks.portrait import portrait_task
from avatarflow.tasks.script import script_task
from avatarflow.tasks.speech import speech_task
from avatarflow.tasks.submit import submit_task


class TaskSteps(Steps):
    async def script(self, ctx: Context, request: VideoRequest) -> Script:
        return await script_task(ctx, request)

    async def speech(self, ctx: Context, request: VideoRequest) -> SpeechInput:
        return await speech_task(request, ctx.store)

    async def portrait(self, ctx: Context, request: VideoRequest) -> PortraitInput:
        return await portrait_task(request, ctx.store)

    async def look_up(self, ctx: Context, plan: Plan) -> Archived | None:
        found = await cache_lookup_task(ctx, plan)
        return await found.aresult() if isinstance(found, State) else found

    async def submit(self, ctx: Context, plan: Plan) -> Job:
        return await submit_task(ctx, plan)

    async def wait(self, ctx: Context, plan: Plan, job: Job, resubmit_expired: bool) -> tuple[Job, Finished]:
        return await poll_task(ctx, plan, job, resubmit_expired)

    async def archive(self, ctx: Context, request: VideoRequest, plan: Plan, finished: Finished,
                      timings: dict[str, float]) -> Archived:
        return await archive_task(ctx, request, plan, finished, timings)
