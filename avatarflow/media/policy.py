"""The source policy: what an untrusted `image`, `audio` or `calendar` reference may name, and
which policy is in force (the operator's, widened only by the CLI on one's own machine)."""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from avatarflow.media import netguard
from avatarflow.media.errors import MediaError, shorten

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")


@dataclass(frozen=True)
class SourcePolicy:
    """What a source may name; the defaults are the safe ones.

    Flow parameters come from the Prefect UI, the API and events, so by default a source may be:

    - an ``https://`` URL of a public host, fetched through the network guard (avatarflow.media.netguard);
    - an ``s3://`` URI inside the archive bucket (under the archive's prefix), or inside a bucket or
      prefix the operator allowed (``s3_allow``);
    - a ``data:`` URI within the size cap.

    Local paths (and ``file://`` URLs, the same thing) are read only under the operator's
    ``local_roots`` (default: none): regular files only (no FIFO, device, directory or hard-linked
    file; procfs/sysfs pseudo-files read as empty), walked
    from the root's directory descriptor component by component with O_NOFOLLOW, so no symlink
    and no ``..`` leads out of the root. Plain ``http://`` only with ``allow_http`` (or to an
    ``allow_hosts`` host). The operator sets the policy through avatarflow.config (the
    AVATARFLOW_SOURCES_* variables, or a SourcePolicy block named by AVATARFLOW_SOURCES_BLOCK);
    no flow parameter widens it. The CLI on one's own machine (`avatarflow run`, `avatarflow
    batch`) widens it to local paths for its own in-process run, with :func:`cli_local_roots`.

    Every refusal is a MediaError naming the field and the rule broken, never whether a file
    exists, what an internal server answered, or OS error text.
    """

    local_roots: tuple[str, ...] = ()
    s3_allow: tuple[str, ...] = ()           # 'bucket' or 'bucket/prefix'
    archive: tuple[str, str] | None = None   # (bucket, prefix) of the archive
    allow_data: bool = True
    allow_http: bool = False
    allow_hosts: tuple[str, ...] = ()
    service_hosts: tuple[str, ...] = ()
    max_redirects: int = 5
    fetch_timeout_s: float = 30.0

    @classmethod
    def from_fields(cls, fields: Any, *, archive: tuple[str, str] | None = None,
                    service_hosts: tuple[str, ...] | list[str] = ()) -> SourcePolicy:
        """From avatarflow.config.SourceFields (the environment's or a block's)."""
        return cls(
            local_roots=tuple(fields.local_roots), s3_allow=tuple(fields.s3_allow), archive=archive,
            allow_data=fields.allow_data, allow_http=fields.allow_http,
            allow_hosts=tuple(fields.allow_hosts), service_hosts=tuple(service_hosts),
            max_redirects=fields.max_redirects, fetch_timeout_s=fields.fetch_timeout_s,
        )

    def with_local_roots(self, *roots: str | os.PathLike) -> SourcePolicy:
        more = tuple(os.path.abspath(os.fspath(r)) for r in roots)
        return replace(self, local_roots=tuple(dict.fromkeys(self.local_roots + more)))

    def guard(self) -> netguard.Guard:
        return netguard.Guard(allow_http=self.allow_http, allow_hosts=self.allow_hosts,
                              service_hosts=self.service_hosts, max_redirects=self.max_redirects,
                              timeout_s=self.fetch_timeout_s)

    def allowed(self) -> str:
        """What this policy accepts, in words (for error messages)."""
        parts = ["an https:// URL of a public host"]
        if self.allow_http:
            parts.append("an http:// URL of a public host")
        if self.archive or self.s3_allow:
            parts.append("an s3:// URI in the archive bucket or an allowed bucket/prefix")
        if self.allow_data:
            parts.append("a data: URI")
        if self.local_roots:
            parts.append("a path (or file:// URL) of a regular file under the allowed local roots")
        return ", ".join(parts[:-1]) + (" or " if len(parts) > 1 else "") + parts[-1]


# ---- the CLI's widening (its own in-process run only) -------------------------------------------
_CLI_ROOTS: list[tuple[str, ...]] = []
_CLI_LOCK = threading.Lock()


