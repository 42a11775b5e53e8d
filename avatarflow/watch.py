"""The bucket watcher: one `avatarflow.portrait.uploaded` event per new portrait under a prefix
of the archive bucket (say ``incoming/``), exactly once, with no state but the bucket's.

Layout (under the archive's key prefix; ``<w>`` is the watched prefix made a path segment)::

    incoming/ada.jpg           a portrait dropped by anyone with write access
    incoming/ada.json          its sidecar (optional): the request's other fields by the API's
                               names (voice_script, voice, voice_language, resolution, seed...)
    watch/<w>/cursor.json      {"after": the last key of the run of handled keys, ...}
    watch/<w>/claims/<h>.json  one per object version (key + ETag): claimed, emitted or rejected

A scan lists the prefix after the cursor (S3's StartAfter: names sorting after the last handled
one), and, every ``full_every_seconds`` (or when asked), the whole prefix against the claims,
which catches names that sort before the cursor. For each object (not a ``.json``, older than
``settle_seconds`` so that its sidecar can land first):

1. **claim** it: create its claim document if absent (If-None-Match). Of two watchers racing,
   one creates it; the other skips the object. A claim still ``claimed`` after ``lease_seconds``
   (its holder died between the claim and the emit) is taken over by replacing it if its ETag is
   unchanged: again, one winner.
2. **check** it (avatarflow.uploads): the first bytes (one ranged GET, which also brings the object's metadata) must be
   a supported image (jpeg, png, webp: magic bytes, like the pipeline), and the fields (sidecar
   over metadata) must pass the contract. A non-image, an empty or oversized object, a sidecar
   that is not a JSON object or a field the contract refuses ends here: the claim becomes
   ``rejected`` with the error (the same message the pipeline would give, e.g. ``image=...: is
   not a supported image format (detected: text); allowed: jpg/jpeg, png or webp``), the scan
   reports it, and the flow leaves it in its artifact and an ``avatarflow.portrait.rejected``
   event. No run is started for it. (A picture without a face passes here and fails its run
   with the portrait error.)
3. **emit** ``avatarflow.portrait.uploaded`` (resource and label ``avatarflow.s3_uri``,
   payload.request the fields), through a call that returns only once the server took it, then
   mark the claim ``emitted``.

Exactly once, also across a crash between 2 and 3: the event's id is derived from the object
version (the server's trigger service ignores an id it has seen), and a request without a seed
gets one derived from the object version too, so a second emission (a claim taken over after a
crash past the emit) makes the same fingerprint, and the ledger makes it one job.

The cursor only moves past a key once every key up to it is handled (so an unsettled object, or
one whose emit failed, is listed again next time); it is replaced if unchanged (ETag), and a
watcher that loses that race merges (the larger key wins).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from avatarflow.store import Store
from avatarflow.uploads import (
    SIDECAR_SUFFIX,
    portrait_uploaded_event,
    read_upload,
    version_id,
)

DEFAULT_PREFIX = "incoming/"
LEASE_S = 120.0
SETTLE_S = 5.0
FULL_EVERY_S = 3600.0
MAX_OBJECTS = 1000

Emit = Callable[[Any], Awaitable[None]]


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.isoformat()


def _when(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value))
    except (TypeError, ValueError):
        return None


def watch_id(prefix: str) -> str:
    """The watched prefix as one path segment: ``incoming/`` -> ``incoming``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in prefix.strip("/")) or "_root"


@dataclass
class Layout:
    store: Store
    prefix: str  # the watched prefix, relative to the store's prefix

    @property
    def watched(self) -> str:
        p = self.store.key(self.prefix)
        return p + "/" if p and not p.endswith("/") else p

    @property
    def root(self) -> str:
        return self.store.key("watch", watch_id(self.prefix))

    @property
    def cursor_key(self) -> str:
        return f"{self.root}/cursor.json"

    @property
    def claims_prefix(self) -> str:
        return f"{self.root}/claims/"

    def claim_key(self, version: str) -> str:
        return f"{self.claims_prefix}{version}.json"


@dataclass
class Rejected:
    uri: str
    error: str
    version: str = ""


