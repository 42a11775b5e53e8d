"""A hostile-input corpus, run through the flows' real entry points against the real local API and
the real SeaweedFS: `avatar_video(request=VideoRequest(...))`, `avatar_batch(calendar=...)`, and
the parameters the event-triggered deployment `on-portrait-uploaded` hands its run (rendered from
deployments/prefect.yaml by Prefect's own trigger templating).

For every case: rejected before any POST (the local API's submit counter does not move), an
error that names the field and the rule broken (never OS error text, never what a server
answered), and two canaries that must never be read: a file outside the allowed root (its
access time is set to 1970, so any read moves it on this relatime file system) and an HTTP
server on loopback that records every hit.

The operator's settings for these runs: local paths only under one root (`root/`), one test
server allowed on loopback (AVATARFLOW_SOURCES_ALLOW_HOSTS), a 2 s total deadline per fetch.
Last: the API key never reaches a redirect target nor any host but the API and history hosts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from avatarflow.flows.avatar_batch import avatar_batch
from avatarflow.flows.avatar_video import avatar_video
from pydantic import ValidationError

from avatarflow.client import SegmindClient
from avatarflow.errors import APIError
from avatarflow.spec import VideoRequest
from tests.http_recorder import Recorder, redirect_to, trickle

ROOT = Path(__file__).resolve().parents[2]
CANARY_TEXT = b"CANARY-FILE-CONTENT"
FORBIDDEN_TEXT = ("Errno", "No such file", "Permission denied", "Traceback", "canary-secret", "CANARY-FILE",
                  "internal-secret", "root:x:0:0")
CASE_TIMEOUT_S = 90


# ---- the world: a root with traps, a canary file and a canary server, an allowed test server ----
def _status(code: int, text: bytes):
    def route(h):
        h.send_response(code)
        h.send_header("content-length", str(len(text)))
        h.end_headers()
        h.wfile.write(text)
    return route


def _claims_huge(h):
    h.send_response(200)
    h.send_header("content-type", "image/jpeg")
    h.send_header("content-length", str(10 * 1024**3))
    h.end_headers()
    try:
        h.wfile.write(b"\xff\xd8\xff" + b"\0" * 65536)
    except OSError:
        pass


def _endless(h):
    """No content-length, and more bytes than any cap (stops once the client hangs up)."""
    h.send_response(200)
    h.send_header("content-type", "audio/wav")
    h.send_header("connection", "close")
    h.end_headers()
    chunk = b"\0" * (1 << 20)
    try:
        for _ in range(200):
            h.wfile.write(chunk)
    except OSError:
        pass


_trickle = trickle(100000, 600, 0.05, b"\xff")


@dataclass
class World:
    root: Path
    canary_file: Path
    canary: Recorder
    origin: Recorder
    portrait: bytes
    extra: dict = field(default_factory=dict)


# for the test ids only: the real cases are built from the running world
DUMMY = World(Path("/r"), Path("/c"), SimpleNamespace(port=1, base="http://x"),  # type: ignore[arg-type]
              SimpleNamespace(port=2, base="http://y"), b"", {"bucket": "b", "prefix": "p"})


@pytest.fixture(scope="module")
def world(tmp_path_factory, portrait_bytes):
    base = tmp_path_factory.mktemp("hostile")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    canary_file = base / "canary.jpg"
    canary_file.write_bytes(CANARY_TEXT)
    (root / "portrait.jpg").write_bytes(portrait_bytes)
    os.symlink(canary_file, root / "link-out.jpg")
    os.symlink(root / "portrait.jpg", root / "link-in.jpg")
    os.symlink(base, root / "dirlink")
    os.link(canary_file, root / "hardlink.jpg")
    os.mkfifo(root / "fifo.jpg")
    os.mkfifo(root / "fifo.wav")
    os.mkfifo(root / "fifo.csv")
    canary = Recorder()
    c = canary.port
    origin = Recorder({
        "/to-canary": redirect_to(f"http://127.0.0.1:{c}/secret"),
        "/to-canary-https": redirect_to(f"https://127.0.0.1:{c}/secret"),
        "/to-localhost": redirect_to(f"https://localhost:{c}/secret", 301),
        "/to-metadata": redirect_to("http://169.254.169.254/latest/meta-data/iam/security-credentials/", 307),
        "/to-metadata-v6": redirect_to("https://[fd00:ec2::254]/latest/meta-data/", 308),
        "/to-10": redirect_to("https://10.0.0.1/admin"),
        "/to-172": redirect_to("https://172.16.5.4/"),
        "/to-192": redirect_to("https://192.168.1.1/"),
        "/to-v6-loopback": redirect_to(f"https://[::1]:{c}/"),
        "/to-decimal": redirect_to(f"https://2130706433:{c}/"),
        "/to-file": redirect_to("file:///etc/passwd"),
        "/to-gopher": redirect_to(f"gopher://127.0.0.1:{c}/_GET"),
        "/chain": redirect_to("/chain2"),
        "/chain2": redirect_to("/chain3"),
        "/chain3": redirect_to(f"https://127.0.0.1:{c}/deep"),
        "/loop": redirect_to("/loop"),
        "/huge": _claims_huge,
        "/endless": _endless,
        "/trickle": _trickle,
        "/500": _status(500, b"internal-secret stack trace"),
        "/401": _status(401, b"internal-secret"),
        "/html": _status(200, b"<!doctype html><html>internal-secret</html>"),
    })
    os.utime(canary_file, (0, time.time()))
    yield World(root, canary_file, canary, origin, portrait_bytes)
    canary.close()
    origin.close()


@pytest.fixture
def hostile(api, pipeline_env, monkeypatch, world, s3, s3_bucket):
    """The operator's settings for the corpus, and the canaries checked after every case."""
    monkeypatch.setenv("AVATARFLOW_SOURCES_LOCAL_ROOTS", str(world.root))
    monkeypatch.setenv("AVATARFLOW_SOURCES_ALLOW_HOSTS", f"127.0.0.1:{world.origin.port}")
    monkeypatch.setenv("AVATARFLOW_SOURCES_FETCH_TIMEOUT_S", "2")
    monkeypatch.delenv("AVATARFLOW_SOURCES_BLOCK", raising=False)
    monkeypatch.delenv("AVATARFLOW_SOURCES_S3_ALLOW", raising=False)
    world.extra = {"prefix": pipeline_env, "bucket": s3_bucket, "api": api}
    # the archive holds a real portrait (for event cases whose other fields are hostile), and a
    # canary object outside the archive's prefix
    s3.put_object(Bucket=s3_bucket, Key=f"{pipeline_env}/uploads/ok.jpg", Body=world.portrait)
    s3.put_object(Bucket=s3_bucket, Key="elsewhere/canary.jpg", Body=CANARY_TEXT)
    submits = _submits(api)
    hits = len(world.canary.hits)
    atime = world.canary_file.stat().st_atime
    yield world
    assert _submits(api) == submits, "a hostile input reached the API's submit"
    assert world.canary.hits[hits:] == [], "the canary server was reached"
    assert world.canary_file.stat().st_atime == atime == 0, "the canary file was read"


