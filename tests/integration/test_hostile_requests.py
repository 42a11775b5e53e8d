"""Hostile requests (the corpus and its canaries: tests/hostile_helpers.py): template bombs and text
caps, the event-triggered deployment's parameters, hostile calendars and rows in avatar_batch, and
the API key going to the API and history hosts only."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import date, datetime, timezone
from pathlib import Path

import pytest
import yaml
from avatarflow.flows.avatar_batch import avatar_batch
from avatarflow.flows.avatar_video import avatar_video

from avatarflow.client import SegmindClient
from avatarflow.errors import APIError
from tests.hostile_helpers import (
    ADDRESS,
    DUMMY,
    FORBIDDEN_TEXT,
    LOCAL_REFUSED,
    UNREADABLE,
    World,
    _expect_rejected,
    _in_thread,
    _speech,
    _status,
    _video,
)
from tests.http_recorder import Recorder, redirect_to

ROOT = Path(__file__).resolve().parents[2]


# ---- 6. templates and text -----------------------------------------------------------------------------
TEMPLATE_BOMBS = {
    "string-times-huge": "{{ 'ab ' * 10**7 }}",
    "nested-loops": "{% for i in range(999) %}{% for j in range(999) %}{% for k in range(999) %}{% endfor %}"
                    "{% endfor %}{% endfor %}",
    "range-huge": "{% for i in range(10**9) %}x{% endfor %}",
    "doubling-with-tilde": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                           "{% endfor %}{{ ns.s }}",
    "doubling-with-plus": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                          "{% endfor %}{{ ns.s }}",
    "power-tower": "{% set ns = namespace(n=2) %}{% for i in range(64) %}{% set ns.n = ns.n ** 2 %}{% endfor %}"
                   "{{ ns.n }}",
    "center-huge": "{{ name|center(10**9) }}",
    "ljust-huge": "{{ name.ljust(10**9) }}",
    "format-width": "{{ '{:>999999999}'.format(name) }}",
    "percent-width": "{{ '%0999999999d' % 1 }}",
    "lipsum": "{{ lipsum(10**6) }}",
    "batch-fill": "{{ [1]|batch(10**9, 'x')|list }}",
    "macro-fanout": "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "sandbox-escape": "{{ name.__class__.__mro__[1].__subclasses__() }}",
    "rendered-too-long": "{% for i in range(900) %}{{ name }} words {% endfor %}",
}


@pytest.mark.parametrize("case", sorted(TEMPLATE_BOMBS))
def test_template_bombs_through_avatar_video(hostile, case):
    """Refused by the sandbox's bounds; a bomb that ran unbounded would hang until the suite's
    timeout fails it (no wall-time bound here: the flow's own bookkeeping stalls under load)."""
    _expect_rejected(_video(image=f"{hostile.root}/portrait.jpg", voice_script=TEMPLATE_BOMBS[case],
                            template_fields={"name": "Ada"}, seed=1), "voice_script", r"voice_script template")


def test_text_caps_in_the_request_model(hostile):
    _expect_rejected(_video(image=f"{hostile.root}/portrait.jpg", voice_script="word " * 1200), "voice_script",
                     r"too long \(6000 characters\); allowed: at most 5000")
    _expect_rejected(_video(image=f"{hostile.root}/portrait.jpg", voice_script="{{ x }}",
                            template_fields={"x": "y" * 70_000}), "template_fields", r"too large")
    _expect_rejected(_video(image="data:image/jpeg;base64," + "A" * (600 * 1024), voice_script="Hi."),
                     "image", r"too long \(\d+ characters\); allowed: at most 524288")
    _expect_rejected(_video(image=f"{hostile.root}/portrait.jpg", audio="data:audio/wav;base64," + "A" * 200_000),
                     "audio", r"could not be decoded|not a supported audio format")


# ---- 7. the event-triggered deployment's parameters ----------------------------------------------------
def _trigger_parameters(resource: dict, payload: dict) -> dict:
    """What the on-portrait-uploaded trigger hands its run: the template of deployments/prefect.yaml
    rendered by Prefect's own trigger templating."""
    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    doc = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    dep = next(d for d in doc["deployments"] if d["name"] == "on-portrait-uploaded")
    params = json.loads(json.dumps(dep["triggers"][0]["parameters"]))
    RunDeployment._upgrade_v1_templates(params)
    event = ReceivedEvent(id=uuid.uuid4(), occurred=datetime.now(timezone.utc), event="avatarflow.portrait.uploaded",
                          resource=resource, payload=payload)
    rendered = hydrate(params, HydrationContext(raise_on_error=True, render_jinja=True,
                                                jinja_context={"event": event}))
    return {**dep.get("parameters", {}), **rendered}


def _event_cases(w: World) -> list[tuple[str, dict, dict, str, str]]:
    ok = f"s3://{w.extra['bucket']}/{w.extra['prefix']}/uploads/ok.jpg"
    c = w.canary.port
    return [
        ("resource-file-url", {"prefect.resource.id": "file:///etc/passwd"}, {}, "image", LOCAL_REFUSED),
        ("resource-label-wins-and-is-hostile",
         {"prefect.resource.id": ok, "avatarflow.s3_uri": "/proc/self/environ"}, {}, "image", LOCAL_REFUSED),
        ("resource-other-bucket", {"prefect.resource.id": "s3://someone-elses-bucket/x.jpg"}, {}, "image",
         r"only inside the archive bucket"),
        ("resource-loopback-url", {"prefect.resource.id": f"https://127.0.0.1:{c}/x.jpg"}, {}, "image", ADDRESS),
        ("resource-gopher", {"prefect.resource.id": "gopher://127.0.0.1:70/"}, {}, "image", "unsupported scheme"),
        ("payload-audio-shadow", {"prefect.resource.id": ok}, {"request": {"audio": "/etc/shadow"}}, "audio",
         LOCAL_REFUSED),
        ("payload-audio-metadata", {"prefect.resource.id": ok},
         {"request": {"audio": "https://169.254.169.254/latest/meta-data/"}}, "audio", ADDRESS),
        ("payload-audio-redirect-inward", {"prefect.resource.id": ok},
         {"request": {"audio": f"{w.origin.base}/to-canary"}}, "audio", r"never fetched|plain http"),
        ("payload-template-bomb", {"prefect.resource.id": ok},
         {"request": {"voice_script": "{{ 'ab ' * 10**7 }}", "template_fields": {"a": 1}}}, "voice_script",
         r"voice_script template"),
        ("payload-unknown-field", {"prefect.resource.id": ok}, {"request": {"api_key": "x", "callback": "y"}},
         "api_key", r"not a parameter|[Ee]xtra"),
        ("payload-wrong-types", {"prefect.resource.id": ok},
         {"request": {"voice_script": {"nested": ["x"]}}}, "voice_script", r"not a string|string"),
        ("payload-seed-overflow", {"prefect.resource.id": ok}, {"request": {"seed": 10**30}}, "seed", r"range"),
        ("payload-template-fields-not-a-dict", {"prefect.resource.id": ok},
         {"request": {"template_fields": "{{ x }}"}}, "template_fields", r"not an object|dict"),
        ("payload-too-long-script", {"prefect.resource.id": ok},
         {"request": {"voice_script": "a " * 5000}}, "voice_script", r"too long"),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _event_cases(DUMMY)])
