"""Polling on real parts: the shared model on SeaweedFS, the local API's vendor-like timing mode,
the record and the history over HTTP, and a flow run's predicted against actual."""

from __future__ import annotations

import asyncio
import statistics
import time
import urllib.parse

import httpx
import pytest

from avatarflow.duration import (
    DurationModel,
    Observation,
    Speech,
    fixed_prediction,
    script_seconds,
)
from avatarflow.local.server.queue import Timing, request_key
from avatarflow.poll import DEFAULT_PLAN
from avatarflow.shared_duration import SharedDurationModel

COST = 3.0  # the local vendor-like mode's default at 720p

def _obs(i: int) -> Observation:
    return Observation(id=f"job{i}", at=1000.0 + i, resolution="720p", speech_s=10.0 + i, exact=True,
                       queue_s=2.0, processing_s=30.0 + 3 * i)

def test_shared_model_on_the_real_store(s3, s3_bucket, s3_prefix):
    from avatarflow.store import Store

    async def main():
        store = Store(s3, s3_bucket, s3_prefix)
        workers = [SharedDurationModel(store, refresh_s=0) for _ in range(3)]
        assert all(await asyncio.gather(*(w.record(_obs(i)) for i, w in enumerate(workers * 2))))
        doc, etag = await store.read_json(workers[0].key)
        assert etag and {o["id"] for o in doc["observations"]} == {f"job{i}" for i in range(6)}

    asyncio.run(main())

def test_timing_arithmetic():
    t = Timing(mode="vendor", queue_wait=3.0, queue_jitter=1.0, jitter=0.02, seed=7)
    a = t.draws(request_key({"voice_script": "x"}, 1))
    assert a == t.draws(request_key({"voice_script": "x"}, 1))  # seeded by the request
    assert a != t.draws(request_key({"voice_script": "x"}, 2))
    draws = [t.draws(str(i)) for i in range(2000)]
    assert all(2.0 <= q <= 4.0 and 0.94 <= f <= 1.06 for q, f in draws)
    assert statistics.pstdev(f for _, f in draws) == pytest.approx(0.02, rel=0.1)
    assert t.processing_s("720p", 10.0) == 30.0 and t.processing_s("1080p", 10.0) == 54.0
    assert t.processing_s("720p", 10.0, 1.01) == pytest.approx(30.3)
    assert Timing().vendor is False and t.vendor
    with pytest.raises(ValueError):
        t.processing_s("4k", 1.0)

def test_timing_flags_are_checked():
    from avatarflow.local.server.serve import timing_of

    t = timing_of("vendor", 2.0, 0.5, ["1080p=6"], 0.02, 3)
    assert t.cost_per_second == {"720p": 3.0, "1080p": 6.0} and t.queue_wait == 2.0 and t.seed == 3
    for bad in (("fast", 1, 1, [], 0, 0), ("vendor", 1, 1, ["4k=2"], 0, 0), ("vendor", 1, 1, ["720p=x"], 0, 0),
                ("vendor", 1, 1, ["720p=0"], 0, 0)):
        with pytest.raises(ValueError):
            timing_of(*bad)