def _submits(api) -> int:
    return int(api.stats()["requests"].get("submit", 0))


# ---- running a case ----------------------------------------------------------------------------
def _in_thread(fn, timeout: float = CASE_TIMEOUT_S):
    """fn() in a thread of its own, failing the test (not hanging it) past `timeout`."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(fn)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"the case did not finish in {timeout:.0f} s (a hang)")


def _expect_rejected(fn, field_name: str, rule: str) -> str:
    """Run fn; it must raise an error naming `field_name` and matching `rule` (a regex)."""
    import re

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - the error is the subject
            return e
        return None

    error = _in_thread(run)
    assert error is not None, "the hostile input was accepted"
    text = str(error)
    assert field_name in text or getattr(error, "field", None) == field_name, (field_name, text)
    assert re.search(rule, text), (rule, text)
    for bad in FORBIDDEN_TEXT:
        assert bad not in text, (bad, text)
    return text


def _speech(request: dict, script: str) -> dict:
    """`request` with a voice_script unless it brings its own speech (exactly one of them)."""
    return request if {"audio", "voice_script", "brief"} & set(request) else {**request, "voice_script": script}


def _video(**request):
    def run():
        try:
            req = VideoRequest(**request)
        except ValidationError as e:  # the request model refuses it: the unit is enough
            raise e
        return asyncio.run(avatar_video(request=req))
    return run


# ---- 1. local paths, files and devices -------------------------------------------------------------
LOCAL_REFUSED = r"local paths are allowed only under the allowed local roots"
UNREADABLE = r"not a readable regular file under the allowed local roots"


def _local_cases(world: World) -> list[tuple[str, dict, str, str]]:
    r, canary = world.root, world.canary_file
    return [
        ("etc-shadow", {"image": "/etc/shadow"}, "image", LOCAL_REFUSED),
        ("etc-passwd", {"image": "/etc/passwd"}, "image", LOCAL_REFUSED),
        ("proc-environ", {"image": "/proc/self/environ"}, "image", LOCAL_REFUSED),
        ("proc-cmdline", {"image": "/proc/self/cmdline"}, "image", LOCAL_REFUSED),
        ("proc-root-canary", {"image": f"/proc/self/root{canary}"}, "image", LOCAL_REFUSED),
        ("file-url-passwd", {"image": "file:///etc/passwd"}, "image", LOCAL_REFUSED),
        ("file-url-localhost", {"image": "file://localhost/etc/passwd"}, "image", LOCAL_REFUSED),
        ("file-url-environ", {"image": "file:///proc/self/environ"}, "image", LOCAL_REFUSED),
        ("file-url-remote-host", {"image": "file://evil.example.com/etc/passwd"}, "image", "file:///absolute/path"),
        ("file-url-canary", {"image": canary.as_uri()}, "image", LOCAL_REFUSED),
        ("dotdot-out-of-root", {"image": f"{r}/../canary.jpg"}, "image", LOCAL_REFUSED),
        ("dotdot-via-sub", {"image": f"{r}/sub/../../canary.jpg"}, "image", LOCAL_REFUSED),
        ("relative-dotdot", {"image": "../../../../../../etc/passwd"}, "image", LOCAL_REFUSED),
        ("symlink-out", {"image": f"{r}/link-out.jpg"}, "image", UNREADABLE),
        ("symlink-dir-out", {"image": f"{r}/dirlink/canary.jpg"}, "image", UNREADABLE),
        ("symlink-in-root", {"image": f"{r}/link-in.jpg"}, "image", UNREADABLE),
        ("hardlink-to-canary", {"image": f"{r}/hardlink.jpg"}, "image", UNREADABLE),
        ("fifo", {"image": f"{r}/fifo.jpg"}, "image", UNREADABLE),
        ("directory", {"image": f"{r}/sub"}, "image", UNREADABLE),
        ("the-root-itself", {"image": str(r)}, "image", UNREADABLE),
        ("missing-file", {"image": f"{r}/missing.jpg"}, "image", UNREADABLE),
        ("dev-zero", {"image": "/dev/zero"}, "image", LOCAL_REFUSED),
        ("dev-random-file-url", {"image": "file:///dev/random"}, "image", LOCAL_REFUSED),
        ("canary-absolute", {"image": str(canary)}, "image", LOCAL_REFUSED),
        ("home-ssh-key", {"image": "~/.ssh/id_rsa"}, "image", LOCAL_REFUSED),
        ("audio-fifo", {"image": f"{r}/portrait.jpg", "audio": f"{r}/fifo.wav"}, "audio", UNREADABLE),
        ("audio-etc-shadow", {"image": f"{r}/portrait.jpg", "audio": "/etc/shadow"}, "audio", LOCAL_REFUSED),
        ("audio-file-environ", {"image": f"{r}/portrait.jpg", "audio": "file:///proc/self/environ"}, "audio",
         LOCAL_REFUSED),
        ("audio-symlink-out", {"image": f"{r}/portrait.jpg", "audio": f"{r}/link-out.jpg"}, "audio", UNREADABLE),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _local_cases(DUMMY)])
def test_local_paths_through_avatar_video(hostile, case):
    """A fifo, /dev/zero or /dev/random is refused, never read: reading one would hang the run until
    the suite's timeout fails it."""
    _, request, field_name, rule = next(c for c in _local_cases(hostile) if c[0] == case)
    _expect_rejected(_video(**_speech(request, "Hello."), seed=1), field_name, rule)