@dataclass
class ScanReport:
    """What a scan did: `emitted` portraits (s3:// URIs), `rejected` objects with their errors,
    `pending` keys left for a later scan (unsettled, or their emit failed), `claimed_elsewhere`
    objects another watcher holds, and the cursor before and after."""

    prefix: str
    full: bool
    listed: int = 0
    emitted: list[str] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    claimed_elsewhere: int = 0
    cursor_before: str | None = None
    cursor_after: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "full": self.full, "listed": self.listed, "emitted": self.emitted,
                "rejected": [{"uri": r.uri, "error": r.error} for r in self.rejected], "pending": self.pending,
                "claimed_elsewhere": self.claimed_elsewhere, "cursor_before": self.cursor_before,
                "cursor_after": self.cursor_after}


def _candidate(key: str, watched: str) -> bool:
    rest = key[len(watched):]
    return bool(rest) and not key.endswith("/") and not key.endswith(SIDECAR_SUFFIX)


class Watcher:
    """Scans one prefix of the archive bucket; `emit(event)` must return only once the event is
    taken (raise otherwise: the object is listed again next scan)."""

    def __init__(self, store: Store, prefix: str = DEFAULT_PREFIX, *, emit: Emit,
                 lease_seconds: float = LEASE_S, settle_seconds: float = SETTLE_S,
                 full_every_seconds: float = FULL_EVERY_S,
                 max_objects: int = MAX_OBJECTS, holder: str | None = None,
                 log: Callable[[str], None] | None = None):
        self.layout = Layout(store, prefix)
        self.store, self.prefix, self.emit = store, prefix, emit
        self.lease_seconds, self.settle_seconds = lease_seconds, settle_seconds
        self.full_every_seconds = full_every_seconds
        self.max_objects = max_objects
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.log = log or (lambda msg: None)

    # --- claims --------------------------------------------------------------------------------

    async def _claim(self, version: str, key: str, etag: str) -> tuple[str, dict] | None:
        """(claim ETag, claim doc) if this watcher now holds the object version; None if it is
        done or held by another watcher within its lease."""
        ck = self.layout.claim_key(version)
        doc = {"key": key, "etag": etag, "uri": self.store.uri(key), "state": "claimed",
               "holder": self.holder, "claimed_at": _iso(_now())}
        tag = await self.store.create_json(ck, doc)
        if tag is not None:
            return tag, doc
        current, ctag = await self.store.read_json(ck)
        if current is None or ctag is None:  # deleted meanwhile: try once more
            tag = await self.store.create_json(ck, doc)
            return (tag, doc) if tag else None
        if current.get("state") != "claimed":
            return None
        since = _when(current.get("claimed_at"))
        if since is not None and _now() - since < timedelta(seconds=self.lease_seconds):
            return None
        doc["taken_over_from"] = current.get("holder")
        tag = await self.store.replace_json(ck, doc, ctag)  # one of the watchers taking over wins
        return (tag, doc) if tag else None

    async def _settle(self, version: str, tag: str, doc: dict, state: str, **extra: Any) -> None:
        done = {**doc, **extra, "state": state, f"{state}_at": _iso(_now())}
        if await self.store.replace_json(self.layout.claim_key(version), done, tag) is None:
            self.log(f"claim of {doc['uri']} changed under us (taken over after the lease); left as is")

    async def _claimed_versions(self) -> set[str]:
        """Versions with a claim document (a `claimed` one is looked at again: it may be stale)."""
        objs = await self.store.list_objects(self.layout.claims_prefix, limit=10_000_000)
        return {o["key"][len(self.layout.claims_prefix):].removesuffix(".json") for o in objs}

    # --- one object ----------------------------------------------------------------------------

    async def _handle(self, obj: dict[str, Any], report: ScanReport) -> bool:
        """True when the object needs nothing more from this watcher (emitted, rejected, or done
        or held by another); False when it must be listed again."""
        key, etag = obj["key"], obj["etag"]
        uri = self.store.uri(key)
        version = version_id(self.store.bucket, key, etag)
        claim = await self._claim(version, key, etag)
        if claim is None:
            current, _ = await self.store.read_json(self.layout.claim_key(version))
            if current and current.get("state") == "claimed":
                report.claimed_elsewhere += 1
                return False  # another watcher holds it: not handled until it says so
            return True
        tag, doc = claim
        try:
            fields, error = await read_upload(self.store, key)
            if error is None:
                try:
                    event = portrait_uploaded_event(uri, fields, version)
                except Exception as e:  # a field the contract refuses
                    error = str(e)
            if error is not None:
                await self._settle(version, tag, doc, "rejected", error=error)
                report.rejected.append(Rejected(uri, error, version))
                self.log(f"rejected {uri}: {error}")
                return True
            await self.emit(event)
        except Exception as e:
            # released, so the next scan tries again (if the release fails too, a scan takes the
            # claim over after the lease); the event may have landed: the same event id and seed
            # keep a second emission one job
            self.log(f"{uri}: not emitted ({type(e).__name__}: {e}); retried next scan")
            try:
                await self.store.delete_if_match(self.layout.claim_key(version), tag)
            except Exception:
                pass
            report.pending.append(key)
            return False
        await self._settle(version, tag, doc, "emitted", event_id=str(event.id),
                           request=event.payload.get("request"))
        report.emitted.append(uri)
        self.log(f"emitted {event.event} for {uri}")
        return True



    # --- a scan --------------------------------------------------------------------------------

    async def _read_cursor(self) -> tuple[dict[str, Any], str | None]:
        doc, tag = await self.store.read_json(self.layout.cursor_key)
        return (doc if isinstance(doc, dict) else {}), tag

    async def _write_cursor(self, after: str | None, full_done: bool) -> str | None:
        """Move the cursor to `after` (never back), conditionally; merges with a racing writer."""
        for _ in range(8):
            doc, tag = await self._read_cursor()
            new = dict(doc)
            if after and after > (doc.get("after") or ""):
                new["after"] = after
            if full_done:
                new["full_at"] = _iso(_now())
            if new == doc and tag is not None:
                return doc.get("after")
            new["updated_at"] = _iso(_now())
            written = (await self.store.replace_json(self.layout.cursor_key, new, tag) if tag
                       else await self.store.create_json(self.layout.cursor_key, new))
            if written is not None:
                return new.get("after")
        self.log("cursor not moved (lost the race 8 times); the next scan lists a little more")
        return None

    async def scan(self, *, full: bool | None = None) -> ScanReport:
        """One pass: list, claim, check, emit; move the cursor. `full`: the whole prefix against
        the claims (default: when the last full pass is older than `full_every_seconds`)."""
        cursor, _ = await self._read_cursor()
        if full is None:
            last_full = _when(cursor.get("full_at"))
            full = last_full is None or _now() - last_full > timedelta(seconds=self.full_every_seconds)
        watched = self.layout.watched
        report = ScanReport(prefix=watched, full=full, cursor_before=cursor.get("after"))
        after = None if full else cursor.get("after")
        known = await self._claimed_versions() if full else set()
        limit = 10_000_000 if full else self.max_objects
        objs = [o for o in await self.store.list_objects(watched, after=after, limit=limit)
                if _candidate(o["key"], watched)]
        report.listed = len(objs)
        settled_before = _now() - timedelta(seconds=self.settle_seconds)
        contiguous, last_done = True, None
        for obj in objs:
            done = False
            lm = obj.get("last_modified")
            if lm is not None and lm > settled_before:
                report.pending.append(obj["key"])  # its sidecar may still be on its way
            elif full and version_id(self.store.bucket, obj["key"], obj["etag"]) in known \
                    and not await self._stale_claim(obj):
                done = True
            else:
                done = await self._handle(obj, report)
            if contiguous and done:
                last_done = obj["key"]
            contiguous = contiguous and done
        # full: the cursor may only move past keys handled now; a stale cursor behind the
        # listing is still right (the next incremental scan lists a little more)
        report.cursor_after = await self._write_cursor(last_done, full_done=full)
        return report

    async def _stale_claim(self, obj: dict[str, Any]) -> bool:
        doc, _ = await self.store.read_json(
            self.layout.claim_key(version_id(self.store.bucket, obj["key"], obj["etag"])))
        return bool(doc) and doc.get("state") == "claimed"


async def post_event(event: Any) -> None:
    """Send one event to the Prefect server over HTTP (``POST /api/events``): returns once the
    server has taken it (HTTP 204), raises otherwise. (The websocket client of ``emit_event``
    sends without an answer.)"""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        r = await client._client.post("/events", json=[event.model_dump(mode="json")])
        r.raise_for_status()
