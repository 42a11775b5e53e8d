"""The duration model and the poll plan (pure, on a fake clock: no timed tests), the model shared
through a store with conditional writes, and the local API's vendor-like timing mode."""

from __future__ import annotations

import asyncio
import copy
import math
import random
import statistics
import time
import urllib.parse
from datetime import UTC

import httpx
import pytest

from avatarflow.api_http import backoff_delay
from avatarflow.duration import (
    PRIOR_COST_PER_S,
    PRIOR_QUEUE_S,
    DurationModel,
    Observation,
    Prediction,
    Speech,
    fixed_prediction,
    observation,
    script_seconds,
    theil_sen,
)
from avatarflow.local.server.queue import Timing, request_key
from avatarflow.poll import DEFAULT_PLAN, Answer, Poll, next_poll, window
from avatarflow.shared_duration import SharedDurationModel, model_key, service_name

COST = 3.0  # the local vendor-like mode's default at 720p


def poll_plan(pred: Prediction, *, until: float | None = None, max_polls: int = 200) -> list[Poll]:
    """The plan's whole schedule on a fake clock, every answer non-final (QUEUED before the
    predicted queue wait, PROCESSING after); stops at the first poll at or past `until`."""
    until = until if until is not None else 3 * pred.seconds + 30
    answers: list[Answer] = []
    polls: list[Poll] = []
    while len(polls) < max_polls:
        poll = next_poll(pred, answers, now=polls[-1].at if polls else 0.0)
        polls.append(poll)
        if poll.at >= until:
            break
        answers.append(Answer(poll.at, "QUEUED" if poll.at < pred.queue_s else "PROCESSING"))
    return polls


def simulate(pred: Prediction, end_s: float, *, queue_s: float | None = None) -> tuple[int, float, int]:
    """(requests, slack, polls) for a job ending at `end_s` (out of the queue at `queue_s`),
    polled by the plan on a fake clock: requests count the poll that sees COMPLETED and the
    extra result request a status poll needs then."""
    queue_s = queue_s if queue_s is not None else min(pred.queue_s, end_s)
    answers: list[Answer] = []
    now, polls = 0.0, 0
    while True:
        poll = next_poll(pred, answers, now=now)
        polls += 1
        now = poll.at
        if now >= end_s:
            return polls + (1 if poll.endpoint == "status" else 0), now - end_s, polls
        answers.append(Answer(now, "QUEUED" if now < queue_s else "PROCESSING"))


def _jobs(rng: random.Random, n: int, *, jitter: float = 0.01, queue: float = 3.0, qj: float = 1.0):
    """(speech seconds, queue wait, processing) of jobs lasting 20..300 s, log-uniformly."""
    out = []
    for _ in range(n):
        total = math.exp(rng.uniform(math.log(20), math.log(300)))
        speech = (total - queue) / COST
        out.append((speech, queue + rng.uniform(-qj, qj), COST * speech * (1 + rng.gauss(0, jitter))))
    return out


def _model(jobs) -> DurationModel:
    return DurationModel(
        Observation(id=f"w{i}", at=float(i), resolution="720p", speech_s=s, exact=True, queue_s=q,
                    processing_s=p, total_s=q + p)
        for i, (s, q, p) in enumerate(jobs)
    )


def _run(model: DurationModel, jobs) -> tuple[list[int], list[float]]:
    requests, slack = [], []
    for s, q, p in jobs:
        pred = model.predict("720p", Speech(s, True))
        polls, late, _ = simulate(pred, q + p, queue_s=q)
        requests.append(1 + polls)  # + the submit
        slack.append(late)
    return requests, slack


def _p95(xs: list[float]) -> float:
    return sorted(xs)[math.ceil(0.95 * len(xs)) - 1]


# ------------------------------------------------------------------ the plan's shape


def test_warm_plan_is_silent_before_the_window_dense_across_it_and_backs_off_after():
    model = _model(_jobs(random.Random(1), 5))
    pred = model.predict("720p", Speech(60.0, True))
    lo, hi = window(pred)
    assert lo < pred.seconds < hi and hi - lo < 15
    plan = poll_plan(pred, until=pred.seconds + 200)
    first = plan[0]  # one gap into the window (or its end): a poll at its very start finds little
    assert first.at == pytest.approx(min(lo + DEFAULT_PLAN.gap_s, hi)) and first.endpoint == "result"
    times = [p.at for p in plan]
    gaps = [b - a for a, b in zip(times, times[1:])]
    in_window = [g for p, g in zip(plan, gaps) if p.at < hi]
    assert in_window and all(g == pytest.approx(DEFAULT_PLAN.gap_s) for g in in_window)
    late = [g for p, g in zip(plan, gaps) if p.phase == "late"]
    assert all(b >= a - 1e-9 for a, b in zip(late, late[1:])) and late[-1] > 3 * DEFAULT_PLAN.gap_s  # growing
    assert max(late) <= DEFAULT_PLAN.late_max_gap_s + 1e-9
    assert all(p.endpoint == "result" for p in plan)  # the result GET carries the status