def test_vendor_timing_mode_over_http(tmp_path, portrait_bytes):
    """A job stays QUEUED for its queue wait and PROCESSING until queue wait + cost x length,
    although the render ends sooner; status, result and history agree."""
    import base64

    from tests.fixtures_api import start_local_api, stop_local_api

    server = start_local_api(tmp_path, "--timing", "vendor", "--queue-wait", "1.5", "--queue-jitter", "0",
                             "--cost-per-second", "720p=2.0", "--timing-jitter", "0", "--workers", "1")
    try:
        h = server.headers
        image = "data:image/jpeg;base64," + base64.b64encode(portrait_bytes).decode()
        body = {"image": image, "voice_script": "Hello there, this is a timing test.", "seed": 3}
        with httpx.Client(base_url=server.base_url, headers=h, timeout=30) as c:
            sent = time.time()
            rid = c.post("/v2/p-video-avatar", json=body).json()["request_id"]
            seen: list[tuple[float, str, str]] = []
            while True:
                st = c.get(f"/v2/requests/{rid}/status").json()["status"]
                res = c.get(f"/v2/requests/{rid}").json()
                seen.append((time.time() - sent, st, res["status"]))
                if st == "COMPLETED" and res["status"] == "COMPLETED":
                    break
                assert time.time() - sent < 60
                time.sleep(0.25)
            row = c.get(f"/inference-request/request-history/{rid}").json()
        job = server.stats()["jobs"][rid]
        length = job["duration_s"]
        assert 1.5 < length < 6
        assert job["modelled_queue_s"] == pytest.approx(1.5)
        assert job["modelled_processing_s"] == pytest.approx(2.0 * length)
        m = res["metrics"]
        assert m["queue_time"] == pytest.approx(1.5, abs=0.01)
        assert m["inference_time"] == pytest.approx(2.0 * length, abs=0.1)
        assert row["latency_ms"] / 1000 == pytest.approx(m["total_time"], abs=0.01)
        assert any(s == "QUEUED" for _, s, _ in seen) and any(s == "PROCESSING" for _, s, _ in seen)
        for t, st, rs in seen:
            if t < 1.4:
                assert st == "QUEUED"
            if t < 1.4 + 2.0 * length - 0.1:
                assert st != "COMPLETED" and rs != "COMPLETED"  # the render ended sooner: still PROCESSING
        done = next(t for t, s, _ in seen if s == "COMPLETED")
        assert done >= 1.5 + 2.0 * length - 0.05
    finally:
        stop_local_api(server)

def test_waits_on_the_record_and_the_history_share_the_plan_over_http(tmp_path, portrait_bytes):
    """On the vendor-like mode with a warm prediction: `wait` asks the result endpoint only, a
    few times, and notices COMPLETED within the plan's gap; `wait(via="history")` follows the same job
    in the request history with the same loop; `predict` is re-read before each poll."""
    import base64

    from avatarflow.client import SegmindClient
    from avatarflow.duration import fixed_prediction as fixed
    from tests.fixtures_api import start_local_api, stop_local_api

    server = start_local_api(tmp_path, "--timing", "vendor", "--queue-wait", "1", "--queue-jitter", "0",
                             "--cost-per-second", "720p=3.0", "--timing-jitter", "0")
    try:
        image = "data:image/jpeg;base64," + base64.b64encode(portrait_bytes).decode()
        body = {"image": image, "voice_script": "Hello there, this is a polling test.", "seed": 5}

        async def main():
            async with SegmindClient(api_key=server.api_key, base_url=server.base_url) as client:
                t0 = time.time()
                rid = (await client.submit(body)).request_id
                events, asked = [], []
                # a deliberately poor first guess; `predict` brings the right one (as a model that
                # learned meanwhile would): queue 1 s + 3.0 s x the speech's length
                speech = script_seconds(body["voice_script"], None, "English (US)")

                def predict():
                    asked.append(1)
                    length = server.stats()["jobs"][rid]["duration_s"] or speech
                    p = fixed(1.0 + 3.0 * length)
                    return type(p)(**{**p.__dict__, "spread_s": 0.5, "processing_spread_s": 0.3,
                                      "queue_s": 1.0, "processing_s": 3.0 * length, "queue_spread_s": 0.1})

                res = await client.wait(rid, submitted_at=t0, prediction=fixed(100.0), predict=predict,
                                        on_status=events.append)
                noticed = time.time()
                row = await client.wait(rid, via="history", submitted_at=t0, prediction=predict())
                return rid, res, events, asked, noticed, row

        rid, res, events, asked, noticed, row = asyncio.run(main())
        stats = server.stats()
        job = stats["jobs"][rid]
        assert res.status == "COMPLETED" and res.metrics.queue_time == pytest.approx(1.0, abs=0.05)
        assert stats["requests"].get("status", 0) == 0  # the result endpoint carried the status
        assert stats["requests"]["result"] == len(events) <= 4 and len(asked) == len(events) + 1  # + the one below
        assert 0 <= noticed - job["completed_at"] < DEFAULT_PLAN.gap_s + 1.0
        assert row.state == "COMPLETED" and stats["requests"]["history"] == 1
    finally:
        stop_local_api(server)

