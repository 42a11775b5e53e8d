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
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

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


class FakeS3:
    """A boto3 S3 client in memory, for the calls avatarflow.store and avatarflow.s3io make:
    put_object (IfNoneMatch/IfMatch: 412 PreconditionFailed), get_object (Range), head_object,
    delete_object (IfMatch), list_objects_v2 (Prefix, StartAfter, MaxKeys, ContinuationToken),
    generate_presigned_url. Objects live in `objects[(bucket, key)]`; `calls` records each call."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.page_size = 1000  # list_objects_v2 answers at most this many keys a page
        self._n = itertools.count(1)

    @staticmethod
    def error(code: str, status: int, op: str) -> Exception:
        from botocore.exceptions import ClientError

        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, op)

    def _get(self, bucket: str, key: str, op: str) -> dict[str, Any]:
        if (bucket, key) not in self.objects:
            raise self.error("NoSuchKey", 404, op)
        return self.objects[(bucket, key)]

    def _check(self, obj: dict[str, Any] | None, if_match: str | None, if_none_match: str | None, op: str) -> None:
        if if_none_match == "*" and obj is not None:
            raise self.error("PreconditionFailed", 412, op)
        if if_match is not None:
            if obj is None:
                raise self.error("NoSuchKey", 404, op)
            if if_match.strip('"') != obj["ETag"].strip('"'):
                raise self.error("PreconditionFailed", 412, op)

    def put_object(self, *, Bucket: str, Key: str, Body: bytes = b"", ContentType: str = "binary/octet-stream",
                   Metadata: dict[str, str] | None = None, IfMatch: str | None = None,
                   IfNoneMatch: str | None = None) -> dict[str, Any]:
        self.calls.append(("put_object", {"Key": Key, "IfMatch": IfMatch, "IfNoneMatch": IfNoneMatch}))
        self._check(self.objects.get((Bucket, Key)), IfMatch, IfNoneMatch, "PutObject")
        data = bytes(Body)
        etag = f'"{hashlib.md5(data).hexdigest()}-{next(self._n)}"'
        self.objects[(Bucket, Key)] = {"Body": data, "ETag": etag, "ContentType": ContentType,
                                       "Metadata": dict(Metadata or {}), "LastModified": time.time()}
        return {"ETag": etag}

    def _meta(self, obj: dict[str, Any]) -> dict[str, Any]:
        return {"ETag": obj["ETag"], "ContentType": obj["ContentType"], "Metadata": dict(obj["Metadata"]),
                "LastModified": obj["LastModified"], "ContentLength": len(obj["Body"])}

    def get_object(self, *, Bucket: str, Key: str, Range: str | None = None) -> dict[str, Any]:
        import io

        from botocore.response import StreamingBody

        self.calls.append(("get_object", {"Key": Key, "Range": Range}))
        obj = self._get(Bucket, Key, "GetObject")
        data, resp = obj["Body"], self._meta(obj)
        if Range:
            first, last = (int(x) for x in Range.removeprefix("bytes=").split("-"))
            if first >= len(data):
                raise self.error("InvalidRange", 416, "GetObject")
            part = data[first:last + 1]
            resp.update(ContentLength=len(part), ContentRange=f"bytes {first}-{first + len(part) - 1}/{len(data)}")
            data = part
        resp["Body"] = StreamingBody(io.BytesIO(data), len(data))
        return resp

    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        self.calls.append(("head_object", {"Key": Key}))
        return self._meta(self._get(Bucket, Key, "HeadObject"))

    def delete_object(self, *, Bucket: str, Key: str, IfMatch: str | None = None) -> dict[str, Any]:
        self.calls.append(("delete_object", {"Key": Key, "IfMatch": IfMatch}))
        self._check(self.objects.get((Bucket, Key)), IfMatch, None, "DeleteObject")
        self.objects.pop((Bucket, Key), None)
        return {}

    def list_objects_v2(self, *, Bucket: str, Prefix: str = "", StartAfter: str = "", MaxKeys: int = 1000,
                        ContinuationToken: str | None = None) -> dict[str, Any]:
        self.calls.append(("list_objects_v2", {"Prefix": Prefix, "StartAfter": StartAfter, "MaxKeys": MaxKeys}))
        after = ContinuationToken or StartAfter
        keys = sorted(k for b, k in self.objects if b == Bucket and k.startswith(Prefix) and k > after)
        page = keys[:min(MaxKeys, self.page_size)]
        contents = [{"Key": k, "Size": len(self.objects[(Bucket, k)]["Body"]),
                     "ETag": self.objects[(Bucket, k)]["ETag"],
                     "LastModified": self.objects[(Bucket, k)]["LastModified"]} for k in page]
        more = len(keys) > len(page)
        return {"Contents": contents, "IsTruncated": more, **({"NextContinuationToken": page[-1]} if more else {})}

    def generate_presigned_url(self, op: str, *, Params: dict[str, str], ExpiresIn: int) -> str:
        return f"https://s3.fake/{Params['Bucket']}/{Params['Key']}?op={op}&expires={ExpiresIn}"
