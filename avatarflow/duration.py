"""How long a job will take, and when to ask whether it is done.

Three parts:

- **speech seconds**, what drives the processing time: exact for `audio` (decoded), estimated
  for a `voice_script` from its words (characters for Japanese) at the voice's speaking rate
  (the local TTS's rates per voice and per language, a voice prompt's "slow"/"fast" factor),
  corrected online per language once real output lengths are known.
- **the duration model**: time from submit to COMPLETED = queue wait + overhead + cost per
  output second x output seconds, the cost per resolution. Fitted from finished jobs
  (`metrics.queue_time` and `metrics.inference_time` of the result, or the history's
  `latency_ms`): Theil-Sen slope (median of pairwise slopes) and median intercept, medians for the
  queue wait, spreads from the median absolute deviation, so a few outliers move nothing. It is
  shared by every worker as one JSON document in the archive bucket, written conditionally
  (`SharedDurationModel`). Cold start (no observations): the prior below.
- **the poll plan**: a belief over (queue wait, processing time), conditioned on every answer
  seen (QUEUED at t: the queue wait is longer than t; PROCESSING at t: it started by t; any
  non-final answer: not done at t). Polls are dense (every `gap_s`) across the likely end and
  sparse elsewhere: none before it, backing off after it. Pure functions of the prediction and
  the answers: `next_poll`, and `poll_plan` for a whole schedule on a fake clock.

The cold-start prior: the vendor's page gives about 100 s for a typical clip; one catalogue gives
$0.81 a call on average, which at Pruna's $0.025 per output second (720p) is a 32 s clip. So:
720p costs 3.0 s per output second and 1080p 5.4 s (the price ratio, 0.045 / 0.025 = 1.8), plus
a 5 s queue wait: 5 + 3.0 x 32 = 101 s for the typical clip. Its spread is wide (15 % of the
processing, 4 s of queue wait) until jobs are observed.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

# ------------------------------------------------------------------------------------------
# Prior and constants
# ------------------------------------------------------------------------------------------

TYPICAL_CLIP_S = 32.0  # $0.81 a call / $0.025 per output second at 720p
PRIOR_COST_PER_S: dict[str, float] = {"720p": 3.0, "1080p": 5.4}
PRIOR_OVERHEAD_S = 0.0
PRIOR_QUEUE_S = 5.0
PRIOR_QUEUE_SPREAD_S = 4.0
PRIOR_REL_SPREAD = 0.15  # of the processing time, until jobs are observed
PRIOR_SPEECH_REL_SPREAD = 0.10  # a script's estimated length, until real lengths are seen
MIN_REL_SPREAD = 0.003
MIN_QUEUE_SPREAD_S = 0.25
WINDOW = 100  # the most recent observations a fit uses (per resolution; queue: all)
MAX_OBSERVATIONS = 400  # kept in the shared document
SMALL_SAMPLE = 1.6  # spreads are inflated by sqrt(1 + SMALL_SAMPLE / n)
MAD_TO_SD = 1.4826

# Speaking rates. The local TTS speaks `VoiceSettings.rate` words a minute (espeak's nominal
# rate, 158..190 by voice); measured words a minute per language relative to that rate:
LANGUAGE_RATE_FACTOR: dict[str, float] = {
    "English (US)": 1.06, "English (UK)": 1.06, "Spanish": 0.93, "French": 1.02, "German": 0.85,
    "Italian": 0.85, "Portuguese (Brazil)": 0.83, "Korean": 0.57, "Hindi": 0.91,
}
# Japanese is counted in characters (kana and kanji, no spaces): 5.0 a second at rate 158.
JAPANESE_CHARS_PER_WPM = 5.0 * 60 / 158
DEFAULT_WPM = 174.0  # the middle of the local voices' rates


# ------------------------------------------------------------------------------------------
# Speech seconds
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Speech:
    """The output length a job is expected to have: exact for audio, estimated for a script."""

    seconds: float
    exact: bool
    language: str | None = None


def _voice_rate(voice: str | None, voice_prompt: str | None) -> float:
    try:
        from avatarflow.local.render.tts import prompt_adjust, voice_settings

        rate = float(voice_settings(voice).rate) if voice else DEFAULT_WPM
        factor = prompt_adjust(voice_prompt or "")[0]
    except (ImportError, ValueError):
        rate, factor = DEFAULT_WPM, 1.0
    return rate * factor


def script_seconds(text: str, voice: str | None = None, language: str | None = "English (US)",
                   voice_prompt: str | None = None) -> float:
    """Seconds the script takes to speak, estimated from its words (Japanese: characters)."""
    wpm = _voice_rate(voice, voice_prompt)
    if language == "Japanese":
        chars = sum(1 for c in text if not c.isspace() and not unicodedata.category(c).startswith("P"))
        return chars / (wpm * JAPANESE_CHARS_PER_WPM) * 60.0
    words = len(re.findall(r"\w+(?:['’-]\w+)*", text))
    return words / (wpm * LANGUAGE_RATE_FACTOR.get(language or "", 1.0)) * 60.0


def audio_seconds(data: bytes) -> float:
    """The exact length of an audio file, by decoding it."""
    from avatarflow.media.audio import check_audio

    return float(check_audio(data).duration_s)


def speech_of(request: Any, audio: bytes | None = None) -> Speech:
    """The speech of an `AvatarRequest` (or its body as a dict): `audio` bytes when the request
    speaks a recording, else the script's estimate."""
    get = request.get if isinstance(request, dict) else lambda k, d=None: getattr(request, k, d)
    if audio is not None:
        return Speech(audio_seconds(audio), True, None)
    language = get("voice_language") or "English (US)"
    return Speech(script_seconds(get("voice_script") or "", get("voice"), language, get("voice_prompt")),
                  False, language)