def test_far_from_the_end_the_plan_is_sparse():
    """A 300 s job: nothing in its first 290 s; a 20 s job: its first poll near 20 s."""
    model = _model(_jobs(random.Random(2), 5))
    long = poll_plan(model.predict("720p", Speech(99.0, True)), until=320)
    short = poll_plan(model.predict("720p", Speech(5.7, True)), until=40)
    assert long[0].at > 285 and sum(1 for p in long if p.at < 300) <= 3
    assert 15 < short[0].at < 23


def test_still_queued_moves_the_window_later_and_processing_pins_it():
    pred = _model(_jobs(random.Random(3), 8)).predict("720p", Speech(30.0, True))
    base = window(pred)
    # the job is still QUEUED 10 s after its expected queue wait: the end moves as much later
    queued = [Answer(pred.queue_s + 10, "QUEUED")]
    lo, hi = window(pred, queued)
    assert lo > base[0] + 8
    nxt = next_poll(pred, queued, now=queued[0].at)
    assert nxt.at == pytest.approx(min(lo + DEFAULT_PLAN.gap_s, hi)) and nxt.at > base[0] + 8
    # then PROCESSING 2 s later: it started in those 2 s, so the end is within 2 s + the spread
    pinned = queued + [Answer(pred.queue_s + 12, "PROCESSING")]
    lo2, hi2 = window(pred, pinned)
    assert lo2 >= pred.queue_s + 10 + pred.processing_s - 3 * pred.processing_spread_s
    assert hi2 - lo2 < hi - lo + 1e-9


def test_a_job_past_its_window_or_unexplained_backs_off():
    pred = _model(_jobs(random.Random(4), 5)).predict("720p", Speech(10.0, True))
    for answers in ([Answer(5.0, "PROCESSING"), Answer(500.0, "PROCESSING")],  # far past the window
                    [Answer(5.0, "PROCESSING"), Answer(500.0, "QUEUED")]):  # contradicts the model
        p1 = next_poll(pred, answers, now=500.0)
        p2 = next_poll(pred, answers + [Answer(p1.at, "PROCESSING")], now=p1.at)
        p3 = next_poll(pred, answers + [Answer(p1.at, "PROCESSING"), Answer(p2.at, "PROCESSING")], now=p2.at)
        assert p1.phase == p2.phase == p3.phase == "late"
        assert p3.at - p2.at >= p2.at - p1.at >= p1.at - 500.0 > 0


def test_still_queued_far_past_the_model_re_anchors_the_queue_wait():
    pred = _model(_jobs(random.Random(4), 5)).predict("720p", Speech(10.0, True))
    lo, hi = window(pred, [Answer(500.0, "QUEUED")])
    assert 500 + 0.9 * pred.processing_s < lo < hi


def test_warm_goals_hold_on_a_fake_clock():
    """After 5 jobs: at most 4 API requests a job on average, slack median < 2 s, p95 < 5 s."""
    rng = random.Random(5)
    requests, slack = _run(_model(_jobs(rng, 5)), _jobs(rng, 300))
    assert statistics.mean(requests) <= 4.0
    assert statistics.median(slack) < 2.0 and _p95(slack) < 5.0


def test_cold_plan_spends_at_most_8_requests():
    rng = random.Random(6)
    requests, slack = _run(DurationModel(), _jobs(rng, 300))
    assert max(requests) <= 8
    assert statistics.median(slack) < 5.0


def test_an_early_end_is_caught_by_the_first_poll_in_one_request():
    pred = fixed_prediction(100.0)
    lo, hi = window(pred)
    first = poll_plan(pred)[0].at
    assert lo < first < hi
    polls, slack, result_polls = simulate(pred, 1.0)  # done long before anything expected
    assert (polls, result_polls) == (1, 1) and slack == pytest.approx(first - 1.0)


# ------------------------------------------------------------------ backoff (the GETs' one retry policy)


def test_backoff_honours_retry_after_and_reset_header():
    from datetime import datetime, timedelta

    import httpx

    r = httpx.Response(429, headers={"Retry-After": "3"})
    assert 3.0 <= backoff_delay(0, r) <= 3.3
    at = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
    r2 = httpx.Response(429, headers={"x-rate-limit-reset-at-utc": at})
    assert 4.0 <= backoff_delay(0, r2) <= 5.5
    assert 0 < backoff_delay(3) <= 4.05