def test_a_failed_history_row_is_final(api):
    """A FAILED row in the history raises JobFailed with its error, through the same loop."""
    import base64
    import io

    from PIL import Image

    from avatarflow.client import SegmindClient
    from avatarflow.errors import JobFailed

    api.set_faults({"fail_rate": 1.0})
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    body = {"image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), "seed": 1}

    async def main():
        async with SegmindClient(api_key=api.api_key, base_url=api.base_url) as client:
            rid = (await client.submit(body)).request_id
            with pytest.raises(JobFailed) as info:
                await client.wait(rid, via="history", prediction=fixed_prediction(2.0))
            return info.value

    assert asyncio.run(main()).error

def test_a_run_records_predicted_vs_actual_and_teaches_the_shared_model(api, pipeline_env, portrait_path, s3,
                                                                         s3_bucket):
    """The flow predicts before submit, polls on the plan, writes predicted vs actual into the
    manifest, and merges the job into the backend's document in the bucket; a second run of
    another script predicts from it."""
    import json

    from avatarflow.flows.avatar_video import avatar_video

    from avatarflow.spec import VideoRequest

    prefix = pipeline_env
    out = asyncio.run(avatar_video(request=VideoRequest(
        image=str(portrait_path), voice_script="A short line to time the job by.", seed=4242)))
    bucket, key = out["manifest_uri"][5:].split("/", 1)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    d = manifest["duration"]
    assert d["predicted"]["source"] == "prior" and d["predicted"]["seconds"] > 0
    assert d["actual"]["total_s"] > 0 and d["actual"]["polls"] >= 1 and d["actual"]["noticed_s"] >= d["actual"]["total_s"]
    assert d["error_s"] == pytest.approx(d["actual"]["total_s"] - d["predicted"]["seconds"], abs=0.01)
    models = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"{prefix}/models/").get("Contents", [])]
    host = urllib.parse.urlsplit(api.base_url).netloc.replace(":", "-")
    assert models == [f"{prefix}/models/duration-{manifest['backend']}-{host}.json"]
    doc = json.loads(s3.get_object(Bucket=s3_bucket, Key=models[0])["Body"].read())
    assert out["request_id"] in {o["id"] for o in doc["observations"]}
    obs = next(o for o in doc["observations"] if o["id"] == out["request_id"])
    assert obs["output_s"] == pytest.approx(manifest["video"]["duration_s"], abs=0.01)

    out2 = asyncio.run(avatar_video(request=VideoRequest(
        image=str(portrait_path), voice_script="Another short line, a little longer than the first one.", seed=4243)))
    bucket, key = out2["manifest_uri"][5:].split("/", 1)
    d2 = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())["duration"]
    assert d2["predicted"]["source"] == "fitted" and d2["predicted"]["n"] >= 1

def test_summary_row_shows_predicted_vs_actual():
    from avatarflow.flows.avatar_video import _timing_row

    from avatarflow.duration import timing_record

    pred = DurationModel().predict("720p", Speech(10.0, True))
    record = timing_record(pred, {"queue_time": 2.0, "inference_time": 30.0}, {"polls": 2, "noticed_s": 33.1})
    assert record["actual"]["total_s"] == 32.0 and record["error_s"] == pytest.approx(32.0 - pred.seconds, abs=0.01)
    row = _timing_row(record, cache_hit=False)
    assert row.startswith("| time to COMPLETED | predicted 35.0 s") and "(prior, 0 jobs)" in row
    assert "actual 32.0 s (queue 2.0 s, processing 30.0 s)" in row and "noticed at 33.1 s after 2 polls" in row
    assert _timing_row(record, cache_hit=True) == "" and _timing_row(None, cache_hit=False) == ""
