"""Reading a source's bytes under the source policy, within a byte cap: https through the network
guard, data: URIs, s3:// objects, local paths; and refusing up front what the policy never allows."""

from __future__ import annotations

import base64
import binascii
import urllib.parse
import urllib.request
from typing import Any

from avatarflow.media import netguard
from avatarflow.media.errors import MediaError, shorten, too_large
from avatarflow.media.local_paths import check_local, read_local
from avatarflow.media.policy import (
    SourcePolicy,
    display_source,
    refuse,
    s3_target,
    scheme_of,
)


def read_source(ref: Any, *, field: str, policy: SourcePolicy | None = None, s3_client: Any = None,
                max_bytes: int) -> bytes:
    """The bytes behind `ref` under `policy` (default: the safe default policy), at most
    `max_bytes`. MediaError naming `field` and the rule broken otherwise."""
    policy = policy or SourcePolicy()
    if not isinstance(ref, str) or not ref.strip():
        raise MediaError(field, "is empty", value=None if ref is None else shorten(ref), allowed=policy.allowed())
    ref = ref.strip()
    scheme = scheme_of(ref)
    if scheme in ("http", "https"):
        return netguard.fetch(ref, field=field, guard=policy.guard(), max_bytes=max_bytes)
    if scheme == "data":
        if not policy.allow_data:
            raise refuse(field, ref, "data: URIs are not allowed here", policy)
        return _read_data_uri(ref, field, max_bytes)
    if scheme == "s3":
        return _read_s3(ref, field, policy, s3_client, max_bytes)
    if scheme == "file":
        parsed = urllib.parse.urlsplit(ref)
        if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
            raise refuse(field, ref, "file:// URL must be file:///absolute/path", policy)
        return read_local(urllib.request.url2pathname(parsed.path), ref, field, policy, max_bytes)
    if scheme:
        raise refuse(field, ref, f"unsupported scheme '{scheme}:'", policy)
    return read_local(ref, ref, field, policy, max_bytes)


def _read_data_uri(ref: str, field: str, max_bytes: int) -> bytes:
    head, sep, payload = ref.partition(",")
    if not sep:
        raise MediaError(field, "is a malformed data: URI (no comma)", value=shorten(ref),
                         allowed="data:<type>;base64,<data>")
    if head.lower().endswith(";base64"):
        if len(payload) * 3 // 4 > max_bytes + 3:
            raise too_large(field, display_source(ref), len(payload) * 3 // 4, max_bytes)
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise MediaError(field, "data: URI has invalid base64", value=shorten(ref)) from None
    else:
        if len(payload) > 3 * max_bytes + 3:
            raise too_large(field, display_source(ref), None, max_bytes)
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise too_large(field, display_source(ref), len(data), max_bytes)
    return data


def _read_s3(ref: str, field: str, policy: SourcePolicy, s3_client: Any, max_bytes: int) -> bytes:
    from avatarflow import s3io

    bucket, key = s3_target(ref, field, policy)
    if s3_client is None:
        raise refuse(field, ref, "is an s3:// URI but no S3 client is configured", policy, allowed=None)
    try:
        return s3io.read_bytes(s3_client, bucket, key, max_bytes)
    except s3io.ObjectUnreadable:
        raise refuse(field, ref, "could not be read from S3 (no such object, or not readable)", policy,
                    allowed=None) from None
    except s3io.ObjectTooLarge as e:
        raise too_large(field, display_source(ref), e.size, max_bytes) from None
    except s3io.ArchiveError as e:
        raise MediaError(field, str(e), value=shorten(ref), transient=True) from None


def check_reference(ref: str, *, field: str, policy: SourcePolicy) -> None:
    """Refuse, without fetching, a reference the policy can never allow (scheme, s3 place,
    local path outside the roots, plain http). MediaError; None when it may be fetched."""
    scheme = scheme_of(ref)
    if scheme in ("http", "https"):
        if scheme == "http" and not policy.allow_http:
            host = urllib.parse.urlsplit(ref).hostname or ""
            port = urllib.parse.urlsplit(ref).port or 80
            if not policy.guard().exempt(host, port):
                raise refuse(field, ref, "plain http:// is not allowed (only https://)", policy)
        return
    if scheme == "data":
        if not policy.allow_data:
            raise refuse(field, ref, "data: URIs are not allowed here", policy)
        return
    if scheme == "s3":
        s3_target(ref, field, policy)
        return
    if scheme and scheme != "file":
        raise refuse(field, ref, f"unsupported scheme '{scheme}:'", policy)
    why = check_local(ref, field=field, policy=policy)
    if why:
        raise refuse(field, ref, why, policy)
