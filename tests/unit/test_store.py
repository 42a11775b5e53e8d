"""avatarflow.store: the bucket's key layout, conditional JSON documents, the cached-video check
and read-back verification, on an in-memory S3 client (tests.unit.fakes.FakeS3)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from avatarflow import s3io
from avatarflow.s3io import ArchiveError, StoredObject
from avatarflow.store import Store, exclusive, parse_s3_uri, s3_uri
from tests.unit.fakes import FakeS3

FP = "f" * 64
BUCKET = "arch"


@pytest.fixture
def s3() -> FakeS3:
    return FakeS3()


@pytest.fixture
def store(s3: FakeS3) -> Store:
    return Store(s3, BUCKET, "team/")


def body_of(s3: FakeS3, key: str) -> dict:
    return json.loads(s3.objects[(BUCKET, key)]["Body"])


# ---- key layout ------------------------------------------------------------------------------
def test_keys_for_a_fingerprint_under_a_prefix():
    st = Store(None, BUCKET, "/team/2026/")
    assert st.ledger_key(FP) == f"team/2026/ledger/{FP}.json"
    assert st.video_key(FP) == f"team/2026/videos/{FP}/video.mp4"
    assert st.manifest_key(FP) == f"team/2026/videos/{FP}/manifest.json"
    assert st.thumbnail_key(FP) == f"team/2026/videos/{FP}/thumbnail.jpg"
    assert st.input_key("abc", "png") == "team/2026/inputs/abc.png"
    assert st.uri(st.video_key(FP)) == f"s3://arch/team/2026/videos/{FP}/video.mp4"


def test_keys_without_a_prefix_start_at_the_bucket_root():
    st = Store(None, BUCKET)
    assert st.ledger_key(FP) == f"ledger/{FP}.json"
    assert st.manifest_key(FP) == f"videos/{FP}/manifest.json"
    assert st.key("/a/", "", "b/") == "a/b"
    assert "s3=" not in repr(st), "the client stays out of the repr"


def test_s3_uris_round_trip_and_bad_ones_are_refused():
    assert s3_uri("b", "x/y.mp4") == "s3://b/x/y.mp4"
    assert parse_s3_uri("s3://b/x/y.mp4") == ("b", "x/y.mp4")
    assert parse_s3_uri("s3://b/odd?name#frag") == ("b", "odd?name#frag"), "? and # are part of a key"
    for bad in ("https://b/x", "s3:///x", "s3://b", "s3://b/"):
        with pytest.raises(ValueError, match="s3://") as info:
            parse_s3_uri(bad)
        assert repr(bad) in str(info.value)


# ---- conditional JSON documents --------------------------------------------------------------
async def test_create_json_only_if_absent(store: Store, s3: FakeS3):
    key = store.ledger_key(FP)
    etag = await store.create_json(key, {"state": "submitting"})
    assert etag and '"' not in etag
    assert s3.calls[-1] == ("put_object", {"Key": key, "IfMatch": None, "IfNoneMatch": "*"})
    assert await store.create_json(key, {"state": "other run"}) is None, "the second create loses"
    assert body_of(s3, key) == {"state": "submitting"}
    assert await store.read_json(key) == ({"state": "submitting"}, etag)


async def test_read_json_of_an_absent_key(store: Store):
    assert await store.read_json(store.ledger_key(FP)) == (None, None)
    assert await store.get_json(store.manifest_key(FP)) is None


async def test_replace_json_only_if_the_etag_still_matches(store: Store, s3: FakeS3):
    key = store.ledger_key(FP)
    first = await store.create_json(key, {"n": 1})
    second = await store.replace_json(key, {"n": 2}, first)
    assert second and second != first
    assert s3.calls[-1][1]["IfMatch"] == f'"{first}"', "an ETag is sent quoted"
    assert await store.replace_json(key, {"n": 3}, first) is None, "a stale ETag loses"
    assert await store.read_json(key) == ({"n": 2}, second)


async def test_delete_if_match_answers_whether_it_deleted(store: Store, s3: FakeS3):
    key = store.ledger_key(FP)
    old = await store.create_json(key, {"n": 1})
    new = await store.replace_json(key, {"n": 2}, old)
    assert await store.delete_if_match(key, old) is False
    assert (BUCKET, key) in s3.objects, "a stale ETag deletes nothing"
    assert await store.delete_if_match(key, new) is True
    assert (BUCKET, key) not in s3.objects
    assert await store.delete_if_match(key, new) is False, "already gone"


async def test_a_concurrent_conditional_write_409_counts_as_lost(store: Store, s3: FakeS3, monkeypatch):
    """AWS answers 409 ConditionalRequestConflict when another conditional write won meanwhile."""
    def conflict(**kw):
        raise s3.error("ConditionalRequestConflict", 409, "PutObject")

    monkeypatch.setattr(s3, "put_object", conflict)
    assert await store.create_json(store.ledger_key(FP), {"n": 1}) is None
    assert await store.replace_json(store.ledger_key(FP), {"n": 1}, "e1") is None


async def test_other_store_errors_are_raised_not_taken_for_a_lost_race(store: Store, s3: FakeS3, monkeypatch):
    from botocore.exceptions import ClientError

    def denied(**kw):
        raise s3.error("AccessDenied", 403, "PutObject")

    monkeypatch.setattr(s3, "put_object", denied)
    with pytest.raises(ClientError, match="AccessDenied"):
        await store.create_json(store.ledger_key(FP), {"n": 1})
    monkeypatch.setattr(s3, "get_object", lambda **kw: (_ for _ in ()).throw(s3.error("InternalError", 500, "Get")))
    with pytest.raises(ClientError, match="InternalError"):
        await store.read_json(store.ledger_key(FP))
    monkeypatch.setattr(s3, "delete_object", lambda **kw: (_ for _ in ()).throw(s3.error("SlowDown", 503, "Del")))
    with pytest.raises(ClientError, match="SlowDown"):
        await store.delete_if_match(store.ledger_key(FP), "e1")


async def test_put_json_overwrites_and_delete_is_unconditional(store: Store, s3: FakeS3):
    key = store.manifest_key(FP)
    await store.put_json(key, {"v": 1, "name": "café"})
    await store.put_json(key, {"v": 2})
    assert await store.get_json(key) == {"v": 2}
    assert s3.objects[(BUCKET, key)]["ContentType"].startswith("application/json")
    await store.delete(key)
    await store.delete(key)  # absent: no error
    assert await store.get_json(key) is None


# ---- listing and reading heads ---------------------------------------------------------------
async def test_list_objects_in_key_order_after_a_key_across_pages(store: Store, s3: FakeS3):
    for name in ("c", "a", "b", "d"):
        await store.put_bytes(store.key("ledger", name), name.encode() * 3, "text/plain")
    await store.put_bytes(store.key("videos", "x"), b"v", "text/plain")
    s3.page_size = 1  # every key on a page of its own
    listed = await store.list_objects(store.key("ledger/"))
    assert [o["key"] for o in listed] == ["team/ledger/a", "team/ledger/b", "team/ledger/c", "team/ledger/d"]
    assert listed[0]["size"] == 3 and '"' not in listed[0]["etag"]
    after = await store.list_objects(store.key("ledger/"), after="team/ledger/b", limit=1)
    assert [o["key"] for o in after] == ["team/ledger/c"]


async def test_read_head_gives_the_first_bytes_and_the_whole_size(store: Store):
    key = store.key("inputs", "p.jpg")
    await store.put_bytes(key, b"\xff\xd8\xff" + b"x" * 997, "image/jpeg")
    data, info = await store.read_head(key, 3)
    assert data == b"\xff\xd8\xff" and info["size"] == 1000 and info["content_type"] == "image/jpeg"
    await store.put_bytes(store.key("empty"), b"", "text/plain")
    data, info = await store.read_head(store.key("empty"))
    assert data == b"" and info["size"] == 0 and info["content_type"] == "text/plain", "an empty object: no byte 0"
    assert await store.read_head(store.key("missing")) is None


async def test_stage_puts_an_input_once_by_its_sha256_and_returns_a_url(store: Store, s3: FakeS3):
    data = b"portrait bytes"
    sha = hashlib.sha256(data).hexdigest()
    url = await store.stage(data, sha, "png", "image/png")
    obj = s3.objects[(BUCKET, store.input_key(sha, "png"))]
    assert obj["Body"] == data and obj["Metadata"][s3io.SHA256_META] == sha
    assert url.startswith(f"https://s3.fake/{BUCKET}/team/inputs/{sha}.png")


# ---- cached videos and verification ----------------------------------------------------------
async def _archive(store: Store, s3: FakeS3, data: bytes = b"mp4 bytes", *, sha: str | None = None) -> dict:
    sha = sha or hashlib.sha256(data).hexdigest()
    s3.put_object(Bucket=BUCKET, Key=store.video_key(FP), Body=data, ContentType="video/mp4",
                  Metadata={s3io.SHA256_META: sha})
    manifest = {"video": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, "fp": FP}
    await store.put_json(store.manifest_key(FP), manifest)
    return manifest


async def test_cached_needs_the_manifest_and_the_video_it_describes(store: Store, s3: FakeS3):
    assert await store.cached(FP) is None
    manifest = await _archive(store, s3)
    assert await store.cached(FP) == manifest
    del s3.objects[(BUCKET, store.video_key(FP))]
    assert await store.cached(FP) is None, "a manifest without its video is not a cache hit"


async def test_cached_refuses_a_video_of_another_size_or_sha256(store: Store, s3: FakeS3):
    await _archive(store, s3, sha="0" * 64)
    assert await store.cached(FP) is None, "the object's sha256 differs from the manifest's"
    manifest = await _archive(store, s3)
    s3.objects[(BUCKET, store.video_key(FP))]["Body"] += b"!"
    assert await store.cached(FP) is None, "the object's size differs from the manifest's"
    s3.objects[(BUCKET, store.video_key(FP))]["Metadata"] = {}
    s3.objects[(BUCKET, store.video_key(FP))]["Body"] = b"mp4 bytes"
    assert await store.cached(FP) is None, "no sha256 on the object: not trusted"
    assert manifest["video"]["size"] == len(b"mp4 bytes")


def _stored(store: Store, data: bytes) -> StoredObject:
    key = store.video_key(FP)
    return StoredObject(BUCKET, key, len(data), hashlib.sha256(data).hexdigest(), "e", f"s3://{BUCKET}/{key}")


async def test_verify_reads_back_what_landed_and_probes_it(store: Store, s3: FakeS3, tmp_path):
    data = b"\x00video" * 1000
    await store.put_bytes(store.video_key(FP), data, "video/mp4")
    seen = []
    result = await store.verify(_stored(store, data), probe=lambda path: seen.append(path.read_bytes()) or "ok")
    assert (result.size, result.sha256, result.probe) == (len(data), hashlib.sha256(data).hexdigest(), "ok")
    assert seen == [data], "the probe gets a copy of the object"


async def test_verify_deletes_a_bad_object_and_names_the_mismatch(store: Store, s3: FakeS3):
    data = b"the real video"
    await store.put_bytes(store.video_key(FP), b"the fake video", "video/mp4")
    with pytest.raises(ArchiveError, match="sha256 .* != ") as info:
        await store.verify(_stored(store, data))
    assert _stored(store, data).s3_uri in str(info.value)
    assert (BUCKET, store.video_key(FP)) not in s3.objects, "the bad object is deleted"
    with pytest.raises(ArchiveError, match="object not found"):
        await store.verify(_stored(store, data))
    await store.put_bytes(store.video_key(FP), data + b"more", "video/mp4")
    with pytest.raises(ArchiveError, match=f"size {len(data) + 4} != {len(data)}"):
        await store.verify(_stored(store, data))


async def test_verify_deletes_an_object_its_probe_refuses(store: Store, s3: FakeS3):
    data = b"not a video"
    await store.put_bytes(store.video_key(FP), data, "video/mp4")

    def probe(path):
        raise ValueError("no video stream")

    with pytest.raises(ArchiveError, match="probe failed: no video stream"):
        await store.verify(_stored(store, data), probe=probe)
    assert (BUCKET, store.video_key(FP)) not in s3.objects


async def test_exclusive_holds_one_holder_per_name(monkeypatch):
    monkeypatch.setattr("avatarflow.store.LOCK_POLL_S", 0.001)
    order: list[str] = []

    async def hold(who: str, name: str) -> None:
        async with exclusive(name):
            order.append(f"{who}+")
            await asyncio.sleep(0.02)
            order.append(f"{who}-")

    await asyncio.gather(hold("a", "unit-lock"), hold("b", "unit-lock"))
    assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])
    order.clear()
    await asyncio.gather(hold("a", "unit-lock-1"), hold("b", "unit-lock-2"))
    assert order[:2] == ["a+", "b+"], "different names do not wait for each other"


async def test_replace_json_of_a_key_deleted_meanwhile_answers_none():
    """AWS answers a PUT with If-Match on a missing key 404 NoSuchKey (not 412): the key changed
    (it was deleted), so replace_json must answer None as its docstring says, like delete_if_match
    answers False on a 404, rather than raise ClientError."""
    s3 = FakeS3()
    store = Store(s3, "arch", "team")
    key = store.ledger_key("f" * 64)
    etag = await store.create_json(key, {"n": 1})
    assert await store.delete_if_match(key, etag) is True
    assert await store.replace_json(key, {"n": 2}, etag) is None
    assert ("arch", key) not in s3.objects, "replace never creates"
