"""Local paths (and file:// URLs) as the source policy allows them: only regular files under the
operator's roots, opened component by component so no symlink, `..` or hard link leads out."""

from __future__ import annotations

import os
import stat
import urllib.parse
import urllib.request

from avatarflow.media.errors import MediaError, shorten, too_large
from avatarflow.media.policy import SourcePolicy, display_source, refuse, scheme_of

READ_CHUNK = 1024 * 1024
LOCAL_REFUSED = "local paths are not allowed here"
LOCAL_OUTSIDE = "local paths are allowed only under the allowed local roots"
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


def read_local(path: str, ref: str, field: str, policy: SourcePolicy, max_bytes: int) -> bytes:
    found = local_root_of(path, policy) if policy.local_roots else None
    if found is None:
        raise refuse(field, ref, LOCAL_OUTSIDE if policy.local_roots else LOCAL_REFUSED, policy)
    root, parts = found
    try:
        fd = open_under_root(root, parts)
    except (OSError, ValueError):
        raise refuse(field, ref, LOCAL_UNREADABLE, policy) from None
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise too_large(field, display_source(ref), size, max_bytes)
        if size == 0:  # also every procfs/sysfs pseudo-file: never read past what fstat says
            raise MediaError(field, "is empty (0 bytes)", value=shorten(ref), allowed=policy.allowed())
        chunks, total = [], 0
        while total < size:
            chunk = os.read(fd, min(READ_CHUNK, size - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError:
        raise refuse(field, ref, LOCAL_UNREADABLE, policy) from None
    finally:
        os.close(fd)
    if total > max_bytes:
        raise too_large(field, display_source(ref), None, max_bytes)
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
        return LOCAL_OUTSIDE if policy.local_roots else LOCAL_REFUSED
    try:
        os.close(open_under_root(*found))
    except (OSError, ValueError):
        return LOCAL_UNREADABLE
    return None
