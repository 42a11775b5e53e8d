"""The source policy: what an untrusted `image`, `audio` or `calendar` may name, in one place.

Flow parameters come from the Prefect UI, the API and events, so by default a source may be:

- an ``https://`` URL of a public host, fetched through the network guard (avatarflow.netguard);
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

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import stat
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from typing import Any, Iterator

from avatarflow import netguard
from avatarflow.media.errors import MediaError, human_size as _size, shorten as _short

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
SCHEMES = ("https", "http", "s3", "data", "file")


@dataclass(frozen=True)
class SourcePolicy:
    """What a source may name (see the module's doc). The defaults are the safe ones."""

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


def cli_roots() -> tuple[str, ...]:
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
    extra = cli_roots()
    return policy.with_local_roots(*extra) if extra else policy


# ---- reading ------------------------------------------------------------------------------------------
def scheme_of(ref: str) -> str:
    """The lower-case scheme of `ref` ('' for a path; 'C:' is a drive letter, not a scheme)."""
    m = _SCHEME.match(ref)
    return m.group(1).lower() if m and len(m.group(1)) > 1 else ""


def _fail(field: str, ref: str, problem: str, policy: SourcePolicy, allowed: str | None = "") -> MediaError:
    return MediaError(field, problem, value=_shown(ref), allowed=policy.allowed() if allowed == "" else allowed)


def _shown(ref: str) -> str:
    if scheme_of(ref) in ("http", "https"):
        return netguard._display(ref)
    return _short(ref)


def display_source(ref: Any) -> Any:
    """A source as it may be recorded (manifests, events, logs, errors): a URL without its query
    string or fragment (a presigned URL's signature), a data: URI shortened to its header."""
    if not isinstance(ref, str):
        return ref
    return _shown(ref)


def read_source(ref: Any, *, field: str, policy: SourcePolicy | None = None, s3_client: Any = None,
                max_bytes: int) -> bytes:
    """The bytes behind `ref` under `policy` (default: the safe default policy), at most
    `max_bytes`. MediaError naming `field` and the rule broken otherwise."""
    policy = policy or SourcePolicy()
    if not isinstance(ref, str) or not ref.strip():
        raise MediaError(field, "is empty", value=None if ref is None else _short(ref), allowed=policy.allowed())
    ref = ref.strip()
    scheme = scheme_of(ref)
    if scheme in ("http", "https"):
        return netguard.fetch(ref, field=field, guard=policy.guard(), max_bytes=max_bytes)
    if scheme == "data":
        if not policy.allow_data:
            raise _fail(field, ref, "data: URIs are not allowed here", policy)
        return _read_data_uri(ref, field, max_bytes)
    if scheme == "s3":
        return _read_s3(ref, field, policy, s3_client, max_bytes)
    if scheme == "file":
        parsed = urllib.parse.urlsplit(ref)
        if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
            raise _fail(field, ref, "file:// URL must be file:///absolute/path", policy)
        return _read_local(urllib.request.url2pathname(parsed.path), ref, field, policy, max_bytes)
    if scheme:
        raise _fail(field, ref, f"unsupported scheme '{scheme}:'", policy)
    return _read_local(ref, ref, field, policy, max_bytes)


def _too_large(field: str, ref: str, size: int | None, max_bytes: int) -> MediaError:
    got = f" ({_size(size)})" if size is not None else ""
    return MediaError(field, f"is too large{got}", value=_shown(ref), allowed=f"at most {_size(max_bytes)}")


def _read_data_uri(ref: str, field: str, max_bytes: int) -> bytes:
    head, sep, payload = ref.partition(",")
    if not sep:
        raise MediaError(field, "is a malformed data: URI (no comma)", value=_short(ref),
                         allowed="data:<type>;base64,<data>")
    if head.lower().endswith(";base64"):
        if len(payload) * 3 // 4 > max_bytes + 3:
            raise _too_large(field, ref, len(payload) * 3 // 4, max_bytes)
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise MediaError(field, "data: URI has invalid base64", value=_short(ref)) from None
    else:
        if len(payload) > 3 * max_bytes + 3:
            raise _too_large(field, ref, None, max_bytes)
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise _too_large(field, ref, len(data), max_bytes)
    return data


# ---- s3:// --------------------------------------------------------------------------------------
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
        raise _fail(field, ref, "is not a full S3 URI", policy, allowed="s3://bucket/key") from None
    if not s3_allowed(bucket, key, policy):
        raise _fail(field, ref, "s3:// is allowed only inside the archive bucket or an allowed bucket/prefix",
                    policy)
    return bucket, key


def _read_s3(ref: str, field: str, policy: SourcePolicy, s3_client: Any, max_bytes: int) -> bytes:
    from avatarflow import s3io

    bucket, key = s3_target(ref, field, policy)
    if s3_client is None:
        raise _fail(field, ref, "is an s3:// URI but no S3 client is configured", policy, allowed=None)
    try:
        return s3io.read_bytes(s3_client, bucket, key, max_bytes)
    except s3io.ObjectUnreadable:
        raise _fail(field, ref, "could not be read from S3 (no such object, or not readable)", policy,
                    allowed=None) from None
    except s3io.ObjectTooLarge as e:
        raise _too_large(field, ref, e.size, max_bytes) from None
    except s3io.ArchiveError as e:
        raise MediaError(field, str(e), value=_short(ref), transient=True) from None


# ---- local paths ---------------------------------------------------------------------------------
LOCAL_REFUSED = "local paths are not allowed here"
LOCAL_UNREADABLE = "is not a readable regular file under the allowed local roots"


def _normalized(path: str) -> str:
    """An absolute, lexically normalized path ('..' folded; no file system access)."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


def local_root_of(path: str, policy: SourcePolicy) -> tuple[str, list[str]] | None:
    """(root, components below it) of `path` when it lies under one of the policy's roots."""
    if "\x00" in path:
        return None
    full = _normalized(path)
    for root in policy.local_roots:
        for r in dict.fromkeys((os.path.normpath(root), os.path.realpath(root))):
            if full == r:
                return r, []
            if full.startswith(r.rstrip(os.sep) + os.sep):
                rest = full[len(r.rstrip(os.sep)) + 1:]
                return r, [c for c in rest.split(os.sep) if c]
    return None


def open_under_root(root: str, parts: list[str]) -> int:
    """A read-only fd of the regular file root/parts..., walked from the root's directory fd
    with O_NOFOLLOW at every step (a symlink anywhere below the root is refused), checked with
    lstat before opening (a FIFO or a device is never opened; a file with more than one hard
    link is refused, since the other link may be outside the root) and with fstat after (the
    same inode). OSError otherwise."""
    if not parts or any(p in ("", ".", "..") or os.sep in p for p in parts):
        raise IsADirectoryError(root)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    cloexec = getattr(os, "O_CLOEXEC", 0)
    dir_flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | cloexec
    fd = os.open(root, dir_flags)
    try:
        for name in parts[:-1]:
            nxt = os.open(name, dir_flags | nofollow, dir_fd=fd)
            os.close(fd)
            fd = nxt
        st = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a hard link may name a file outside
            raise IsADirectoryError(parts[-1])
        file_fd = os.open(parts[-1], os.O_RDONLY | nofollow | cloexec | getattr(os, "O_NONBLOCK", 0)
                          | getattr(os, "O_NOCTTY", 0), dir_fd=fd)
    finally:
        os.close(fd)
    try:
        st2 = os.fstat(file_fd)
        if not stat.S_ISREG(st2.st_mode) or (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
            raise IsADirectoryError(parts[-1])
    except BaseException:
        os.close(file_fd)
        raise
    return file_fd


def _read_local(path: str, ref: str, field: str, policy: SourcePolicy, max_bytes: int) -> bytes:
    found = local_root_of(path, policy) if policy.local_roots else None
    if found is None:
        raise _fail(field, ref, LOCAL_REFUSED if not policy.local_roots
                    else "local paths are allowed only under the allowed local roots", policy)
    root, parts = found
    try:
        fd = open_under_root(root, parts)
    except (OSError, ValueError):
        raise _fail(field, ref, LOCAL_UNREADABLE, policy) from None
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise _too_large(field, ref, size, max_bytes)
        if size == 0:  # also every procfs/sysfs pseudo-file: never read past what fstat says
            raise MediaError(field, "is empty (0 bytes)", value=_short(ref), allowed=policy.allowed())
        chunks, total = [], 0
        while total < size:
            chunk = os.read(fd, min(1024 * 1024, size - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError:
        raise _fail(field, ref, LOCAL_UNREADABLE, policy) from None
    finally:
        os.close(fd)
    if total > max_bytes:
        raise _too_large(field, ref, None, max_bytes)
    return b"".join(chunks)


def check_local(ref: str, *, field: str, policy: SourcePolicy) -> str | None:
    """Why the local source `ref` (a path or file:// URL) would be refused (None: it opens).
    Cheap: opens the file without reading it. Used to fail a calendar row before any submit."""
    if scheme_of(ref) == "file":
        parsed = urllib.parse.urlsplit(ref)
        if parsed.netloc not in ("", "localhost"):
            return "file:// URL must be file:///absolute/path"
        path = urllib.request.url2pathname(parsed.path)
    else:
        path = ref
    found = local_root_of(path, policy) if policy.local_roots else None
    if found is None:
        return LOCAL_REFUSED if not policy.local_roots else "local paths are allowed only under the allowed local roots"
    try:
        os.close(open_under_root(*found))
    except (OSError, ValueError):
        return LOCAL_UNREADABLE
    return None


def check_reference(ref: str, *, field: str, policy: SourcePolicy) -> None:
    """Refuse, without fetching, a reference the policy can never allow (scheme, s3 place,
    local path outside the roots, plain http). MediaError; None when it may be fetched."""
    scheme = scheme_of(ref)
    if scheme in ("http", "https"):
        if scheme == "http" and not policy.allow_http:
            host = urllib.parse.urlsplit(ref).hostname or ""
            port = urllib.parse.urlsplit(ref).port or 80
            if not policy.guard().exempt(host, port):
                raise _fail(field, ref, "plain http:// is not allowed (only https://)", policy)
        return
    if scheme == "data":
        if not policy.allow_data:
            raise _fail(field, ref, "data: URIs are not allowed here", policy)
        return
    if scheme == "s3":
        s3_target(ref, field, policy)
        return
    if scheme and scheme != "file":
        raise _fail(field, ref, f"unsupported scheme '{scheme}:'", policy)
    why = check_local(ref, field=field, policy=policy)
    if why:
        raise _fail(field, ref, why, policy)


__all__ = ["SourcePolicy", "read_source", "display_source", "resolve_policy", "policy_from_env", "cli_local_roots",
           "check_reference", "check_local", "s3_allowed", "open_under_root"]
