"""Streaming archive into S3: multipart upload from an async byte stream, checksums,
verification, JSON documents (manifest, ledger) and presigned URLs.

A pure library: no Prefect. Every function takes a boto3 S3 client (see :func:`s3_client`);
blocking boto3 calls of the async functions run in a worker thread (``asyncio.to_thread``).
No function logs credentials; keys never carry secrets.

Atomic appearance: a large object is uploaded with a multipart upload to its final key and
appears only at ``CompleteMultipartUpload``; any failure aborts the upload, so a reader never
sees a partial object. S3 fixes an object's metadata when the upload is *created*, before the
stream's sha256 is known, so after completion the ``sha256`` metadata entry is added by an
in-place ``CopyObject`` (``MetadataDirective=REPLACE``): the data never changes, and the
sha256 is also in the returned :class:`StoredObject` (and the manifest the pipeline writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import posixpath
import tempfile
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatarflow.errors import AvatarflowError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000
SHA256_META = "sha256"
_READ_CHUNK = 1 * MiB


class ArchiveError(AvatarflowError, RuntimeError):
    """An archive operation failed or what landed in S3 is not what was sent."""


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    key: str
    size: int
    sha256: str
    etag: str
    s3_uri: str
    content_type: str = "application/octet-stream"
    parts: int = 0  # 0: single PUT; otherwise the multipart part count


@dataclass(frozen=True)
class Verification:
    size: int
    sha256: str
    probe: Any = field(default=None, repr=False)  # what probe(path) returned


# --------------------------------------------------------------------------------------------
# client and URIs


def s3_client(
    endpoint_url: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str | None = "us-east-1",
    *,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    max_attempts: int = 5,
    max_pool_connections: int = 20,
):
    """A boto3 S3 client: path-style addressing, SigV4, standard retries, timeouts.

    ``endpoint_url=None`` and no keys: AWS with boto3's default credential chain.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path"},
        signature_version="s3v4",
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
        tcp_keepalive=True,
    )
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=config,
    )


def manifest_key(video_key: str) -> str:
    """The manifest beside a video: ``videos/<fp>/video.mp4`` -> ``videos/<fp>/manifest.json``."""
    directory = posixpath.dirname(video_key)
    return posixpath.join(directory, "manifest.json") if directory else "manifest.json"


