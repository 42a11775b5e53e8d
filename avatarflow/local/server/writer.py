"""The local API's stand-in for the vendor's LLMs: a deterministic, seeded writer, not a language
model. It reads the brief's fields from the prompt (Topic, Tone, Audience, Call to action,
Language, Length), and strings sentences of the language around them until the length is met,
so a brief becomes a spoken script with no key and no network."""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from pathlib import Path
from typing import Any

_FIELD = re.compile(r"^(Topic|Tone|Audience|Call to action|Language|Length):\s*(.*)$", re.MULTILINE)
_LENGTH = re.compile(r"about\s+(\d+)\s+(words|characters)")

# Per language (avatarflow/assets/writer_phrases.json): openers by tone ("{a}" the audience), the
# topic line ("{t}"), the call to action ("{c}"), a closing without one, and neutral sentences to
# reach the length.
PHRASES: dict[str, dict[str, Any]] = json.loads(
    (Path(__file__).resolve().parents[2] / "assets" / "writer_phrases.json").read_text(encoding="utf-8"))
_TONE_WORDS = {"formal": ("formal", "professional", "serious"), "excited": ("excited", "energetic", "enthusiastic", "fun"),
               "calm": ("calm", "gentle", "relaxed", "soothing")}


def _phrases(language: str) -> dict[str, Any]:
    return PHRASES.get(language.split(" (")[0], PHRASES["English"])


def _tone(tone: str) -> str:
    t = tone.lower()
    for name, words in _TONE_WORDS.items():
        if any(w in t for w in words):
            return name
    return "friendly"


def units(text: str, language: str) -> int:
    """Words (Japanese: characters), counted as the speaking-rate estimate counts them."""
    if language == "Japanese":
        return sum(1 for c in text if not c.isspace() and not unicodedata.category(c).startswith("P"))
    return len(re.findall(r"\w+(?:['’-]\w+)*", text))


def _short(text: str, words: int = 10) -> str:
    first = re.split(r"(?<=[.!?。！？])\s", text.strip(), maxsplit=1)[0].rstrip(".!?。！？")
    return " ".join(first.split()[:words]) if " " in first else first[:40]


def write(fields: dict[str, str], seed: int) -> str:
    """The script for a brief's fields; the same fields and seed give the same text."""
    language = fields.get("language") or "English (US)"
    p = _phrases(language)
    rng = random.Random(seed)
    m = _LENGTH.search(fields.get("length", ""))
    target = int(m.group(1)) if m else 75
    audience = _short(fields.get("audience") or "everyone", 6)
    cta = (fields.get("call to action") or "").strip()
    sentences = [p["open"][_tone(fields.get("tone") or "")].format(a=audience),
                 p["topic"].format(t=_short(fields.get("topic") or "our news"))]
    closing = p["cta"].format(c=_short(cta, 12)) if cta and cta.lower() != "none" else p["close"]
    pool = list(p["fill"])
    rng.shuffle(pool)
    body: list[str] = []
    used = units(" ".join(sentences + [closing]), language)
    while pool or body:
        if not pool:
            pool = list(p["fill"])
            rng.shuffle(pool)
        nxt = pool.pop()
        n = units(nxt, language)
        if abs(target - used - n) >= abs(target - used):
            break
        body.append(nxt)
        used += n
    return " ".join(sentences + body + [closing])


def prompt_fields(body: dict[str, Any]) -> dict[str, str]:
    """The brief's fields from an LLM request body (`messages` or `prompt`)."""
    messages = body.get("messages") or []
    text = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict)) or str(body.get("prompt", ""))
    return {k.lower(): v.strip() for k, v in _FIELD.findall(text)}


def answer(slug: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The provider-shaped answer for an LLM request, as the vendor's `output` (a JSON string):
    Anthropic's shape for a claude slug, Gemini's for a gemini slug, else OpenAI's. Also the
    usage in tokens."""
    seed = body.get("seed")
    if seed is None:
        seed = int(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12], 16)
    text = write(prompt_fields(body), int(seed))
    prompt_tokens = sum(len(str(m.get("content", ""))) for m in body.get("messages") or [] if isinstance(m, dict)) // 4
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max(1, len(text) // 4)}
    if "claude" in slug:
        doc: dict[str, Any] = {"type": "message", "role": "assistant", "content": [{"type": "text", "text": text}],
                               "stop_reason": "end_turn", "usage": usage}
    elif "gemini" in slug:
        doc = {"candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP"}],
               "usageMetadata": usage}
    else:
        doc = {"object": "chat.completion", "model": slug,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
               "usage": usage}
    return json.dumps(doc, ensure_ascii=False), usage
