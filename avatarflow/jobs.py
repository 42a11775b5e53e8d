"""One job from plan to archive: exactly-once submit through the ledger, wait, stream to S3.

The API has no idempotency key and every POST is billed, so the ledger (in the archive bucket,
keyed by fingerprint) holds the request id from the moment it is known; a retried or restarted
run resumes it, and a lost submit answer is reconciled through the request history.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

from pydantic import BaseModel, Field

from avatarflow import archive, media
from avatarflow.client import DEADLINE_FACTOR, PollEvent, SegmindClient, poll_offsets
from avatarflow.contract import MODEL_SLUG, AvatarRequest, Metrics
from avatarflow.errors import (
    AmbiguousSubmit,
    AvatarflowError,
    DeadlineExceeded,
    JobFailed,
    NotFound,
    RateLimited,
)
from avatarflow.fingerprint import fingerprint, random_seed, sha256_hex
from avatarflow.inputs import PortraitInput, SpeechInput
from avatarflow.spec import VideoRequest
from avatarflow.store import Store

CLAIM_STALE_S = 60.0
CLAIM_WAIT_S = 1.0
RECONCILE_TRIES = 3
RECONCILE_INTERVAL_S = 2.0
SUBMIT_RATE_LIMIT_TRIES = 5
DOWNLOAD_CHUNK = 1 << 20
PRESIGN_EXPIRES_S = 7 * 24 * 3600
THUMBNAIL_AT_S = 0.5


class SubmitUnresolved(AvatarflowError):
    """A submit's answer was lost and the history does not show the job yet. The ledger keeps
    the claim: a rerun reconciles again, and submits only once the claim is stale and the
    history still has no such job."""


class JobExpired(AvatarflowError):
    """The request record expired (404) and its output can no longer be fetched."""


@dataclass(frozen=True)
class Plan:
    """The body to send and the key it is known by."""

    request: AvatarRequest
    fingerprint: str
    seed: int
    seed_random: bool
    image_sha256: str
    audio_sha256: str | None


@dataclass(frozen=True)
class Job:
    request_id: str
    submitted_at: float
    resumed: bool


@dataclass(frozen=True)
class Finished:
    request_id: str
    output_url: str
    metrics: dict[str, Any] = field(default_factory=dict)
    via: str = "result"


@dataclass(frozen=True)
class Archived:
    s3_uri: str
    manifest_uri: str
    presigned_url: str
    thumbnail_url: str | None
    size: int
    sha256: str
    manifest: dict[str, Any]


class VideoResult(BaseModel):
    """What a run returns: where the video is and how it was made."""

    s3_uri: str
    presigned_url: str
    manifest_uri: str
    thumbnail_url: str | None = None
    request_id: str
    fingerprint: str
    seed: int
    seed_random: bool
    cache_hit: bool
    cost: float | None = None
    size: int
    sha256: str
    timings: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def of(cls, archived: Archived, plan: Plan, *, cache_hit: bool, timings: dict[str, float]) -> VideoResult:
        return cls(
            s3_uri=archived.s3_uri, presigned_url=archived.presigned_url, manifest_uri=archived.manifest_uri,
            thumbnail_url=archived.thumbnail_url, request_id=archived.manifest["request_id"],
            fingerprint=plan.fingerprint, seed=plan.seed, seed_random=plan.seed_random, cache_hit=cache_hit,
            cost=archived.manifest.get("cost"), size=archived.size, sha256=archived.sha256,
            timings={k: round(v, 3) for k, v in timings.items()},
        )


def plan_job(video: VideoRequest, speech: SpeechInput, portrait: PortraitInput) -> Plan:
    """Choose the seed (random when none or -1: recorded, never a cache hit) and fingerprint."""
    seed_random = video.random_seed
    seed = random_seed() if seed_random else int(video.seed)
    request = video.api_request(portrait.url, speech.audio_url, speech.voice_script, seed)
    fp = fingerprint(request, image_sha256=portrait.sha256, audio_sha256=speech.audio_sha256)
    return Plan(request, fp, seed, seed_random, portrait.sha256, speech.audio_sha256)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def _reconcile(
    client: SegmindClient, body: dict[str, Any], since: float, tries: int
) -> str | None:
    """The request id of a job posted with this body since `since`, from the history."""
    request = AvatarRequest.model_validate(body)
    for attempt in range(tries):
        row = await client.find_submitted(request, since=since - 5)
        if row is not None:
            return row.request_id
        if attempt + 1 < tries:
            await asyncio.sleep(RECONCILE_INTERVAL_S)
    return None


async def submit_once(client: SegmindClient, store: Store, plan: Plan, *, log: Callable[[str], Any] = print) -> Job:
    """Submit the plan's request at most once across retries, restarts and machines."""
    key = store.ledger_key(plan.fingerprint)
    rate_limited = 0
    while True:
        entry = await store.get_json(key)
        if entry and entry.get("request_id") and entry.get("state") in ("submitted", "completed"):
            log(f"ledger has request {entry['request_id']}: resuming it, no new submit")
            return Job(entry["request_id"], entry["submitted_at"], resumed=True)
        if entry and entry.get("state") == "submitting":
            claimed_at = float(entry.get("claimed_at", 0))
            rid = await _reconcile(client, entry["body"], claimed_at, tries=1)
            if rid:
                log(f"history shows request {rid} for this job: adopting it, no new submit")
                return await _record(store, key, entry, rid, claimed_at, resumed=True)
            if time.time() - claimed_at < CLAIM_STALE_S:
                await asyncio.sleep(CLAIM_WAIT_S)
                continue
            log(f"stale claim by {entry.get('owner')} and no such job in the history: taking over")
            await store.delete(key)
        elif entry:
            await store.delete(key)
        claim = {
            "fingerprint": plan.fingerprint,
            "state": "submitting",
            "claimed_at": time.time(),
            "owner": _owner(),
            "body": plan.request.body(),
            "seed": plan.seed,
            "seed_random": plan.seed_random,
            "image_sha256": plan.image_sha256,
            "audio_sha256": plan.audio_sha256,
            "updated_at": _now_iso(),
        }
        if await store.create_json(key, claim) is None:
            continue
        try:
            answer = await client.submit(plan.request)
        except AmbiguousSubmit as e:
            rid = await _reconcile(client, claim["body"], e.sent_at, tries=RECONCILE_TRIES)
            if rid:
                log(f"submit answer lost; history shows request {rid}: adopting it")
                return await _record(store, key, claim, rid, e.sent_at, resumed=False)
            raise SubmitUnresolved(
                f"submit answer lost and the history shows no job yet ({e}); rerun to reconcile again"
            ) from None
        except RateLimited as e:
            await store.delete(key)
            rate_limited += 1
            if rate_limited >= SUBMIT_RATE_LIMIT_TRIES:
                raise
            await asyncio.sleep(min(e.retry_after or 2.0**rate_limited, 120.0))
            continue
        except BaseException:
            await store.delete(key)
            raise
        return await _record(store, key, claim, answer.request_id, claim["claimed_at"], resumed=False)


