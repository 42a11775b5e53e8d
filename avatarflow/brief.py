"""From a brief to the spoken script: the prompt for an LLM on the vendor's queue, the text out
of any provider's answer, and the checks a script passes before a video is paid for."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from avatarflow import duration, safety
from avatarflow.contract import LLM_EXPECTED_DURATION_S, TARGET_SECONDS_MAX, ChatMessage, LlmRequest
from avatarflow.errors import AvatarflowError, JobFailed
from avatarflow.fingerprint import sha256_hex

BRIEF_VERSION = 1
# A script may be this far off its target (estimated at the language's speaking rate).
LENGTH_TOLERANCE = 0.5
LLM_TEMPERATURE = 0.7
TOKENS_PER_SECOND = 12  # generous: about 2.5 words a second, 4 tokens a word, doubled for CJK

_MARKUP = re.compile(
    r"(<[a-zA-Z/][^>]*>|\*\*|__|^\s*#|^\s*[-*]\s|\[[^\]]*\]|\([^)]*(?:pause|music|laugh|smile|beat|sfx)[^)]*\)"
    r"|```|https?://)",
    re.IGNORECASE | re.MULTILINE,
)
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F]")


class ScriptRejected(AvatarflowError):
    """The LLM's answer cannot be spoken as it is: empty, off its length, marked up or blocked."""

    def __init__(self, problem: str, *, allowed: str):
        super().__init__(f"script_model's answer {problem}; allowed: {allowed}")
        self.problem, self.allowed = problem, allowed


@dataclass(frozen=True)
class Brief:
    """What to write about, for whom, how long, in which language and voice."""

    brief: str
    language: str
    voice: str | None = None
    voice_prompt: str | None = None
    target_seconds: float = 30.0
    tone: str | None = None
    audience: str | None = None
    call_to_action: str | None = None
    model: str = LlmRequest.model_fields["model"].default
    seed: int | None = None

    def fingerprint(self) -> str:
        """The cache key of the script: the brief, the model, its options and the seed."""
        doc = {"v": BRIEF_VERSION, "kind": "script", **self.__dict__, "temperature": LLM_TEMPERATURE}
        return sha256_hex(json.dumps(doc, sort_keys=True, ensure_ascii=False))


def units_per_second(brief: Brief) -> float:
    """Words (Japanese: characters) spoken a second in this language and voice."""
    sample = "あ" * 100 if brief.language == "Japanese" else " ".join(["word"] * 100)
    return 100 / duration.script_seconds(sample, brief.voice, brief.language, brief.voice_prompt)


def target_units(brief: Brief) -> int:
    return max(5, round(brief.target_seconds * units_per_second(brief)))


def llm_request(brief: Brief) -> LlmRequest:
    """The chat for the script: a system rule for plain spoken text, then the brief's fields."""
    unit = "characters" if brief.language == "Japanese" else "words"
    system = (
        f"You write the words a talking avatar speaks aloud. Answer with the spoken text only, in "
        f"{brief.language}: plain sentences, no title, no stage directions, no markup, no lists, "
        "no emoji, no links, no quotation marks around the script."
    )
    lines = [
        f"Topic: {brief.brief}",
        f"Tone: {brief.tone or 'friendly'}",
        f"Audience: {brief.audience or 'a general audience'}",
        f"Call to action: {brief.call_to_action or 'none'}",
        f"Language: {brief.language}",
        f"Length: about {target_units(brief)} {unit} ({brief.target_seconds:g} seconds spoken)",
    ]
    return LlmRequest(
        model=brief.model,
        messages=[ChatMessage(role="system", content=system), ChatMessage(role="user", content="\n".join(lines))],
        max_tokens=int(min(TARGET_SECONDS_MAX, brief.target_seconds) * TOKENS_PER_SECOND) + 64,
        temperature=LLM_TEMPERATURE,
        seed=brief.seed,
    )


def answer_text(body: Any) -> str:
    """The text of an LLM answer: `output` as a string holding JSON, an object or plain text (or
    the whole body when there is no `output`), in the OpenAI, Anthropic or Gemini shape."""
    doc = body.get("output", body) if isinstance(body, dict) else body
    if isinstance(doc, str):
        try:
            doc = json.loads(doc)
        except ValueError:
            return doc.strip()
        if isinstance(doc, str):
            return doc.strip()
    return _text_of(doc).strip()


def _parts(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content
                       if not isinstance(p, dict) or p.get("type", "text") == "text")
    return ""


