"""Hostile sources through avatar_video (the corpus and its canaries: tests/hostile_helpers.py):
local paths, files and devices; refused schemes; loopback, private and metadata addresses; an
allowed server that redirects inward or overwhelms; s3:// outside the archive."""

from __future__ import annotations


import pytest

from tests.hostile_helpers import (
    ADDRESS,
    DUMMY,
    LOCAL_REFUSED,
    UNREADABLE,
    World,
    _expect_rejected,
    _speech,
    _video,
)


# ---- 1. local paths, files and devices -------------------------------------------------------------
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
    # the slow body's total deadline is timed without Prefect in test_sources (a flow's own
    # bookkeeping stalls under load: no wall-time bound here)
    _expect_rejected(_video(**_speech(request, "Hi."), seed=1), field_name, rule)


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


