"""A store and an API client in memory, for ledger tests that must interleave two runs step by step.

Each run is an asyncio task that sets `WHO` (a context variable); the store can hold a run's
writes at a gate, and the client can hold a run's slot wait or POST, so a test decides the order.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import hashlib
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

from avatarflow.errors import AmbiguousSubmit, RateLimited, SubmitNotSent

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="?")


class FakeStore:
    """Objects with ETags; If-None-Match/If-Match honoured unless `ignores_conditions`."""

    def __init__(self, *, ignores_conditions: bool = False):
        self.objects: dict[str, tuple[dict, str]] = {}
        self.ignores_conditions = ignores_conditions
        self.bucket = "fake"
        self.prefix = ""
        self.s3 = SimpleNamespace(meta=SimpleNamespace(endpoint_url=f"memory://{uuid.uuid4().hex}"))
        self.write_gates: dict[str, asyncio.Event] = {}  # who -> event awaited before each write
        self.reads: dict[str, asyncio.Event] = {}
        self.writes: list[tuple[str, str, str]] = []
        self.hiccups: dict[str, int] = {}  # who -> how many of its next replaces fail with an error
        self._n = itertools.count(1)

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in parts if p)

    def ledger_key(self, fingerprint: str) -> str:
        return self.key("ledger", f"{fingerprint}.json")

    def read_event(self, who: str) -> asyncio.Event:
        return self.reads.setdefault(who, asyncio.Event())

    async def _gate(self, op: str, key: str) -> None:
        who = WHO.get()
        gate = self.write_gates.get(who)
        if gate is not None and "/_probe/" not in key:  # the store probe is not part of a race
            await gate.wait()
        self.writes.append((who, op, key))

    def _etag(self) -> str:
        return f"e{next(self._n)}"

    async def read_json(self, key: str) -> tuple[dict | None, str | None]:
        await asyncio.sleep(0)
        self.read_event(WHO.get()).set()
        if key not in self.objects:
            return None, None
        doc, etag = self.objects[key]
        return copy.deepcopy(doc), etag

    async def get_json(self, key: str) -> dict | None:
        return (await self.read_json(key))[0]

    async def create_json(self, key: str, obj: dict) -> str | None:
        await self._gate("create", key)
        if key in self.objects and not self.ignores_conditions:
            return None
        etag = self._etag()
        self.objects[key] = (copy.deepcopy(obj), etag)
        return etag

    async def replace_json(self, key: str, obj: dict, etag: str) -> str | None:
        await self._gate("replace", key)
        if self.hiccups.get(WHO.get(), 0) > 0:
            self.hiccups[WHO.get()] -= 1
            raise ConnectionError("store hiccup")
        if not self.ignores_conditions and (key not in self.objects or self.objects[key][1] != etag):
            return None
        new = self._etag()
        self.objects[key] = (copy.deepcopy(obj), new)
        return new

    async def put_json(self, key: str, obj: dict) -> None:
        await self._gate("put", key)
        self.objects[key] = (copy.deepcopy(obj), self._etag())

    async def delete_if_match(self, key: str, etag: str) -> bool:
        await self._gate("delete_if_match", key)
        if key in self.objects and self.objects[key][1] == etag:
            del self.objects[key]
            return True
        return False

    async def delete(self, key: str) -> None:
        await self._gate("delete", key)
        self.objects.pop(key, None)


@dataclass
class Posted:
    request_id: str
    body: dict
    at: float
    who: str
    in_history: bool = True


@dataclass
class FakeClient:
    """Counts POSTs. `plan[who]` scripts each POST of a run: "ok", "5xx", "unparseable",
    "reset" (job made, answer lost), "refused" (not sent), "429", "hang" (job made, answer held
    until `release[who]` is set). `slot_waits[who]`: an event a run's slot wait blocks on."""

    plan: dict[str, list[str]] = field(default_factory=dict)
    slot_waits: dict[str, asyncio.Event] = field(default_factory=dict)
    release: dict[str, asyncio.Event] = field(default_factory=dict)
    hidden: set[str] = field(default_factory=set)  # runs whose jobs the history does not show yet
    posts: list[Posted] = field(default_factory=list)
    posting: dict[str, asyncio.Event] = field(default_factory=dict)
    old_errors: bool = False  # raise what the first client raised (ServerError, ValueError)
    on_post: Callable[[str], Any] | None = None
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def posting_event(self, who: str) -> asyncio.Event:
        return self.posting.setdefault(who, asyncio.Event())

    async def take_slot(self) -> None:
        gate = self.slot_waits.get(WHO.get())
        if gate is not None:
            await gate.wait()

    async def submit(self, request: Any, *, slot_taken: bool = False) -> Any:
        who = WHO.get()
        if not slot_taken:
            await self.take_slot()
        step = (self.plan.get(who) or ["ok"]).pop(0) if self.plan.get(who) else "ok"
        await asyncio.sleep(0)
        if step == "refused":
            raise SubmitNotSent("refused")
        if step == "429":
            raise RateLimited("slow down", retry_after=0.01, status_code=429)
        sent_at = time.time()
        body = request.body()
        rid = f"req-{next(self._ids)}-{who}"
        self.posts.append(Posted(rid, body, sent_at, who, in_history=who not in self.hidden))
        self.posting_event(who).set()
        if step == "hang":
            await self.release.setdefault(who, asyncio.Event()).wait()
        if step in ("5xx", "reset", "unparseable"):
            if self.old_errors and step == "5xx":
                from avatarflow.errors import ServerError

                raise ServerError("boom", status_code=500)
            if self.old_errors and step == "unparseable":
                raise ValueError("not JSON")
            raise AmbiguousSubmit(f"{step}: a job may exist", sent_at=sent_at)
        return SimpleNamespace(request_id=rid)

    async def find_submitted(self, request: Any, *, since: float) -> Any:
        await asyncio.sleep(0)
        body = json.dumps(request.body(), sort_keys=True)
        for p in self.posts:
            if p.in_history and p.at >= since and json.dumps(p.body, sort_keys=True) == body:
                return SimpleNamespace(request_id=p.request_id)
        return None

    def show(self, who: str) -> None:
        """The history catches up with `who`'s jobs."""
        self.hidden.discard(who)
        for p in self.posts:
            if p.who == who:
                p.in_history = True


def fingerprint_of(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


async def as_run(who: str, coro: Any) -> Any:
    """Run `coro` as run `who` (a task of its own, so the context variable stays its own)."""

    async def go() -> Any:
        WHO.set(who)
        return await coro

    return await asyncio.create_task(go())
