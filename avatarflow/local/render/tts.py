"""Offline speech for the local p-video-avatar engine: libespeak-ng through ctypes.

``synthesize`` speaks a script with one of the 30 contract voices in one of the 10 contract
languages and returns the samples together with the phoneme timings reported by espeak's
synthesis callback (the renderer drives the mouth from them). ``load_audio`` decodes audio the
user supplied instead (any container PyAV reads) to mono float32.

espeak-ng is a process-global C library and not thread-safe: it is initialised once per process
and every call into it holds ``_LOCK``.
"""

from __future__ import annotations

import ctypes
import io
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avatarflow.contract import VOICE_LANGUAGES, VOICES, voice_gender

__all__ = [
    "AudioError",
    "LANGUAGE_VOICES",
    "Speech",
    "VOICE_TABLE",
    "VoiceSettings",
    "is_pause",
    "load_audio",
    "prompt_adjust",
    "synthesize",
    "to_speakable",
    "voice_settings",
]

# --------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------


class AudioError(ValueError):
    """Audio that cannot be used: not decodable, no audio stream, or empty."""


@dataclass(frozen=True)
class Speech:
    """Mono float32 speech in [-1, 1].

    ``phonemes`` holds ``(start_s, end_s, phoneme)`` in espeak's phoneme mnemonics (pauses are
    ``"_"``, ``"_:"``, ``"_!"`` and the like: see :func:`is_pause`); it is empty for audio the
    user gave. ``words`` holds ``(start_s, end_s, word)`` from espeak's word events (empty for
    given audio). Synthesized speech is at espeak's native rate, 22050 Hz.
    """

    samples: np.ndarray
    sample_rate: int
    phonemes: tuple[tuple[float, float, str], ...] = ()
    words: tuple[tuple[float, float, str], ...] = ()

    @property
    def duration_s(self) -> float:
        return len(self.samples) / float(self.sample_rate) if self.sample_rate else 0.0


_PAUSE = re.compile(r"^_[^A-Za-z0-9]*$")


def is_pause(phoneme: str) -> bool:
    """True for espeak's pause / silence phonemes (``_``, ``_:``, ``_!``, ``_|``, ``_^_``).

    Not for phonemes that merely start with ``_`` such as Japanese palatalisation ``_j``.
    """
    return phoneme == "" or bool(_PAUSE.match(phoneme))


# --------------------------------------------------------------------------------------------
# Languages and voices
# --------------------------------------------------------------------------------------------

#: contract language -> espeak-ng voice (language) name
LANGUAGE_VOICES: dict[str, str] = {
    "English (US)": "en-us",
    "English (UK)": "en",  # espeak file gmw/en: "English (Great Britain)", language en-gb
    "Spanish": "es",
    "French": "fr",
    "German": "de",
    "Italian": "it",
    "Portuguese (Brazil)": "pt-br",
    "Japanese": "ja",
    "Korean": "ko",
    "Hindi": "hi",
}
assert set(LANGUAGE_VOICES) == set(VOICE_LANGUAGES), "LANGUAGE_VOICES out of step with contract"

_FEMALE_VARIANTS = ("f1", "f2", "f3", "f4", "f5")
_MALE_VARIANTS = ("m1", "m2", "m3", "m4", "m6", "m7", "m8")
# espeakPITCH is 0-100 around the variant's own base (50). The k-th voice of a gender uses
# variant k % n and "round" r = k // n; the round sets a pitch base far enough apart that two
# voices sharing a variant never sound alike, the variant adds a small step on top. Female
# voices (f-variants, pitch 44..80: about 165-290 Hz measured) stay clearly above male voices
# (m-variants, pitch 24..54: about 75-110 Hz measured).
_FEMALE_PITCH_BASE = (44, 58, 72)  # + 2 * (k % 5)
_MALE_PITCH_BASE = (54, 40, 26)  # - 2 * (k % 7)
_RANGES = (40, 55, 70)
_RATES = (158, 166, 174, 182, 190)


