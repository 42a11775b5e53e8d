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
from typing import Any

_FIELD = re.compile(r"^(Topic|Tone|Audience|Call to action|Language|Length):\s*(.*)$", re.MULTILINE)
_LENGTH = re.compile(r"about\s+(\d+)\s+(words|characters)")

# Per language: openers by tone ("{a}" the audience), the topic line ("{t}"), the call to action
# ("{c}"), a closing without one, and neutral sentences to reach the length.
PHRASES: dict[str, dict[str, Any]] = {
    "English": {
        "open": {"friendly": "Hi {a}!", "formal": "Hello {a}.", "excited": "Great news, {a}!",
                 "calm": "Welcome, {a}."},
        "topic": "Today it is all about {t}.",
        "cta": "So {c}.", "close": "Thank you for watching.",
        "fill": ["It is simple to get started.", "We made it for people like you.",
                 "Every detail was planned with care.", "You will notice the difference right away.",
                 "It only takes a few minutes.", "Our team is here to help you.",
                 "Many people already enjoy it every day.", "Now is a good moment to try it.",
                 "It works the way you would expect.", "We think you are going to love it."],
    },
    "Spanish": {
        "open": {"friendly": "¡Hola, {a}!", "formal": "Buenos días, {a}.", "excited": "¡Gran noticia, {a}!",
                 "calm": "Bienvenidos, {a}."},
        "topic": "Hoy hablamos de {t}.",
        "cta": "Así que {c}.", "close": "Gracias por vernos.",
        "fill": ["Empezar es muy sencillo.", "Lo hicimos pensando en personas como tú.",
                 "Cuidamos cada detalle.", "Vas a notar la diferencia enseguida.",
                 "Solo lleva unos minutos.", "Nuestro equipo está aquí para ayudarte.",
                 "Mucha gente ya lo disfruta cada día.", "Ahora es un buen momento para probarlo.",
                 "Funciona tal como esperas.", "Creemos que te va a encantar."],
    },
    "French": {
        "open": {"friendly": "Bonjour {a} !", "formal": "Bonjour à vous, {a}.", "excited": "Grande nouvelle, {a} !",
                 "calm": "Bienvenue, {a}."},
        "topic": "Aujourd'hui, parlons de {t}.",
        "cta": "Alors, {c}.", "close": "Merci de nous avoir regardés.",
        "fill": ["C'est très simple de commencer.", "Nous l'avons conçu pour des gens comme vous.",
                 "Chaque détail a été soigné.", "Vous verrez la différence tout de suite.",
                 "Cela ne prend que quelques minutes.", "Notre équipe est là pour vous aider.",
                 "Beaucoup de gens l'apprécient déjà.", "C'est le bon moment pour essayer.",
                 "Tout fonctionne comme prévu.", "Nous pensons que vous allez l'adorer."],
    },
    "German": {
        "open": {"friendly": "Hallo {a}!", "formal": "Guten Tag, {a}.", "excited": "Tolle Neuigkeiten, {a}!",
                 "calm": "Willkommen, {a}."},
        "topic": "Heute geht es um {t}.",
        "cta": "Also: {c}.", "close": "Danke fürs Zuschauen.",
        "fill": ["Der Einstieg ist ganz einfach.", "Wir haben es für Menschen wie Sie gemacht.",
                 "Jedes Detail wurde sorgfältig geplant.", "Sie merken den Unterschied sofort.",
                 "Es dauert nur wenige Minuten.", "Unser Team hilft Ihnen gern.",
                 "Viele Menschen nutzen es schon jeden Tag.", "Jetzt ist ein guter Moment, es auszuprobieren.",
                 "Es funktioniert so, wie Sie es erwarten.", "Wir glauben, es wird Ihnen gefallen."],
    },
    "Italian": {
        "open": {"friendly": "Ciao {a}!", "formal": "Buongiorno, {a}.", "excited": "Grandi novità, {a}!",
                 "calm": "Benvenuti, {a}."},
        "topic": "Oggi parliamo di {t}.",
        "cta": "Quindi {c}.", "close": "Grazie per la visione.",
        "fill": ["Iniziare è semplicissimo.", "L'abbiamo pensato per persone come te.",
                 "Ogni dettaglio è stato curato.", "Noterai subito la differenza.",
                 "Bastano pochi minuti.", "Il nostro team è qui per aiutarti.",
                 "Molte persone lo usano già ogni giorno.", "Questo è il momento giusto per provarlo.",
                 "Funziona proprio come ti aspetti.", "Pensiamo che ti piacerà molto."],
    },
    "Portuguese": {
        "open": {"friendly": "Olá, {a}!", "formal": "Bom dia, {a}.", "excited": "Ótima notícia, {a}!",
                 "calm": "Boas-vindas, {a}."},
        "topic": "Hoje vamos falar de {t}.",
        "cta": "Então, {c}.", "close": "Obrigado por assistir.",
        "fill": ["Começar é muito simples.", "Fizemos isso para pessoas como você.",
                 "Cuidamos de cada detalhe.", "Você vai notar a diferença na hora.",
                 "Leva só alguns minutos.", "Nossa equipe está aqui para ajudar.",
                 "Muita gente já aproveita todos os dias.", "Agora é um ótimo momento para experimentar.",
                 "Funciona do jeito que você espera.", "Achamos que você vai adorar."],
    },
    "Japanese": {
        "open": {"friendly": "こんにちは、{a}のみなさん。", "formal": "{a}のみなさま、こんにちは。",
                 "excited": "{a}のみなさん、うれしいおしらせです。", "calm": "{a}のみなさん、ようこそ。"},
        "topic": "きょうは{t}についておはなしします。",
        "cta": "ぜひ、{c}。", "close": "ごらんいただき、ありがとうございました。",
        "fill": ["はじめるのはとてもかんたんです。", "みなさんのためにつくりました。",
                 "ひとつひとつていねいにしあげました。", "すぐにちがいをかんじられます。",
                 "ほんのすうふんでおわります。", "わたしたちのチームがおてつだいします。",
                 "おおくのひとがまいにちつかっています。", "いまがためすのにいいタイミングです。"],
    },
    "Korean": {
        "open": {"friendly": "안녕하세요, {a} 여러분!", "formal": "{a} 여러분, 안녕하십니까.",
                 "excited": "{a} 여러분, 좋은 소식입니다!", "calm": "{a} 여러분, 환영합니다."},
        "topic": "오늘은 {t}에 대해 이야기합니다.",
        "cta": "지금 바로 {c}.", "close": "시청해 주셔서 감사합니다.",
        "fill": ["시작하는 방법은 아주 간단합니다.", "여러분 같은 분들을 위해 만들었습니다.",
                 "모든 부분을 정성껏 준비했습니다.", "바로 차이를 느끼실 수 있습니다.",
                 "몇 분이면 충분합니다.", "저희 팀이 언제든 도와드립니다.",
                 "많은 분들이 매일 즐기고 있습니다.", "지금이 시작하기 좋은 때입니다."],
    },
    "Hindi": {
        "open": {"friendly": "नमस्ते {a}!", "formal": "नमस्कार {a}।", "excited": "बड़ी खुशखबरी, {a}!",
                 "calm": "स्वागत है, {a}।"},
        "topic": "आज हम {t} के बारे में बात करेंगे।",
        "cta": "तो, {c}।", "close": "देखने के लिए धन्यवाद।",
        "fill": ["शुरू करना बहुत आसान है।", "हमने इसे आप जैसे लोगों के लिए बनाया है।",
                 "हर बात का ध्यान रखा गया है।", "आपको तुरंत फर्क दिखेगा।",
                 "इसमें बस कुछ मिनट लगते हैं।", "हमारी टीम आपकी मदद के लिए यहां है।",
                 "बहुत से लोग इसे हर दिन पसंद करते हैं।", "इसे आज़माने का यह सही समय है।"],
    },
}
TONES = ("friendly", "formal", "excited", "calm")
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
