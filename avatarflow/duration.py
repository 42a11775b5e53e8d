"""How long a job will take: its speech's length, and the model fitted from finished jobs.

Two parts (the poll plan built on the prediction is avatarflow.poll):

- **speech seconds**, what drives the processing time: exact for `audio` (decoded), estimated
  for a `voice_script` from its words (characters for Japanese) at the voice's speaking rate
  (the local TTS's rates per voice and per language, a voice prompt's "slow"/"fast" factor),
  corrected online per language once real output lengths are known.
- **the duration model**: time from submit to COMPLETED = queue wait + overhead + cost per
  output second x output seconds, the cost per resolution. Fitted from finished jobs
  (`metrics.queue_time` and `metrics.inference_time` of the result, or the history's
  `latency_ms`): Theil-Sen slope (median of pairwise slopes) and median intercept, medians for the
  queue wait, spreads from the median absolute deviation, so a few outliers move nothing. Every
  worker shares it through the bucket (avatarflow.shared_duration). Cold start (no
  observations): the prior below.

The cold-start prior: the vendor's page gives about 100 s for a typical clip; one catalogue gives
$0.81 a call on average, which at Pruna's $0.025 per output second (720p) is a 32 s clip. So:
720p costs 3.0 s per output second and 1080p 5.4 s (the price ratio, 0.045 / 0.025 = 1.8), plus
a 5 s queue wait: 5 + 3.0 x 32 = 101 s for the typical clip. Its spread is wide (15 % of the
processing, 4 s of queue wait) until jobs are observed.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from collections.abc import Iterable
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
    """A prediction of exactly `seconds` with the prior's relative spread (an `expected_seconds`
    given by hand)."""
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