async def _record(store: Store, key: str, entry: dict, request_id: str, submitted_at: float, *, resumed: bool) -> Job:
    await store.put_json(
        key, {**entry, "state": "submitted", "request_id": request_id,
              "submitted_at": submitted_at, "updated_at": _now_iso()},
    )
    return Job(request_id, submitted_at, resumed)


async def _mark(store: Store, fingerprint: str, state: str, **extra: Any) -> None:
    key = store.ledger_key(fingerprint)
    entry = await store.get_json(key) or {"fingerprint": fingerprint}
    await store.put_json(key, {**entry, **extra, "state": state, "updated_at": _now_iso()})


async def _output_alive(client: SegmindClient, url: str) -> bool:
    try:
        async with client.stream_output(url):
            return True
    except Exception:
        return False


async def await_job(
    client: SegmindClient,
    store: Store,
    plan: Plan,
    job: Job,
    *,
    expected_s: float,
    resubmit_expired: bool = False,
    on_status: Callable[[PollEvent], Awaitable[None] | None] | None = None,
    log: Callable[[str], Any] = print,
) -> tuple[Job, Finished]:
    """Poll until COMPLETED. FAILED raises JobFailed (final). An expired record (404) is looked
    up in the history; only if its output is gone and `resubmit_expired` is set, a new job."""
    try:
        result = await client.wait(
            job.request_id, submitted_at=job.submitted_at, expected_s=expected_s, on_status=on_status
        )
    except JobFailed as e:
        await _mark(store, plan.fingerprint, "failed", error=e.error, request_id=job.request_id)
        raise
    except NotFound:
        return await _await_history(
            client, store, plan, job, expected_s=expected_s, resubmit_expired=resubmit_expired,
            on_status=on_status, log=log,
        )
    url = result.output_url
    if not url:
        raise JobFailed(f"COMPLETED without an output URL: {result.model_dump()}", request_id=job.request_id)
    metrics = (result.metrics or Metrics()).model_dump(exclude_none=True)
    return job, Finished(job.request_id, url, metrics)