# ------------------------------------------------------------------------------------------
# Observations and the model
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """One finished job: what was predicted from, and how long it took."""

    id: str
    at: float
    resolution: str
    speech_s: float
    exact: bool
    language: str | None = None
    output_s: float | None = None  # the archived video's real length, when probed
    queue_s: float | None = None
    processing_s: float | None = None
    total_s: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Observation:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def observation(request_id: str, prediction: Prediction, *, metrics: Any = None,
                latency_ms: float | None = None, output_s: float | None = None,
                at: float | None = None) -> Observation | None:
    """An observation from a finished job's result metrics (`inference_time`, `queue_time`,
    `total_time`; a dict or the contract's Metrics) or the history's `latency_ms`; None if neither
    says anything."""
    m = metrics if isinstance(metrics, dict) else (metrics.model_dump() if metrics is not None else {})
    queue = _num(m.get("queue_time"))
    processing = _num(m.get("inference_time"))
    total = _num(m.get("total_time"))
    if total is None and latency_ms is not None:
        total = _num(latency_ms / 1000.0)
    if total is None and queue is not None and processing is not None:
        total = queue + processing
    if processing is None and total is None:
        return None
    return Observation(id=request_id, at=at if at is not None else time.time(),
                       resolution=prediction.resolution, speech_s=prediction.speech_s,
                       exact=prediction.speech_exact, language=prediction.language,
                       output_s=output_s, queue_s=queue, processing_s=processing, total_s=total)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f >= 0 else None


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _mad_sd(xs: list[float]) -> float:
    if len(xs) < 3:
        return 0.0
    m = _median(xs)
    return MAD_TO_SD * _median([abs(x - m) for x in xs])