@contextlib.contextmanager
def cli_local_roots(*roots: str | os.PathLike) -> Iterator[None]:
    """While inside, local paths under `roots` are allowed in this process. For the CLI on one's
    own machine (`avatarflow run`, `avatarflow batch`), around its in-process flow run; never
    reachable from a flow parameter."""
    entry = tuple(os.path.abspath(os.fspath(r)) for r in roots)
    with _CLI_LOCK:
        _CLI_ROOTS.append(entry)
    try:
        yield
    finally:
        with _CLI_LOCK:
            _CLI_ROOTS.remove(entry)


def widened_roots() -> tuple[str, ...]:
    """The local roots the CLI has widened the policy to, while its run lasts."""
    with _CLI_LOCK:
        return tuple(r for entry in _CLI_ROOTS for r in entry)


# ---- resolving the policy ------------------------------------------------------------------------
async def resolve_policy(store: Any = None) -> SourcePolicy:
    """The policy in force: the operator's (a SourcePolicy block named by AVATARFLOW_SOURCES_BLOCK,
    else the AVATARFLOW_SOURCES_* variables), the archive's bucket/prefix from `store`, the local
    services on loopback, and the CLI's roots while it runs in this process."""
    from avatarflow import config

    fields = await config.source_fields()
    return _assemble(fields, store)


def policy_from_env(store: Any = None) -> SourcePolicy:
    """Like resolve_policy, for sync callers, from the environment only (no block)."""
    from avatarflow import config

    settings = config.source_settings()
    return _assemble(config.SourceFields.model_validate(settings.model_dump(exclude={"block"})), store)


def _assemble(fields: Any, store: Any) -> SourcePolicy:
    from avatarflow import config

    archive = None
    endpoint = None
    if store is not None:
        archive = (store.bucket, store.prefix or "")
        endpoint = getattr(getattr(getattr(store, "s3", None), "meta", None), "endpoint_url", None)
    policy = SourcePolicy.from_fields(fields, archive=archive,
                                      service_hosts=tuple(config.local_service_hosts(endpoint)))
    extra = widened_roots()
    return policy.with_local_roots(*extra) if extra else policy


# ---- naming and refusing a source -----------------------------------------------------------
def scheme_of(ref: str) -> str:
    """The lower-case scheme of `ref` ('' for a path; 'C:' is a drive letter, not a scheme)."""
    m = _SCHEME.match(ref)
    return m.group(1).lower() if m and len(m.group(1)) > 1 else ""


def display_source(ref: Any) -> Any:
    """A source as it may be recorded (manifests, events, logs, errors): a URL without its query
    string or fragment (a presigned URL's signature), a data: URI shortened to its header."""
    if not isinstance(ref, str):
        return ref
    return netguard.display_url(ref) if scheme_of(ref) in ("http", "https") else shorten(ref)


def refuse(field: str, ref: str, problem: str, policy: SourcePolicy, allowed: str | None = "") -> MediaError:
    """The MediaError for `ref`; `allowed` defaults to what `policy` accepts."""
    return MediaError(field, problem, value=display_source(ref),
                      allowed=policy.allowed() if allowed == "" else allowed)


# ---- s3:// ---------------------------------------------------------------------------------------
def s3_allowed(bucket: str, key: str, policy: SourcePolicy) -> bool:
    """True when s3://bucket/key is in the archive (under its prefix) or an allowed bucket/prefix."""
    segments = key.split("/")
    if any(s in ("", ".", "..") for s in segments) or "\\" in key or "?" in key or "#" in key:
        return False
    places = [f"{policy.archive[0]}/{policy.archive[1].strip('/')}".rstrip("/")] if policy.archive else []
    places += list(policy.s3_allow)
    for place in places:
        b, _, prefix = place.partition("/")
        if b != bucket:
            continue
        prefix = prefix.strip("/")
        if not prefix or key.startswith(prefix + "/"):
            return True
    return False


def s3_target(ref: str, field: str, policy: SourcePolicy) -> tuple[str, str]:
    """The (bucket, key) of an s3:// source the policy allows; MediaError otherwise."""
    from avatarflow.store import parse_s3_uri

    try:
        bucket, key = parse_s3_uri(ref)
    except ValueError:
        raise refuse(field, ref, "is not a full S3 URI", policy, allowed="s3://bucket/key") from None
    if not s3_allowed(bucket, key, policy):
        raise refuse(field, ref, "s3:// is allowed only inside the archive bucket or an allowed bucket/prefix",
                     policy)
    return bucket, key
