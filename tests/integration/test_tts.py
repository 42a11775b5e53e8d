"""Offline TTS (libespeak-ng through ctypes) and audio loading for the local engine."""

from __future__ import annotations

import io
import threading
import wave

import av
import numpy as np
import pytest

from avatarflow.contract import VOICE_LANGUAGES, VOICES, voice_gender
from avatarflow.local.render import tts
from avatarflow.local.render.encode import write_wav
from avatarflow.local.render.tts import AudioError, Speech, is_pause, load_audio, synthesize

SENTENCES = {
    "English (US)": "Good morning, how are you today?",
    "English (UK)": "Good morning, how are you today?",
    "Spanish": "Buenos días, ¿cómo estás hoy?",
    "French": "Bonjour, comment allez-vous aujourd'hui ?",
    "German": "Guten Morgen, wie geht es dir heute?",
    "Italian": "Buongiorno, come stai oggi?",
    "Portuguese (Brazil)": "Bom dia, como você está hoje?",
    "Japanese": "おはようございます、今日は良い天気です。",
    "Korean": "안녕하세요, 오늘 날씨가 좋네요.",
    "Hindi": "नमस्ते, आज आप कैसे हैं?",
}
EN = "The quick brown fox jumps over the lazy dog near the river bank."


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def f0(x: np.ndarray, sr: int, fmin: float = 60.0, fmax: float = 400.0) -> float:
    """Median fundamental frequency over voiced frames (plain autocorrelation)."""
    frame, lo, hi = int(0.04 * sr), int(sr / fmax), int(sr / fmin)
    level = rms(x)
    found = []
    for i in range(0, len(x) - frame, frame // 2):
        fr = x[i : i + frame].astype(np.float64)
        if rms(fr) < 0.5 * level:
            continue
        fr -= fr.mean()
        ac = np.correlate(fr, fr, "full")[frame - 1 :]
        if ac[0] <= 0:
            continue
        ac /= ac[0]
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.5:  # voiced
            found.append(sr / lag)
    assert found, "no voiced frames"
    return float(np.median(found))


def test_sentences_cover_every_language():
    assert set(SENTENCES) == set(VOICE_LANGUAGES) == set(tts.LANGUAGE_VOICES)


@pytest.mark.parametrize("language", VOICE_LANGUAGES)
def test_every_language_speaks(language):
    s = synthesize(SENTENCES[language], "Kore (Female)", language)
    assert isinstance(s, Speech)
    assert s.samples.dtype == np.float32 and s.samples.ndim == 1
    assert s.sample_rate == 22050
    assert float(np.abs(s.samples).max()) <= 1.0
    # A short sentence: plausible speech length, not silence, not spelled out.
    assert 0.8 < s.duration_s < 5.0, s.duration_s
    assert rms(s.samples) > 0.02
    sounds = [p for _, _, p in s.phonemes if not is_pause(p)]
    assert len(sounds) >= 10
    # Timings: ordered, contiguous, inside the audio, last one ends at the audio's end.
    for (a0, a1, _), (b0, _, _) in zip(s.phonemes, s.phonemes[1:]):
        assert 0 <= a0 <= a1 == b0
    assert s.phonemes[-1][1] == pytest.approx(s.duration_s)
    assert s.words and s.words[-1][1] == pytest.approx(s.duration_s)


def test_pauses_are_identifiable():
    s = synthesize("Hello world. This is a test.", "Puck (Male)", "English (US)")
    names = [p for _, _, p in s.phonemes]
    assert any(is_pause(p) for p in names)
    assert "h" in names and not all(is_pause(p) for p in names)
    assert is_pause("_:") and is_pause("_") and is_pause("_|")
    assert not is_pause("_j") and not is_pause("a")
    # The pause after the full stop is real silence in the samples.
    sr = s.sample_rate
    long_pauses = [(a, b) for a, b, p in s.phonemes if p == "_:" and b - a > 0.08]
    assert long_pauses
    a, b = long_pauses[0]
    assert rms(s.samples[int(a * sr) : int(b * sr)]) < 0.2 * rms(s.samples)


def test_japanese_kanji_is_read_not_spelled():
    kanji = "今日は良い天気です"
    kana = "きょうわよいてんきです"
    speakable = tts.to_speakable(kanji, "Japanese")
    assert speakable == kana  # kanji -> hiragana, topic particle read "wa"
    assert not tts._KANJI.search(speakable)
    read = synthesize(kanji, "Kore (Female)", "Japanese")
    by_kana = synthesize(kana, "Kore (Female)", "Japanese")
    assert read.duration_s == pytest.approx(by_kana.duration_s, rel=0.05)
    # What espeak does with the raw kanji: each one spelled out ("Chinese letter") in English.
    settings = tts.voice_settings("Kore (Female)")
    pcm, sr, events = tts._espeak(kanji, "ja+f2", settings.rate, settings.pitch, 50)
    raw_s = len(pcm) / sr
    assert raw_s > 3 * read.duration_s, (raw_s, read.duration_s)
    assert any(e[4] == "(en)" for e in events)  # raw kanji switch espeak into English
    assert not any(p.startswith("(") for _, _, p in read.phonemes)
    # Text without kanji is left alone; other languages are never converted.
    assert tts.to_speakable("カタカナとひらがな", "Japanese") == "カタカナとひらがな"
    assert tts.to_speakable("今日は", "English (US)") == "今日は"


def test_thirty_distinct_voices_with_matching_gender():
    assert set(tts.VOICE_TABLE) == set(VOICES) and len(VOICES) == 30
    keys = {s.key for s in tts.VOICE_TABLE.values()}
    assert len(keys) == 30
    for voice, s in tts.VOICE_TABLE.items():
        assert s.gender == voice_gender(voice)
        assert s.variant[0] == ("f" if s.gender == "female" else "m")
        assert 0 <= s.pitch <= 100 and 0 <= s.pitch_range <= 100 and 80 <= s.rate <= 450
    # Within a gender no two voices share a pitch setting.
    for gender in ("female", "male"):
        pitches = [s.pitch for s in tts.VOICE_TABLE.values() if s.gender == gender]
        assert len(set(pitches)) == len(pitches)
    # Derived deterministically: rebuilding gives the same table.
    assert tts._build_voice_table() == tts.VOICE_TABLE
    with pytest.raises(ValueError, match="allowed"):
        synthesize("hi", "Nobody (Male)", "English (US)")
    with pytest.raises(ValueError, match="allowed"):
        synthesize("hi", "Puck (Male)", "Klingon")
    with pytest.raises(ValueError):
        synthesize("   ", "Puck (Male)", "English (US)")


def test_voices_sound_different_and_female_is_higher():
    measured = {}
    audio = {}
    for voice in VOICES:
        s = synthesize(EN, voice, "English (US)")
        measured[voice] = f0(s.samples, s.sample_rate)
        audio[voice] = s.samples
    female = [hz for v, hz in measured.items() if voice_gender(v) == "female"]
    male = [hz for v, hz in measured.items() if voice_gender(v) == "male"]
    assert min(female) > 1.3 * max(male), measured
    assert 150 < min(female) and max(male) < 130
    # No two voices give the same samples.
    digests = {a.tobytes() for a in audio.values()}
    assert len(digests) == 30


def test_voice_prompt_shifts_rate_and_pitch():
    slow = synthesize(EN, "Puck (Male)", "English (US)", "Speak slowly and calmly.")
    fast = synthesize(EN, "Puck (Male)", "English (US)", "Fast and energetic!")
    plain = synthesize(EN, "Puck (Male)", "English (US)")
    neutral = synthesize(EN, "Puck (Male)", "English (US)", "Say the following.")
    assert slow.duration_s > plain.duration_s > fast.duration_s
    assert slow.duration_s > 1.3 * fast.duration_s
    assert np.array_equal(neutral.samples, plain.samples)
    assert f0(fast.samples, fast.sample_rate) > f0(plain.samples, plain.sample_rate)
    assert tts.prompt_adjust("Say the following.") == (1.0, 0, 0)
    rate, pitch, rng = tts.prompt_adjust("calm and relaxed")
    assert rate < 1 and rng < 0
    rate, pitch, rng = tts.prompt_adjust("upbeat, excited")
    assert rate > 1 and pitch > 0 and rng > 0
    for word in ("slow", "slowly", "calm", "relaxed", "gentle"):
        assert tts.prompt_adjust(word)[0] < 1
    for word in ("fast", "quick", "energetic", "excited", "upbeat"):
        assert tts.prompt_adjust(word)[0] > 1


def test_deterministic_and_thread_safe():
    assert tts.deterministic()
    first = synthesize(EN, "Leda (Female)", "English (US)")
    again = synthesize(EN, "Leda (Female)", "English (US)")
    assert np.array_equal(first.samples, again.samples)
    assert first.phonemes == again.phonemes
    # espeak keeps wavegen state between utterances; other voices/languages/prompts in between
    # must not change the result.
    synthesize(SENTENCES["German"], "Puck (Male)", "German", "fast")
    synthesize(SENTENCES["Japanese"], "Kore (Female)", "Japanese", "calm")
    third = synthesize(EN, "Leda (Female)", "English (US)")
    assert np.array_equal(first.samples, third.samples)
    jobs = [("Leda (Female)", "English (US)"), ("Puck (Male)", "German"),
            ("Kore (Female)", "Japanese")] * 3
    serial = {j: synthesize(SENTENCES[j[1]] if j[1] != "English (US)" else EN, *j).samples
              for j in set(jobs)}
    results: dict[int, np.ndarray] = {}

    def run(i, voice, language):
        text = SENTENCES[language] if language != "English (US)" else EN
        results[i] = synthesize(text, voice, language).samples

    threads = [threading.Thread(target=run, args=(i, *j)) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, j in enumerate(jobs):
        assert np.array_equal(results[i], serial[j])


# ---------------------------------------------------------------------------------------------
# Given audio


def tone(sr: int, seconds: float = 1.0, hz: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    x = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    return np.tile(x, (channels, 1))


def wav_bytes(sr: int = 16000, channels: int = 2) -> bytes:
    buf = io.BytesIO()
    write_wav(buf, tone(sr, channels=channels).T, sr)
    return buf.getvalue()


def m4a_bytes(sr: int = 44100) -> bytes:
    x = tone(sr, seconds=1.0, channels=2)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=sr, layout="stereo")
        frame_len = 1024
        for i in range(0, x.shape[1], frame_len):
            chunk = np.ascontiguousarray(x[:, i : i + frame_len])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate = sr
            frame.pts = i
            for pkt in stream.encode(frame):
                out.mux(pkt)
        for pkt in stream.encode(None):
            out.mux(pkt)
    return buf.getvalue()


def test_load_audio_wav_resamples_to_mono():
    s = load_audio(wav_bytes(16000, channels=2), sample_rate=24000)
    assert s.sample_rate == 24000 and s.samples.dtype == np.float32 and s.samples.ndim == 1
    assert s.duration_s == pytest.approx(1.0, abs=0.02)
    assert s.phonemes == ()
    assert rms(s.samples) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
    assert float(np.abs(s.samples).max()) <= 1.0
    assert f0(s.samples, s.sample_rate, fmin=200, fmax=800) == pytest.approx(440, rel=0.03)


def test_load_audio_m4a():
    data = m4a_bytes()
    s = load_audio(data)
    assert s.sample_rate == 24000
    assert s.duration_s == pytest.approx(1.0, abs=0.1)
    assert rms(s.samples) > 0.2


@pytest.mark.parametrize(
    "data", [b"", b"not audio at all" * 100, bytes(range(256)) * 40], ids=["empty", "text", "noise"]
)
def test_load_audio_rejects_garbage(data):
    with pytest.raises(AudioError):
        load_audio(data)
    assert issubclass(AudioError, ValueError)


def test_load_audio_rejects_video_without_audio():
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            frame.pts = i
            for pkt in stream.encode(frame):
                out.mux(pkt)
        for pkt in stream.encode(None):
            out.mux(pkt)
    with pytest.raises(AudioError, match="no audio stream"):
        load_audio(buf.getvalue())


def test_write_wav_roundtrip(tmp_path):
    s = synthesize("Hello there.", "Orus (Male)", "English (US)")
    path = tmp_path / "out.wav"
    write_wav(path, s.samples, s.sample_rate)
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        assert w.getframerate() == s.sample_rate and w.getnframes() == len(s.samples)
    back = load_audio(path.read_bytes(), sample_rate=s.sample_rate)
    assert np.allclose(back.samples, s.samples, atol=2e-4)