# ---- 2. schemes the request model refuses -----------------------------------------------------------
@pytest.mark.parametrize("ref", ["gopher://127.0.0.1:70/_GET", "ftp://example.com/portrait.jpg",
                                 "javascript:alert(document.cookie)", "dict://127.0.0.1:11211/stats",
                                 "ldap://127.0.0.1/", "jar:http://example.com/x.jar!/p.jpg", "smb://host/share/p.jpg"])
def test_other_schemes_are_refused_by_the_request_model(hostile, ref):
    _expect_rejected(_video(image=ref, voice_script="Hi.", seed=1), "image", "unsupported scheme")


# ---- 3. the network guard: loopback, private and metadata addresses, in every spelling ------------------
ADDRESS = r"resolves to (a loopback|a private|a link-local|an unspecified|the cloud metadata|a shared|a multicast)"


def _net_cases(c: int) -> list[tuple[str, str, str]]:
    return [
        ("http-loopback", f"http://127.0.0.1:{c}/secret", r"plain http:// is not allowed"),
        ("https-loopback", f"https://127.0.0.1:{c}/secret", ADDRESS),
        ("http-localhost", f"http://localhost:{c}/", r"plain http:// is not allowed"),
        ("https-localhost", f"https://localhost:{c}/", ADDRESS),
        ("zero-address", f"https://0.0.0.0:{c}/", ADDRESS),
        ("ipv6-loopback", f"https://[::1]:{c}/", ADDRESS),
        ("ipv4-mapped-ipv6", f"https://[::ffff:127.0.0.1]:{c}/", ADDRESS),
        ("ten-slash-8", "https://10.0.0.1/p.jpg", ADDRESS),
        ("172-16-slash-12", "https://172.16.0.1/p.jpg", ADDRESS),
        ("172-31", "https://172.31.255.254/p.jpg", ADDRESS),
        ("192-168-slash-16", "https://192.168.0.1/p.jpg", ADDRESS),
        ("metadata-v4", "http://169.254.169.254/latest/meta-data/", r"plain http:// is not allowed"),
        ("metadata-v4-https", "https://169.254.169.254/latest/meta-data/", ADDRESS),
        ("metadata-v6", "https://[fd00:ec2::254]/latest/meta-data/", ADDRESS),
        ("cgnat", "https://100.64.0.1/p.jpg", ADDRESS),
        ("multicast", "https://224.0.0.1/p.jpg", ADDRESS),
        ("decimal-ip", f"https://2130706433:{c}/", ADDRESS),
        ("hex-ip", f"https://0x7f000001:{c}/", ADDRESS),
        ("short-ip", f"https://127.1:{c}/", ADDRESS),
        ("octal-ip", f"https://0177.0.0.1:{c}/", r"not a valid URL|" + ADDRESS),
        ("name-resolving-to-loopback", f"https://vm:{c}/", ADDRESS),
        ("localhost-trailing-dot", f"https://localhost.:{c}/", ADDRESS),
        ("credentials-in-url", f"https://user:pw@127.0.0.1:{c}/", r"credentials in the URL"),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _net_cases(1)])
