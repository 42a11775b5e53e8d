"""avatarflow.budget: each row's estimated cost (spoken seconds x the price per second of its
resolution, plus the script an LLM writes from a brief) and the cap that refuses, before anything
is submitted, the first job past it and every later one."""

from __future__ import annotations

import math

import pytest

from avatarflow import budget
from avatarflow.budget import estimate_cost, estimate_seconds, plan
from avatarflow.contract import PRICE_PER_SECOND, SCRIPT_COST_ESTIMATE_USD
from avatarflow.inputs import TemplateError
from avatarflow.spec import VideoRequest


def req(**kw) -> VideoRequest:
    return VideoRequest(image="https://example.com/p.jpg", **kw)


# ---- per-row costs -------------------------------------------------------------------------------
def test_the_vendor_prices_per_output_second():
    assert PRICE_PER_SECOND == {"720p": 0.025, "1080p": 0.045}
    assert SCRIPT_COST_ESTIMATE_USD == 0.01


def test_a_script_costs_its_spoken_seconds_at_its_resolution():
    ten_words = req(voice_script="one two three four five six seven eight nine ten")  # 1 + 10 / 2.5 = 5 s
    assert estimate_seconds(ten_words) == pytest.approx(5.0)
    assert estimate_cost(ten_words) == pytest.approx(5.0 * 0.025)
    assert estimate_cost(ten_words.model_copy(update={"resolution": "1080p"})) == pytest.approx(5.0 * 0.045)


def test_the_script_is_counted_as_rendered_with_the_rows_fields():
    r = req(voice_script="Hello {{ name }}, {{ greeting }}", template_fields={"name": "Ada Lovelace",
                                                                             "greeting": "a b c d e"})
    # "Hello Ada Lovelace, a b c d e": 8 words, not the template's 4
    assert estimate_seconds(r) == pytest.approx(budget.LEAD_SECONDS + 8 / budget.WORDS_PER_SECOND)


def test_no_script_counts_the_apis_default_script():
    r = req()
    default = VideoRequest.model_fields["voice_script"].default
    assert estimate_seconds(r) == pytest.approx(1 + len(default.split()) / 2.5)
    assert estimate_seconds(r) > 1


def test_a_recording_counts_as_a_fixed_length_whatever_the_script():
    r = req(audio="https://example.com/a.wav")
    assert estimate_seconds(r) == budget.AUDIO_ESTIMATE_S == 30.0
    assert estimate_cost(r.model_copy(update={"resolution": "1080p"})) == pytest.approx(30.0 * 0.045)


def test_a_brief_costs_its_target_seconds_and_the_scripts_cent():
    r = req(brief="Our spring sale, for {{ city }}.", template_fields={"city": "Lyon"}, target_seconds=20)
    assert estimate_seconds(r) == pytest.approx(21.0)
    assert estimate_cost(r) == pytest.approx(21.0 * 0.025 + 0.01)
    long = r.model_copy(update={"target_seconds": 60.0, "resolution": "1080p"})
    assert estimate_cost(long) == pytest.approx(61.0 * 0.045 + 0.01)


def test_a_template_that_cannot_render_fails_before_any_cost():
    with pytest.raises(TemplateError):
        estimate_cost(req(voice_script="{{ 'ab ' * 10**7 }}", template_fields={"x": 1}))
    with pytest.raises(TemplateError):
        estimate_cost(req(brief="{{ 'ab ' * 10**7 }}", template_fields={"x": 1}))


# ---- the cap -------------------------------------------------------------------------------------
def test_the_cap_stops_at_the_first_job_past_it_and_refuses_every_later_one():
    p = plan([0.3, 0.3, 0.5, 0.1, 0.1], 1.0)
    assert p.submit == [True, True, False, False, False], "a cheaper later job is refused too"
    assert p.stopped_at == 2 and p.planned == pytest.approx(0.6) and p.limit == 1.0
    assert p.estimates == [0.3, 0.3, 0.5, 0.1, 0.1]


def test_a_budget_that_is_exactly_spent_admits_the_last_job():
    p = plan([0.1, 0.2], 0.3)  # 0.1 + 0.2 is 0.30000000000000004 in floats
    assert p.submit == [True, True] and p.stopped_at is None and p.planned == pytest.approx(0.3)
    assert plan([0.3, 0.0001], 0.3).submit == [True, False]


def test_a_zero_budget_refuses_every_paid_job_and_none_is_no_limit():
    zero = plan([0.0, 0.01, 0.0], 0)
    assert zero.submit == [True, False, False] and zero.stopped_at == 1 and zero.planned == 0
    free = plan([5.0, 7.0], None)
    assert free.submit == [True, True] and free.planned == 12.0 and free.stopped_at is None
    assert plan([], 1.0).submit == [] and plan([], 1.0).stopped_at is None


@pytest.mark.parametrize("limit", [-0.01, math.nan])
def test_a_bad_budget_is_refused_naming_the_value(limit):
    with pytest.raises(ValueError) as info:
        plan([0.1], limit)
    assert f"budget={limit!r} is not allowed" in str(info.value)
    assert "allowed: a number of USD >= 0" in str(info.value)


def test_the_reason_names_the_jobs_estimate_the_budget_and_what_was_planned():
    p = plan([0.75, 0.5, 0.125], 1.0)
    assert p.reason(1) == "budget: ~$0.500 more would pass $1.00 ($0.750 planned before it)"
    assert p.reason(2).startswith("budget: ~$0.125 more would pass $1.00")


def test_costs_from_requests_feed_the_cap():
    rows = [req(voice_script="w " * 40), req(voice_script="w " * 40), req(audio="https://example.com/a.wav")]
    costs = [estimate_cost(r) for r in rows]  # 17 s, 17 s, 30 s at 720p
    assert costs == pytest.approx([17 * 0.025, 17 * 0.025, 30 * 0.025])
    p = plan(costs, 1.0)
    assert p.submit == [True, True, False] and p.planned == pytest.approx(34 * 0.025)
