"""avatar_resume: bring home a request known only by its id (no new submit), as a flow run."""

from __future__ import annotations

from typing import Any

from prefect import flow

from avatarflow.pipeline import resume_video
from avatarflow.flows.avatar_video import finish_run, pipeline_context
from avatarflow.tasks.steps import TaskSteps


@flow(name="avatar_resume", flow_run_name="resume-{request_id}", persist_result=False)
async def avatar_resume(
    request_id: str,
    credentials_block: str | None = None,
    archive_block: str | None = None,
    backend: str | None = None,
    concurrency_limit: str | None = None,
    expected_seconds: float | None = None,
) -> dict[str, Any]:
    """Poll a known request until it completes and archive it: its ledger entry (or the request
    history) says what it was; the same steps as avatar_video, from the cache look-up on."""
    async with pipeline_context(credentials_block, archive_block, backend, concurrency_limit, expected_seconds) as ctx:
        return await finish_run(lambda c: resume_video(c, request_id, TaskSteps()), ctx, None)