@dataclass(frozen=True)
class VoiceSettings:
    """How one contract voice is rendered by espeak: variant, pitch, pitch range, rate (wpm)."""

    voice: str
    gender: str
    variant: str
    pitch: int
    pitch_range: int
    rate: int

    @property
    def key(self) -> tuple[str, int, int, int]:
        return (self.variant, self.pitch, self.pitch_range, self.rate)


def _build_voice_table() -> dict[str, VoiceSettings]:
    """Derive each voice's settings from its index k among the contract voices of its gender.

    variant = variants[k % n], r = k // n,
    pitch = female: 44/58/72[r] + 2 * (k % n); male: 54/40/26[r] - 2 * (k % n),
    range = (40, 55, 70)[(k + r) % 3], rate = (158 .. 190 step 8)[(k + 2r) % 5].
    Pitch alone is unique within a gender; the whole table is checked unique.
    """
    table: dict[str, VoiceSettings] = {}
    counters = {"female": 0, "male": 0}
    for voice in VOICES:
        gender = voice_gender(voice)
        k = counters[gender]
        counters[gender] += 1
        if gender == "female":
            n = len(_FEMALE_VARIANTS)
            variant, r = _FEMALE_VARIANTS[k % n], k // n
            pitch = _FEMALE_PITCH_BASE[r] + 2 * (k % n)
        else:
            n = len(_MALE_VARIANTS)
            variant, r = _MALE_VARIANTS[k % n], k // n
            pitch = _MALE_PITCH_BASE[r] - 2 * (k % n)
        table[voice] = VoiceSettings(
            voice=voice,
            gender=gender,
            variant=variant,
            pitch=pitch,
            pitch_range=_RANGES[(k + r) % len(_RANGES)],
            rate=_RATES[(k + 2 * r) % len(_RATES)],
        )
    keys = [s.key for s in table.values()]
    if len(set(keys)) != len(keys):  # pragma: no cover - a table design error
        raise RuntimeError("voice table is not unique")
    return table


#: contract voice -> espeak settings (30 unique entries)
VOICE_TABLE: dict[str, VoiceSettings] = _build_voice_table()


def voice_settings(voice: str) -> VoiceSettings:
    try:
        return VOICE_TABLE[voice]
    except KeyError:
        raise ValueError(f"voice={voice!r} is not allowed; allowed: {', '.join(VOICES)}") from None


_SLOW_WORDS = {"slow", "slowly", "slower", "calm", "calmly", "relaxed", "gentle", "gently",
               "soft", "softly", "soothing"}
_CALM_WORDS = {"calm", "calmly", "relaxed", "gentle", "gently", "soothing", "soft", "softly"}
_FAST_WORDS = {"fast", "faster", "quick", "quickly", "energetic", "excited", "excitedly",
               "upbeat", "enthusiastic", "cheerful", "lively"}


def prompt_adjust(voice_prompt: str) -> tuple[float, int, int]:
    """What a voice prompt does: (rate factor, pitch delta, pitch-range delta).

    Slow/calm words slow the voice (calm words also narrow the pitch range and lower the pitch a
    little); fast/energetic words speed it up and raise and widen the pitch. Text with none of
    these words (e.g. "Say the following.") changes nothing.
    """
    words = set(re.findall(r"[a-z]+", voice_prompt.lower()))
    slow = bool(words & _SLOW_WORDS)
    calm = bool(words & _CALM_WORDS)
    fast = bool(words & _FAST_WORDS)
    rate, pitch, rng = 1.0, 0, 0
    if slow and not fast:
        rate = 0.75
        if calm:
            pitch, rng = -4, -20
    elif fast and not slow:
        rate, pitch, rng = 1.3, 6, 20
    return rate, pitch, rng


# --------------------------------------------------------------------------------------------
# Text preparation
# --------------------------------------------------------------------------------------------

