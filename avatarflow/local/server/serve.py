"""The local p-video-avatar API's start-up from its settings (the CLI's `avatarflow local serve`
parses the flags; this module turns them into a running server).

Fault knobs at start-up (all off by default; the same schema as ``POST /_local/faults``, see
:mod:`avatarflow.local.server.chaos`): ``--faults`` takes the whole JSON object (or ``@file.json``), and
the single flags are applied over it:

    --fault status.500=0.1 --fault submit.drop=0.05   # ENDPOINT.KIND=RATE, repeatable
    --fail-rate 0.2 --submit-drop-after-accept 0.1 --submit-delay 5 --fault-count 3 --retry-after 2
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from avatarflow.errors import BadSetting


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
    from avatarflow.local.server.chaos import ENDPOINTS, FAULT_KINDS, Faults, Settings, validate_knobs

    body: dict[str, Any] = {}
    if faults:
        text = faults
        if faults.startswith("@"):
            try:
                text = Path(faults[1:]).read_text()
            except OSError as e:
                raise BadSetting(f"--faults {faults!r}: cannot read the file: {e.strerror or e}") from None
        try:
            body = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadSetting(f"--faults is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadSetting("--faults must be a JSON object")
    for item in fault or []:
        name, sep, rate = item.partition("=")
        endpoint, dot, kind = name.partition(".")
        if not (sep and dot):
            raise BadSetting(f"--fault {item!r} is not ENDPOINT.KIND=RATE (e.g. status.500=0.1)")
        if endpoint not in ENDPOINTS:
            raise BadSetting(f"--fault {item!r}: endpoint {endpoint!r} is not allowed; allowed: {', '.join(ENDPOINTS)}")
        if kind not in FAULT_KINDS:
            raise BadSetting(f"--fault {item!r}: kind {kind!r} is not allowed; allowed: {', '.join(FAULT_KINDS)}")
        try:
            value = float(rate)
        except ValueError:
            raise BadSetting(f"--fault {item!r}: rate {rate!r} is not a number from 0 to 1") from None
        body.setdefault(endpoint, {})[kind] = value
    for key, value in (("fail_rate", fail_rate), ("submit_drop_after_accept", submit_drop_after_accept),
                       ("submit_delay", submit_delay), ("count", fault_count), ("retry_after", retry_after)):
        if value is not None:
            body[key] = value
    for endpoint in ENDPOINTS:
        for kind, rate in (body.get(endpoint) or {}).items():
            if kind not in FAULT_KINDS:
                raise BadSetting(f"faults: {endpoint}.{kind} is not a fault; allowed: {', '.join(FAULT_KINDS)}")
            if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
                raise BadSetting(f"faults: {endpoint}.{kind}={rate!r} is not a rate from 0 to 1")
    for key in ("fail_rate", "submit_drop_after_accept"):
        if key in body and not (isinstance(body[key], (int, float)) and 0 <= body[key] <= 1):
            raise BadSetting(f"faults: {key}={body[key]!r} is not a rate from 0 to 1")
    unknown = sorted(set(body) - set(Faults.model_fields) - set(Settings.model_fields))
    if unknown:
        allowed = ", ".join([*Faults.model_fields, *Settings.model_fields])
        raise BadSetting(f"faults: {', '.join(unknown)} is not a fault knob; allowed: {allowed}")
    try:
        validate_knobs(body)  # the ranges POST /_local/faults enforces
        Faults.model_validate({k: v for k, v in body.items() if k in Faults.model_fields})
        Settings.model_validate({k: v for k, v in body.items() if k in Settings.model_fields})
    except ValueError as e:  # KnobError, pydantic's ValidationError
        raise BadSetting(f"faults: {e}") from None
    return body


def timing_of(mode: str, queue_wait: float, queue_jitter: float, cost_per_second: list[str],
              jitter: float, seed: int):
    """The `Timing` the --timing flags describe; ValueError with a readable message when bad."""
    from pydantic import ValidationError

    from avatarflow.local.server.queue import Timing

    costs = dict(Timing().cost_per_second)
    for item in cost_per_second:
        res, sep, value = item.partition("=")
        try:
            cost = float(value)
        except ValueError:
            sep = ""
        if not sep or res.strip() not in costs or not 0 < cost < 1e4:
            raise BadSetting(f"--cost-per-second {item!r} is not allowed; allowed: RES=SECONDS with RES "
                             f"one of {', '.join(Timing().cost_per_second)} and SECONDS above 0")
        costs[res.strip()] = cost
    if mode not in ("render", "vendor"):
        raise BadSetting(f"--timing {mode!r} is not allowed; allowed: render, vendor")
    try:
        return Timing(mode=mode, queue_wait=queue_wait, queue_jitter=queue_jitter, cost_per_second=costs,
                      jitter=jitter, seed=seed)
    except ValidationError as e:
        raise BadSetting(f"timing: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}") from None


def serve_local(
    *, host: str, port: int, api_key: list[str], admin_key: list[str], data_dir: Path | None, workers: int,
    retention: float, min_processing_time: float, timing: str, queue_wait: float, queue_jitter: float,
    cost_per_second: list[str], timing_jitter: float, timing_seed: int, requests_per_minute: int, credits: float,
    faults: str | None, fault: list[str], fail_rate: float | None, submit_drop_after_accept: float | None,
    submit_delay: float | None, fault_count: int | None, retry_after: float | None,
) -> None:
    """Serve the Segmind-compatible p-video-avatar API on loopback (blocks); ValueError with a
    readable message when a setting is bad. Keys also from AVATARFLOW_LOCAL_API_KEY and
    AVATARFLOW_LOCAL_ADMIN_KEY (comma-separated)."""
    from avatarflow.local.server.api import ServerConfig, check_loopback, serve as run
    from avatarflow.local.server.chaos import Faults, Settings
    from avatarflow.local.server.queue import set_default_timing

    check_loopback(host)
    body = fault_settings(faults, fault, fail_rate, submit_drop_after_accept, submit_delay, fault_count, retry_after)
    settings = {k: body.pop(k) for k in list(body) if k in Settings.model_fields}
    keys = list(api_key) + [k.strip() for k in os.environ.get("AVATARFLOW_LOCAL_API_KEY", "").split(",") if k.strip()]
    admin_keys = list(admin_key) + [k.strip() for k in os.environ.get("AVATARFLOW_LOCAL_ADMIN_KEY", "").split(",")
                                    if k.strip()]
    config = ServerConfig(
        data_dir=data_dir or Path(tempfile.mkdtemp(prefix="avatarflow-api-")),
        api_keys=keys,
        admin_keys=admin_keys,
        workers=workers,
        settings=Settings(**{"min_processing_time": min_processing_time, "requests_per_minute": requests_per_minute,
                             "retention": retention, **settings}),
        faults=Faults.model_validate(body),
        credits=credits,
    )
    set_default_timing(timing_of(timing, queue_wait, queue_jitter, cost_per_second, timing_jitter, timing_seed))
    run(host, port, config)
