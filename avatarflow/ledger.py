"""Exactly-once submit. The API has no idempotency key and every POST is billed, so one ledger
entry per fingerprint (in the archive bucket) decides who may POST, and records the request id.

The protocol, every write conditional (create with If-None-Match, change with If-Match on the
ETag just read; a lost race re-reads and follows the winner):
1. An entry holding a request id is resumed: no POST.
2. A rate-limit slot is taken, then the claim is created (state `claimed`, a lease).
3. The holder renews the lease while it waits (for a slot after a 429, for the POST's answer);
   a claim is stale only when not renewed for the lease time.
4. `posting` is stamped right before the POST. From then on the job may exist: a timeout, a
   reset, a cancellation, a 5xx or an unparseable answer keeps the claim and is reconciled
   through the request history, never reposted. Only answers that prove no job was made (a
   429 or 4xx, a refused connection) release or re-arm the claim.
5. Another run takes over a stale `claimed` entry at once; a stale `posting` entry only when
   the history shows no job posted with its body since it was stamped.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from avatarflow.api_http import RETRY_AFTER_MAX_S
from avatarflow.contract import AvatarRequest
from avatarflow.errors import (
    AmbiguousSubmit,
    APIError,
    AvatarflowError,
    RateLimited,
    SubmitNotSent,
    TransportError,
)
from avatarflow.store import Store

LEASE_S = 30.0
FOLLOW_INTERVAL_S = 1.0
RECONCILE_TRIES = 3
RECONCILE_INTERVAL_S = 2.0
RECONCILE_MARGIN_S = 5.0
SUBMIT_RATE_LIMIT_TRIES = 5

CLAIMED, POSTING, SUBMITTED, COMPLETED, FAILED = "claimed", "posting", "submitted", "completed", "failed"
HELD = (CLAIMED, POSTING)
KNOWN = (SUBMITTED, COMPLETED)

Log = Callable[[str], Any]


class SubmitUnresolved(AvatarflowError):
    """A submit's answer was lost and the history does not show the job yet. The claim stays:
    a rerun reconciles again, and posts only once the claim is stale and the history still has
    no such job."""


class StoreUnsafe(AvatarflowError):
    """The archive store does not honour conditional writes, so the ledger cannot guard the POST."""


@dataclass(frozen=True)
class Job:
    request_id: str
    submitted_at: float
    resumed: bool


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


_PROBED: dict[tuple[str, str], bool] = {}


async def probe_store(store: Store) -> bool:
    """True when the store refuses a second conditional create (HTTP 412), as the ledger needs."""
    ident = (str(getattr(getattr(store.s3, "meta", None), "endpoint_url", id(store.s3))), store.bucket)
    if ident not in _PROBED:
        key = store.key("ledger", "_probe", f"{uuid.uuid4().hex}.json")
        first = await store.create_json(key, {"probe": 1})
        second = await store.create_json(key, {"probe": 2})
        if first:
            await store.delete(key)
        _PROBED[ident] = bool(first) and second is None
    return _PROBED[ident]


class _Lost(Exception):
    """Our entry was changed by another run: re-read and follow it."""


class _Holder:
    """The claim we hold: every change is If-Match on our last ETag; a renewer keeps the lease."""

    def __init__(self, ledger: Ledger, key: str, entry: dict, etag: str):
        self.ledger, self.key, self.entry, self.etag = ledger, key, entry, etag
        self._lock = asyncio.Lock()
        self._renewer: asyncio.Task | None = None
        self.lost = False

    async def update(self, **changes: Any) -> None:
        async with self._lock:
            if self.lost:
                raise _Lost()
            entry = {**self.entry, **changes, "renewed_at": self.ledger.clock(), "updated_at": _now_iso()}
            etag = await self.ledger.store.replace_json(self.key, entry, self.etag)
            if etag is None:
                self.lost = True
                raise _Lost()
            self.entry, self.etag = entry, etag

    async def release(self) -> None:
        """Give the claim back (no job was made): delete it only if it is still ours."""
        async with self._lock:
            if not self.lost:
                await self.ledger.store.delete_if_match(self.key, self.etag)
                self.lost = True

    async def _renew(self) -> None:
        while not self.lost:
            await asyncio.sleep(self.ledger.lease_seconds / 3)
            try:
                await self.update()
            except _Lost:
                return
            except Exception:  # a store hiccup: the next tick tries again, well inside the lease
                continue

    def start_renewing(self) -> None:
        self._renewer = asyncio.ensure_future(self._renew())

    async def stop_renewing(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None


class Ledger:
    """The exactly-once protocol over a Store's `ledger/` folder (and its request-id index)."""

    def __init__(
        self, store: Store, *, lease_seconds: float | None = None, follow_interval_seconds: float | None = None,
        reconcile_tries: int | None = None, reconcile_interval_seconds: float | None = None,
        require_conditional: bool = True, owner: str | None = None, clock: Callable[[], float] = time.time,
    ):
        """Unset timings take the module's constants. `require_conditional=False` lets a single
        worker run on a store that ignores conditional writes (the probe then only warns)."""
        self.store = store
        self.lease_seconds = lease_seconds or LEASE_S
        self.follow_interval_seconds = follow_interval_seconds or FOLLOW_INTERVAL_S
        self.reconcile_tries = reconcile_tries or RECONCILE_TRIES
        self.reconcile_interval_seconds = reconcile_interval_seconds or RECONCILE_INTERVAL_S
        self.require_conditional = require_conditional
        self.owner = owner or default_owner()
        self.clock = clock

    def key(self, fingerprint: str) -> str:
        return self.store.ledger_key(fingerprint)

    def index_key(self, request_id: str) -> str:
        return self.store.key("ledger", "by-request", f"{request_id}.json")

    async def check_store(self, log: Log = print) -> None:
        if await probe_store(self.store):
            return
        where = f"bucket {self.store.bucket!r} at {getattr(self.store.s3.meta, 'endpoint_url', '?')}"
        if self.require_conditional:
            raise StoreUnsafe(
                f"the archive store ({where}) accepted a second If-None-Match create: it ignores "
                "conditional writes, so two workers could both pay for one video. Use a store that "
                "honours them (AWS S3, SeaweedFS >= 3.80, MinIO >= 2024-11), or, with a single "
                "worker only, set AVATARFLOW_LEDGER_SINGLE_WORKER=1"
            )
        log(f"warning: the archive store ({where}) ignores conditional writes; single-worker mode")

    async def entry(self, fingerprint: str) -> dict | None:
        return (await self.store.read_json(self.key(fingerprint)))[0]

    async def find(self, request_id: str) -> dict | None:
        """The ledger entry of a request id, through the index (no scan)."""
        index = (await self.store.read_json(self.index_key(request_id)))[0]
        if not index:
            return None
        entry = await self.entry(index["fingerprint"])
        return entry if entry and entry.get("request_id") == request_id else None

    async def mark(self, fingerprint: str, state: str, **extra: Any) -> None:
        """Record a later state (completed, failed) without losing a concurrent writer's change."""
        key = self.key(fingerprint)
        while True:
            entry, etag = await self.store.read_json(key)
            new = {**(entry or {"fingerprint": fingerprint}), **extra, "state": state, "updated_at": _now_iso()}
            if entry is None:
                if await self.store.create_json(key, new) is not None:
                    return
            elif await self.store.replace_json(key, new, etag) is not None:
                return

    def _stale(self, entry: dict, etag: str, seen: dict[str, float]) -> bool:
        """Not renewed for the lease time: unchanged under our own eyes that long, or stamped by
        its holder more than two lease times ago (room for clock skew)."""
        first = seen.setdefault(etag, time.monotonic())
        age = self.clock() - float(entry.get("renewed_at") or 0)
        return time.monotonic() - first >= self.lease_seconds or age >= 2 * self.lease_seconds

    async def _reconcile(self, client: Any, request: AvatarRequest, since: float, tries: int) -> str | None:
        """The request id of a job posted with this body since `since`, from the history."""
        for attempt in range(tries):
            row = await client.find_submitted(request, since=since - RECONCILE_MARGIN_S)
            if row is not None:
                return row.request_id
            if attempt + 1 < tries:
                await asyncio.sleep(self.reconcile_interval_seconds)
        return None

    async def _index(self, request_id: str, fingerprint: str) -> None:
        await self.store.create_json(self.index_key(request_id), {"fingerprint": fingerprint})

    async def submit(
        self, client: Any, fingerprint: str, request: AvatarRequest, *, record: dict[str, Any] | None = None,
        replace_request: str | None = None, log: Log = print,
    ) -> Job:
        """POST `request` at most once for `fingerprint` across retries, restarts and machines.

        `record`: more fields kept in the entry (seed, media hashes). `replace_request`: the
        entry's request id whose output is gone: a new job replaces it (resubmit_expired)."""
        await self.check_store(log)
        key = self.key(fingerprint)
        seen: dict[str, float] = {}
        while True:
            entry, etag = await self.store.read_json(key)
            if entry is not None:
                rid, state = entry.get("request_id"), entry.get("state")
                if rid and state in KNOWN and rid != replace_request:
                    log(f"ledger has request {rid}: resuming it, no new submit")
                    return Job(rid, float(entry.get("submitted_at") or self.clock()), resumed=True)
                if state in HELD:
                    if not self._stale(entry, etag, seen):
                        await asyncio.sleep(self.follow_interval_seconds)
                        continue
                    if state == POSTING:
                        since = float(entry.get("posting_at") or entry.get("claimed_at") or 0)
                        rid = await self._reconcile(client, request, since, tries=1)
                        if rid:
                            log(f"history shows request {rid} for this job: adopting it, no new submit")
                            job = await self._adopt(key, entry, etag, rid, since, fingerprint)
                            if job is None:
                                continue
                            return job
                    log(f"stale {state} claim by {entry.get('owner')} and no such job in the history: taking over")
            await client.take_slot()
            claim = {
                **(record or {}), "fingerprint": fingerprint, "state": CLAIMED, "owner": self.owner,
                "claimed_at": self.clock(), "renewed_at": self.clock(), "body": request.body(),
                "attempt": int((entry or {}).get("attempt", 0)) + 1, "updated_at": _now_iso(),
            }
            if entry is not None and entry.get("request_id"):
                claim["replaced_request_id"] = entry["request_id"]
            if entry is not None and entry.get("orphaned"):
                claim["orphaned"] = entry["orphaned"]
            new_etag = (
                await self.store.create_json(key, claim) if entry is None
                else await self.store.replace_json(key, claim, etag)
            )
            if new_etag is None:
                continue  # another run won: follow it
            try:
                return await self._post(client, _Holder(self, key, claim, new_etag), request, fingerprint, log)
            except _Lost:
                continue

    async def _adopt(self, key: str, entry: dict, etag: str, rid: str, since: float, fingerprint: str) -> Job | None:
        done = {**entry, "state": SUBMITTED, "request_id": rid, "submitted_at": since, "updated_at": _now_iso()}
        if await self.store.replace_json(key, done, etag) is None:
            return None
        await self._index(rid, fingerprint)
        return Job(rid, since, resumed=True)

    async def _post(self, client: Any, holder: _Holder, request: AvatarRequest, fingerprint: str, log: Log) -> Job:
        holder.start_renewing()
        rate_limited = 0
        try:
            while True:
                await holder.update(state=POSTING, posting_at=self.clock())
                try:
                    answer = await client.submit(request, slot_taken=True)
                except RateLimited as e:  # certainly not created: keep the claim, wait, take a slot
                    rate_limited += 1
                    if rate_limited >= SUBMIT_RATE_LIMIT_TRIES:
                        await holder.release()
                        raise
                    await holder.update(state=CLAIMED)
                    await asyncio.sleep(min(e.retry_after or 2.0**rate_limited, RETRY_AFTER_MAX_S))
                    await client.take_slot()
                    continue
                except AmbiguousSubmit as e:
                    rid = await self._reconcile(client, request, e.sent_at, tries=self.reconcile_tries)
                    if rid:
                        log(f"submit answer lost; history shows request {rid}: adopting it")
                        return await self._record(holder, rid, e.sent_at, fingerprint, log, resumed=False)
                    raise SubmitUnresolved(
                        f"submit answer lost and the history shows no job yet ({e}); rerun to reconcile again"
                    ) from None
                except (APIError, TransportError) as e:
                    if _not_sent(e):  # refused before a job could exist: give the claim back
                        await holder.release()
                    raise
                return await self._record(
                    holder, answer.request_id, float(holder.entry["posting_at"]), fingerprint, log, resumed=False
                )
        except BaseException:
            if holder.entry.get("state") == CLAIMED and not holder.lost:
                await asyncio.shield(holder.release())  # no POST went out: nothing to reconcile
            raise
        finally:
            await holder.stop_renewing()

    async def _record(self, holder: _Holder, rid: str, submitted_at: float, fingerprint: str, log: Log,
                      *, resumed: bool) -> Job:
        """Write the request id; if another run replaced our claim meanwhile, follow the winner
        and keep our job's id in the entry (`orphaned`), so no billed job goes unrecorded."""
        await holder.stop_renewing()
        try:
            await holder.update(state=SUBMITTED, request_id=rid, submitted_at=submitted_at)
        except _Lost:
            winner = await self._orphan(holder.key, rid)
            if winner["request_id"] != rid:
                log(f"request {rid} was made while another run took the claim over; following {winner['request_id']}")
            await self._index(rid, fingerprint)
            return Job(winner["request_id"], float(winner.get("submitted_at") or submitted_at), resumed=True)
        await self._index(rid, fingerprint)
        return Job(rid, submitted_at, resumed)

    async def _orphan(self, key: str, rid: str) -> dict:
        """Our claim was taken over after our POST went out. A takeover still without a request
        id is replaced by ours (its holder then follows us, or records its own as orphaned);
        otherwise ours joins the entry's `orphaned` ids. Either way no billed job goes unrecorded."""
        while True:
            entry, etag = await self.store.read_json(key)
            if entry is None or not entry.get("request_id"):
                ours = {**(entry or {}), "state": SUBMITTED, "request_id": rid, "submitted_at": self.clock(),
                        "updated_at": _now_iso()}
                written = (await self.store.create_json(key, ours) if entry is None
                           else await self.store.replace_json(key, ours, etag))
                if written is not None:
                    return ours
                continue
            if rid == entry["request_id"] or rid in entry.get("orphaned", []):
                return entry
            updated = {**entry, "orphaned": [*entry.get("orphaned", []), rid]}
            if await self.store.replace_json(key, updated, etag) is not None:
                return updated


def _not_sent(e: BaseException) -> bool:
    """An answer that proves no job was created: a 4xx, or a connection never made."""
    status = getattr(e, "status_code", None)
    if status is not None:
        return 400 <= int(status) < 500
    return isinstance(e, SubmitNotSent)


__all__ = ["Ledger", "Job", "SubmitUnresolved", "StoreUnsafe", "probe_store", "LEASE_S"]
