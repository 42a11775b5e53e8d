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

The world, its fixtures and the running of a case, shared by
tests/integration/test_hostile_sources.py and test_hostile_requests.py (a pytest plugin: tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from avatarflow.flows.avatar_video import avatar_video
from pydantic import ValidationError

from avatarflow.spec import VideoRequest
from tests.http_recorder import Recorder, redirect_to, trickle

CANARY_TEXT = b"CANARY-FILE-CONTENT"
FORBIDDEN_TEXT = ("Errno", "No such file", "Permission denied", "Traceback", "canary-secret", "CANARY-FILE",
                  "internal-secret", "root:x:0:0")
CASE_TIMEOUT_S = 90
LOCAL_REFUSED = r"local paths are allowed only under the allowed local roots"
UNREADABLE = r"not a readable regular file under the allowed local roots"
ADDRESS = r"resolves to (a loopback|a private|a link-local|an unspecified|the cloud metadata|a shared|a multicast)"


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