def test_network_guard_through_avatar_video(hostile, case):
    _, url, rule = next(x for x in _net_cases(hostile.canary.port) if x[0] == case)
    text = _expect_rejected(_video(image=url, voice_script="Hi.", seed=1), "image", rule)
    assert "pw@" not in text


# ---- 4. an allowed test server that redirects inward, or sends too much, too slowly -------------------
def _origin_cases() -> list[tuple[str, str, str, str]]:
    guard = r"never fetched|plain http:// is not allowed"
    return [
        ("redirect-to-canary", "image", "/to-canary", guard),
        ("redirect-to-canary-https", "image", "/to-canary-https", guard),
        ("redirect-to-localhost", "image", "/to-localhost", guard),
        ("redirect-to-metadata", "image", "/to-metadata", guard),
        ("redirect-to-metadata-v6", "image", "/to-metadata-v6", guard),
        ("redirect-to-10", "image", "/to-10", guard),
        ("redirect-to-172", "image", "/to-172", guard),
        ("redirect-to-192", "image", "/to-192", guard),
        ("redirect-to-ipv6-loopback", "image", "/to-v6-loopback", guard),
        ("redirect-to-decimal-ip", "image", "/to-decimal", guard),
        ("redirect-to-file", "image", "/to-file", r"unsupported scheme 'file:'"),
        ("redirect-to-gopher", "image", "/to-gopher", r"unsupported scheme 'gopher:'"),
        ("redirect-chain-inward", "image", "/chain", guard),
        ("redirect-loop", "image", "/loop", r"too many redirects"),
        ("claims-10-gb", "image", "/huge", r"too large"),
        ("endless-body-audio", "audio", "/endless", r"too large"),
        ("slow-body", "image", "/trickle", r"timed out"),
        ("server-error-body-hidden", "image", "/500", r"could not be fetched \(HTTP 500\)"),
        ("unauthorized-body-hidden", "image", "/401", r"could not be fetched \(HTTP 401\)"),
        ("html-not-an-image", "image", "/html", r"not a supported image format"),
        ("audio-redirect-to-metadata", "audio", "/to-metadata", guard),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _origin_cases()])