def test_event_triggered_parameters(hostile, case):
    _, resource, payload, field_name, rule = next(c for c in _event_cases(hostile) if c[0] == case)
    params = _trigger_parameters(resource, payload)
    assert set(params) == {"request", "concurrency_limit"}
    params["concurrency_limit"] = None  # no global limit in the test harness
    _expect_rejected(lambda: asyncio.run(avatar_video(**params)), field_name, rule)


def test_malformed_event_payloads_never_start_a_run():
    """A payload.request that is not an object fails the trigger's own rendering: no run at all."""
    from prefect.utilities.schema_tools.hydration import InvalidJinja

    for payload in ({"request": "a string"}, {"request": [1, 2]}, {"request": 7}):
        with pytest.raises(InvalidJinja):
            _trigger_parameters({"prefect.resource.id": "s3://b/k.jpg"}, payload)


# ---- 8. the batch flow: hostile calendars and hostile rows ----------------------------------------------
def _batch(calendar: str) -> dict:
    return asyncio.run(avatar_batch(calendar=calendar, today=date(2026, 11, 24), concurrency_limit=None))


def _calendar_cases(w: World) -> list[tuple[str, str, str]]:
    c = w.canary.port
    return [
        ("calendar-etc-passwd", "/etc/passwd", LOCAL_REFUSED),
        ("calendar-proc-environ-url", "file:///proc/self/environ", LOCAL_REFUSED),
        ("calendar-canary-file", str(w.canary_file), LOCAL_REFUSED),
        ("calendar-fifo", f"{w.root}/fifo.csv", UNREADABLE),
        ("calendar-symlink-out", f"{w.root}/link-out.jpg", UNREADABLE),
        ("calendar-loopback", f"http://127.0.0.1:{c}/calendar.csv", r"plain http"),
        ("calendar-loopback-https", f"https://127.0.0.1:{c}/calendar.csv", ADDRESS),
        ("calendar-metadata", "https://169.254.169.254/latest/user-data", ADDRESS),
        ("calendar-redirect-inward", f"{w.origin.base}/to-canary", r"never fetched|plain http"),
        ("calendar-other-bucket", "s3://someone-elses-bucket/calendar.csv", r"only inside the archive bucket"),
        ("calendar-gopher", "gopher://127.0.0.1:70/_x", r"unsupported scheme"),
        ("calendar-endless", f"{w.origin.base}/endless", r"too large"),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _calendar_cases(DUMMY)])