def _error_code(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_not_found(exc: BaseException) -> bool:
    code, status = _error_code(exc)
    return status == 404 or code in {"NoSuchKey", "404", "NotFound"}


def _clean_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """S3 user metadata: lower-case keys, string values; non-ASCII values percent-encoded
    (HTTP headers carry ASCII only)."""
    out: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        key = str(k).strip().lower()
        if not key:
            continue
        value = "" if v is None else str(v)
        if not value.isascii() or any(c in value for c in "\r\n"):
            value = urllib.parse.quote(value, safe=" !#$&'()*+,-./:;=?@[]^_`{|}~")
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# streaming archive


async def _aiter_bytes(chunks: AsyncIterable[bytes] | AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        if chunk:
            yield bytes(chunk) if not isinstance(chunk, bytes) else chunk


async def archive_stream(
    chunks: AsyncIterable[bytes],
    *,
    s3,
    bucket: str,
    key: str,
    content_type: str = "video/mp4",
    metadata: Mapping[str, Any] | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    expected_size: int | None = None,
) -> StoredObject:
    """Upload an async byte stream to ``s3://bucket/key`` with constant memory.

    At most one part is being filled while at most one other is in flight (about
    ``2 * part_size`` of buffers). The sha256 is computed on the fly. A body shorter than
    ``part_size`` goes up as one ``PutObject`` (with its sha256 in the metadata). Any error or
    cancellation aborts the multipart upload: nothing appears at ``key``.
    ``expected_size``: if given, a stream of another length is an error (object not created).
    """
    if part_size < MIN_PART_SIZE:
        raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3 minimum)")
    meta = _clean_metadata(metadata)
    meta.pop(SHA256_META, None)
    digest = hashlib.sha256()
    size = 0
    buf = bytearray()
    upload_id: str | None = None
    parts: list[dict[str, Any]] = []
    in_flight: asyncio.Task | None = None

    def _upload_part(number: int, body: bytes) -> dict[str, Any]:
        resp = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": resp["ETag"]}

    async def _send(body: bytes) -> None:
        nonlocal upload_id, in_flight
        if upload_id is None:
            resp = await asyncio.to_thread(
                s3.create_multipart_upload, Bucket=bucket, Key=key, ContentType=content_type, Metadata=meta
            )
            upload_id = resp["UploadId"]
        if in_flight is not None:  # keep at most one part in flight
            parts.append(await in_flight)
            in_flight = None
        number = len(parts) + 1
        if number > MAX_PARTS:
            raise ArchiveError(f"stream needs more than {MAX_PARTS} parts: raise part_size")
        in_flight = asyncio.ensure_future(asyncio.to_thread(_upload_part, number, body))

    try:
        async for chunk in _aiter_bytes(chunks):
            digest.update(chunk)
            size += len(chunk)
            buf += chunk
            while len(buf) >= part_size:
                with memoryview(buf) as view:
                    body = bytes(view[:part_size])  # one copy, no intermediate bytearray
                del buf[:part_size]
                await _send(body)
        if expected_size is not None and size != expected_size:
            raise ArchiveError(f"stream ended after {size} bytes, expected {expected_size}")
        sha256 = digest.hexdigest()

        if upload_id is None:  # small body: one PutObject, complete with its sha256
            body = bytes(buf)
            buf = bytearray()
            resp = await asyncio.to_thread(
                s3.put_object, Bucket=bucket, Key=key, Body=body, ContentType=content_type,
                Metadata={**meta, SHA256_META: sha256},
            )
            return StoredObject(bucket, key, size, sha256, resp["ETag"].strip('"'), f"s3://{bucket}/{key}",
                                content_type, 0)

        if buf:
            body = bytes(buf)
            buf = bytearray()
            await _send(body)
        if in_flight is not None:
            parts.append(await in_flight)
            in_flight = None
        resp = await asyncio.to_thread(
            s3.complete_multipart_upload, Bucket=bucket, Key=key, UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )
        upload_id_done = upload_id
        upload_id = None  # completed: nothing to abort from here on
        etag = str(resp.get("ETag", "")).strip('"')
        log.debug("multipart upload %s of s3://%s/%s completed (%d parts)", upload_id_done, bucket, key, len(parts))
    except BaseException as exc:
        if in_flight is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(in_flight)
        if upload_id is not None:
            await _abort(s3, bucket, key, upload_id)
        if isinstance(exc, (ArchiveError, asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
            raise
        if isinstance(exc, Exception) and getattr(exc, "response", None) is not None:
            raise ArchiveError(f"upload of s3://{bucket}/{key} failed: {exc}") from exc
        raise

    # the data is complete at the final key; record its sha256 in its metadata in place
    try:
        copy = await asyncio.to_thread(
            s3.copy_object, Bucket=bucket, Key=key,
            CopySource={"Bucket": bucket, "Key": key},
            MetadataDirective="REPLACE", ContentType=content_type,
            Metadata={**meta, SHA256_META: sha256},
        )
        etag = str(copy.get("CopyObjectResult", {}).get("ETag", etag)).strip('"') or etag
    except Exception as exc:  # e.g. objects over 5 GiB cannot be copied in one request on AWS
        log.warning("could not add sha256 metadata to s3://%s/%s: %s", bucket, key, exc)
    return StoredObject(bucket, key, size, sha256, etag, f"s3://{bucket}/{key}", content_type, len(parts))


async def _abort(s3, bucket: str, key: str, upload_id: str) -> None:
    def abort() -> None:
        try:
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            log.warning("could not abort multipart upload %s of s3://%s/%s: %s", upload_id, bucket, key, exc)

    task = asyncio.ensure_future(asyncio.to_thread(abort))
    with contextlib.suppress(BaseException):
        await asyncio.shield(task)
    if not task.done():  # cancelled while aborting: let the thread finish anyway
        with contextlib.suppress(BaseException):
            await task


async def archive_url(
    url: str,
    *,
    s3,
    bucket: str,
    key: str,
    client=None,
    headers: Mapping[str, str] | None = None,
    content_type: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    chunk_size: int = 256 * 1024,
) -> StoredObject:
    """Stream ``url`` (httpx, no whole-file buffering) into S3 via :func:`archive_stream`.

    A non-2xx answer raises ``httpx.HTTPStatusError``; a body shorter or longer than its
    ``Content-Length`` raises :class:`ArchiveError`; neither leaves an object.
    """
    import httpx

    own = client is None
    if own:
        client = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=True)
    try:
        async with client.stream("GET", url, headers=dict(headers or {})) as resp:
            resp.raise_for_status()
            length = resp.headers.get("content-length")
            expected = int(length) if length and length.isdigit() and "content-encoding" not in resp.headers else None
            ctype = content_type or resp.headers.get("content-type", "").split(";")[0].strip() or "video/mp4"
            return await archive_stream(
                resp.aiter_bytes(chunk_size), s3=s3, bucket=bucket, key=key, content_type=ctype,
                metadata=metadata, part_size=part_size, expected_size=expected,
            )
    finally:
        if own:
            await client.aclose()


# --------------------------------------------------------------------------------------------
# verification


def _delete_quietly(s3, bucket: str, key: str) -> None:
    try:
        s3.delete_object(Bucket=bucket, Key=key)
    except Exception as exc:
        log.warning("could not delete bad object s3://%s/%s: %s", bucket, key, exc)


def verify(
    s3,
    stored: StoredObject,
    *,
    probe: Callable[[Path], Any] | None = None,
    delete_bad: bool = True,
) -> Verification:
    """Check what landed: size (HEAD), sha256 (streaming GET, recomputed), and optionally
    ``probe(path)`` on a downloaded temporary copy (e.g. ``media.probe_video``).

    On any mismatch or probe failure the object is deleted (unless ``delete_bad=False``)
    and :class:`ArchiveError` is raised.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    where = stored.s3_uri

    def bad(reason: str, cause: BaseException | None = None) -> ArchiveError:
        if delete_bad:
            _delete_quietly(s3, stored.bucket, stored.key)
        err = ArchiveError(f"verification of {where} failed: {reason}")
        if cause is not None:
            err.__cause__ = cause
        return err

    try:
        head = s3.head_object(Bucket=stored.bucket, Key=stored.key)
    except ClientError as exc:
        if _is_not_found(exc):
            raise ArchiveError(f"verification of {where} failed: object not found") from exc
        raise ArchiveError(f"verification of {where} failed: {exc}") from exc
    if int(head["ContentLength"]) != stored.size:
        raise bad(f"size {head['ContentLength']} != {stored.size}")
    meta_sha = (head.get("Metadata") or {}).get(SHA256_META)
    if meta_sha and meta_sha != stored.sha256:
        raise bad(f"metadata sha256 {meta_sha} != {stored.sha256}")

    digest = hashlib.sha256()
    size = 0
    tmp_path: Path | None = None
    tmp_file = None
    try:
        if probe is not None:
            suffix = posixpath.splitext(stored.key)[1] or ".bin"
            fd, name = tempfile.mkstemp(prefix="avatarflow-verify-", suffix=suffix)
            tmp_path = Path(name)
            tmp_file = os.fdopen(fd, "wb")
        try:
            body = s3.get_object(Bucket=stored.bucket, Key=stored.key)["Body"]
            try:
                for chunk in body.iter_chunks(_READ_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    if tmp_file is not None:
                        tmp_file.write(chunk)
            finally:
                body.close()
        except (ClientError, BotoCoreError) as exc:
            raise ArchiveError(f"verification of {where} failed: could not read it back: {exc}") from exc
        if tmp_file is not None:
            tmp_file.close()
            tmp_file = None
        if size != stored.size:
            raise bad(f"read back {size} bytes, expected {stored.size}")
        sha = digest.hexdigest()
        if sha != stored.sha256:
            raise bad(f"sha256 {sha} != {stored.sha256}")
        result = None
        if probe is not None and tmp_path is not None:
            try:
                result = probe(tmp_path)
            except Exception as exc:
                raise bad(f"probe failed: {exc}", exc) from exc
        return Verification(size=size, sha256=sha, probe=result)
    finally:
        if tmp_file is not None:
            tmp_file.close()
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink()


async def verify_async(s3, stored: StoredObject, *, probe: Callable[[Path], Any] | None = None,
                       delete_bad: bool = True) -> Verification:
    """:func:`verify` in a worker thread."""
    return await asyncio.to_thread(verify, s3, stored, probe=probe, delete_bad=delete_bad)


# --------------------------------------------------------------------------------------------
# JSON documents, staging, presigned URLs


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")


def put_json(s3, bucket: str, key: str, obj: Any) -> str:
    """Write ``obj`` as JSON at ``key`` (overwrites); returns the ETag."""
    resp = s3.put_object(Bucket=bucket, Key=key, Body=_json_bytes(obj),
                         ContentType="application/json; charset=utf-8")
    return str(resp.get("ETag", "")).strip('"')


def get_json(s3, bucket: str, key: str) -> dict | None:
    """The JSON document at ``key``, or None if there is none."""
    from botocore.exceptions import ClientError

    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as exc:
        if _is_not_found(exc):
            return None
        raise
    try:
        return json.loads(body.read())
    finally:
        body.close()


def _precondition_failed(exc: BaseException) -> bool:
    code, status = _error_code(exc)
    return status in (409, 412) or code in {"PreconditionFailed", "ConditionalRequestConflict"}


def get_json_versioned(s3, bucket: str, key: str) -> tuple[dict | None, str | None]:
    """The JSON document at ``key`` and its ETag, or ``(None, None)`` if there is none."""
    from botocore.exceptions import ClientError

    try:
        resp = s3.get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _is_not_found(exc):
            return None, None
        raise
    body = resp["Body"]
    try:
        return json.loads(body.read()), str(resp.get("ETag", "")).strip('"')
    finally:
        body.close()


def put_json_conditional(s3, bucket: str, key: str, obj: Any, *, if_match: str | None = None) -> str | None:
    """Write ``obj`` only if ``key`` is absent (``if_match=None``: ``If-None-Match: *``) or still
    has the ETag ``if_match``. The new ETag, or None when the condition failed (HTTP 412, or
    409 ConditionalRequestConflict when a concurrent conditional write won on AWS)."""
    from botocore.exceptions import ClientError

    condition = {"IfMatch": f'"{if_match}"'} if if_match else {"IfNoneMatch": "*"}
    try:
        resp = s3.put_object(Bucket=bucket, Key=key, Body=_json_bytes(obj),
                             ContentType="application/json; charset=utf-8", **condition)
    except ClientError as exc:
        if _precondition_failed(exc):
            return None
        raise
    return str(resp.get("ETag", "")).strip('"')


def delete_if_match(s3, bucket: str, key: str, etag: str) -> bool:
    """Delete ``key`` only if it still has the ETag ``etag``; False when it changed."""
    from botocore.exceptions import ClientError

    try:
        s3.delete_object(Bucket=bucket, Key=key, IfMatch=f'"{etag}"')
    except ClientError as exc:
        if _precondition_failed(exc):
            return False
        if _is_not_found(exc):
            return False
        raise
    return True


class ObjectUnreadable(ArchiveError):
    """No such object or bucket, or not readable with these credentials."""


class ObjectTooLarge(ArchiveError):
    def __init__(self, size: int | None, max_bytes: int):
        super().__init__(f"object larger than {max_bytes} bytes")
        self.size, self.max_bytes = size, max_bytes


def read_bytes(s3, bucket: str, key: str, max_bytes: int) -> bytes:
    """The object's bytes, read in chunks and refused past ``max_bytes`` (by its length, or while
    reading). ObjectUnreadable when it cannot be read (no server text), ObjectTooLarge, or
    ArchiveError for a broken connection (worth a retry)."""
    try:
        obj = s3.get_object(Bucket=bucket, Key=key)
    except Exception as exc:  # botocore ClientError and friends
        code, status = _error_code(exc)
        if status in (403, 404) or code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket", "AccessDenied", "403"):
            raise ObjectUnreadable("no such object, or not readable") from None
        raise ArchiveError("could not be read from S3") from None
    length, body = obj.get("ContentLength"), obj["Body"]
    try:
        if isinstance(length, int) and length > max_bytes:
            raise ObjectTooLarge(length, max_bytes)
        buf = bytearray()
        while chunk := body.read(_READ_CHUNK):
            buf += chunk
            if len(buf) > max_bytes:
                raise ObjectTooLarge(None, max_bytes)
        return bytes(buf)
    except ArchiveError:
        raise
    except Exception:
        raise ArchiveError("could not be read from S3 (connection broken)") from None
    finally:
        close = getattr(body, "close", None)
        if close:
            close()


def presign(s3, bucket: str, key: str, expires: int = 3600) -> str:
    """A presigned GET URL (no credentials needed by whoever holds it) valid ``expires`` s."""
    return s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(expires)
    )


def stage_bytes(s3, bucket: str, key: str, data: bytes, content_type: str,
                *, expires: int = 3600, metadata: Mapping[str, Any] | None = None) -> str:
    """Upload input media (portrait, audio) and return a presigned GET URL for the API."""
    s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type,
                  Metadata={**_clean_metadata(metadata), SHA256_META: hashlib.sha256(data).hexdigest()})
    return presign(s3, bucket, key, expires)


def object_exists(s3, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if _is_not_found(exc):
            return False
        raise
