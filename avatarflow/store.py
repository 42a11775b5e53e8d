"""The archive bucket's layout: staged inputs, the job ledger, and archived videos with manifests.

Everything another machine needs to resume or reuse a job lives here, not in process memory.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.parse
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from avatarflow import s3io, verify

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
LOCK_POLL_S = 0.2


def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``"s3://bucket/some/key"`` -> ``("bucket", "some/key")``."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    key = parsed.path.lstrip("/")
    if parsed.query:
        key += "?" + parsed.query
    if parsed.fragment:
        key += "#" + parsed.fragment
    if not key:
        raise ValueError(f"s3:// URI without a key: {uri!r}")
    return parsed.netloc, key


@dataclass
class Store:
    """An S3 bucket (and key prefix) holding avatarflow's inputs, ledger and videos."""

    s3: Any = field(repr=False)
    bucket: str
    prefix: str = ""

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def ledger_key(self, fingerprint: str) -> str:
        return self.key("ledger", f"{fingerprint}.json")

    def video_key(self, fingerprint: str) -> str:
        return self.key("videos", fingerprint, "video.mp4")

    def manifest_key(self, fingerprint: str) -> str:
        return self.key("videos", fingerprint, "manifest.json")

    def thumbnail_key(self, fingerprint: str) -> str:
        return self.key("videos", fingerprint, "thumbnail.jpg")

    def input_key(self, sha256: str, ext: str) -> str:
        return self.key("inputs", f"{sha256}.{ext}")

    async def get_json(self, key: str) -> dict | None:
        return (await self.read_json(key))[0]

    async def put_json(self, key: str, obj: dict) -> None:
        """Write `key` whatever is there (for documents only this run writes: manifests, records)."""
        await asyncio.to_thread(_put_json, self.s3, self.bucket, key, obj, {})

    async def read_json(self, key: str) -> tuple[dict | None, str | None]:
        """The document at `key` and its ETag, for a later `replace_json`; (None, None) if absent."""
        return await asyncio.to_thread(_read_json, self.s3, self.bucket, key)

    async def create_json(self, key: str, obj: dict) -> str | None:
        """Create `key` only if absent (If-None-Match: *): its ETag, or None if it existed."""
        return await asyncio.to_thread(_put_json, self.s3, self.bucket, key, obj, {"IfNoneMatch": "*"})

    async def replace_json(self, key: str, obj: dict, etag: str) -> str | None:
        """Replace `key` only if it still has `etag` (If-Match): the new ETag, or None if it changed."""
        return await asyncio.to_thread(_put_json, self.s3, self.bucket, key, obj, {"IfMatch": f'"{etag}"'})

    async def delete_if_match(self, key: str, etag: str) -> bool:
        """Delete `key` only if it still has `etag`; False when it changed or is gone."""
        return await asyncio.to_thread(_delete_if_match, self.s3, self.bucket, key, etag)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.s3.delete_object, Bucket=self.bucket, Key=key)

    async def list_objects(self, prefix: str, *, after: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Objects whose key starts with `prefix`, in key order, after the key `after` (S3's
        StartAfter), at most `limit`: each {key, size, etag, last_modified (aware datetime)}."""
        return await asyncio.to_thread(_list_objects, self.s3, self.bucket, prefix, after, limit)

    async def read_head(self, key: str, n: int = 4096) -> tuple[bytes, dict[str, Any]] | None:
        """The first `n` bytes of `key` and what S3 says of it (one ranged GET): {size, etag,
        content_type, metadata, last_modified}; None if there is no such object."""
        return await asyncio.to_thread(_read_head, self.s3, self.bucket, key, n)

    async def presign(self, key: str, expires: int = 3600) -> str:
        return await asyncio.to_thread(s3io.presign, self.s3, self.bucket, key, expires)

    async def stage(self, data: bytes, sha256: str, ext: str, content_type: str) -> str:
        """Upload an input once (content-addressed) and return a URL the API can fetch."""
        return await asyncio.to_thread(
            s3io.stage_bytes, self.s3, self.bucket, self.input_key(sha256, ext), data, content_type
        )

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        await asyncio.to_thread(self.s3.put_object, Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    async def upload_stream(
        self, chunks: Any, key: str, content_type: str, metadata: dict[str, str]
    ) -> s3io.StoredObject:
        """Stream an async byte iterator to `key` (multipart, sha256 on the fly); nothing appears
        at `key` unless the whole stream landed."""
        return await s3io.archive_stream(
            chunks, s3=self.s3, bucket=self.bucket, key=key, content_type=content_type, metadata=metadata
        )

    async def verify(self, stored: s3io.StoredObject, probe: Any = None) -> verify.Verification:
        """Read back what landed (size, sha256, `probe(path)`); a bad object is deleted."""
        return await verify.verify_async(self.s3, stored, probe=probe)

    async def cached(self, fingerprint: str) -> dict | None:
        """The manifest of an archived video for this fingerprint, if the video is there too with
        the size and the sha256 the manifest records.

        The manifest is written last, after the video is verified: its presence marks a complete
        archive; the object's sha256 (set when it was verified) must still match it."""
        manifest = await self.get_json(self.manifest_key(fingerprint))
        if manifest is None:
            return None
        try:
            head = await asyncio.to_thread(
                self.s3.head_object, Bucket=self.bucket, Key=self.video_key(fingerprint)
            )
        except Exception:
            return None
        video = manifest.get("video", {})
        sha = (head.get("Metadata") or {}).get(s3io.SHA256_META)
        if head.get("ContentLength") != video.get("size") or not sha or sha != video.get("sha256"):
            return None
        return manifest


def _precondition_failed(exc: BaseException) -> bool:
    """HTTP 412, or 409 ConditionalRequestConflict when a concurrent conditional write won on AWS."""
    code, status = s3io.error_code(exc)
    return status in (409, 412) or code in {"PreconditionFailed", "ConditionalRequestConflict"}


def _read_json(s3: Any, bucket: str, key: str) -> tuple[dict | None, str | None]:
    from botocore.exceptions import ClientError

    try:
        resp = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if s3io.is_not_found(exc):
            return None, None
        raise
    body = resp["Body"]
    try:
        return json.loads(body.read()), str(resp.get("ETag", "")).strip('"')
    finally:
        body.close()


def _put_json(s3: Any, bucket: str, key: str, obj: Any, condition: dict[str, str]) -> str | None:
    """The new ETag, or None when `condition` (IfNoneMatch / IfMatch) failed."""
    from botocore.exceptions import ClientError

    body = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    try:
        resp = s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json; charset=utf-8",
                             **condition)
    except ClientError as exc:
        if condition and (_precondition_failed(exc) or ("IfMatch" in condition and s3io.is_not_found(exc))):
            return None  # lost the race; a replace of a deleted key gets 404 on AWS
        raise
    return str(resp.get("ETag", "")).strip('"')