def test_hostile_calendars_through_avatar_batch(hostile, case):
    _, ref, rule = next(c for c in _calendar_cases(hostile) if c[0] == case)
    _expect_rejected(lambda: _batch(ref), "calendar", rule)


def test_hostile_rows_fail_alone_before_any_submit(hostile, s3):
    """A calendar in the archive (the scheduled deployment's shape) whose rows are hostile: every
    row fails with its line and field; nothing is submitted."""
    w = hostile
    c = w.canary.port
    bucket, prefix = w.extra["bucket"], w.extra["prefix"]
    rows = [
        ({"image": "/etc/shadow"}, "image", LOCAL_REFUSED),
        ({"image": "file:///proc/self/environ"}, "image", LOCAL_REFUSED),
        ({"image": f"{w.root}/link-out.jpg"}, "image", UNREADABLE),
        ({"image": f"{w.root}/fifo.jpg"}, "image", UNREADABLE),
        ({"image": f"{w.root}/../canary.jpg"}, "image", LOCAL_REFUSED),
        ({"image": f"http://127.0.0.1:{c}/p.jpg"}, "image", r"plain http"),
        ({"image": f"https://127.0.0.1:{c}/p.jpg"}, "image", ADDRESS),  # found when fetched, in its child run
        ({"image": f"{w.origin.base}/to-metadata"}, "image", r"never fetched|plain http"),  # likewise
        ({"image": f"s3://{bucket}/elsewhere/canary.jpg"}, "image", r"only inside the archive bucket"),
        ({"image": "gopher://127.0.0.1:70/"}, "image", r"unsupported scheme"),
        ({"image": f"{w.root}/portrait.jpg", "audio": f"{w.root}/fifo.wav"}, "audio", UNREADABLE),
        ({"image": f"{w.root}/portrait.jpg", "voice_script": "{{ 'ab ' * 10**7 }}", "name": "x"}, "voice_script",
         r"voice_script template"),
        ({"image": f"{w.root}/portrait.jpg", "voice_script": "{% for i in range(10**6) %}{{ name }} {% endfor %}",
          "name": "x"}, "voice_script", r"voice_script template"),
    ]
    lines = [json.dumps({**_speech(r, "Hello {{ name }}." if "name" in r else "Hello."),
                         "publish_date": "2026-11-24", "seed": i}) for i, (r, _, _) in enumerate(rows)]
    key = f"{prefix}/calendars/hostile-{uuid.uuid4().hex[:8]}.jsonl"
    s3.put_object(Bucket=bucket, Key=key, Body="\n".join(lines).encode())
    out = _in_thread(lambda: _batch(f"s3://{bucket}/{key}"))
    import re

    by_line = {e["line"]: e for e in out["entries"]}
    assert out["failed"] == len(rows) and out["completed"] == 0
    fetched = {7, 8}  # refused by the network guard when the child run fetches them
    for n, (_, field_name, rule) in enumerate(rows, start=1):
        error = by_line[n]["error"]
        assert by_line[n]["status"] == "failed", (n, error)
        assert bool(by_line[n]["run_name"]) == (n in fetched), (n, by_line[n])
        assert (f"line {n}" in error or n in fetched) and field_name in error and re.search(rule, error), (n, error)
        for bad in FORBIDDEN_TEXT:
            assert bad not in error, (n, error)


