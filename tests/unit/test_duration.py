"""avatarflow.duration and avatarflow.shared_duration: the model's prior and fit, and the shared
document under concurrent writers (an in-memory store honouring ETags)."""

from __future__ import annotations

import asyncio
import copy
import random

import pytest

from avatarflow.duration import (
    PRIOR_COST_PER_S,
    PRIOR_QUEUE_S,
    DurationModel,
    Observation,
    Speech,
    observation,
    script_seconds,
    theil_sen,
)
from avatarflow.shared_duration import SharedDurationModel, model_key, service_name


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