def _delete_if_match(s3: Any, bucket: str, key: str, etag: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.delete_object(Bucket=bucket, Key=key, IfMatch=f'"{etag}"')
    except ClientError as exc:
        if _precondition_failed(exc) or s3io.is_not_found(exc):
            return False
        raise
    return True


def _list_objects(s3: Any, bucket: str, prefix: str, after: str | None, limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    if after:
        kw["StartAfter"] = after
    while len(out) < limit:
        page = s3.list_objects_v2(**kw, MaxKeys=min(1000, limit - len(out)))
        for o in page.get("Contents") or []:
            out.append({"key": o["Key"], "size": o.get("Size", 0), "etag": str(o.get("ETag", "")).strip('"'),
                        "last_modified": o.get("LastModified")})
        if not page.get("IsTruncated") or not page.get("NextContinuationToken"):
            break
        kw = {"Bucket": bucket, "Prefix": prefix, "ContinuationToken": page["NextContinuationToken"]}
    return out[:limit]


def _read_head(s3: Any, bucket: str, key: str, n: int) -> tuple[bytes, dict[str, Any]] | None:
    from botocore.exceptions import ClientError

    def info(resp: dict[str, Any], size: int) -> dict[str, Any]:
        return {"size": size, "etag": str(resp.get("ETag", "")).strip('"'),
                "content_type": resp.get("ContentType"), "metadata": dict(resp.get("Metadata") or {}),
                "last_modified": resp.get("LastModified")}

    try:
        resp = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{max(n, 1) - 1}")
    except ClientError as exc:
        if s3io.is_not_found(exc):
            return None
        if s3io.error_code(exc)[1] != 416:  # an empty object has no byte 0
            raise
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc2:
            if s3io.is_not_found(exc2):
                return None
            raise
        return b"", info(head, int(head.get("ContentLength") or 0))
    body = resp["Body"]
    try:
        data = body.read()
    finally:
        body.close()
    total = str(resp.get("ContentRange") or "").rpartition("/")[2]
    return data, info(resp, int(total) if total.isdigit() else int(resp.get("ContentLength") or len(data)))


@asynccontextmanager
async def exclusive(name: str) -> AsyncIterator[None]:
    """One holder at a time per name in this process, across threads and event loops."""
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(name, threading.Lock())
    while not lock.acquire(blocking=False):
        await asyncio.sleep(LOCK_POLL_S)
    try:
        yield
    finally:
        lock.release()