_KANJI = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3005\u3006]")
_JA_PUNCT = re.compile(r"^[\s\u3000-\u303f\uff01-\uff0f\uff1a-\uff1f!-/:-@\[-`{-~]*$")
# pykakasi reads the topic phrase 今日は as the greeting こんにちは; followed by more words it is
# きょうは (kyou wa).
_JA_FIXES = {"今日は": "きょうわ"}
# Particles pykakasi leaves as their own segment: espeak would read は/へ literally (ha/he).
_JA_PARTICLES = {"は": "わ", "へ": "え"}
_kakasi: Any = None
_KAKASI_LOCK = threading.Lock()


def to_speakable(text: str, language: str) -> str:
    """Text espeak can read for the language.

    espeak's Japanese voice reads kana only (kanji would be spelled out as "Chinese letter"),
    so Japanese text with kanji is converted to hiragana with pykakasi; the particles は and へ
    standing alone become わ and え as spoken.
    """
    text = " ".join(text.split())
    if LANGUAGE_VOICES.get(language) == "ja" and _KANJI.search(text):
        global _kakasi
        with _KAKASI_LOCK:
            if _kakasi is None:
                import pykakasi  # loading its dictionaries takes about 1 s, once per process

                _kakasi = pykakasi.kakasi()
            items = _kakasi.convert(text)
        parts = []
        for i, item in enumerate(items):
            orig = item["orig"]
            following = "".join(x["orig"] for x in items[i + 1:])
            if orig in _JA_FIXES and not _JA_PUNCT.match(following):
                parts.append(_JA_FIXES[orig])
            elif _KANJI.search(orig):
                parts.append(item["hira"])
            elif orig in _JA_PARTICLES and i > 0 and not _JA_PUNCT.match(items[i - 1]["orig"]):
                parts.append(_JA_PARTICLES[orig])
            else:
                parts.append(orig)
        text = "".join(parts)
    return text


# --------------------------------------------------------------------------------------------
# libespeak-ng through ctypes
# --------------------------------------------------------------------------------------------

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_POS_CHARACTER = 1

_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_EVENT_PHONEME = 7

_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)

_LOCK = threading.Lock()
_lib: Any = None
_sample_rate = 0
_callback_ref: Any = None  # keeps the ctypes callback alive for the life of the process


