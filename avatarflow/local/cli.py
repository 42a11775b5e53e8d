"""`avatarflow local ...`: the local API server (and, mounted by the main CLI, up/down/status).

Run it before the console script is wired as ``python -m avatarflow.local.cli serve ...``.

Fault knobs at start-up (all off by default; the same schema as ``POST /_local/faults``, see
:mod:`avatarflow.local.chaos`): ``--faults`` takes the whole JSON object (or ``@file.json``), and
the single flags below are applied over it:

    --fault status.500=0.1 --fault submit.drop=0.05   # ENDPOINT.KIND=RATE, repeatable
    --fail-rate 0.2 --submit-drop-after-accept 0.1 --submit-delay 5 --fault-count 3 --retry-after 2
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer

local_app = typer.Typer(help="Local services: the p-video-avatar API and S3 on loopback.", no_args_is_help=True)


@local_app.callback()
def _group() -> None:
    """Local services: the p-video-avatar API and S3 on loopback."""


def fault_settings(
    faults: str | None = None,
    fault: list[str] | None = None,
    fail_rate: float | None = None,
    submit_drop_after_accept: float | None = None,
    submit_delay: float | None = None,
    fault_count: int | None = None,
    retry_after: float | None = None,
) -> dict[str, Any]:
    """The fault object the CLI flags describe; ValueError with a readable message when bad."""
    from avatarflow.local.chaos import ENDPOINTS, FAULT_KINDS, Faults, Settings, validate_knobs

    body: dict[str, Any] = {}
    if faults:
        text = faults
        if faults.startswith("@"):
            try:
                text = Path(faults[1:]).read_text()
            except OSError as e:
                raise ValueError(f"--faults {faults!r}: cannot read the file: {e.strerror or e}") from None
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--faults is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ValueError("--faults must be a JSON object")
    for item in fault or []:
        name, sep, rate = item.partition("=")
        endpoint, dot, kind = name.partition(".")
        if not (sep and dot):
            raise ValueError(f"--fault {item!r} is not ENDPOINT.KIND=RATE (e.g. status.500=0.1)")
        if endpoint not in ENDPOINTS:
            raise ValueError(f"--fault {item!r}: endpoint {endpoint!r} is not allowed; allowed: {', '.join(ENDPOINTS)}")
        if kind not in FAULT_KINDS:
            raise ValueError(f"--fault {item!r}: kind {kind!r} is not allowed; allowed: {', '.join(FAULT_KINDS)}")
        try:
            value = float(rate)
        except ValueError:
            raise ValueError(f"--fault {item!r}: rate {rate!r} is not a number from 0 to 1") from None
        body.setdefault(endpoint, {})[kind] = value
    for key, value in (("fail_rate", fail_rate), ("submit_drop_after_accept", submit_drop_after_accept),
                       ("submit_delay", submit_delay), ("count", fault_count), ("retry_after", retry_after)):
        if value is not None:
            body[key] = value
    for endpoint in ENDPOINTS:
        for kind, rate in (body.get(endpoint) or {}).items():
            if kind not in FAULT_KINDS:
                raise ValueError(f"faults: {endpoint}.{kind} is not a fault; allowed: {', '.join(FAULT_KINDS)}")
            if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
                raise ValueError(f"faults: {endpoint}.{kind}={rate!r} is not a rate from 0 to 1")
    for key in ("fail_rate", "submit_drop_after_accept"):
        if key in body and not (isinstance(body[key], (int, float)) and 0 <= body[key] <= 1):
            raise ValueError(f"faults: {key}={body[key]!r} is not a rate from 0 to 1")
    unknown = sorted(set(body) - set(Faults.model_fields) - set(Settings.model_fields))
    if unknown:
        allowed = ", ".join([*Faults.model_fields, *Settings.model_fields])
        raise ValueError(f"faults: {', '.join(unknown)} is not a fault knob; allowed: {allowed}")
    try:
        validate_knobs(body)  # the ranges POST /_local/faults enforces
        Faults.model_validate({k: v for k, v in body.items() if k in Faults.model_fields})
        Settings.model_validate({k: v for k, v in body.items() if k in Settings.model_fields})
    except ValueError as e:  # KnobError, pydantic's ValidationError
        raise ValueError(f"faults: {e}") from None
    return body


def timing_of(mode: str, queue_wait: float, queue_jitter: float, cost_per_second: list[str],
              jitter: float, seed: int):
    """The `Timing` the --timing flags describe; ValueError with a readable message when bad."""
    from pydantic import ValidationError

    from avatarflow.local.queue import Timing

    costs = dict(Timing().cost_per_second)
    for item in cost_per_second:
        res, sep, value = item.partition("=")
        try:
            cost = float(value)
        except ValueError:
            sep = ""
        if not sep or res.strip() not in costs or not 0 < cost < 1e4:
            raise ValueError(f"--cost-per-second {item!r} is not allowed; allowed: RES=SECONDS with RES "
                             f"one of {', '.join(Timing().cost_per_second)} and SECONDS above 0")
        costs[res.strip()] = cost
    if mode not in ("render", "vendor"):
        raise ValueError(f"--timing {mode!r} is not allowed; allowed: render, vendor")
    try:
        return Timing(mode=mode, queue_wait=queue_wait, queue_jitter=queue_jitter, cost_per_second=costs,
                      jitter=jitter, seed=seed)
    except ValidationError as e:
        raise ValueError(f"timing: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None


@local_app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Loopback address to bind (anything else is refused)."),
    port: int = typer.Option(8787, help="Port."),
    api_key: list[str] = typer.Option([], help="A key the server accepts (repeatable); also AVATARFLOW_LOCAL_API_KEY (comma-separated)."),
    admin_key: list[str] = typer.Option([], help="A key for /_local/* only (repeatable); also AVATARFLOW_LOCAL_ADMIN_KEY (comma-separated). None: /_local/* takes the API keys."),
    data_dir: Optional[Path] = typer.Option(None, help="Where outputs are written (default: a temporary directory)."),
    workers: int = typer.Option(2, min=1, help="Jobs rendered at once."),
    retention: float = typer.Option(3600.0, min=0, help="Seconds a request record lives (then 404); history rows never expire."),
    min_processing_time: float = typer.Option(0.0, min=0, help="A job stays PROCESSING at least this long."),
    timing: str = typer.Option("render", help="Job times: 'render' (as long as the render takes) or 'vendor' (queue wait + cost per output second x length, seeded jitter; --min-processing-time ignored)."),
    queue_wait: float = typer.Option(3.0, min=0, help="--timing vendor: mean seconds a job stays QUEUED."),
    queue_jitter: float = typer.Option(1.0, min=0, help="--timing vendor: the queue wait varies uniformly by +- this many seconds."),
    cost_per_second: list[str] = typer.Option([], help="--timing vendor: processing seconds per output second, RES=S (default 720p=3.0, 1080p=5.4); repeatable."),
    timing_jitter: float = typer.Option(0.01, min=0, max=0.3, help="--timing vendor: relative standard deviation of the processing time."),
    timing_seed: int = typer.Option(0, help="--timing vendor: seed of the jitter (with each request's body)."),
    rate_limit: int = typer.Option(0, min=0, help="Requests per minute per key (0: off)."),
    credits: float = typer.Option(100.0, help="Starting balance reported as remaining_credits."),
    faults: Optional[str] = typer.Option(None, help="Fault injection as a JSON object, or @file.json (schema: avatarflow.local.chaos)."),
    fault: list[str] = typer.Option([], help="One fault rate, ENDPOINT.KIND=RATE (e.g. status.500=0.1, submit.drop=0.05); repeatable."),
    fail_rate: Optional[float] = typer.Option(None, help="Share of jobs that end FAILED ('local: injected failure')."),
    submit_drop_after_accept: Optional[float] = typer.Option(None, help="Share of submits queued whose answer is then cut off."),
    submit_delay: Optional[float] = typer.Option(None, help="Seconds a submit answer is held back (the job is queued at once)."),
    fault_count: Optional[int] = typer.Option(None, help="Only this many injected faults fire, then all clear."),
    retry_after: Optional[float] = typer.Option(None, help="Retry-After seconds of injected 429s."),
) -> None:
    """Serve the Segmind-compatible p-video-avatar API on loopback."""
    from avatarflow.local.api import ServerConfig, check_loopback, serve as run
    from avatarflow.local.queue import set_default_timing
    from avatarflow.local.chaos import Faults, Settings

    try:
        check_loopback(host)
        body = fault_settings(faults, fault, fail_rate, submit_drop_after_accept, submit_delay, fault_count, retry_after)
        settings = {k: body.pop(k) for k in list(body) if k in Settings.model_fields}
        keys = list(api_key) + [k.strip() for k in os.environ.get("AVATARFLOW_LOCAL_API_KEY", "").split(",") if k.strip()]
        admin_keys = list(admin_key) + [k.strip() for k in os.environ.get("AVATARFLOW_LOCAL_ADMIN_KEY", "").split(",") if k.strip()]
        config = ServerConfig(
            data_dir=data_dir or Path(tempfile.mkdtemp(prefix="avatarflow-api-")),
            api_keys=keys,
            admin_keys=admin_keys,
            workers=workers,
            settings=Settings(**{"min_processing_time": min_processing_time, "rate_limit": rate_limit,
                                 "retention": retention, **settings}),
            faults=Faults.model_validate(body),
            credits=credits,
        )
        set_default_timing(timing_of(timing, queue_wait, queue_jitter, cost_per_second, timing_jitter, timing_seed))
        run(host, port, config)
    except ValueError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    local_app()
