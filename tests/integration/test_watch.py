"""The bucket watcher (avatarflow.watch, flows/avatar_watch.py) on real parts.

Library tests on real SeaweedFS (no Prefect): watchers racing over one prefix emit each
portrait once; a non-image and a bad sidecar are rejected with the pipeline's error; a crash
between the claim and the emit, a stale claim, a name sorting before the cursor, an object still
settling.

End to end: a real Prefect server and process worker with the deployments of prefect.yaml, the
real local API as the vendor: portraits (and a non-image) dropped under a watched prefix, two
runs of the `bucket-watch` deployment at once, and the `on-portrait-uploaded` trigger makes one
video per portrait, none twice; the non-image is rejected with a clear error and starts no run.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx

from avatarflow.store import Store
from avatarflow.uploads import derived_seed, sidecar_key, version_id
from avatarflow.watch import Layout, Watcher
from tests.fixtures_prefect_server import deployed, prefect_server  # noqa: F401

NOT_IMAGE = "is not a supported image format (detected: text)"
# a seed no other test of the session uses: the local API counts jobs by seed across tests
SIDECAR_SEED = 4_242_424_242


async def claims(store: Store, prefix: str) -> list[dict]:
    """Every claim document of a watched prefix."""
    layout = Layout(store, prefix)
    out = []
    for o in await store.list_objects(layout.claims_prefix, limit=10_000_000):
        doc, _ = await store.read_json(o["key"])
        if doc:
            out.append(doc)
    return out


class Recorder:
    """An emit that records events (after a pause, to widen the window of a race)."""

    def __init__(self, fail_first: int = 0, pause: float = 0.05):
        self.events: list = []
        self.fail_first, self.pause = fail_first, pause

    async def __call__(self, event) -> None:
        await asyncio.sleep(self.pause)
        if self.fail_first > 0:
            self.fail_first -= 1
            raise ConnectionResetError("events API went away")
        self.events.append(event)

    def uris(self) -> list[str]:
        return [e.resource.id for e in self.events]


def _store(s3, bucket: str, prefix: str) -> Store:
    return Store(s3=s3, bucket=bucket, prefix=prefix)


def _put(s3, bucket: str, key: str, body: bytes, content_type: str = "image/jpeg", **meta: str) -> str:
    s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type, Metadata=meta)
    return f"s3://{bucket}/{key}"


async def test_racing_watchers_emit_each_portrait_once_and_reject_the_non_image(s3, s3_bucket, s3_prefix,
                                                                               portrait_bytes):
    store = _store(s3, s3_bucket, s3_prefix)
    base = f"{s3_prefix}/incoming"
    portraits = [_put(s3, s3_bucket, f"{base}/p{i:02d}.jpg", portrait_bytes) for i in range(8)]
    s3.put_object(Bucket=s3_bucket, Key=f"{base}/p01.json",
                  Body=json.dumps({"voice_script": "From the sidecar.", "voice": "Puck (Male)", "seed": 11}).encode())
    portraits.append(_put(s3, s3_bucket, f"{base}/meta.png", portrait_bytes, "image/png",
                          voice_script="From metadata.", **{"voice-language": "English (UK)"}))
    text = _put(s3, s3_bucket, f"{base}/notes.jpg", b"just some text, not a picture\n", "image/jpeg")
    badside = _put(s3, s3_bucket, f"{base}/q.jpg", portrait_bytes)
    s3.put_object(Bucket=s3_bucket, Key=f"{base}/q.json", Body=json.dumps({"voice": "Nobody"}).encode())

    emit = Recorder()
    watchers = [Watcher(store, "incoming/", emit=emit, settle_seconds=0) for _ in range(3)]
    reports = await asyncio.gather(*(w.scan(full=False) for w in watchers))

    uris = emit.uris()
    assert sorted(uris) == sorted(portraits), uris  # every portrait, none twice
    assert sorted(u for r in reports for u in r.emitted) == sorted(portraits)
    rejected = {x.uri: x.error for r in reports for x in r.rejected}
    assert set(rejected) == {text, badside}, rejected
    assert NOT_IMAGE in rejected[text] and text in rejected[text]
    assert "voice" in rejected[badside] and "Nobody" in rejected[badside]

    by_uri = {e.resource.id: e for e in emit.events}
    side = by_uri[f"s3://{s3_bucket}/{base}/p01.jpg"].payload["request"]
    assert side == {"voice_script": "From the sidecar.", "voice": "Puck (Male)", "seed": 11}
    meta = by_uri[f"s3://{s3_bucket}/{base}/meta.png"].payload["request"]
    assert meta["voice_script"] == "From metadata." and meta["voice_language"] == "English (UK)"
    plain = by_uri[portraits[0]]
    etag = s3.head_object(Bucket=s3_bucket, Key=f"{base}/p00.jpg")["ETag"].strip('"')
    version = version_id(s3_bucket, f"{base}/p00.jpg", etag)
    assert plain.payload["request"] == {"seed": derived_seed(version)}  # reproducible: a re-emit is a cache hit
    assert plain.resource["avatarflow.s3_uri"] == portraits[0]

    # the claims record it all; a second round (incremental and full) emits nothing more
    docs = await claims(store, "incoming/")
    assert sorted(d["state"] for d in docs) == ["emitted"] * len(portraits) + ["rejected"] * 2
    again = await asyncio.gather(watchers[0].scan(full=False), watchers[1].scan(full=True))
    assert len(emit.events) == len(portraits) and not any(r.emitted or r.rejected for r in again)
    assert again[1].cursor_after == f"{base}/q.jpg"  # the cursor is past every handled key


async def test_emit_failure_released_stale_claim_taken_over_live_claim_left(s3, s3_bucket, s3_prefix,
                                                                          portrait_bytes):
    store = _store(s3, s3_bucket, s3_prefix)
    base = f"{s3_prefix}/incoming"
    a = _put(s3, s3_bucket, f"{base}/a.jpg", portrait_bytes)

    # the events API fails: the object stays pending and the cursor stays before it
    flaky = Recorder(fail_first=1)
    w = Watcher(store, "incoming/", emit=flaky, settle_seconds=0)
    first = await w.scan(full=False)
    assert first.emitted == [] and first.pending == [f"{base}/a.jpg"] and first.cursor_after is None
    second = await w.scan(full=False)
    assert second.emitted == [a] and flaky.uris() == [a]

    # a watcher died holding claims: one stale (past the lease), one fresh
    emit = Recorder()
    w2 = Watcher(store, "incoming/", emit=emit, settle_seconds=0, lease_seconds=60)
    for name, age in (("stale", 600), ("fresh", 1)):
        key = f"{base}/{name}.jpg"
        _put(s3, s3_bucket, key, portrait_bytes)
        etag = s3.head_object(Bucket=s3_bucket, Key=key)["ETag"].strip('"')
        when = (datetime.now(timezone.utc) - timedelta(seconds=age)).isoformat()
        await store.create_json(w2.layout.claim_key(version_id(s3_bucket, key, etag)),
                                {"key": key, "etag": etag, "state": "claimed", "holder": "dead", "claimed_at": when})
    report = await w2.scan(full=False)
    assert emit.uris() == [f"s3://{s3_bucket}/{base}/stale.jpg"], emit.uris()
    assert report.claimed_elsewhere == 1 and report.cursor_after == f"{base}/a.jpg"  # not past "fresh"
    taken = {d["key"]: d for d in await claims(store, "incoming/")}
    assert taken[f"{base}/stale.jpg"]["state"] == "emitted"
    assert taken[f"{base}/stale.jpg"]["taken_over_from"] == "dead"
    assert taken[f"{base}/fresh.jpg"]["state"] == "claimed"


async def test_late_names_settling_objects_and_the_full_scan(s3, s3_bucket, s3_prefix, portrait_bytes):
    store = _store(s3, s3_bucket, s3_prefix)
    base = f"{s3_prefix}/incoming"
    emit = Recorder()
    w = Watcher(store, "incoming/", emit=emit, settle_seconds=0)
    m = _put(s3, s3_bucket, f"{base}/m.jpg", portrait_bytes)
    assert (await w.scan()).emitted == [m]  # the first scan is a full one (no full pass yet)

    early = _put(s3, s3_bucket, f"{base}/a.jpg", portrait_bytes)  # sorts before the cursor
    assert (await w.scan()).emitted == []  # incremental: after the cursor only
    full = await w.scan(full=True)
    assert full.emitted == [early] and emit.uris() == [m, early]

    slow = Watcher(store, "incoming/", emit=emit, settle_seconds=3600)  # nothing has settled for an hour
    _put(s3, s3_bucket, f"{base}/z.jpg", portrait_bytes)
    r = await slow.scan(full=False)
    assert r.emitted == [] and r.pending == [f"{base}/z.jpg"] and r.cursor_after == f"{base}/m.jpg"
    assert sidecar_key(f"{base}/z.jpg") == f"{base}/z.json" and sidecar_key("x") == "x.json"


# --- end to end: the deployment, the trigger, the worker, the local API ------------------------

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _api(server, method: str, path: str, **kw) -> httpx.Response:
    for attempt in range(6):
        r = httpx.request(method, f"{server.api_url}{path}", headers=server.headers, timeout=30, **kw)
        if r.status_code != 503:
            return r
        time.sleep(1 + attempt)
    return r


def _wait_final(server, run_id: str, log, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = _api(server, "GET", f"/flow_runs/{run_id}").json()
        if run.get("state_type") in FINAL:
            return run
        time.sleep(1)
    raise AssertionError(f"run {run_id} not final after {timeout} s\n{log.read_text()[-4000:]}")


def test_dropped_portraits_become_one_video_each(prefect_server, deployed, s3, s3_bucket, portrait_bytes,  # noqa: F811
                                                 local_api):
    server, log = prefect_server, deployed["worker_log"]
    watched = f"incoming-{uuid.uuid4().hex[:8]}/"
    base = f"{deployed['prefix']}/{watched}"
    plain = _put(s3, s3_bucket, f"{base}ada.jpg", portrait_bytes, voice_script="From the metadata.")
    s3.put_object(Bucket=s3_bucket, Key=f"{base}bob.json",
                  Body=json.dumps({"voice_script": "Dropped in a bucket.", "voice": "Puck (Male)", "seed": SIDECAR_SEED}).encode())
    sidecar = _put(s3, s3_bucket, f"{base}bob.jpg", portrait_bytes)
    text = _put(s3, s3_bucket, f"{base}readme.jpg", b"this is not a portrait\n", "image/jpeg")
    ada_etag = s3.head_object(Bucket=s3_bucket, Key=f"{base}ada.jpg")["ETag"].strip('"')
    seeds = {plain: derived_seed(version_id(s3_bucket, f"{base}ada.jpg", ada_etag)), sidecar: SIDECAR_SEED}

    watch = _api(server, "GET", "/deployments/name/avatar_watch/bucket-watch").json()
    uploaded = _api(server, "GET", "/deployments/name/avatar_video/on-portrait-uploaded").json()
    assert watch["schedules"] and watch["schedules"][0]["schedule"]["interval"] > 0
    params = {"prefix": watched, "settle_seconds": 0, "full_scan": False}
    runs = [_api(server, "POST", f"/deployments/{watch['id']}/create_flow_run", json={"parameters": params}).json()
            for _ in range(2)]  # two watchers at once
    for run in runs:
        done = _wait_final(server, run["id"], log)
        assert done["state_type"] == "COMPLETED", f"{done['state']}\n{log.read_text()[-4000:]}"

    # the watchers' record: each portrait emitted once, the non-image rejected with the reason
    docs = {f"s3://{s3_bucket}/{d['key']}": d for d in asyncio.run(
        claims(Store(s3=s3, bucket=s3_bucket, prefix=deployed["prefix"]), watched))}
    assert {u: d["state"] for u, d in docs.items()} == {plain: "emitted", sidecar: "emitted", text: "rejected"}
    assert NOT_IMAGE in docs[text]["error"]
    arts = _api(server, "POST", "/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [r["id"] for r in runs]}}}).json()
    rows = [row for a in arts if a["key"] == "avatar-watch"
            for row in (json.loads(a["data"]) if isinstance(a["data"], str) else a["data"])]
    assert sorted((r["object"], r["status"]) for r in rows) == sorted(
        [(plain, "emitted"), (sidecar, "emitted"), (text, "rejected")]), rows

    # the trigger: one run per portrait, each completed with its archived video; none for the text
    deadline, mine = time.time() + 180, []
    while time.time() < deadline:
        mine = [r for r in _api(server, "POST", "/flow_runs/filter", json={
            "deployments": {"id": {"any_": [uploaded["id"]]}}, "limit": 200}).json()
            if r["parameters"]["request"]["image"].startswith(f"s3://{s3_bucket}/{base}")]
        if len(mine) >= 2 and all(r["state_type"] in FINAL for r in mine):
            break
        time.sleep(2)
    time.sleep(5)  # a duplicate event would have made its run by now
    again = [r for r in _api(server, "POST", "/flow_runs/filter", json={
        "deployments": {"id": {"any_": [uploaded["id"]]}}, "limit": 200}).json()
        if r["parameters"]["request"]["image"].startswith(f"s3://{s3_bucket}/{base}")]
    images = sorted(r["parameters"]["request"]["image"] for r in again)
    assert images == sorted([plain, sidecar]), images
    for r in again:
        r = _wait_final(server, r["id"], log)
        assert r["state_type"] == "COMPLETED", f"{r['state']}\n{log.read_text()[-4000:]}"
        assert r["parameters"]["request"]["seed"] == seeds[r["parameters"]["request"]["image"]]
    bob = next(r for r in again if r["parameters"]["request"]["image"] == sidecar)
    assert bob["parameters"]["request"]["voice_script"] == "Dropped in a bucket."

    # one job per portrait at the API, and an archived video each
    jobs = local_api.stats()["jobs"].values()
    for uri, seed in seeds.items():
        assert sum(j["seed"] == seed for j in jobs) == 1, (uri, seed)
    videos = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"{deployed['prefix']}/videos/")
              .get("Contents", []) if o["Key"].endswith("/manifest.json")]
    archived = [json.loads(s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read()) for k in videos]
    for seed in seeds.values():
        assert sum(m["seed"] == seed for m in archived) == 1, seed