# ---- 9. the key goes to the API and history hosts only ----------------------------------------------------
def test_the_key_never_follows_a_redirect_nor_goes_to_another_host(world):
    """Real loopback servers that record headers: the API answers its calls with redirects to a
    second server; the client refuses them, the key reaches only the configured hosts."""
    target = Recorder()
    history = Recorder({
        "/inference-request/request-history/r1": _status(200, json.dumps({
            "request_id": "r1", "model_name": "p-video-avatar", "state": "COMPLETED"}).encode()),
    })
    api = Recorder({
        "/v2/requests/r1/status": redirect_to(f"{target.base}/steal-status", 302),
        "/v2/requests/r2/status": redirect_to(f"http://localhost:{target.port}/steal", 301),
        "/v2/requests/r3/status": redirect_to("/v2/requests/r1/status", 307),  # same origin: still not followed
        "/v2/p-video-avatar": redirect_to(f"{target.base}/steal-submit", 307),
    })
    key = "sk-" + uuid.uuid4().hex
    errors: list[BaseException] = []

    async def go():
        async with SegmindClient(key, api.base, history.base, max_retries=0) as client:
            for rid in ("r1", "r2", "r3"):
                try:
                    await client.status(rid)
                except APIError as e:
                    errors.append(e)
            try:
                await client.submit({"image": "https://example.com/p.jpg", "voice_script": "Hi.", "seed": 1})
            except APIError as e:
                errors.append(e)
            await client.history("r1")  # the history host gets the key
            # an output download is a plain GET: no key, to any host
            async with client.stream_output(f"{target.base}/output.mp4") as r:
                await r.aread()

    try:
        asyncio.run(go())
    finally:
        target.close()
        history.close()
        api.close()
    assert len(errors) == 4
    for e in errors:
        assert "redirect" in str(e) and key not in str(e)
    assert f"127.0.0.1:{target.port}" in str(errors[0]) and "HTTP 302" in str(errors[0])
    assert f"localhost:{target.port}" in str(errors[1])
    assert [h["path"] for h in target.hits] == ["/output.mp4"], "no redirect was followed"
    assert all("x-api-key" not in h["headers"] for h in target.hits)
    assert len(api.hits) == 4 and all(h["headers"].get("x-api-key") == key for h in api.hits)
    assert len(history.hits) == 1 and history.hits[0]["headers"].get("x-api-key") == key
    assert world.canary.hits == []


def test_the_key_goes_to_no_other_origin_even_on_the_same_host():
    """The key is bound to the API's and the history's origins (scheme, host and port)."""
    other = Recorder({"/x": _status(200, b"{}")})
    api = Recorder({"/x": _status(200, b"{}")})
    key = "sk-" + uuid.uuid4().hex

    async def go():
        async with SegmindClient(key, api.base, max_retries=0) as client:
            await client._get(f"{api.base}/x")
            await client._get(f"{other.base}/x")
            await client._get(f"http://localhost:{api.port}/x")  # another origin name for the same server

    try:
        asyncio.run(go())
    finally:
        other.close()
        api.close()
    assert api.hits[0]["headers"].get("x-api-key") == key
    assert "x-api-key" not in other.hits[0]["headers"]
    assert "x-api-key" not in api.hits[1]["headers"]
    with pytest.raises(ValueError, match="not sent over plain http"):
        SegmindClient(key, "http://api.example.com")
    with pytest.raises(ValueError, match="not sent over plain http"):
        SegmindClient(key, "https://api.example.com", "http://history.example.com")
