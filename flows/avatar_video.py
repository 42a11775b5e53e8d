"""avatar_video: one portrait and a script (or a recording) to an archived, lip-synced MP4."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_link_artifact, acreate_markdown_artifact
from prefect.events import emit_event
from prefect.runtime import flow_run
from pydantic import BaseModel

from avatarflow import config, fleet, progress
from avatarflow.contract import DEFAULT_VOICE
from avatarflow.ledger import Ledger
from avatarflow.manifest import Archived
from avatarflow.pipeline import Context, VideoResult, make_video
from avatarflow.poll import PollEvent
from avatarflow.media.policy import display_source
from avatarflow.spec import VideoRequest
from avatarflow.store import Store
from avatarflow.tasks.steps import TaskSteps


def _run_name() -> str:
    params = flow_run.parameters or {}
    req = params.get("request") or {}
    if isinstance(req, BaseModel):
        req = req.model_dump()
    image = str(req.get("image", "portrait")).rstrip("/").rsplit("/", 1)[-1][:24]
    words = "audio" if req.get("audio") else "-".join(str(req.get("voice_script", "")).split()[:3])[:30]
    voice = str(req.get("voice", DEFAULT_VOICE)).split(" ")[0]
    name = f"avatar-{image}-{voice}-{words}".lower()
    return re.sub(r"[^a-z0-9._-]+", "-", name).strip("-")


async def resolve(
    credentials_block: str | None, archive_block: str | None, backend: str | None
) -> tuple[config.ApiSettings, Store]:
    """API and archive from named blocks (only those the operator allows), else from the
    environment or the local services."""
    if credentials_block:
        from avatarflow.blocks.credentials import SegmindCredentials

        api = (await SegmindCredentials.load(config.check_block("credentials", credentials_block))).settings()
    else:
        api = config.api_settings(backend)
    return api, await resolve_store(archive_block)


async def resolve_store(archive_block: str | None) -> Store:
    """The archive: a named S3Bucket block the operator allows, else the environment or the
    local services."""
    if archive_block:
        from prefect_aws import S3Bucket

        from avatarflow.blocks.archive import store_from_block

        return store_from_block(await S3Bucket.load(config.check_block("archive", archive_block)))
    a = config.archive_settings()
    return Store(s3=a.s3(), bucket=a.bucket, prefix=a.prefix)


def _limiter(name: str | None) -> Any:
    from avatarflow.request_limit import request_limiter

    return request_limiter(name)


async def _apply_preset(request: VideoRequest) -> VideoRequest:
    if not request.preset:
        return request
    from avatarflow.blocks.preset import AvatarPreset

    return request.with_preset((await AvatarPreset.load(request.preset)).look())


def _timing_row(duration: dict | None, cache_hit: bool) -> str:
    """Predicted vs actual time to COMPLETED, as a summary row (none for a cache hit's old one)."""
    if cache_hit or not duration:
        return ""
    pred, actual = duration.get("predicted") or {}, duration.get("actual") or {}

    def s(v: Any) -> str:
        return f"{v:.1f} s" if isinstance(v, (int, float)) else "n/a"

    said = (f"{s(pred.get('seconds'))} +- {s(pred.get('spread_s'))} ({pred.get('source')}, {pred.get('n', 0)} jobs)"
            if pred else "n/a")
    got = f"{s(actual.get('total_s'))} (queue {s(actual.get('queue_s'))}, processing {s(actual.get('processing_s'))})"
    seen = f"noticed at {s(actual.get('noticed_s'))} after {actual.get('polls', 'n/a')} polls"
    return f"| time to COMPLETED | predicted {said}; actual {got}; {seen} |\n"


def _script_rows(script: dict[str, Any] | None) -> str:
    """The script written from a brief: the words, the model, its prompt and its cost."""
    if not script:
        return ""
    prompt = " / ".join(m.get("content", "").replace("\n", "; ") for m in script.get("prompt", []) if m.get("role") == "user")
    cost = script.get("cost")
    return (f"| script | {script['text'].replace('|', '/')} |\n"
            f"| script model | `{script['model']}` (request `{script['request_id']}`, "
            f"cost {cost if cost is not None else 'n/a'}) |\n"
            f"| script prompt | {prompt.replace('|', '/')} |\n")


async def _report(result: VideoResult, archived: Archived) -> None:
    key = f"avatar-{result.fingerprint[:16]}"
    await acreate_link_artifact(
        link=result.presigned_url, link_text=result.s3_uri, key=key,
        description=f"Archived video (request {result.request_id}, seed {result.seed})",
    )
    p = archived.manifest.get("parameters", {})
    thumb = f"![thumbnail]({result.thumbnail_url})\n\n" if result.thumbnail_url else ""
    await acreate_markdown_artifact(
        key=f"{key}-summary",
        markdown=(
            f"## Avatar video\n\n{thumb}"
            f"| | |\n|---|---|\n"
            f"| video | [{result.s3_uri}]({result.presigned_url}) |\n"
            f"| manifest | `{result.manifest_uri}` |\n"
            f"| request id | `{result.request_id}` |\n"
            f"| voice | {p.get('voice')} / {p.get('voice_language')} |\n"
            f"| resolution | {p.get('resolution')} |\n"
            f"| seed | {result.seed}{' (random)' if result.seed_random else ''} |\n"
            f"| cache hit | {result.cache_hit} |\n"
            f"| cost | {result.cost if result.cost is not None else 'n/a'} |\n"
            f"| duration | {archived.manifest.get('video', {}).get('duration_s')} s |\n"
            f"{_timing_row(archived.manifest.get('duration'), result.cache_hit)}"
            f"{_script_rows(result.script)}"
        ),
        description="Avatar video summary",
    )


@asynccontextmanager
async def pipeline_context(
    credentials_block: str | None, archive_block: str | None, backend: str | None, concurrency_limit: str | None,
    expected_seconds: float | None = None,
) -> AsyncIterator[Context]:
    """The pipeline's context for a flow run: API and archive resolved, the run's logger. A run
    put back in the queue after too many crashes fails here, before any request."""
    fleet.refuse_restart_loop(flow_run.run_count, fleet.MAX_STARTS,
                              "run it again by hand (its request, if it was sent, is resumed from the ledger)")
    logger = get_run_logger()
    api, store = await resolve(credentials_block, archive_block, backend)

    def on_status(event: PollEvent) -> None:
        logger.info("request %s: %s after %.1f s (poll %d)", event.request_id, event.status, event.elapsed_s, event.polls)
        progress.publish(event)

    async with api.client(limiter=_limiter(concurrency_limit)) as client:
        yield Context(
            client=client, store=store, backend=api.backend,
            ledger=Ledger(store, require_conditional=not config.environment().avatarflow_ledger_single_worker),
            expected_seconds=expected_seconds or api.expected_seconds, log=logger.info, on_status=on_status,
        )


async def finish_run(make: Callable[[Context], Awaitable[tuple[VideoResult, Archived]]], ctx: Context,
                     source: str | None) -> dict[str, Any]:
    """Run the chain, report it (artifacts, an event) and return the result as a dict."""
    try:
        result, archived = await make(ctx)
    except Exception as e:
        fingerprint = ctx.plan.fingerprint if ctx.plan else "unplanned"
        emit_event(
            event="avatarflow.video.failed",
            resource={"prefect.resource.id": f"avatarflow.video.{fingerprint}"},
            payload={"error": str(e), "error_type": type(e).__name__, "image": display_source(source)},
        )
        raise
    await _report(result, archived)
    emit_event(
        event="avatarflow.video.archived",
        resource={"prefect.resource.id": f"avatarflow.video.{result.fingerprint}", "avatarflow.s3_uri": result.s3_uri},
        payload=result.model_dump(exclude={"presigned_url", "thumbnail_url"}),
    )
    return result.model_dump()


@flow(name="avatar_video", flow_run_name=_run_name, persist_result=False)
async def avatar_video(
    request: VideoRequest,
    credentials_block: str | None = None,
    archive_block: str | None = None,
    backend: str | None = None,
    concurrency_limit: str | None = None,
) -> dict[str, Any]:
    """Make one talking-avatar video and archive it in S3; answered from the archive when the
    same portrait, speech, parameters and explicit seed were made before.

    `concurrency_limit` names a Prefect global concurrency limit with slot decay that every API
    request takes a slot of: the account's request rate, held across all workers."""
    request = await _apply_preset(request)
    async with pipeline_context(credentials_block, archive_block, backend, concurrency_limit, request.expected_seconds) as ctx:
        return await finish_run(lambda c: make_video(c, request, TaskSteps()), ctx, request.image)