async def _await_history(
    client: SegmindClient, store: Store, plan: Plan, job: Job, *, expected_s: float,
    resubmit_expired: bool, on_status: Callable[[PollEvent], Awaitable[None] | None] | None,
    log: Callable[[str], Any],
) -> tuple[Job, Finished]:
    """The request record is gone (404): follow the job in the request history, which keeps
    every request at any age, on the same schedule and deadline as the status polling."""
    log(f"request {job.request_id}: record expired (404); following it in the request history")
    deadline = job.submitted_at + DEADLINE_FACTOR * expected_s
    offsets = poll_offsets(expected_s)
    while True:
        row = await client.history(job.request_id)
        state = (row.state or "").upper()
        if on_status is not None:
            maybe = on_status(PollEvent(job.request_id, state or "UNKNOWN", time.time() - job.submitted_at, 0))
            if asyncio.iscoroutine(maybe):
                await maybe
        if state == "FAILED":
            await _mark(store, plan.fingerprint, "failed", error=row.error, request_id=job.request_id)
            raise JobFailed(row.error or "FAILED", request_id=job.request_id)
        if state == "COMPLETED":
            break
        if time.time() >= deadline:
            raise DeadlineExceeded(job.request_id, time.time() - job.submitted_at, state)
        target = next(offsets)
        while job.submitted_at + target < time.time():
            target = next(offsets)
        await asyncio.sleep(min(job.submitted_at + target, deadline) - time.time())
    if row.output_url and await _output_alive(client, row.output_url):
        log(f"request {job.request_id}: output found through the history")
        metrics = {"cost": row.credits_deduction, "total_time": (row.latency_ms or 0) / 1000 or None}
        return job, Finished(job.request_id, row.output_url, metrics, via="history")
    if not resubmit_expired:
        raise JobExpired(
            f"request {job.request_id} completed but its record expired and its output is gone; "
            "rerun with resubmit_expired=True to pay for a new job"
        )
    log(f"request {job.request_id}: output gone; submitting a new job (resubmit_expired)")
    await store.delete(store.ledger_key(plan.fingerprint))
    new_job = await submit_once(client, store, plan, log=log)
    return await await_job(client, store, plan, new_job, expected_s=expected_s, on_status=on_status, log=log)


def manifest_of(
    video: VideoRequest, plan: Plan, finished: Finished, stored: archive.StoredObject,
    probe: media.VideoProbe, *, timings: dict[str, float], backend: str,
) -> dict[str, Any]:
    """Everything about one archived video; no key, no presigned signature."""
    parameters = plan.request.model_dump(exclude={"image", "audio"})
    return {
        "model": MODEL_SLUG,
        "fingerprint": plan.fingerprint,
        "request_id": finished.request_id,
        "seed": plan.seed,
        "seed_random": plan.seed_random,
        "parameters": parameters,
        "inputs": {
            "image": _shown(video.image), "image_sha256": plan.image_sha256,
            "audio": _shown(video.audio) if video.audio else None, "audio_sha256": plan.audio_sha256,
            "template_fields": video.template_fields, "preset": video.preset,
        },
        "video": {
            "s3_uri": stored.s3_uri, "size": stored.size, "sha256": stored.sha256,
            "content_type": "video/mp4", "width": probe.width, "height": probe.height,
            "duration_s": round(probe.duration_s, 3), "video_codec": probe.video_codec,
            "audio_codec": probe.audio_codec,
        },
        "cost": finished.metrics.get("cost"),
        "metrics": finished.metrics,
        "output_via": finished.via,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "backend": backend,
        "archived_at": _now_iso(),
    }


def _shown(source: str | None) -> str | None:
    if source and source.startswith("data:"):
        return source[:40] + "...(data URI)"
    return source


async def archive_output(
    client: SegmindClient, store: Store, video: VideoRequest, plan: Plan, finished: Finished,
    *, timings: dict[str, float], backend: str,
) -> Archived:
    """Stream the output into S3, verify it (size, sha256, the video decodes), add a thumbnail
    and, last, the manifest that marks the archive complete."""
    key = store.video_key(plan.fingerprint)
    metadata = {"fingerprint": plan.fingerprint, "request-id": finished.request_id,
                "seed": str(plan.seed), "model": MODEL_SLUG}
    async with client.stream_output(finished.output_url) as response:
        stored = await archive.archive_stream(
            response.aiter_bytes(DOWNLOAD_CHUNK), s3=store.s3, bucket=store.bucket, key=key,
            content_type="video/mp4", metadata=metadata,
        )
    seen: dict[str, Any] = {}

    def probe(path: Path) -> media.VideoProbe:
        seen["probe"] = media.probe_video(path)
        seen["thumbnail"] = media.thumbnail_jpeg(path, at_s=THUMBNAIL_AT_S)
        return seen["probe"]

    await asyncio.to_thread(archive.verify, store.s3, stored, probe=probe)
    thumb_key = store.key("videos", plan.fingerprint, "thumbnail.jpg")
    await asyncio.to_thread(
        store.s3.put_object, Bucket=store.bucket, Key=thumb_key, Body=seen["thumbnail"], ContentType="image/jpeg"
    )
    manifest = manifest_of(video, plan, finished, stored, seen["probe"], timings=timings, backend=backend)
    manifest["thumbnail_s3_uri"] = store.uri(thumb_key)
    await store.put_json(store.manifest_key(plan.fingerprint), manifest)
    await _mark(store, plan.fingerprint, "completed", request_id=finished.request_id, s3_uri=stored.s3_uri)
    return Archived(
        s3_uri=stored.s3_uri,
        manifest_uri=store.uri(store.manifest_key(plan.fingerprint)),
        presigned_url=await store.presign(key, PRESIGN_EXPIRES_S),
        thumbnail_url=await store.presign(thumb_key, PRESIGN_EXPIRES_S),
        size=stored.size,
        sha256=stored.sha256,
        manifest=manifest,
    )


