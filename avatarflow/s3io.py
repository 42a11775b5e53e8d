"""Streaming archive into S3: multipart upload from an async byte stream, checksums,
capped reads and presigned URLs (the read-back check is `avatarflow.verify`).

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
import logging
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from avatarflow.errors import AvatarflowError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000
SHA256_META = "sha256"
READ_CHUNK = 1 * MiB


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


def error_code(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_not_found(exc: BaseException) -> bool:
    code, status = error_code(exc)
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
# capped reads, staging, presigned URLs


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
        code, status = error_code(exc)
        if status in (403, 404) or code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket", "AccessDenied", "403"):
            raise ObjectUnreadable("no such object, or not readable") from None
        raise ArchiveError("could not be read from S3") from None
    length, body = obj.get("ContentLength"), obj["Body"]
    try:
        if isinstance(length, int) and length > max_bytes:
            raise ObjectTooLarge(length, max_bytes)
        buf = bytearray()
        while chunk := body.read(READ_CHUNK):
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
