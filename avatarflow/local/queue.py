"""The local API's jobs: QUEUED -> PROCESSING -> COMPLETED | FAILED on a pool of render workers,
records that expire after the retention, and a request history that does not."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from avatarflow import media
from avatarflow.contract import MODEL_SLUG, AvatarRequest, cost_of
from avatarflow.fingerprint import random_seed
from avatarflow.local.chaos import Chaos

MAX_IMAGE_BYTES = 30 * 1024 * 1024
MAX_AUDIO_BYTES = 50 * 1024 * 1024
INJECTED_FAILURE = "local: injected failure"


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds") if t else None


@dataclass
class LocalJob:
    request_id: str
    request: AvatarRequest
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
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def final(self) -> bool:
        return self.status in ("COMPLETED", "FAILED")

    def history_row(self, base_url: str) -> dict[str, Any]:
        state = self.status if self.final else "PENDING"
        latency = (self.completed_at - self.created_at) * 1000 if self.completed_at else None
        return {
            "request_id": self.request_id,
            "model_name": MODEL_SLUG,
            "model_status": state,
            "request_body": self.body,
            "generation_url": f"{base_url}/files/{self.request_id}.mp4" if self.status == "COMPLETED" else None,
            "credits_deduction": self.cost,
            "latency_ms": round(latency) if latency is not None else None,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.completed_at or self.started_at or self.created_at),
            "error": self.error,
        }


class JobQueue:
    """Jobs in memory, rendered by `workers` threads; outputs as files under `data_dir`."""

    def __init__(self, data_dir: Path, workers: int, chaos: Chaos, credits: float = 100.0):
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.chaos = chaos
        self.credits = credits
        self.jobs: dict[str, LocalJob] = {}
        self._slots = asyncio.Semaphore(workers)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="render")
        self._tasks: set[asyncio.Task] = set()

    def submit(self, request: AvatarRequest, body: dict[str, Any]) -> LocalJob:
        job = LocalJob(request_id=str(uuid.uuid4()), request=request, body=body, created_at=time.time(),
                       injected_failure=self.chaos.roll("fail_rate"))
        self.jobs[job.request_id] = job
        task = asyncio.get_running_loop().create_task(self._run(job))
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

    async def _render(self, job: LocalJob) -> None:
        from avatarflow.local.render import render_video

        req = job.request
        image = await asyncio.to_thread(media.read_source, req.image, field="image", max_bytes=MAX_IMAGE_BYTES)
        audio = (
            await asyncio.to_thread(media.read_source, req.audio, field="audio", max_bytes=MAX_AUDIO_BYTES)
            if req.audio else None
        )
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
            rid: {"status": j.status, "created_at": j.created_at, "started_at": j.started_at,
                  "completed_at": j.completed_at, "seed": j.seed, "error": j.error}
            for rid, j in self.jobs.items()
        }

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def new_key() -> str:
    return "afl-" + secrets.token_urlsafe(24)