def theil_sen(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(slope, intercept): the median of pairwise slopes, then the median of y - slope x."""
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs))
              if abs(xs[j] - xs[i]) > 1e-9]
    slope = _median(slopes)
    return slope, _median([y - slope * x for x, y in zip(xs, ys)])


@dataclass(frozen=True)
class Fit:
    """The model for one resolution."""

    cost_per_s: float
    overhead_s: float
    rel_spread: float
    queue_s: float
    queue_spread_s: float
    n: int
    n_queue: int


@dataclass(frozen=True)
class Prediction:
    """Expected time from submit to COMPLETED, with the parts it is made of."""

    seconds: float  # median, queue wait + processing
    spread_s: float  # one standard deviation's worth
    queue_s: float
    queue_spread_s: float
    processing_s: float
    processing_spread_s: float
    speech_s: float
    speech_exact: bool
    resolution: str
    language: str | None
    n: int  # observations behind the cost fit (0: the prior)

    @property
    def source(self) -> str:
        return "fitted" if self.n else "prior"

    def scaled(self, k: float) -> Prediction:
        """Every time multiplied by `k` (a backend whose typical job is k times the vendor's)."""
        return replace(self, seconds=self.seconds * k, spread_s=self.spread_s * k, queue_s=self.queue_s * k,
                       queue_spread_s=self.queue_spread_s * k, processing_s=self.processing_s * k,
                       processing_spread_s=self.processing_spread_s * k)

    @property
    def speech(self) -> Speech:
        return Speech(self.speech_s, self.speech_exact, self.language)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["source"] = self.source
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def fixed_prediction(seconds: float, resolution: str = "720p") -> Prediction:
    """A prediction of exactly `seconds` with the prior's relative spread (an `expected_s` given
    by hand)."""
    s = max(float(seconds), 0.5)
    return Prediction(seconds=s, spread_s=PRIOR_REL_SPREAD * s, queue_s=0.0, queue_spread_s=MIN_QUEUE_SPREAD_S,
                      processing_s=s, processing_spread_s=PRIOR_REL_SPREAD * s, speech_s=s / 3.0,
                      speech_exact=False, resolution=resolution, language=None, n=0)


class DurationModel:
    """Observations of finished jobs, and predictions from them (the prior when there are none)."""

    def __init__(self, observations: Iterable[Observation] = ()):
        self._obs: dict[str, Observation] = {}
        self._fits: dict[str, Fit] = {}
        self.merge(observations)

    @property
    def observations(self) -> list[Observation]:
        return sorted(self._obs.values(), key=lambda o: (o.at, o.id))

    def __len__(self) -> int:
        return len(self._obs)

    def add(self, obs: Observation) -> None:
        self.merge([obs])

    def merge(self, observations: Iterable[Observation]) -> None:
        for o in observations:
            self._obs[o.id] = o
        if len(self._obs) > MAX_OBSERVATIONS:
            keep = self.observations[-MAX_OBSERVATIONS:]
            self._obs = {o.id: o for o in keep}
        self._fits.clear()

    # -- the document shared in the bucket --
    def to_doc(self) -> dict[str, Any]:
        return {"version": 1, "updated_at": time.time(),
                "observations": [o.to_dict() for o in self.observations]}

    @classmethod
    def from_doc(cls, doc: dict[str, Any] | None) -> DurationModel:
        rows = (doc or {}).get("observations") or []
        obs = []
        for r in rows:
            try:
                obs.append(Observation.from_dict(r))
            except TypeError:
                continue  # a row this version cannot read
        return cls(obs)

    # -- fitting --
    def speech_correction(self, language: str | None) -> tuple[float, float]:
        """(factor, relative spread) turning a script estimate into output seconds, per language."""
        ratios = [o.output_s / o.speech_s for o in self.observations
                  if not o.exact and o.output_s and o.speech_s > 0 and o.language == language][-WINDOW:]
        n = len(ratios)
        if not n:
            return 1.0, PRIOR_SPEECH_REL_SPREAD
        factor = _median(ratios)
        spread = _mad_sd([r / factor for r in ratios]) * math.sqrt(1 + SMALL_SAMPLE / n)
        return factor, max(spread, PRIOR_SPEECH_REL_SPREAD / (n + 1) ** 2, MIN_REL_SPREAD)

    def _x(self, o: Observation) -> float:
        if o.output_s:
            return o.output_s
        if o.exact:
            return o.speech_s
        return o.speech_s * self.speech_correction(o.language)[0]

    def fit(self, resolution: str) -> Fit:
        if resolution in self._fits:
            return self._fits[resolution]
        obs = self.observations
        queue = [o.queue_s for o in obs if o.queue_s is not None][-WINDOW:]
        nq = len(queue)
        if nq:
            q = _median(queue)
            q_spread = max(_mad_sd(queue) * math.sqrt(1 + SMALL_SAMPLE / nq),
                           PRIOR_QUEUE_SPREAD_S / (nq + 1) ** 2, MIN_QUEUE_SPREAD_S)
        else:
            q, q_spread = PRIOR_QUEUE_S, PRIOR_QUEUE_SPREAD_S
        pts = []
        for o in obs:
            if o.resolution != resolution or o.speech_s <= 0:
                continue
            y = o.processing_s if o.processing_s is not None else (
                o.total_s - (o.queue_s if o.queue_s is not None else q) if o.total_s is not None else None)
            if y is not None and y > 0:
                pts.append((self._x(o), y))
        pts = pts[-WINDOW:]
        n = len(pts)
        prior_cost = PRIOR_COST_PER_S.get(resolution, PRIOR_COST_PER_S["720p"])
        if not n:
            fit = Fit(prior_cost, PRIOR_OVERHEAD_S, PRIOR_REL_SPREAD, q, q_spread, 0, nq)
        else:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            slope, overhead = 0.0, PRIOR_OVERHEAD_S
            if n >= 4 and max(xs) >= 1.5 * min(xs):
                slope, overhead = theil_sen(xs, ys)
            if slope <= 0 or overhead < 0:
                overhead = max(PRIOR_OVERHEAD_S, 0.0)
                slope = _median([(y - overhead) / x for x, y in pts])
            slope = max(slope, 1e-3)
            rel = [y / (overhead + slope * x) - 1.0 for x, y in pts]
            spread = max(_mad_sd(rel) * math.sqrt(1 + SMALL_SAMPLE / n), PRIOR_REL_SPREAD / (n + 1) ** 2,
                         MIN_REL_SPREAD)
            fit = Fit(slope, overhead, spread, q, q_spread, n, nq)
        self._fits[resolution] = fit
        return fit

    def predict(self, resolution: str, speech: Speech) -> Prediction:
        fit = self.fit(resolution)
        x, speech_rel = speech.seconds, 0.0
        if not speech.exact:
            factor, speech_rel = self.speech_correction(speech.language)
            x *= factor
        processing = fit.overhead_s + fit.cost_per_s * max(x, 0.0)
        p_spread = processing * math.hypot(fit.rel_spread, speech_rel)
        return Prediction(
            seconds=fit.queue_s + processing, spread_s=math.hypot(fit.queue_spread_s, p_spread),
            queue_s=fit.queue_s, queue_spread_s=fit.queue_spread_s, processing_s=processing,
            processing_spread_s=p_spread, speech_s=speech.seconds, speech_exact=speech.exact,
            resolution=resolution, language=speech.language, n=fit.n,
        )


def timing_record(prediction: Prediction | None, metrics: dict[str, Any] | None,
                  waited: dict[str, Any] | None = None) -> dict[str, Any]:
    """Predicted against actual, for the manifest and the run's summary."""
    m = metrics or {}
    actual: dict[str, Any] = {"queue_s": _num(m.get("queue_time")), "processing_s": _num(m.get("inference_time")),
                              "total_s": _num(m.get("total_time"))}
    if actual["total_s"] is None and actual["queue_s"] is not None and actual["processing_s"] is not None:
        actual["total_s"] = actual["queue_s"] + actual["processing_s"]
    actual.update(waited or {})
    record: dict[str, Any] = {"predicted": prediction.to_dict() if prediction else None,
                              "actual": {k: round(v, 3) if isinstance(v, float) else v for k, v in actual.items()}}
    if prediction is not None and actual["total_s"] is not None:
        record["error_s"] = round(actual["total_s"] - prediction.seconds, 3)
    return record


class SharedDurationModel:
    """The model of every worker: one JSON document in the bucket (`Store`), read on `refresh`
    (at most every `refresh_s`), and each finished job merged in by a conditional write (create
    if absent, else replace if the ETag is unchanged; on a race re-read, merge, retry)."""

    def __init__(self, store: Any, key: str | None = None, *, refresh_s: float = 30.0, retries: int = 10):
        self.store = store
        self.key = key or store.key("models", "duration.json")
        self.refresh_s, self.retries = refresh_s, retries
        self.model = DurationModel()
        self._loaded_at = -math.inf

    async def refresh(self, *, force: bool = False) -> DurationModel:
        if force or time.monotonic() - self._loaded_at >= self.refresh_s:
            doc, _ = await self.store.read_json(self.key)
            self.model.merge(DurationModel.from_doc(doc).observations)
            self._loaded_at = time.monotonic()
        return self.model

    async def predict(self, resolution: str, speech: Speech) -> Prediction:
        return (await self.refresh()).predict(resolution, speech)

    def live(self, pred: Prediction) -> Callable[[], Prediction]:
        """The prediction re-read from the in-memory model (no I/O), for a wait that should use
        what jobs finishing meanwhile taught it; `pred` itself while the model is still cold."""

        def current() -> Prediction:
            fresh = self.model.predict(pred.resolution, pred.speech)
            return fresh if fresh.n else pred

        return current

    async def record(self, obs: Observation | None) -> bool:
        """Merge one observation into the shared document; False if it never got in."""
        if obs is None:
            return False
        self.model.add(obs)
        for attempt in range(self.retries):
            doc, etag = await self.store.read_json(self.key)
            merged = DurationModel.from_doc(doc)
            merged.merge([obs])
            if etag is None:
                written = await self.store.create_json(self.key, merged.to_doc())
            else:
                written = await self.store.replace_json(self.key, merged.to_doc(), etag)
            if written is not None:
                self.model.merge(merged.observations)
                self._loaded_at = time.monotonic()
                return True
            await asyncio.sleep(random.uniform(0, 0.05 * 2**attempt))
        return False


_SHARED: dict[tuple[str, str, str], SharedDurationModel] = {}


def service_name(backend: str, base_url: str | None = None) -> str:
    """What a model document is about: the backend and the API's host and port (a credentials
    block pointing the `segmind` backend at the local API gets the local API's own document)."""
    from urllib.parse import urlsplit

    where = urlsplit(base_url).netloc if base_url else ""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{backend}-{where}" if where else backend).strip("-")


def model_key(store: Any, service: str) -> str:
    """The shared document of one service (the vendor's and the local API's times differ)."""
    return store.key("models", f"duration-{service}.json")


def shared_model(store: Any, service: str) -> SharedDurationModel:
    """One SharedDurationModel per bucket document in this process, so runs in one process learn
    from each other at once (and from other machines at each refresh)."""
    key = model_key(store, service)
    endpoint = str(getattr(getattr(getattr(store, "s3", None), "meta", None), "endpoint_url", ""))
    ident = (endpoint, str(getattr(store, "bucket", "")), key)
    shared = _SHARED.get(ident)
    if shared is None:
        shared = _SHARED[ident] = SharedDurationModel(store, key)
    else:
        shared.store = store
    return shared


# ------------------------------------------------------------------------------------------
# The poll plan
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanConfig:
    """`gap_s`: polls this far apart where the end is likely (slack about half of it);
    `window` the quantiles of the end that make "likely"; `window_polls` the most polls spent
    across that window (a wide, cold window gets wider gaps instead of more polls); after it,
    gaps grow by `late_growth` up to `late_max_gap_s`."""

    gap_s: float = 3.0
    window: tuple[float, float] = (0.02, 0.98)
    window_polls: int = 7
    late_growth: float = 1.5
    late_max_gap_s: float = 30.0
    min_gap_s: float = 0.5
    result_from: float = 0.01  # poll the result endpoint once P(done) reaches this
    grid: int = 41


DEFAULT_PLAN = PlanConfig()


@dataclass(frozen=True)
class Answer:
    """A non-final answer: its status (QUEUED, PROCESSING, or anything else not final) at `at`
    seconds after submit."""

    at: float
    status: str


@dataclass(frozen=True)
class Poll:
    at: float  # seconds after submit
    endpoint: str  # "result" (carries the status; saves a round trip when done) or "status"
    phase: str  # "window", "late"


def _normal_grid(mean: float, sd: float, n: int, low: float) -> tuple[list[float], list[float]]:
    sd = max(sd, 1e-6)
    xs = [mean + sd * (-4.0 + 8.0 * i / (n - 1)) for i in range(n)]
    ws = [math.exp(-0.5 * ((x - mean) / sd) ** 2) for x in xs]
    xs = [max(x, low) for x in xs]
    return xs, ws


def end_distribution(pred: Prediction, answers: Iterable[Answer] = (), *, grid: int = 41,
                     not_done: bool = False) -> list[tuple[float, float]]:
    """The end time's distribution [(t, weight)], sorted, weights summing to 1, given the status
    answers (QUEUED at t: queue wait > t; PROCESSING at t: queue wait <= t). With `not_done`, also
    conditioned on the job not being done at each answer. Empty if the answers rule out every
    point (the model was wrong: the caller is then "late")."""
    qs, qw = _normal_grid(pred.queue_s, pred.queue_spread_s, grid, 0.0)
    ps, pw = _normal_grid(pred.processing_s, pred.processing_spread_s, grid, 0.1 * pred.processing_s)
    answers = list(answers)
    q_lo = max((a.at for a in answers if a.status == "QUEUED"), default=-math.inf)
    q_hi = min((a.at for a in answers if a.status == "PROCESSING"), default=math.inf)
    t_min = max((a.at for a in answers), default=-math.inf) if not_done else -math.inf
    queue = [(q, w) for q, w in zip(qs, qw) if q_lo < q <= q_hi]
    if not queue and q_lo < q_hi:  # re-anchor the queue wait on what the answers say
        if q_hi < math.inf:  # started by q_hi, sooner than modelled: anywhere since the last QUEUED
            a = max(q_lo, 0.0)
            queue = [(a + (q_hi - a) * (i + 0.5) / grid, 1.0) for i in range(grid)]
        else:  # still QUEUED past the modelled wait: the rest of it, half-normal beyond q_lo
            sd = max(pred.queue_spread_s, 0.25 * (q_lo - pred.queue_s), MIN_QUEUE_SPREAD_S)
            queue = [(q_lo + sd * 4.0 * (i + 0.5) / grid, math.exp(-0.5 * (4.0 * (i + 0.5) / grid) ** 2))
                     for i in range(grid)]
    out: dict[float, float] = {}
    for q, wq in queue:
        for p, wp in zip(ps, pw):
            t = q + p
            if t > t_min:
                out[t] = out.get(t, 0.0) + wq * wp
    total = sum(out.values())
    if total <= 0:
        return []
    return sorted((t, w / total) for t, w in out.items())


def _quantile(dist: list[tuple[float, float]], p: float) -> float:
    acc = 0.0
    for t, w in dist:
        acc += w
        if acc >= p:
            return t
    return dist[-1][0]


def _cdf(dist: list[tuple[float, float]], t: float) -> float:
    return sum(w for x, w in dist if x <= t)


def window(pred: Prediction, answers: Iterable[Answer] = (), cfg: PlanConfig = DEFAULT_PLAN) -> tuple[float, float] | None:
    """(start, end) of the likely end, given the status answers; None when they rule it out."""
    dist = end_distribution(pred, answers, grid=cfg.grid)
    if not dist:
        return None
    return _quantile(dist, cfg.window[0]), _quantile(dist, cfg.window[1])


def next_poll(pred: Prediction, answers: Iterable[Answer] = (), now: float = 0.0,
              cfg: PlanConfig = DEFAULT_PLAN) -> Poll:
    """When to ask next (seconds after submit), given the prediction and the non-final answers
    so far. No poll before the window; the first one gap into it (at its end when it is
    narrower), then every gap across it (re-anchored by the answers: a job
    still QUEUED moves the window later, PROCESSING pins its start); after it, growing gaps."""
    answers = sorted(answers, key=lambda a: a.at)
    last = answers[-1].at if answers else -math.inf
    earliest = max(now, last + cfg.min_gap_s)
    dist = end_distribution(pred, answers, grid=cfg.grid)
    if dist:
        lo, hi = _quantile(dist, cfg.window[0]), _quantile(dist, cfg.window[1])
        gap = max(cfg.gap_s, (hi - lo) / max(cfg.window_polls - 1, 1))
    else:  # the answers contradict the model: late since the first answer it cannot explain
        k = next(k for k in range(1, len(answers) + 1)
                 if not end_distribution(pred, answers[:k], grid=cfg.grid))
        lo = hi = answers[k - 1].at
        gap = cfg.gap_s
    if last < lo:  # the first poll one gap into the window (a poll at its very start finds little)
        at = max(earliest, min(lo + gap, hi))
        phase = "window"
    elif last < hi:
        at = max(earliest, last + gap)
        phase = "window"
    else:
        late = sum(1 for a in answers if a.at >= hi)
        cap = max(gap, min(cfg.late_max_gap_s, 0.1 * max(pred.seconds, hi)))
        at = max(earliest, last + min(cap, gap * cfg.late_growth ** late))
        phase = "late"
    p_done = _cdf(end_distribution(pred, answers, grid=cfg.grid, not_done=True), at) if dist else 1.0
    return Poll(at=at, endpoint="result" if p_done >= cfg.result_from or phase == "late" else "status", phase=phase)


def poll_plan(pred: Prediction, *, status_at: Callable[[float], str] | None = None,
              until: float | None = None, max_polls: int = 200, cfg: PlanConfig = DEFAULT_PLAN) -> list[Poll]:
    """The whole schedule on a fake clock, assuming every answer is non-final: `status_at(t)`
    gives the status answered at t (default: QUEUED before the predicted queue wait, PROCESSING
    after). Stops after the first poll at or past `until` (default: 3x the prediction)."""
    status_at = status_at or (lambda t: "QUEUED" if t < pred.queue_s else "PROCESSING")
    until = until if until is not None else 3 * pred.seconds + 30
    answers: list[Answer] = []
    polls: list[Poll] = []
    while len(polls) < max_polls:
        poll = next_poll(pred, answers, now=polls[-1].at if polls else 0.0, cfg=cfg)
        polls.append(poll)
        if poll.at >= until:
            break
        answers.append(Answer(poll.at, status_at(poll.at)))
    return polls


def simulate(pred: Prediction, end_s: float, *, queue_s: float | None = None,
             cfg: PlanConfig = DEFAULT_PLAN) -> tuple[int, float, int]:
    """(polls, slack, result-endpoint polls) for a job that ends at `end_s` (and leaves the
    queue at `queue_s`), polled by the plan on a fake clock: the count includes the poll that
    sees COMPLETED, and the extra result request a status poll needs then."""
    queue_s = queue_s if queue_s is not None else min(pred.queue_s, end_s)
    answers: list[Answer] = []
    now, polls = 0.0, 0
    while True:
        poll = next_poll(pred, answers, now=now, cfg=cfg)
        polls += 1
        now = poll.at
        if now >= end_s:
            return polls + (1 if poll.endpoint == "status" else 0), now - end_s, polls
        answers.append(Answer(now, "QUEUED" if now < queue_s else "PROCESSING"))


__all__ = [
    "Answer", "DEFAULT_PLAN", "DurationModel", "Fit", "Observation", "PlanConfig", "Poll", "Prediction",
    "PRIOR_COST_PER_S", "PRIOR_QUEUE_S", "SharedDurationModel", "Speech", "TYPICAL_CLIP_S", "audio_seconds", "model_key",
    "service_name", "shared_model", "timing_record",
    "end_distribution", "fixed_prediction", "next_poll", "observation", "poll_plan", "script_seconds",
    "simulate", "speech_of", "theil_sen", "window",
]