async def from_cache(store: Store, manifest: dict[str, Any], fingerprint: str) -> Archived:
    thumb = manifest.get("thumbnail_s3_uri")
    thumb_key = thumb.split("/", 3)[3] if thumb else None
    return Archived(
        s3_uri=manifest["video"]["s3_uri"],
        manifest_uri=store.uri(store.manifest_key(fingerprint)),
        presigned_url=await store.presign(store.video_key(fingerprint), PRESIGN_EXPIRES_S),
        thumbnail_url=await store.presign(thumb_key, PRESIGN_EXPIRES_S) if thumb_key else None,
        size=manifest["video"]["size"],
        sha256=manifest["video"]["sha256"],
        manifest=manifest,
    )


async def _ledger_entry(store: Store, request_id: str) -> dict | None:
    def scan() -> dict | None:
        pages = store.s3.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=store.key("ledger") + "/")
        for page in pages:
            for obj in page.get("Contents", []):
                entry = archive.get_json(store.s3, store.bucket, obj["Key"])
                if entry and entry.get("request_id") == request_id:
                    return entry
        return None

    return await asyncio.to_thread(scan)


async def resume_request(
    client: SegmindClient, store: Store, request_id: str, *, expected_s: float, backend: str,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Poll and archive a request known only by its id: the ledger's record of it, else the
    request history's copy of the body (its media fetched again to fingerprint them)."""
    entry = await _ledger_entry(store, request_id)
    if entry is not None:
        body, submitted_at = entry["body"], float(entry.get("submitted_at") or time.time())
        image_sha, audio_sha = entry["image_sha256"], entry.get("audio_sha256")
        seed_random = bool(entry.get("seed_random"))
    else:
        row = await client.history(request_id)
        if not isinstance(row.request_body, dict):
            raise JobExpired(f"request {request_id}: the history has no request body to resume from")
        body, submitted_at, seed_random = row.request_body, time.time() - expected_s, False
        image_sha = sha256_hex(await asyncio.to_thread(media.read_source, body["image"], field="image", max_bytes=50 << 20))
        audio_sha = (
            sha256_hex(await asyncio.to_thread(media.read_source, body["audio"], field="audio", max_bytes=50 << 20))
            if body.get("audio") else None
        )
    request = AvatarRequest.model_validate(body)
    fp = fingerprint(request, image_sha256=image_sha, audio_sha256=audio_sha)
    plan = Plan(request, fp, int(request.seed), seed_random, image_sha, audio_sha)
    manifest = await store.cached(fp)
    if manifest is not None and manifest.get("request_id") == request_id:
        return VideoResult.of(await from_cache(store, manifest, fp), plan, cache_hit=True, timings={}).model_dump()
    started = time.perf_counter()
    _, finished = await await_job(
        client, store, plan, Job(request_id, submitted_at, resumed=True), expected_s=expected_s, log=log
    )
    video = VideoRequest.model_validate({**body, "image": body["image"]})
    timings = {"poll": time.perf_counter() - started}
    archived = await archive_output(client, store, video, plan, finished, timings=timings, backend=backend)
    timings["archive"] = time.perf_counter() - started - timings["poll"]
    return VideoResult.of(archived, plan, cache_hit=False, timings=timings).model_dump()


def download_copy(url: str, dest: Path) -> Path:
    """A local copy of a (presigned) URL, written beside and renamed into place."""
    import httpx

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, httpx.stream("GET", url, timeout=60) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                f.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


__all__ = [
    "Plan", "Job", "Finished", "Archived", "plan_job", "submit_once", "await_job",
    "archive_output", "from_cache", "download_copy", "resume_request", "VideoResult",
    "SubmitUnresolved", "JobExpired",
]
