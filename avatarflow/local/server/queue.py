"""The local API's jobs: QUEUED -> PROCESSING -> COMPLETED | FAILED on a pool of render workers,
records that expire after the retention, and a request history that does not.

Two timing modes:

- ``render`` (default): a job is QUEUED until a render worker takes it, PROCESSING while it
  renders (at least ``min_processing_time``), then COMPLETED.
- ``vendor``: the job's times follow a model of the vendor's service (:class:`Timing`), whatever
  the render takes: QUEUED for the queue wait, then PROCESSING for cost per output second x the
  output's length (the speech's length) at the request's resolution, with seeded jitter. The
  render runs meanwhile; when it ends earlier, the job stays PROCESSING until the modelled time
  (when later, until it ends), so status, result metrics and history rows all tell the same
  times. Identical requests with a fixed seed share one render (the local engine is
  deterministic), each job keeping its own times.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from avatarflow.contract import (
    AUDIO_MAX_BYTES,
    IMAGE_MAX_BYTES,
    MODEL_SLUG,
    AvatarRequest,
    LlmRequest,
    cost_of,
)
from avatarflow.fingerprint import random_seed
from avatarflow.local.server import writer
from avatarflow.local.server.chaos import Chaos
from avatarflow.media.fetch import read_source
from avatarflow.media.policy import SourcePolicy

# As the vendor does, the local API fetches the URLs it is given (https, or http: the local S3's
# presigned URLs are http on loopback); never a local path.
FETCH_POLICY = SourcePolicy(allow_http=True, allow_hosts=("127.0.0.1", "localhost", "::1"))
# The LLM stand-in: a short queue, and a price per token like a large hosted model's.
LLM_QUEUE_S = 0.3
LLM_PRICE_IN, LLM_PRICE_OUT = 2.5e-6, 1e-5
INJECTED_FAILURE = "local: injected failure"


class Timing(BaseModel):
    """The vendor-like timing mode. For each job: queue wait = ``queue_wait`` + uniform jitter in
    +-``queue_jitter``; processing = ``cost_per_second[resolution]`` x output seconds x (1 + e),
    e normal with standard deviation ``jitter`` (clipped at 3 of them). Both are drawn from a
    random generator seeded with ``seed`` and the request's body, so a run can be repeated and
    the same request gets the same times. The defaults are the duration model's prior for the
    vendor (:mod:`avatarflow.duration`): a 32 s clip at 720p takes 3 + 96 = 99 s."""

    model_config = ConfigDict(extra="forbid")

    mode: str = Field("render", pattern="^(render|vendor)$")
    queue_wait: float = Field(3.0, ge=0, le=3600)
    queue_jitter: float = Field(1.0, ge=0, le=3600)
    cost_per_second: dict[str, float] = Field(default_factory=lambda: {"720p": 3.0, "1080p": 5.4})
    jitter: float = Field(0.01, ge=0, le=0.3)
    seed: int = 0

    @property
    def vendor(self) -> bool:
        return self.mode == "vendor"

    def draws(self, key: str) -> tuple[float, float]:
        """(queue wait in seconds, processing factor) for the request with this key."""
        rng = random.Random(f"{self.seed}:{key}")
        queue = max(0.0, self.queue_wait + rng.uniform(-self.queue_jitter, self.queue_jitter))
        e = max(-3.0, min(3.0, rng.gauss(0.0, 1.0))) * self.jitter
        return queue, 1.0 + e

    def processing_s(self, resolution: str, output_s: float, factor: float = 1.0) -> float:
        cost = self.cost_per_second.get(resolution)
        if cost is None:
            raise ValueError(f"timing: no cost per second for resolution {resolution!r}; "
                             f"given: {', '.join(self.cost_per_second)}")
        return cost * output_s * factor


#: the timing of servers built without one (set by `avatarflow local serve --timing ...`)
DEFAULT_TIMING = Timing()


def set_default_timing(timing: Timing) -> None:
    global DEFAULT_TIMING
    DEFAULT_TIMING = timing


def request_key(body: dict[str, Any], seed: int | None) -> str:
    """A request's identity for the timing draws and the shared render: its canonical body
    (`AvatarRequest.body()`, defaults filled in) and seed."""
    canon = json.dumps({**body, "seed": seed}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds") if t else None


@dataclass
class LocalJob:
    request_id: str
    request: AvatarRequest | LlmRequest
    body: dict[str, Any]
    created_at: float
    status: str = "QUEUED"
    started_at: float | None = None
    completed_at: float | None = None
    error: str | None = None
    output: Path | None = None
    duration_s: float | None = None
    cost: float | None = None
    seed: int | None = None
    injected_failure: bool = False
    modelled_queue_s: float | None = None
    modelled_processing_s: float | None = None
    answer: str | None = None  # an LLM job's `output`: the provider's JSON as a string
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def slug(self) -> str:
        return self.request.slug

    @property
    def final(self) -> bool:
        return self.status in ("COMPLETED", "FAILED")

    def history_row(self, base_url: str) -> dict[str, Any]:
        state = self.status if self.final else "PENDING"
        latency = (self.completed_at - self.created_at) * 1000 if self.completed_at else None
        return {
            "request_id": self.request_id,
            "model_name": self.slug,
            "model_status": state,
            "request_body": self.body,
            "generation_url": (f"{base_url}/files/{self.request_id}.mp4"
                               if self.status == "COMPLETED" and self.slug == MODEL_SLUG else None),
            "credits_deduction": self.cost,
            "latency_ms": round(latency) if latency is not None else None,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.completed_at or self.started_at or self.created_at),
            "error": self.error,
        }


class JobQueue:
    """Jobs in memory, rendered by `workers` threads; outputs as files under `data_dir`."""

    def __init__(self, data_dir: Path, workers: int, chaos: Chaos, credits: float = 100.0,
                 timing: Timing | None = None):
        self.timing = timing if timing is not None else DEFAULT_TIMING
        self._renders: dict[str, asyncio.Future] = {}
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.chaos = chaos
        self.credits = credits
        self.jobs: dict[str, LocalJob] = {}
        self._slots = asyncio.Semaphore(workers)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="render")
        self._tasks: set[asyncio.Task] = set()

    def submit(self, request: AvatarRequest | LlmRequest, body: dict[str, Any]) -> LocalJob:
        job = LocalJob(request_id=str(uuid.uuid4()), request=request, body=body, created_at=time.time(),
                       injected_failure=self.chaos.roll("fail_rate"))
        self.jobs[job.request_id] = job
        if isinstance(request, LlmRequest):
            run = self._run_llm(job)
        else:
            run = self._run_timed(job) if self.timing.vendor else self._run(job)
        task = asyncio.get_running_loop().create_task(run)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def get(self, request_id: str) -> LocalJob | None:
        """A live record: unknown ids and records past the retention are None (404)."""
        job = self.jobs.get(request_id)
        if job is None or time.time() - job.created_at > self.chaos.settings.retention:
            return None
        return job

    def history(self, request_id: str) -> LocalJob | None:
        return self.jobs.get(request_id)

    def output_path(self, request_id: str) -> Path:
        return self.data_dir / f"{request_id}.mp4"

    async def _run(self, job: LocalJob) -> None:
        async with self._slots:
            job.status, job.started_at = "PROCESSING", time.time()
            try:
                await self._render(job)
            except Exception as e:  # the job's FAILED error, like the vendor's
                job.status, job.error = "FAILED", str(e) or type(e).__name__
            wait = job.started_at + self.chaos.settings.min_processing_time - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if job.status != "FAILED" and job.injected_failure:
                job.status, job.error = "FAILED", INJECTED_FAILURE
            if job.status != "FAILED":
                job.status = "COMPLETED"
                job.cost = cost_of(job.duration_s or 0.0, job.request.resolution)
                self.credits = round(self.credits - job.cost, 6)
            job.completed_at = time.time()
            job.done.set()

    async def _run_llm(self, job: LocalJob) -> None:
        """The LLM stand-in (avatarflow.local.server.writer): queued, written, priced by its tokens."""
        await asyncio.sleep(LLM_QUEUE_S)
        job.status, job.started_at = "PROCESSING", time.time()
        job.answer, usage = writer.answer(job.slug, job.body)
        await asyncio.sleep(max(0.0, job.started_at + self.chaos.settings.min_processing_time - time.time()))
        if job.injected_failure:
            job.status, job.error = "FAILED", INJECTED_FAILURE
        else:
            job.status = "COMPLETED"
            job.cost = round(usage["prompt_tokens"] * LLM_PRICE_IN + usage["completion_tokens"] * LLM_PRICE_OUT, 6)
            self.credits = round(self.credits - job.cost, 6)
        job.completed_at = time.time()
        job.done.set()

    async def _run_timed(self, job: LocalJob) -> None:
        """The vendor-like mode: modelled times, the render running meanwhile."""
        req = job.request
        job.seed = random_seed() if req.random_seed else int(req.seed)
        key = request_key(req.body(), job.seed)
        queue_s, factor = self.timing.draws(key)
        job.modelled_queue_s = queue_s
        render = asyncio.ensure_future(self._shared_render(job, key, shared=not req.random_seed))
        await asyncio.sleep(max(0.0, job.created_at + queue_s - time.time()))
        job.status, job.started_at = "PROCESSING", job.created_at + queue_s
        try:
            output, duration = await render
            job.output, job.duration_s = output, duration
            job.modelled_processing_s = self.timing.processing_s(req.resolution, duration, factor)
            await asyncio.sleep(max(0.0, job.started_at + job.modelled_processing_s - time.time()))
        except Exception as e:  # the job's FAILED error, like the vendor's
            job.status, job.error = "FAILED", str(e) or type(e).__name__
        if job.status != "FAILED" and job.injected_failure:
            job.status, job.error = "FAILED", INJECTED_FAILURE
        if job.status != "FAILED":
            job.status = "COMPLETED"
            job.cost = cost_of(job.duration_s or 0.0, req.resolution)
            self.credits = round(self.credits - job.cost, 6)
        job.completed_at = time.time()
        job.done.set()

    async def _shared_render(self, job: LocalJob, key: str, *, shared: bool) -> tuple[Path, float]:
        """Render under a worker slot; identical requests (same body and seed) share one render."""
        if shared and key in self._renders:
            return await asyncio.shield(self._renders[key])
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        if shared:
            self._renders[key] = future
        try:
            async with self._slots:
                await self._render(job)
            future.set_result((job.output, job.duration_s))
        except BaseException as e:
            future.set_exception(e)
            if shared:
                self._renders.pop(key, None)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        return job.output, job.duration_s

    async def _render(self, job: LocalJob) -> None:
        from avatarflow.local.render.video import render_video

        req = job.request
        image = await asyncio.to_thread(
            read_source, req.image, field="image", policy=FETCH_POLICY, max_bytes=IMAGE_MAX_BYTES
        )
        audio = (
            await asyncio.to_thread(
                read_source, req.audio, field="audio", policy=FETCH_POLICY, max_bytes=AUDIO_MAX_BYTES
            )
            if req.audio else None
        )
        if job.seed is None:
            job.seed = random_seed() if req.random_seed else int(req.seed)
        out = self.output_path(job.request_id)
        info = await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: render_video(req, image, audio, out, seed=job.seed)
        )
        job.output, job.duration_s = out, info.duration_s

    def metrics(self, job: LocalJob) -> dict[str, Any]:
        started = job.started_at or job.created_at
        return {
            "inference_time": round((job.completed_at or time.time()) - started, 3),
            "queue_time": round(started - job.created_at, 3),
            "total_time": round((job.completed_at or time.time()) - job.created_at, 3),
            "cost": job.cost,
            "remaining_credits": self.credits,
        }

    def summary(self) -> dict[str, Any]:
        return {
            rid: {"model": j.slug, "status": j.status, "created_at": j.created_at, "started_at": j.started_at,
                  "completed_at": j.completed_at, "seed": j.seed, "error": j.error,
                  "duration_s": j.duration_s, "modelled_queue_s": j.modelled_queue_s,
                  "modelled_processing_s": j.modelled_processing_s}
            for rid, j in self.jobs.items()
        }

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