class _Collector:
    """What the callback gathers during one espeak_Synth call."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.events: list[tuple[int, int, int, int, str]] = []  # type, ms, sample, text_pos, id


_current: _Collector | None = None


def _on_synth(wav: Any, numsamples: int, events: Any) -> int:
    col = _current
    if col is None:
        return 0
    if numsamples > 0 and wav:
        col.chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
    i = 0
    while True:
        ev = events[i]
        if ev.type == _EVENT_LIST_TERMINATED:
            break
        if ev.type == _EVENT_PHONEME:
            name = bytes(ev.id.string).split(b"\0", 1)[0].decode("utf-8", "replace")
            col.events.append((ev.type, ev.audio_position, ev.sample, ev.text_position, name))
        elif ev.type == _EVENT_WORD:
            col.events.append((ev.type, ev.audio_position, ev.sample, ev.text_position,
                               str(ev.length)))
        i += 1
    return 0


def _elf_symbols(path: str) -> dict[str, tuple[int, int]]:
    """name -> (value, size) from an ELF64 little-endian ``.symtab`` (static symbols too)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return {}
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    out: dict[str, tuple[int, int]] = {}
    for _, stype, _, _, off, size, link, _, _, _ in sections:
        if stype != 2:  # SHT_SYMTAB
            continue
        stroff = sections[link][4]
        for j in range(size // 24):
            st_name, _, _, _, value, st_size = struct.unpack_from("<IBBHQQ", data, off + j * 24)
            end = data.index(b"\0", stroff + st_name)
            out[data[stroff + st_name : end].decode("ascii", "replace")] = (value, st_size)
    return out


# Wavegen state that espeak keeps across utterances (function-static, never reset by the API):
# the pitch-flutter phase, the gain control and the cycle counter, plus the echo buffer. Left
# alone, the same text comes out slightly different every call; resetting them (with the random
# seed) makes synthesis deterministic. (symbol prefix, value; None = zero the whole object)
_STATE_RESETS: tuple[tuple[str, int | None], ...] = (
    ("Flutter_ix", 0), ("agc", 256), ("cycle_count", 0), ("echo_buf", None),
)
_state_addrs: list[tuple[int, int, int | None]] = []  # (address, size, value)


def _find_state(lib: Any, path: str) -> list[tuple[int, int, int | None]]:
    syms = _elf_symbols(path)
    if "espeak_Synth" not in syms:
        return []
    base = ctypes.cast(lib.espeak_Synth, ctypes.c_void_p).value - syms["espeak_Synth"][0]
    found = []
    for prefix, value in _STATE_RESETS:
        hits = [v for n, v in syms.items() if n == prefix or n.startswith(prefix + ".")]
        if len(hits) != 1:
            return []  # not the build we know: do not poke at memory
        addr, size = hits[0]
        if value is not None and size != 4:
            return []
        found.append((base + addr, size, value))
    return found


def _reset_state(lib: Any) -> None:
    lib.espeak_ng_SetRandSeed(1)
    for addr, size, value in _state_addrs:
        if value is None:
            ctypes.memset(addr, 0, size)
        else:
            ctypes.c_int.from_address(addr).value = value


def deterministic() -> bool:
    """Whether this libespeak-ng build lets synthesis be reset to give identical output."""
    with _LOCK:
        _ensure_lib()
    return bool(_state_addrs)


def _ensure_lib() -> Any:
    """Load and initialise libespeak-ng once per process (call with _LOCK held)."""
    global _lib, _sample_rate, _callback_ref
    if _lib is not None:
        return _lib
    import espeakng_loader

    lib = ctypes.CDLL(espeakng_loader.get_library_path())
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_ng_SetRandSeed.restype = None
    lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
    ]
    data = espeakng_loader.get_data_path().encode()
    rate = lib.espeak_Initialize(
        _AUDIO_OUTPUT_SYNCHRONOUS, 0, data,
        _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT,
    )
    if rate <= 0:
        raise RuntimeError(f"espeak_Initialize failed ({rate}) with data at {data.decode()}")
    _callback_ref = _SynthCallback(_on_synth)
    lib.espeak_SetSynthCallback(_callback_ref)
    _sample_rate = rate
    _state_addrs[:] = _find_state(lib, espeakng_loader.get_library_path())
    _lib = lib
    return lib