# ------------------------------------------------------------------ the model


def test_cold_prior_is_about_100_s_for_a_typical_clip():
    pred = DurationModel().predict("720p", Speech(32.0, True))
    assert pred.source == "prior" and 95 <= pred.seconds <= 105
    assert pred.queue_s == PRIOR_QUEUE_S and pred.processing_s == pytest.approx(32 * PRIOR_COST_PER_S["720p"])
    assert DurationModel().predict("1080p", Speech(32.0, True)).seconds > pred.seconds * 1.5
    assert pred.spread_s > 10  # wide until jobs are seen


def test_fit_ignores_outliers():
    rng = random.Random(7)
    obs = []
    for i in range(30):
        s = rng.uniform(5, 90)
        p = 4.0 * s * (1 + rng.gauss(0, 0.01))
        if i % 10 == 3:
            p *= 5  # a stuck job
        if i % 10 == 7:
            p *= 0.1  # a cached one
        q = 2.0 + rng.uniform(-0.5, 0.5) + (60 if i == 11 else 0)
        obs.append(Observation(id=str(i), at=i, resolution="720p", speech_s=s, exact=True, queue_s=q,
                               processing_s=p))
    fit = DurationModel(obs).fit("720p")
    assert fit.cost_per_s == pytest.approx(4.0, rel=0.02)
    assert abs(fit.overhead_s) < 2.0 and fit.rel_spread < 0.03
    assert fit.queue_s == pytest.approx(2.0, abs=0.3) and fit.queue_spread_s < 1.0
    assert DurationModel(obs).fit("1080p").n == 0  # other resolutions keep the prior


def test_fit_with_overhead_and_theil_sen():
    xs = [5, 10, 20, 40, 80]
    ys = [10 + 2 * x for x in xs]
    assert theil_sen(xs, ys) == pytest.approx((2.0, 10.0))
    model = DurationModel(Observation(id=str(i), at=i, resolution="1080p", speech_s=x, exact=True,
                                      queue_s=1.0, processing_s=y) for i, (x, y) in enumerate(zip(xs, ys)))
    pred = model.predict("1080p", Speech(30.0, True))
    assert pred.processing_s == pytest.approx(70.0, rel=0.01) and pred.seconds == pytest.approx(71.0, rel=0.01)


def test_one_observation_already_moves_the_cost():
    model = DurationModel([Observation(id="a", at=0, resolution="720p", speech_s=10, exact=True,
                                       queue_s=1.0, processing_s=80.0)])
    pred = model.predict("720p", Speech(20.0, True))
    assert pred.processing_s == pytest.approx(160.0) and pred.n == 1
    assert pred.processing_spread_s < DurationModel().predict("720p", Speech(20.0, True)).processing_spread_s


def test_scripts_are_corrected_per_language_by_real_lengths():
    est = script_seconds("word " * 100, "Puck (Male)", "German")
    assert 35 < est < 50  # 100 words at 158 wpm x 0.85
    assert script_seconds("word " * 100, "Puck (Male)", "English (US)") < est
    assert script_seconds("word " * 100, "Puck (Male)", "English (US)", "Speak slowly.") > \
        script_seconds("word " * 100, "Puck (Male)", "English (US)")
    assert script_seconds("こんにちは世界", "Puck (Male)", "Japanese") > 0
    obs = [Observation(id=str(i), at=i, resolution="720p", speech_s=10.0 + i, exact=False, language="German",
                       output_s=1.2 * (10.0 + i), queue_s=1.0, processing_s=3.0 * 1.2 * (10.0 + i))
           for i in range(6)]
    model = DurationModel(obs)
    factor, spread = model.speech_correction("German")
    assert factor == pytest.approx(1.2) and spread < 0.02
    assert model.speech_correction("French") == (1.0, pytest.approx(0.10))
    pred = model.predict("720p", Speech(20.0, False, "German"))
    assert pred.processing_s == pytest.approx(3.0 * 24.0, rel=0.01)


def test_each_service_has_its_own_document():
    assert service_name("segmind", "https://api.segmind.com") == "segmind-api.segmind.com"
    assert service_name("segmind", "http://127.0.0.1:8787") == "segmind-127.0.0.1-8787"
    assert service_name("local") == "local"

    class S:
        def key(self, *parts):
            return "/".join(("pre",) + parts)

    assert model_key(S(), "local-127.0.0.1-9") == "pre/models/duration-local-127.0.0.1-9.json"


