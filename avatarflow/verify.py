"""Read back what landed in S3: size, sha256 and a decode probe; a bad object is deleted.

An archive is trusted only after this check; the manifest is written after it passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import posixpath
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatarflow import s3io
from avatarflow.s3io import READ_CHUNK

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verification:
    size: int
    sha256: str
    probe: Any = field(default=None, repr=False)  # what probe(path) returned


def _delete_quietly(s3, bucket: str, key: str) -> None:
    try:
        s3.delete_object(Bucket=bucket, Key=key)
    except Exception as exc:
        log.warning("could not delete bad object s3://%s/%s: %s", bucket, key, exc)


def verify(
    s3,
    stored: s3io.StoredObject,
    *,
    probe: Callable[[Path], Any] | None = None,
    delete_bad: bool = True,
) -> Verification:
    """Check what landed: size (HEAD), sha256 (streaming GET, recomputed), and optionally
    ``probe(path)`` on a downloaded temporary copy (e.g. ``media.video.probe_video``).

    On any mismatch or probe failure the object is deleted (unless ``delete_bad=False``)
    and :class:`s3io.ArchiveError` is raised.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    where = stored.s3_uri

    def bad(reason: str, cause: BaseException | None = None) -> s3io.ArchiveError:
        if delete_bad:
            _delete_quietly(s3, stored.bucket, stored.key)
        err = s3io.ArchiveError(f"verification of {where} failed: {reason}")
        if cause is not None:
            err.__cause__ = cause
        return err

    try:
        head = s3.head_object(Bucket=stored.bucket, Key=stored.key)
    except ClientError as exc:
        if s3io.is_not_found(exc):
            raise s3io.ArchiveError(f"verification of {where} failed: object not found") from exc
        raise s3io.ArchiveError(f"verification of {where} failed: {exc}") from exc
    if int(head["ContentLength"]) != stored.size:
        raise bad(f"size {head['ContentLength']} != {stored.size}")
    meta_sha = (head.get("Metadata") or {}).get(s3io.SHA256_META)
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
                for chunk in body.iter_chunks(READ_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    if tmp_file is not None:
                        tmp_file.write(chunk)
            finally:
                body.close()
        except (ClientError, BotoCoreError) as exc:
            raise s3io.ArchiveError(f"verification of {where} failed: could not read it back: {exc}") from exc
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


async def verify_async(s3, stored: s3io.StoredObject, *, probe: Callable[[Path], Any] | None = None,
                       delete_bad: bool = True) -> Verification:
    """:func:`verify` in a worker thread."""
    return await asyncio.to_thread(verify, s3, stored, probe=probe, delete_bad=delete_bad)
