"""The safety filter: a small word blocklist on spoken text, shared by the local engine (which
applies it to the script when ``disable_safety_filter`` is false, the API's default being true
as on the vendor's side) and the brief step (which checks a generated script before a video is
paid for). Whole words, case-insensitive; the message names the rule, never the word.
The prompts are not spoken, so they are not checked; the image is not checked (no classifier
ships offline).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from avatarflow.errors import AvatarflowError


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: re.Pattern[str]


def _words(*words: str) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(words) + r")\b", re.IGNORECASE)


RULES: tuple[Rule, ...] = (
    Rule("violence", _words(
        r"kill(?:s|ed|ing)?", r"murder(?:s|ed|ing)?", r"behead(?:s|ed|ing)?",
        r"massacre(?:s|d)?", r"slaughter(?:s|ed|ing)?", r"stab(?:s|bed|bing)?",
        r"bomb(?:s|ed|ing)?", r"shoot(?:s|ing)?",
    )),
    Rule("sexual content", _words(
        r"porn(?:o|ography|ographic)?", r"nude(?:s)?", r"naked", r"rape(?:s|d)?", r"raping",
        r"sex(?:ual)?",
    )),
)


class ContentBlocked(AvatarflowError, ValueError):
    """The script matched a blocklist rule; the message is safe to show (no quoted words)."""

    bad_input = True

    def __init__(self, rule: str):
        super().__init__(f"content blocked by safety filter: the script matches the "
                         f"'{rule}' rule; rephrase it or set disable_safety_filter=true")
        self.rule = rule


def blocked_rule(text: str) -> str | None:
    """The name of the first rule the text breaks, or None."""
    for rule in RULES:
        if rule.pattern.search(text):
            return rule.name
    return None


def check_script(text: str) -> None:
    """Raise :class:`ContentBlocked` when the text breaks a rule."""
    rule = blocked_rule(text)
    if rule is not None:
        raise ContentBlocked(rule)