def test_observation_from_metrics_or_history_latency():
    pred = DurationModel().predict("720p", Speech(12.0, True))
    o = observation("r1", pred, metrics={"inference_time": 40.0, "queue_time": 2.0, "cost": 0.3})
    assert (o.processing_s, o.queue_s, o.total_s, o.speech_s, o.exact) == (40.0, 2.0, 42.0, 12.0, True)
    h = observation("r2", pred, latency_ms=45_000)
    assert h.total_s == 45.0 and h.processing_s is None
    assert observation("r3", pred, metrics={}) is None
    model = DurationModel([h])  # total only: processing = total - the queue's estimate
    assert model.fit("720p").cost_per_s == pytest.approx((45.0 - PRIOR_QUEUE_S) / 12.0)
    doc = DurationModel([o, h]).to_doc()
    assert {x.id for x in DurationModel.from_doc(copy.deepcopy(doc)).observations} == {"r1", "r2"}


# ------------------------------------------------------------------ the shared document


class GatedStore:
    """In memory, ETags honoured; `hold` makes every writer wait until all have read."""

    def __init__(self, readers: int = 0):
        self.objects: dict[str, tuple[dict, str]] = {}
        self.n = 0
        self.readers = readers
        self.read_count = 0
        self.all_read = asyncio.Event()
        self.conflicts = 0

    def key(self, *parts: str) -> str:
        return "/".join(parts)

    async def read_json(self, key):
        self.read_count += 1
        if self.read_count >= self.readers:
            self.all_read.set()
        doc = self.objects.get(key)
        return (copy.deepcopy(doc[0]), doc[1]) if doc else (None, None)

    async def _wait(self):
        await asyncio.wait_for(self.all_read.wait(), 5)

    async def create_json(self, key, obj):
        await self._wait()
        if key in self.objects:
            self.conflicts += 1
            return None
        self.n += 1
        self.objects[key] = (copy.deepcopy(obj), f"e{self.n}")
        return f"e{self.n}"

    async def replace_json(self, key, obj, etag):
        await self._wait()
        if key not in self.objects or self.objects[key][1] != etag:
            self.conflicts += 1
            return None
        self.n += 1
        self.objects[key] = (copy.deepcopy(obj), f"e{self.n}")
        return f"e{self.n}"


def _obs(i: int) -> Observation:
    return Observation(id=f"job{i}", at=1000.0 + i, resolution="720p", speech_s=10.0 + i, exact=True,
                       queue_s=2.0, processing_s=30.0 + 3 * i)


def test_concurrent_updates_merge_none_lost():
    """Four workers read the empty document before any writes: one create wins, the others
    re-read, merge and replace; every observation lands."""

    async def main():
        store = GatedStore(readers=4)
        workers = [SharedDurationModel(store, refresh_s=0) for _ in range(4)]
        assert all(await asyncio.gather(*(w.record(_obs(i)) for i, w in enumerate(workers))))
        doc = store.objects[workers[0].key][0]
        assert {o["id"] for o in doc["observations"]} == {f"job{i}" for i in range(4)}
        assert store.conflicts >= 3
        fresh = SharedDurationModel(store)
        assert len((await fresh.refresh()).observations) == 4
        assert (await fresh.predict("720p", Speech(10.0, True))).n == 4

    asyncio.run(main())


def test_shared_model_on_the_real_store(s3, s3_bucket, s3_prefix):
    from avatarflow.store import Store

    async def main():
        store = Store(s3, s3_bucket, s3_prefix)
        workers = [SharedDurationModel(store, refresh_s=0) for _ in range(3)]
        assert all(await asyncio.gather(*(w.record(_obs(i)) for i, w in enumerate(workers * 2))))
        doc, etag = await store.read_json(workers[0].key)
        assert etag and {o["id"] for o in doc["observations"]} == {f"job{i}" for i in range(6)}

    asyncio.run(main())


# ------------------------------------------------------------------ the local timing mode


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


# ------------------------------------------------------------------ the one poll loop, over HTTP


def test_wait_refuses_an_unknown_source_or_schedule_key():
    """A misspelt keyword fails before any request, never silently ignored."""
    from avatarflow.client import SegmindClient

    async def main():
        async with SegmindClient(base_url="http://127.0.0.1:9") as client:
            with pytest.raises(TypeError, match="expected_secs"):
                await client.wait("rid", expected_secs=1)
            with pytest.raises(ValueError, match="via='records'"):
                await client.wait("rid", via="records")

    asyncio.run(main())


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


# ------------------------------------------------------------------ wired into the pipeline


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