def _text_of(doc: Any) -> str:
    if isinstance(doc, dict):
        if isinstance(doc.get("choices"), list) and doc["choices"]:
            choice = doc["choices"][0]
            message = choice.get("message") or {}
            return _parts(message.get("content")) or _parts(choice.get("text"))
        if isinstance(doc.get("candidates"), list) and doc["candidates"]:
            return _parts((doc["candidates"][0].get("content") or {}).get("parts"))
        if "content" in doc:
            return _parts(doc["content"])
        if isinstance(doc.get("text"), str):
            return doc["text"]
    if isinstance(doc, list):
        return _parts(doc)
    return ""


def check_script(text: str, brief: Brief) -> str:
    """The script, if it can be spoken as it is: not empty, within LENGTH_TOLERANCE of the target,
    no markup or emoji, and past the safety filter's word list. ScriptRejected otherwise."""
    text = re.sub(r"\s+", " ", text).strip().strip('"“”')
    if not text:
        raise ScriptRejected("is empty", allowed="spoken text")
    seconds = duration.script_seconds(text, brief.voice, brief.language, brief.voice_prompt)
    low, high = brief.target_seconds * (1 - LENGTH_TOLERANCE), brief.target_seconds * (1 + LENGTH_TOLERANCE)
    if not low <= seconds <= high:
        raise ScriptRejected(
            f"would take about {seconds:.0f} s to speak, for target_seconds={brief.target_seconds:g}",
            allowed=f"{low:.0f} to {high:.0f} s",
        )
    if _MARKUP.search(text) or _EMOJI.search(text):
        raise ScriptRejected("holds markup, stage directions, a link or emoji", allowed="plain spoken sentences")
    rule = safety.blocked_rule(text)
    if rule is not None:
        raise ScriptRejected(f"matches the safety filter's {rule!r} rule", allowed="text past the word list")
    return text


@dataclass(frozen=True)
class Script:
    """A written script and how it was made (kept in the archive, shown in the manifest)."""

    text: str
    model: str
    prompt: list[dict[str, str]]
    cost: float | None
    request_id: str
    fingerprint: str
    cached: bool = False

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "cached"}


def brief_of(request: Any) -> Brief:
    """The brief of a VideoRequest: its text rendered over the row's template_fields (the LLM's
    answer is never a template), the voice, the language, and the seed when it is explicit."""
    from avatarflow.inputs import render_script

    return Brief(
        brief=render_script(request.brief, request.template_fields, "brief"), language=request.voice_language,
        voice=request.voice, voice_prompt=request.voice_prompt, target_seconds=request.target_seconds,
        tone=request.tone, audience=request.audience, call_to_action=request.call_to_action,
        model=request.script_model, seed=None if request.random_seed else int(request.seed),
    )


async def write_script(ctx: Any, brief: Brief) -> Script:
    """The script for `brief`: from the archive when written before (no LLM call), else asked
    of the LLM once through the ledger (a lost answer is reconciled, never reposted), checked,
    and kept. A brief without a seed is written anew each time, like a video without one."""
    from avatarflow.ledger import COMPLETED, FAILED

    fp = brief.fingerprint() if brief.seed is not None else sha256_hex(f"{brief.fingerprint()}:{uuid.uuid4()}")
    key = ctx.store.key("scripts", f"{fp}.json")
    doc, _ = await ctx.store.read_json(key)
    if doc:
        ctx.log(f"script {fp[:12]} from the archive: no LLM call")
        return Script(**doc, cached=True)
    request = llm_request(brief)
    job = await ctx.ledger.submit(ctx.client, fp, request, record={"kind": "script"}, log=ctx.log)
    try:
        result = await ctx.client.wait(job.request_id, submitted_at=job.submitted_at,
                                       expected_seconds=min(LLM_EXPECTED_DURATION_S, ctx.expected_seconds))
    except JobFailed as e:
        await ctx.ledger.mark(fp, FAILED, error=e.error, request_id=job.request_id)
        raise
    body = result.model_dump()
    text = check_script(answer_text(body if result.output is None else {"output": result.output}), brief)
    script = Script(text, brief.model, [m.model_dump() for m in request.messages],
                    result.metrics.cost if result.metrics else None, job.request_id, fp)
    await ctx.store.create_json(key, script.record())
    await ctx.ledger.mark(fp, COMPLETED, request_id=job.request_id)
    return script
