"""A batch's budget: each job's estimated cost (expected speech seconds x the price per output
second of its resolution), and the point where submitting stops: the first job whose estimate
would take the running total past the budget. That job and every later one are skipped, so the
outcome does not depend on which child run happened to finish first."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from avatarflow.contract import PRICE_PER_SECOND, SCRIPT_COST_ESTIMATE_USD
from avatarflow.spec import VideoRequest

# Speech rate of a voice_script: about 150 words a minute, plus a second of lead-in and tail.
WORDS_PER_SECOND = 2.5
LEAD_SECONDS = 1.0
# A recording's length is unknown before it is fetched: counted as this many seconds.
AUDIO_ESTIMATE_S = 30.0


def estimate_seconds(request: VideoRequest) -> float:
    """Expected output length in seconds: the words of the script as it will be spoken (the
    template rendered with the row's fields, in the same bounded sandbox as the run: a template
    that cannot render raises inputs.TemplateError), `target_seconds` for a script written from a
    brief, or AUDIO_ESTIMATE_S for a recording."""
    if request.audio:
        return AUDIO_ESTIMATE_S
    from avatarflow.inputs import render_script

    if request.brief:
        render_script(request.brief, request.template_fields, "brief")  # a bad template fails up front
        return LEAD_SECONDS + request.target_seconds

    script = render_script(request.voice_script, request.template_fields)
    return LEAD_SECONDS + len(script.split()) / WORDS_PER_SECOND


def estimate_cost(request: VideoRequest) -> float:
    """USD the job is expected to cost: expected seconds x contract.PRICE_PER_SECOND[resolution],
    plus contract.SCRIPT_COST_ESTIMATE_USD when an LLM writes the script from a brief."""
    script = SCRIPT_COST_ESTIMATE_USD if request.brief else 0.0
    return round(estimate_seconds(request) * PRICE_PER_SECOND[request.resolution] + script, 6)


@dataclass
class BudgetPlan:
    """Which jobs to submit under a budget (None: no limit)."""

    limit: float | None
    estimates: list[float]
    submit: list[bool]
    planned: float  # the sum of the submitted jobs' estimates
    stopped_at: int | None  # index of the first job refused, if any

    def reason(self, i: int) -> str:
        """Why job i is skipped."""
        return (f"budget: ~${self.estimates[i]:.3f} more would pass ${self.limit:.2f} "
                f"(${self.planned:.3f} planned before it)")


def plan(estimates: Iterable[float], limit: float | None) -> BudgetPlan:
    """Admit jobs in order while the running total of estimates stays within `limit`; stop at
    the first that would pass it (it and all later jobs are refused)."""
    est = [float(e) for e in estimates]
    if limit is not None and (math.isnan(limit) or limit < 0):
        raise ValueError(f"budget={limit!r} is not allowed; allowed: a number of USD >= 0")
    total, submit, stopped = 0.0, [], None
    for i, e in enumerate(est):
        ok = stopped is None and (limit is None or total + e <= limit + 1e-9)
        if ok:
            total += e
        elif stopped is None:
            stopped = i
        submit.append(ok)
    return BudgetPlan(limit=limit, estimates=est, submit=submit, planned=round(total, 6), stopped_at=stopped)