def test_allowed_server_cannot_lead_inward_or_overwhelm(hostile, case):
    _, field_name, path, rule = next(c for c in _origin_cases() if c[0] == case)
    url = f"{hostile.origin.base}{path}"
    request = {"image": url} if field_name == "image" else {"image": f"{hostile.root}/portrait.jpg", "audio": url}
    t = time.monotonic()
    _expect_rejected(_video(**_speech(request, "Hi."), seed=1), field_name, rule)
    if case == "slow-body":  # the total deadline (2 s), once per try (the task retries a timeout twice)
        assert time.monotonic() - t < 30


def test_the_local_apis_own_routes_leak_nothing(hostile):
    """The local API is reachable on loopback (the one exception), but its answers never show."""
    api = hostile.extra["api"]
    for path in ("/_local/stats", "/_local/faults", "/v2/requests/x/status"):
        text = _expect_rejected(_video(image=f"{api.base_url}{path}", voice_script="Hi.", seed=1), "image",
                                r"could not be fetched|not found|not a supported image format")
        assert api.api_key not in text and "{" not in text and '"submit"' not in text


# ---- 5. s3:// outside the archive ---------------------------------------------------------------------
def _s3_cases(bucket: str, prefix: str) -> list[tuple[str, str, str]]:
    place = r"only inside the archive bucket"
    return [
        ("other-bucket", "s3://someone-elses-bucket/portrait.jpg", place),
        ("same-bucket-other-prefix", f"s3://{bucket}/elsewhere/canary.jpg", place),
        ("dotdot-out-of-prefix", f"s3://{bucket}/{prefix}/../elsewhere/canary.jpg", place),
        ("prefix-lookalike", f"s3://{bucket}/{prefix}-evil/x.jpg", place),
        ("double-slash", f"s3://{bucket}/{prefix}//x.jpg", place),
        ("no-key", f"s3://{bucket}", r"not a full S3 URI"),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _s3_cases("b", "p")])
def test_s3_outside_the_archive_through_avatar_video(hostile, case):
    _, ref, rule = next(c for c in _s3_cases(hostile.extra["bucket"], hostile.extra["prefix"]) if c[0] == case)
    _expect_rejected(_video(image=ref, voice_script="Hi.", seed=1), "image", rule)


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
    t = time.monotonic()
    _expect_rejected(_video(image=f"{hostile.root}/portrait.jpg", voice_script=TEMPLATE_BOMBS[case],
                            template_fields={"name": "Ada"}, seed=1), "voice_script", r"voice_script template")
    assert time.monotonic() - t < 30


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
