"""avatarflow.s3io and avatarflow.local.services against a real SeaweedFS."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading

import httpx
import pytest

from avatarflow import s3io, store, verify
from avatarflow.s3io import ArchiveError, MiB


async def _chunks(data: bytes, size: int = 64 * 1024, *, fail_after: int | None = None):
    for i in range(0, len(data), size):
        if fail_after is not None and i >= fail_after:
            raise RuntimeError("source broke mid-stream")
        yield data[i : i + size]
        await asyncio.sleep(0)


def _pending_uploads(s3, bucket: str, key: str) -> list[dict]:
    resp = s3.list_multipart_uploads(Bucket=bucket, Prefix=key)
    return [u for u in resp.get("Uploads", []) if u["Key"] == key]


def _exists(s3, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if s3io.is_not_found(exc):
            return False
        raise
    return True


# --------------------------------------------------------------------------------------------
# archive_stream


async def test_multipart_stream_roundtrip(s3, s3_bucket, s3_prefix):
    data = os.urandom(20 * MiB + 12345)
    key = f"{s3_prefix}/video.mp4"
    stored = await s3io.archive_stream(
        _chunks(data), s3=s3, bucket=s3_bucket, key=key,
        metadata={"fingerprint": "abc123", "Request-Id": "req-1", "voice": "Zoë"},
        part_size=5 * MiB,
    )
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.parts == 5
    assert stored.s3_uri == f"s3://{s3_bucket}/{key}"
    head = s3.head_object(Bucket=s3_bucket, Key=key)
    assert head["ContentLength"] == len(data)
    assert head["ContentType"] == "video/mp4"
    assert head["Metadata"]["sha256"] == stored.sha256
    assert head["Metadata"]["fingerprint"] == "abc123"
    assert head["Metadata"]["request-id"] == "req-1"
    assert head["Metadata"]["voice"] == "Zo%C3%AB"  # non-ASCII percent-encoded
    body = s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == stored.sha256
    assert not _pending_uploads(s3, s3_bucket, key)
    v = verify.verify(s3, stored)
    assert v.size == len(data) and v.sha256 == stored.sha256


async def test_small_stream_single_put(s3, s3_bucket, s3_prefix):
    data = b"\x00\x00\x00\x18ftypmp42" + os.urandom(1000)
    key = f"{s3_prefix}/small.mp4"
    stored = await s3io.archive_stream(
        _chunks(data, 100), s3=s3, bucket=s3_bucket, key=key, metadata={"k": "v"}, part_size=5 * MiB
    )
    assert stored.parts == 0
    assert (stored.size, stored.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    head = s3.head_object(Bucket=s3_bucket, Key=key)
    assert head["Metadata"] == {"k": "v", "sha256": stored.sha256}
    assert head["ContentType"] == "video/mp4"
    assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == data


async def test_empty_stream(s3, s3_bucket, s3_prefix):
    key = f"{s3_prefix}/empty.bin"
    stored = await s3io.archive_stream(
        _chunks(b""), s3=s3, bucket=s3_bucket, key=key, content_type="application/octet-stream"
    )
    assert stored.size == 0 and stored.sha256 == hashlib.sha256(b"").hexdigest()
    verify.verify(s3, stored)


async def test_error_mid_stream_leaves_nothing(s3, s3_bucket, s3_prefix):
    data = os.urandom(12 * MiB)
    key = f"{s3_prefix}/broken.mp4"
    with pytest.raises(RuntimeError, match="mid-stream"):
        await s3io.archive_stream(
            _chunks(data, fail_after=11 * MiB), s3=s3, bucket=s3_bucket, key=key, part_size=5 * MiB
        )
    assert not _exists(s3, s3_bucket, key)
    assert not _pending_uploads(s3, s3_bucket, key)


async def test_short_stream_against_expected_size_leaves_nothing(s3, s3_bucket, s3_prefix):
    key = f"{s3_prefix}/short.mp4"
    with pytest.raises(ArchiveError, match="expected"):
        await s3io.archive_stream(
            _chunks(os.urandom(6 * MiB)), s3=s3, bucket=s3_bucket, key=key,
            part_size=5 * MiB, expected_size=7 * MiB,
        )
    assert not _exists(s3, s3_bucket, key)
    assert not _pending_uploads(s3, s3_bucket, key)


async def test_cancelled_stream_aborts_upload(s3, s3_bucket, s3_prefix):
    key = f"{s3_prefix}/cancelled.mp4"
    started = asyncio.Event()

    async def slow():
        yield os.urandom(6 * MiB)
        started.set()
        await asyncio.sleep(3600)
        yield b"never"

    task = asyncio.create_task(
        s3io.archive_stream(slow(), s3=s3, bucket=s3_bucket, key=key, part_size=5 * MiB)
    )
    await asyncio.wait_for(started.wait(), 10)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not _exists(s3, s3_bucket, key)
    assert not _pending_uploads(s3, s3_bucket, key)


async def test_part_size_below_s3_minimum_rejected(s3, s3_bucket):
    with pytest.raises(ValueError):
        await s3io.archive_stream(_chunks(b"x"), s3=s3, bucket=s3_bucket, key="x", part_size=MiB)


async def test_archive_url_streams_http_body(s3, s3_bucket, s3_prefix):
    data = os.urandom(6 * MiB + 7)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/missing":
            return httpx.Response(404)
        return httpx.Response(200, headers={"content-type": "video/mp4"}, content=data)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        key = f"{s3_prefix}/from-url.mp4"
        stored = await s3io.archive_url(
            "http://render.local/out.mp4", s3=s3, bucket=s3_bucket, key=key, client=client, part_size=5 * MiB
        )
        assert stored.sha256 == hashlib.sha256(data).hexdigest() and stored.parts == 2
        with pytest.raises(httpx.HTTPStatusError):
            await s3io.archive_url(
                "http://render.local/missing", s3=s3, bucket=s3_bucket, key=f"{s3_prefix}/m.mp4", client=client
            )
        assert not _exists(s3, s3_bucket, f"{s3_prefix}/m.mp4")


# --------------------------------------------------------------------------------------------
# verify


async def test_verify_detects_tampered_object(s3, s3_bucket, s3_prefix):
    data = os.urandom(64 * 1024)
    key = f"{s3_prefix}/tampered.mp4"
    stored = await s3io.archive_stream(_chunks(data), s3=s3, bucket=s3_bucket, key=key)
    seen = []
    result = verify.verify(s3, stored, probe=lambda p: seen.append(p.read_bytes()) or "probed")
    assert result.probe == "probed" and seen == [data]

    # same size, other bytes, metadata copied along (a checksum is the only thing to catch it)
    tampered = bytearray(data)
    tampered[1000] ^= 0xFF
    s3.put_object(Bucket=s3_bucket, Key=key, Body=bytes(tampered), Metadata={"sha256": stored.sha256})
    with pytest.raises(ArchiveError, match="sha256"):
        verify.verify(s3, stored)
    assert not _exists(s3, s3_bucket, key)


async def test_verify_size_mismatch_and_probe_failure(s3, s3_bucket, s3_prefix):
    key = f"{s3_prefix}/size.mp4"
    stored = await s3io.archive_stream(_chunks(b"abc" * 1000), s3=s3, bucket=s3_bucket, key=key)
    s3.put_object(Bucket=s3_bucket, Key=key, Body=b"abc")
    with pytest.raises(ArchiveError, match="size"):
        verify.verify(s3, stored)
    assert not _exists(s3, s3_bucket, key)

    stored = await s3io.archive_stream(_chunks(b"not a video"), s3=s3, bucket=s3_bucket, key=key)

    def probe(path):
        raise ValueError("no video stream")

    with pytest.raises(ArchiveError, match="probe"):
        await verify.verify_async(s3, stored, probe=probe)
    assert not _exists(s3, s3_bucket, key)
    with pytest.raises(ArchiveError, match="not found"):
        verify.verify(s3, stored)


# --------------------------------------------------------------------------------------------
# presigned URLs, staging, JSON


def test_presigned_url_and_anonymous_denied(s3, s3_bucket, s3_prefix):
    key = f"{s3_prefix}/portrait.jpg"
    data = b"\xff\xd8\xff" + os.urandom(2048)
    url = s3io.stage_bytes(s3, s3_bucket, key, data, "image/jpeg")
    assert "Signature" in url and s3_bucket in url
    r = httpx.get(url, trust_env=False)
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"] == "image/jpeg"
    plain = url.split("?", 1)[0]
    anon = httpx.get(plain, trust_env=False)
    assert anon.status_code == 403 and anon.content != data
    assert s3io.presign(s3, s3_bucket, key, expires=60).startswith(plain)


async def test_json_documents(s3, s3_bucket, s3_prefix):
    docs = store.Store(s3, s3_bucket, s3_prefix)
    key = docs.key("doc.json")
    assert await docs.get_json(key) is None
    await docs.put_json(key, {"a": 1, "text": "héllo"})
    assert await docs.get_json(key) == {"a": 1, "text": "héllo"}
    await docs.put_json(key, {"a": 2})
    assert await docs.get_json(key) == {"a": 2}
    assert s3.head_object(Bucket=s3_bucket, Key=key)["ContentType"].startswith("application/json")


async def test_create_json_if_absent_is_honoured(s3, s3_bucket, s3_prefix):
    docs = store.Store(s3, s3_bucket, s3_prefix)
    key = docs.key("ledger.json")
    assert await docs.create_json(key, {"request_id": "first"})
    assert await docs.create_json(key, {"request_id": "second"}) is None
    assert await docs.get_json(key) == {"request_id": "first"}


async def test_create_json_concurrent_single_winner(s3, s3_bucket, s3_prefix):
    docs = store.Store(s3, s3_bucket, s3_prefix)
    key = docs.key("race.json")
    barrier = threading.Barrier(8)
    results: dict[int, bool] = {}

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = asyncio.run(docs.create_json(key, {"writer": i})) is not None

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, ok in results.items() if ok]
    assert len(winners) == 1, results
    assert await docs.get_json(key) == {"writer": winners[0]}


def test_uri_and_manifest_helpers():
    assert store.parse_s3_uri("s3://b/videos/x/video.mp4") == ("b", "videos/x/video.mp4")
    for bad in ("http://b/k", "s3://b", "s3://b/", "s3:///k"):
        with pytest.raises(ValueError):
            store.parse_s3_uri(bad)
    layout = store.Store(None, "b", "team/")
    assert layout.manifest_key("fp") == "team/videos/fp/manifest.json"
    assert layout.video_key("fp") == "team/videos/fp/video.mp4"
    assert store.s3_uri("b", "k/x") == "s3://b/k/x"


def _tiny_mp4() -> bytes:
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(10):
            img = np.full((64, 64, 3), i * 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


async def test_verify_with_media_probe(s3, s3_bucket, s3_prefix):
    from avatarflow.media.video import probe_video
    data = _tiny_mp4()
    key = f"{s3_prefix}/video.mp4"
    stored = await s3io.archive_stream(_chunks(data, 1000), s3=s3, bucket=s3_bucket, key=key)
    result = await verify.verify_async(s3, stored, probe=probe_video)
    assert result.probe is not None
    bad = await s3io.archive_stream(_chunks(b"\x00" * 5000), s3=s3, bucket=s3_bucket, key=key)
    with pytest.raises(ArchiveError, match="probe"):
        verify.verify(s3, bad, probe=probe_video)
    assert not _exists(s3, s3_bucket, key)


async def test_replace_only_if_unchanged_and_delete_if_match(s3, s3_bucket, s3_prefix):
    docs = store.Store(s3, s3_bucket, s3_prefix)
    key = docs.key("cas.json")
    first = await docs.create_json(key, {"v": 1})
    doc, etag = await docs.read_json(key)
    assert doc == {"v": 1} and etag == first
    second = await docs.replace_json(key, {"v": 2}, etag)
    assert second and second != first
    assert await docs.replace_json(key, {"v": 3}, first) is None, "a stale ETag must lose"
    assert await docs.delete_if_match(key, first) is False
    assert await docs.get_json(key) == {"v": 2}
    assert await docs.delete_if_match(key, second) is True
    assert await docs.read_json(key) == (None, None)
