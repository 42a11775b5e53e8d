"""One video's chain, without Prefect: speech, portrait, plan, cache look-up, exactly-once
submit, wait, archive. `make_video` and `resume_video` are the only places the steps are
chained; a flow hands them `Steps` whose methods are its Prefect tasks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from pydantic import BaseModel, Field

from avatarflow import manifest
from avatarflow.brief import Script, brief_of, write_script
from avatarflow.client import SegmindClient
from avatarflow.contract import (
    EXPECTED_DURATION_S,
    AvatarRequest,
    check_request_id,
)
from avatarflow.duration import (
    TYPICAL_CLIP_S,
    DurationModel,
    Prediction,
    Speech,
    fixed_prediction,
    observation,
    speech_of,
)
from avatarflow.errors import AvatarflowError, JobFailed, NotFound
from avatarflow.fingerprint import fingerprint, random_seed, sha256_hex
from avatarflow.inputs import (
    PortraitInput,
    SpeechInput,
    fetch_media,
    prepare_portrait,
    prepare_speech,
)
from avatarflow.ledger import FAILED, Job, Ledger
from avatarflow.manifest import Archived
from avatarflow.poll import PollEvent
from avatarflow.responses import Metrics
from avatarflow.shared_duration import SharedDurationModel, service_name, shared_model
from avatarflow.spec import VideoRequest
from avatarflow.store import Store, exclusive

Log = Callable[[str], Any]
OnStatus = Callable[[PollEvent], Awaitable[None] | None]


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

    def record(self) -> dict[str, Any]:
        """What the ledger keeps beside the body, so another machine can resume the request."""
        return {"seed": self.seed, "seed_random": self.seed_random,
                "image_sha256": self.image_sha256, "audio_sha256": self.audio_sha256}


@dataclass(frozen=True)
class Finished:
    request_id: str
    output_url: str
    metrics: dict[str, Any] = field(default_factory=dict)
    via: str = "result"
    waited: dict[str, Any] = field(default_factory=dict)  # polls, noticed_s (submit to noticed)


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
    script: dict[str, Any] | None = None  # the script written from a brief: text, model, cost

    @classmethod
    def of(cls, archived: Archived, plan: Plan, *, cache_hit: bool, timings: dict[str, float]) -> VideoResult:
        return cls(
            s3_uri=archived.s3_uri, presigned_url=archived.presigned_url, manifest_uri=archived.manifest_uri,
            thumbnail_url=archived.thumbnail_url, request_id=archived.manifest["request_id"],
            fingerprint=plan.fingerprint, seed=plan.seed, seed_random=plan.seed_random, cache_hit=cache_hit,
            cost=archived.manifest.get("cost"), size=archived.size, sha256=archived.sha256,
            timings={k: round(v, 3) for k, v in timings.items()}, script=archived.manifest.get("script"),
        )


@dataclass
class Context:
    """What every step needs: the API, the archive, its ledger, and how to report.

    `expected_seconds`: the backend's typical time for a job (the vendor's 100 s, the local API's
    few seconds); the duration model's cold prior is scaled to it until jobs are observed.
    `durations`: the duration model shared through the archive bucket (default: this process's
    copy of the backend's document); `prediction`: this job's, once its speech is known."""

    client: SegmindClient
    store: Store
    ledger: Ledger
    backend: str
    expected_seconds: float
    log: Log = print
    on_status: OnStatus | None = None
    plan: Plan | None = None  # set once known, for the caller's failure report
    durations: SharedDurationModel | None = None
    prediction: Prediction | None = None
    script: Script | None = None  # written from the request's brief, once it is


def plan_job(video: VideoRequest, speech: SpeechInput, portrait: PortraitInput) -> Plan:
    """Choose the seed (random when none or -1: recorded, never a cache hit) and fingerprint."""
    seed_random = video.random_seed
    seed = random_seed() if seed_random else int(video.seed)
    request = video.api_request(portrait.url, speech.audio_url, speech.voice_script, seed)
    fp = fingerprint(request, image_sha256=portrait.sha256, audio_sha256=speech.audio_sha256)
    return Plan(request, fp, seed, seed_random, portrait.sha256, speech.audio_sha256)


async def _output_alive(client: SegmindClient, url: str) -> bool:
    try:
        async with client.stream_output(url):
            return True
    except Exception:
        return False


async def predict_job(ctx: Context, request: AvatarRequest, audio_s: float | None = None) -> Prediction:
    """This job's duration, before submit, from the shared model: the speech's length (exact for
    audio, estimated for a script) and the resolution. Never fails a run: a store that cannot be
    read leaves the in-memory model (or the prior)."""
    if request.audio:
        speech = Speech(audio_s, True) if audio_s else Speech(TYPICAL_CLIP_S, False)
    else:
        speech = speech_of(request)
    model = DurationModel()
    try:
        if ctx.durations is None:
            ctx.durations = shared_model(ctx.store, service_name(ctx.backend, ctx.client.base_url))
        model = await ctx.durations.refresh()
    except Exception as e:  # the model is an optimisation: polling works without it
        ctx.log(f"duration model not read ({type(e).__name__}: {e}); using what this process knows")
        model = ctx.durations.model if ctx.durations is not None else model
    pred = model.predict(request.resolution, speech)
    if not pred.n and ctx.expected_seconds and ctx.expected_seconds != EXPECTED_DURATION_S:
        pred = pred.scaled(ctx.expected_seconds / EXPECTED_DURATION_S)
    ctx.log(f"predicted {pred.seconds:.1f} s +- {pred.spread_s:.1f} s to COMPLETED ({pred.source}, "
            f"{pred.speech_s:.1f} s of speech{'' if pred.speech_exact else ' estimated'}, {pred.resolution})")
    return pred


async def learn(ctx: Context, finished: Finished, output_s: float | None = None) -> None:
    """Feed a finished job's times to the shared model (best effort)."""
    if ctx.prediction is None or ctx.durations is None:
        return
    latency = finished.metrics.get("total_time") if finished.via == "history" else None
    obs = observation(finished.request_id, ctx.prediction, metrics=finished.metrics if finished.via != "history" else None,
                      latency_ms=latency * 1000 if latency else None, output_s=output_s)
    try:
        if obs is not None and not await ctx.durations.record(obs):
            ctx.log("duration model not updated (the shared document kept changing)")
    except Exception as e:
        ctx.log(f"duration model not updated ({type(e).__name__}: {e})")


def _waiting(ctx: Context, job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    """The wait's keyword arguments (the prediction, live from the model) and what it saw."""
    pred = ctx.prediction or fixed_prediction(ctx.expected_seconds)
    seen: dict[str, Any] = {"polls": 0}

    def on_status(event: PollEvent) -> Awaitable[None] | None:
        seen["polls"] = event.polls
        return ctx.on_status(event) if ctx.on_status is not None else None

    live = ctx.durations.live(pred) if ctx.durations is not None and ctx.prediction is not None else None
    return {"submitted_at": job.submitted_at, "prediction": pred, "predict": live, "on_status": on_status}, seen


async def wait_job(ctx: Context, plan: Plan, job: Job, *, resubmit_expired: bool = False) -> tuple[Job, Finished]:
    """Poll until COMPLETED. FAILED raises JobFailed (final). An expired record (404) is followed
    in the history; only if its output is gone and `resubmit_expired` is set, a new job."""
    kwargs, seen = _waiting(ctx, job)
    try:
        result = await ctx.client.wait(job.request_id, **kwargs)
    except JobFailed as e:
        await ctx.ledger.mark(plan.fingerprint, FAILED, error=e.error, request_id=job.request_id)
        raise
    except NotFound:
        return await _wait_history(ctx, plan, job, resubmit_expired=resubmit_expired)
    if not result.output_url:
        raise JobFailed(f"COMPLETED without an output URL: {result.model_dump()}", request_id=job.request_id)
    metrics = (result.metrics or Metrics()).model_dump(exclude_none=True)
    waited = {"polls": seen["polls"], "noticed_s": round(time.time() - job.submitted_at, 3)}
    return job, Finished(job.request_id, result.output_url, metrics, waited=waited)


async def _wait_history(ctx: Context, plan: Plan, job: Job, *, resubmit_expired: bool) -> tuple[Job, Finished]:
    """The request record is gone (404): follow the job in the request history, which keeps
    every request at any age, with the same poll loop, plan and deadline."""
    client = ctx.client
    ctx.log(f"request {job.request_id}: record expired (404); following it in the request history")
    kwargs, seen = _waiting(ctx, job)
    try:
        row = await client.wait(job.request_id, via="history", **kwargs)
    except JobFailed as e:
        await ctx.ledger.mark(plan.fingerprint, FAILED, error=e.error, request_id=job.request_id)
        raise
    if row.output_url and await _output_alive(client, row.output_url):
        ctx.log(f"request {job.request_id}: output found through the history")
        metrics = {"cost": row.credits_deduction, "total_time": (row.latency_ms or 0) / 1000 or None}
        waited = {"polls": seen["polls"], "noticed_s": round(time.time() - job.submitted_at, 3)}
        return job, Finished(job.request_id, row.output_url, metrics, via="history", waited=waited)
    if not resubmit_expired:
        raise JobExpired(
            f"request {job.request_id} completed but its record expired and its output is gone; "
            "rerun with resubmit_expired=True to pay for a new job"
        )
    ctx.log(f"request {job.request_id}: output gone; submitting a new job (resubmit_expired)")
    new_job = await ctx.ledger.submit(
        client, plan.fingerprint, plan.request, record=plan.record(), replace_request=job.request_id, log=ctx.log
    )
    return await wait_job(ctx, plan, new_job)


class Steps:
    """One video's steps. A flow subclasses this to run each step as a Prefect task."""

    async def script(self, ctx: Context, request: VideoRequest) -> Script:
        return await write_script(ctx, brief_of(request))

    async def speech(self, ctx: Context, request: VideoRequest) -> SpeechInput:
        return await prepare_speech(request, ctx.store)

    async def portrait(self, ctx: Context, request: VideoRequest) -> PortraitInput:
        return await prepare_portrait(request, ctx.store)

    async def look_up(self, ctx: Context, plan: Plan) -> Archived | None:
        return await manifest.look_up(ctx.store, plan)

    async def submit(self, ctx: Context, plan: Plan) -> Job:
        return await ctx.ledger.submit(ctx.client, plan.fingerprint, plan.request, record=plan.record(), log=ctx.log)

    async def wait(self, ctx: Context, plan: Plan, job: Job, resubmit_expired: bool) -> tuple[Job, Finished]:
        return await wait_job(ctx, plan, job, resubmit_expired=resubmit_expired)

    async def archive(self, ctx: Context, request: VideoRequest, plan: Plan, finished: Finished,
                      timings: dict[str, float]) -> Archived:
        return await manifest.archive_output(ctx, request, plan, finished, timings=timings)


class _Laps:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self._t
        self._t = now


async def _finish(ctx: Context, steps: Steps, request: VideoRequest, plan: Plan, job: Job | None,
                  lap: _Laps, *, resubmit_expired: bool) -> tuple[VideoResult, Archived]:
    """From the cache look-up (or a known job) to the archived video."""
    async with exclusive(plan.fingerprint):
        archived = await steps.look_up(ctx, plan)
        lap("cache_lookup")
        cache_hit = archived is not None
        if archived is None:
            if job is None:
                job = await steps.submit(ctx, plan)
                lap("submit")
            job, finished = await steps.wait(ctx, plan, job, resubmit_expired)
            lap("poll")
            archived = await steps.archive(ctx, request, plan, finished, dict(lap.timings))
            lap("archive")
            await learn(ctx, finished, archived.manifest.get("video", {}).get("duration_s"))
    return VideoResult.of(archived, plan, cache_hit=cache_hit, timings=lap.timings), archived


async def make_video(ctx: Context, request: VideoRequest, steps: Steps | None = None) -> tuple[VideoResult, Archived]:
    """A portrait and a script (or a recording) to an archived video, or the archive's copy."""
    steps = steps or Steps()
    await ctx.ledger.check_store(ctx.log)
    lap = _Laps()
    if request.brief:
        ctx.script = await steps.script(ctx, request)
        lap("script")
        request = request.with_script(ctx.script.text)
    speech = await steps.speech(ctx, request)
    lap("speech")
    portrait = await steps.portrait(ctx, request)
    lap("portrait")
    ctx.plan = plan = plan_job(request, speech, portrait)
    ctx.log(f"fingerprint {plan.fingerprint}, seed {plan.seed}{' (random)' if plan.seed_random else ''}")
    ctx.prediction = await predict_job(ctx, plan.request, speech.audio_duration_s)
    result, archived = await _finish(ctx, steps, request, plan, None, lap, resubmit_expired=request.resubmit_expired)
    if ctx.script is not None:  # this run's script: `cached` says whether this run paid for it
        result.script = {**ctx.script.record(), "cached": ctx.script.cached}
    return result, archived


async def resume_video(ctx: Context, request_id: str, steps: Steps | None = None) -> tuple[VideoResult, Archived]:
    """Poll and archive a request known only by its id: its ledger entry (found through the
    index), else the request history's copy of the body (its media fetched again to hash them)."""
    steps = steps or Steps()
    check_request_id(request_id)
    lap = _Laps()
    entry = await ctx.ledger.find(request_id)
    if entry is not None:
        body, submitted_at = entry["body"], float(entry.get("submitted_at") or time.time())
        image_sha, audio_sha = entry["image_sha256"], entry.get("audio_sha256")
        seed_random = bool(entry.get("seed_random"))
    else:
        row = await ctx.client.history(request_id)
        if not isinstance(row.request_body, dict):
            raise JobExpired(f"request {request_id}: the history has no request body to resume from")
        body, submitted_at, seed_random = row.request_body, time.time() - ctx.expected_seconds, False
        image_sha = sha256_hex(await fetch_media(body["image"], "image", ctx.store))
        audio_sha = sha256_hex(await fetch_media(body["audio"], "audio", ctx.store)) if body.get("audio") else None
    request = AvatarRequest.model_validate(body)
    fp = fingerprint(request, image_sha256=image_sha, audio_sha256=audio_sha)
    ctx.plan = plan = Plan(request, fp, int(request.seed), seed_random, image_sha, audio_sha)
    ctx.prediction = await predict_job(ctx, request)
    video = VideoRequest.model_validate({k: v for k, v in body.items() if not (k == "voice_script" and body.get("audio"))})
    job = Job(request_id, submitted_at, resumed=True)
    return await _finish(ctx, steps, video, plan, job, lap, resubmit_expired=False)
