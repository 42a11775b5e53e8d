"""From a brief to a script: the prompt, the text out of every answer shape, the checks, and the
local stand-in writer (avatarflow.local.server.writer)."""

from __future__ import annotations

import json

import pytest

from avatarflow import duration
from avatarflow.brief import Brief, ScriptRejected, answer_text, check_script, llm_request
from avatarflow.local.server import writer

TEXT = "Hello there. Our spring sale starts today."
BRIEF = Brief(brief="the spring sale", language="English (US)", voice="Zephyr (Female)", target_seconds=20,
              tone="friendly", audience="returning customers", call_to_action="visit the store", seed=3)

OPENAI = {"choices": [{"message": {"role": "assistant", "content": TEXT}, "finish_reason": "stop"}]}
OPENAI_PARTS = {"choices": [{"message": {"content": [{"type": "text", "text": "Hello there. "},
                                                      {"type": "text", "text": "Our spring sale starts today."}]}}]}
ANTHROPIC = {"content": [{"type": "text", "text": "Hello there. "}, {"type": "text", "text": "Our spring sale starts today."}],
             "stop_reason": "end_turn"}
GEMINI = {"candidates": [{"content": {"parts": [{"text": "Hello there. "}, {"text": "Our spring sale starts today."}]},
                          "finishReason": "STOP"}]}


@pytest.mark.parametrize("doc", [OPENAI, OPENAI_PARTS, ANTHROPIC, GEMINI], ids=["openai", "openai-parts", "anthropic", "gemini"])
@pytest.mark.parametrize("wrap", ["string", "parsed", "bare"])
def test_text_comes_out_of_every_answer_shape(doc, wrap):
    body = {"string": {"status": "COMPLETED", "output": json.dumps(doc)},
            "parsed": {"status": "COMPLETED", "output": doc}, "bare": doc}[wrap]
    assert answer_text(body) == TEXT


def test_plain_text_and_a_string_holding_a_string():
    assert answer_text({"output": "  Just words.  "}) == "Just words."
    assert answer_text({"output": json.dumps("Just words.")}) == "Just words."
    assert answer_text({"output": {"unexpected": 1}}) == ""


def test_the_prompt_asks_for_plain_speech_in_the_language_at_the_length():
    req = llm_request(Brief(**{**BRIEF.__dict__, "language": "Spanish"}))
    system, user = req.messages[0].content, req.messages[1].content
    assert "in Spanish" in system and "no stage directions" in system and "no emoji" in system
    words = int(user.split("Length: about ")[1].split()[0])
    seconds = duration.script_seconds(" ".join(["palabra"] * words), "Zephyr (Female)", "Spanish")
    assert abs(seconds - 20) < 1.0
    assert "Call to action: visit the store" in user and req.seed == 3 and req.slug == BRIEF.model


def test_script_fingerprint_follows_brief_model_options_and_seed():
    assert BRIEF.fingerprint() == Brief(**BRIEF.__dict__).fingerprint()
    for change in ({"seed": 4}, {"model": "claude-5"}, {"tone": "formal"}, {"target_seconds": 21}, {"brief": "x"}):
        assert Brief(**{**BRIEF.__dict__, **change}).fingerprint() != BRIEF.fingerprint()


@pytest.mark.parametrize("text, problem", [
    ("   ", "is empty"),
    ("Hi.", "to speak"),
    (" ".join(["word"] * 400), "to speak"),
    ("**Hello** there, welcome to the spring sale of this year, with many offers for you all today.", "markup"),
    ("[Music plays] Hello there, welcome to the spring sale of this year, with many offers for you today.", "markup"),
    ("Hello there 😀 welcome to the spring sale of this year, with many offers for all of you today.", "emoji"),
    ("Hello there, welcome to the spring sale. We will kill the prices this year for all of you, friends.", "safety"),
])
def test_a_script_that_cannot_be_spoken_is_rejected_with_the_reason(text, problem):
    with pytest.raises(ScriptRejected, match=problem):
        check_script(text, Brief(**{**BRIEF.__dict__, "target_seconds": 8}))


def test_a_good_script_passes_whitespace_folded():
    text = "Hello there,\n welcome to the spring sale of this year, with many offers for all of you today."
    assert check_script(text, Brief(**{**BRIEF.__dict__, "target_seconds": 8})).startswith("Hello there, welcome")


def test_the_local_writer_follows_the_brief_and_is_deterministic():
    body = llm_request(BRIEF).body()
    out, usage = writer.answer("gpt-5.5", body)
    text = answer_text({"output": out})
    assert text == answer_text({"output": writer.answer("gpt-5.5", body)[0]})
    assert "spring sale" in text and "returning customers" in text and "visit the store" in text
    assert usage["completion_tokens"] > 0
    other = answer_text({"output": writer.answer("gpt-5.5", {**body, "seed": 4})[0]})
    assert other != text
    check_script(text, BRIEF)
    for slug, key in (("claude-sonnet-5", "content"), ("gemini-3-pro", "candidates"), ("gpt-5.5", "choices")):
        assert key in json.loads(writer.answer(slug, body)[0])


@pytest.mark.parametrize("language", ["English (US)", "Spanish", "German", "French", "Italian", "Korean"])
def test_the_local_writer_hits_the_length_in_the_language(language):
    brief = Brief(**{**BRIEF.__dict__, "language": language, "target_seconds": 30})
    text = answer_text({"output": writer.answer("gpt-5.5", llm_request(brief).body())[0]})
    assert abs(duration.script_seconds(text, brief.voice, language) - 30) <= 0.2 * 30
