"""A portrait dropped in the bucket, read as a request: its version (key + ETag), its first bytes
checked like the pipeline's, its sidecar over its metadata, and the events it becomes, whose ids
and default seed derive from the version so that a second emission is still one job."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from avatarflow.contract import IMAGE_MAX_BYTES
from avatarflow.media.errors import MediaError
from avatarflow.media.portrait import IMAGE_ALLOWED, IMAGE_FORMATS
from avatarflow.media.sniff import checked_kind
from avatarflow.store import Store

SIDECAR_SUFFIX = ".json"
HEAD_BYTES = 4096
PORTRAIT_REJECTED = "avatarflow.portrait.rejected"
_EVENT_NS = uuid.UUID("5b0c3f5e-3f3b-4a52-9a57-6f0d0f4a1d1e")


def sidecar_key(key: str) -> str:
    """``incoming/ada.jpg`` -> ``incoming/ada.json``."""
    head, _, name = key.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return f"{head}/{stem}{SIDECAR_SUFFIX}" if head else f"{stem}{SIDECAR_SUFFIX}"


def version_id(bucket: str, key: str, etag: str) -> str:
    """One object version: sha256 of ``s3://bucket/key`` and its ETag."""
    return hashlib.sha256(f"s3://{bucket}/{key}\n{etag}".encode()).hexdigest()


def derived_seed(version: str) -> int:
    """The seed of an upload that names none: reproducible, so a second emission is a cache hit."""
    return int(version[:12], 16) % 1_000_000_000


def event_id(version: str) -> uuid.UUID:
    return uuid.uuid5(_EVENT_NS, version)

def check_image_head(data: bytes, size: int, uri: str) -> None:
    """The pipeline's first checks on a portrait (empty, size, magic bytes) on its first bytes:
    MediaError naming the object when it cannot be a portrait."""
    def fail(problem: str, allowed: str) -> MediaError:
        return MediaError("image", problem, value=uri, allowed=allowed)

    checked_kind(data, fail, IMAGE_MAX_BYTES, IMAGE_FORMATS, "image", IMAGE_ALLOWED, size=size)


def request_fields(metadata: dict[str, str], sidecar: dict[str, Any] | None) -> dict[str, Any]:
    """The request's fields: the object's metadata (x-amz-meta-<field>, ``-`` read as ``_``)
    for the contract's field names, then the sidecar's over them; never `image` (the object)."""
    from avatarflow.spec import VideoRequest

    names = set(VideoRequest.model_fields) - {"image"}
    fields: dict[str, Any] = {}
    for k, v in (metadata or {}).items():
        name = k.lower().replace("-", "_")
        if name in names:
            fields[name] = v
    for k, v in (sidecar or {}).items():
        if k != "image":
            fields[k] = v
    return fields


def portrait_uploaded_event(s3_uri: str, request: dict[str, Any], version: str) -> Any:
    """The `avatarflow.portrait.uploaded` event of ``avatarflow emit`` (checked against the
    contract), with an id and, when none is given, a seed derived from the object version."""
    from avatarflow.events import portrait_uploaded_event as event_of

    fields = dict(request)
    if fields.get("seed") in (None, "", -1, "-1"):
        fields["seed"] = derived_seed(version)
    event = event_of(s3_uri, fields)
    return event.model_copy(update={"id": event_id(version)})


def rejected_event(uri: str, error: str, version: str) -> Any:
    from prefect.events import Event

    return Event(event=PORTRAIT_REJECTED, resource={"prefect.resource.id": uri, "avatarflow.s3_uri": uri},
                 payload={"error": error}, id=uuid.uuid5(_EVENT_NS, "rejected\n" + version))


async def read_upload(store: Store, key: str) -> tuple[dict[str, Any], str | None]:
    """(request fields, None) for an object that can be a portrait request, else ({}, the error
    the pipeline would give, naming the whole object)."""
    uri = store.uri(key)
    head = await store.read_head(key, HEAD_BYTES)
    if head is None:
        return {}, f"image={uri!r}: the object is gone"
    data, info = head
    try:
        check_image_head(data, info["size"], uri)
    except MediaError as e:
        return {}, f"{e.field}={uri!r}: {e.problem}" + (f"; allowed: {e.allowed}" if e.allowed else "")
    sidecar: dict[str, Any] | None = None
    side = sidecar_key(key)
    try:
        sidecar, _ = await store.read_json(side)
    except (ValueError, UnicodeDecodeError) as e:
        return {}, f"sidecar {store.uri(side)}: not valid JSON ({e})"
    if sidecar is not None and not isinstance(sidecar, dict):
        return {}, f"sidecar {store.uri(side)}: not a JSON object; allowed: an object of request fields"
    return request_fields(info.get("metadata") or {}, sidecar), None