def _reset_after_fork() -> None:
    global _LOCK
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _espeak(text: str, voice_name: str, rate: int, pitch: int, pitch_range: int) -> tuple[
    np.ndarray, int, list[tuple[int, int, int, int, str]]
]:
    global _current
    with _LOCK:
        lib = _ensure_lib()
        err = lib.espeak_SetVoiceByName(voice_name.encode())
        if err != 0:
            raise RuntimeError(f"espeak has no voice {voice_name!r} (error {err})")
        for param, value in ((_RATE, rate), (_VOLUME, 100), (_PITCH, pitch), (_RANGE, pitch_range)):
            lib.espeak_SetParameter(param, int(value), 0)
        _reset_state(lib)
        col = _Collector()
        _current = col
        try:
            raw = text.encode("utf-8") + b"\0"
            buf = ctypes.create_string_buffer(raw, len(raw))
            err = lib.espeak_Synth(buf, len(raw), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        finally:
            _current = None
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed (error {err})")
        sr = _sample_rate
    pcm = np.concatenate(col.chunks) if col.chunks else np.zeros(0, np.int16)
    return pcm, sr, col.events


def _timeline(
    events: list[tuple[int, int, int, int, str]], duration: float, text: str
) -> tuple[tuple[tuple[float, float, str], ...], tuple[tuple[float, float, str], ...]]:
    """Phoneme and word intervals: each ends where the next of its kind starts (last: audio end)."""
    # "(en)"/"(ja)" mark a language switch, not a sound.
    phon = [
        (ms / 1000.0, name)
        for t, ms, _, _, name in events
        if t == _EVENT_PHONEME and name and not name.startswith("(")
    ]
    phonemes = []
    for i, (start, name) in enumerate(phon):
        end = phon[i + 1][0] if i + 1 < len(phon) else duration
        start, end = min(start, duration), min(max(end, start), duration)
        phonemes.append((start, end, name))
    wds = []
    for t, ms, _, pos, length in events:
        if t != _EVENT_WORD:
            continue
        # text_position is 1-based in characters; length is in characters too.
        chars = text[max(pos - 1, 0): max(pos - 1, 0) + int(length)]
        wds.append((ms / 1000.0, chars))
    words = []
    for i, (start, w) in enumerate(wds):
        end = wds[i + 1][0] if i + 1 < len(wds) else duration
        start, end = min(start, duration), min(max(end, start), duration)
        words.append((start, end, w))
    return tuple(phonemes), tuple(words)


def synthesize(text: str, voice: str, language: str, voice_prompt: str = "") -> Speech:
    """Speak ``text`` offline with a contract voice and language (espeak-ng, 22050 Hz)."""
    if language not in LANGUAGE_VOICES:
        raise ValueError(
            f"language={language!r} is not allowed; allowed: {', '.join(VOICE_LANGUAGES)}"
        )
    settings = voice_settings(voice)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty; give the words to speak")
    rate_f, dpitch, drange = prompt_adjust(voice_prompt or "")
    speakable = to_speakable(text.replace("\0", " "), language)
    pcm, sr, events = _espeak(
        speakable,
        f"{LANGUAGE_VOICES[language]}+{settings.variant}",
        rate=int(round(settings.rate * rate_f)),
        pitch=min(100, max(0, settings.pitch + dpitch)),
        pitch_range=min(100, max(0, settings.pitch_range + drange)),
    )
    samples = (pcm.astype(np.float32) / 32768.0).astype(np.float32)
    duration = len(samples) / sr
    phonemes, words = _timeline(events, duration, speakable)
    return Speech(samples=samples, sample_rate=sr, phonemes=phonemes, words=words)


# --------------------------------------------------------------------------------------------
# Given audio
# --------------------------------------------------------------------------------------------


def load_audio(data: bytes, sample_rate: int = 24000) -> Speech:
    """Decode any audio PyAV reads (wav, mp3, m4a, ogg, flac ...) to mono float32 at ``sample_rate``.

    Raises :class:`AudioError` when the bytes are not decodable, hold no audio stream, or hold
    no samples.
    """
    import av

    if not data:
        raise AudioError("audio is empty (0 bytes)")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate={sample_rate} must be positive")
    chunks: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioError("audio has no audio stream")
            stream = container.streams.audio[0]
            # Resample in the source layout (planar float) and average the channels here:
            # libswresample's own downmix adds channels at -3 dB, which can clip.
            resampler = None
            for frame in container.decode(stream):
                if resampler is None:
                    resampler = av.AudioResampler(
                        format="fltp", layout=frame.layout.name, rate=sample_rate
                    )
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().mean(axis=0))
            if resampler is not None:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray().mean(axis=0))
    except AudioError:
        raise
    except (av.FFmpegError, ValueError, OSError, EOFError) as e:
        raise AudioError(f"audio is not decodable: {e}") from None
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise AudioError("audio holds no samples")
    np.clip(samples, -1.0, 1.0, out=samples)
    return Speech(samples=samples, sample_rate=sample_rate, phonemes=())
