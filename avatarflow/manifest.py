"""An archived video: streamed home, verified, a thumbnail, and last the manifest that marks it
complete; the cache look-up reads the manifest back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avatarflow.client import DOWNLOAD_CHUNK
from avatarflow.contract import MODEL_SLUG
from avatarflow.duration import Prediction, timing_record
from avatarflow.ledger import COMPLETED
from avatarflow.media.policy import display_source
from avatarflow.media.video import VideoProbe, probe_video, thumbnail_jpeg
from avatarflow.store import Store

if TYPE_CHECKING:
    from avatarflow.brief import Script
    from avatarflow.pipeline import Context, Finished, Plan
    from avatarflow.spec import VideoRequest

PRESIGN_EXPIRES_S = 24 * 3600
THUMBNAIL_AT_S = 0.5


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Archived:
    s3_uri: str
    manifest_uri: str
    presigned_url: str
    thumbnail_url: str | None
    size: int
    sha256: str
    manifest: dict[str, Any]


def manifest_of(
    video: VideoRequest, plan: Plan, finished: Finished, stored: Any, probe: VideoProbe,
    *, timings: dict[str, float], backend: str, prediction: Prediction | None = None, script: Script | None = None,
) -> dict[str, Any]:
    """Everything about one archived video; no key, no presigned signature. `duration`: the
    time to COMPLETED predicted before submit against the actual (queue, processing, total, when
    it was noticed, how many polls)."""
    return {
        "model": MODEL_SLUG,
        "fingerprint": plan.fingerprint,
        "request_id": finished.request_id,
        "seed": plan.seed,
        "seed_random": plan.seed_random,
        "parameters": plan.request.model_dump(exclude={"image", "audio"}),
        "inputs": {
            "image": display_source(video.image), "image_sha256": plan.image_sha256,
            "audio": display_source(video.audio), "audio_sha256": plan.audio_sha256,
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
        "duration": timing_record(prediction, finished.metrics, finished.waited),
        "script": script.record() if script else None,
        "backend": backend,
        "archived_at": _now_iso(),
    }


async def archive_output(
    ctx: Context, video: VideoRequest, plan: Plan, finished: Finished, *, timings: dict[str, float]
) -> Archived:
    """Stream the output into S3, verify it (size, sha256, the video decodes), add a thumbnail
    and, last, the manifest that marks the archive complete."""
    store = ctx.store
    key = store.video_key(plan.fingerprint)
    metadata = {"fingerprint": plan.fingerprint, "request-id": finished.request_id,
                "seed": str(plan.seed), "model": MODEL_SLUG}
    async with ctx.client.stream_output(finished.output_url) as response:
        stored = await store.upload_stream(response.aiter_bytes(DOWNLOAD_CHUNK), key, "video/mp4", metadata)
    seen: dict[str, Any] = {}

    def probe(path: Path) -> VideoProbe:
        seen["probe"] = probe_video(path)
        seen["thumbnail"] = thumbnail_jpeg(path, at_s=THUMBNAIL_AT_S)
        return seen["probe"]

    await store.verify(stored, probe)
    thumb_key = store.thumbnail_key(plan.fingerprint)
    await store.put_bytes(thumb_key, seen["thumbnail"], "image/jpeg")
    manifest = manifest_of(video, plan, finished, stored, seen["probe"], timings=timings, backend=ctx.backend,
                           prediction=ctx.prediction, script=ctx.script)
    manifest["thumbnail_s3_uri"] = store.uri(thumb_key)
    await store.put_json(store.manifest_key(plan.fingerprint), manifest)
    await ctx.ledger.mark(plan.fingerprint, COMPLETED, request_id=finished.request_id, s3_uri=stored.s3_uri)
    return await from_cache(store, manifest, plan.fingerprint)


async def from_cache(store: Store, manifest: dict[str, Any], fingerprint: str) -> Archived:
    thumb = manifest.get("thumbnail_s3_uri")
    return Archived(
        s3_uri=manifest["video"]["s3_uri"],
        manifest_uri=store.uri(store.manifest_key(fingerprint)),
        presigned_url=await store.presign(store.video_key(fingerprint), PRESIGN_EXPIRES_S),
        thumbnail_url=await store.presign(store.thumbnail_key(fingerprint), PRESIGN_EXPIRES_S) if thumb else None,
        size=manifest["video"]["size"],
        sha256=manifest["video"]["sha256"],
        manifest=manifest,
    )


async def look_up(store: Store, plan: Plan) -> Archived | None:
    """The archived video of this plan (never for a random seed): manifest, size and checksum."""
    if plan.seed_random:
        return None
    manifest = await store.cached(plan.fingerprint)
    return None if manifest is None else await from_cache(store, manifest, plan.fingerprint)
