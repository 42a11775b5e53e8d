"""The source policy and the network guard, unit by unit: real files, FIFOs, symlinks and devices;
real loopback HTTP servers that record every hit; the real SeaweedFS for s3://."""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

import pytest

from avatarflow.media import netguard
from avatarflow.media.errors import MediaError
from avatarflow.media.fetch import check_reference, read_source
from avatarflow.media.local_paths import open_under_root
from avatarflow.media.policy import (
    SourcePolicy,
    cli_local_roots,
    policy_from_env,
    s3_allowed,
    widened_roots,
)
from tests.http_recorder import Recorder, redirect_to, trickle


# ---- servers ---------------------------------------------------------------------------------
def body(data: bytes, *, length: bool = True):
    def route(h):
        h.send_response(200)
        if length:
            h.send_header("content-length", str(len(data)))
        else:
            h.send_header("transfer-encoding", "chunked")
        h.end_headers()
        if length:
            h.wfile.write(data)
        else:
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
    return route


slow = trickle(1000000, 200, 0.1)


@pytest.fixture
def canary():
    s = Recorder()
    yield s
    s.close()


@pytest.fixture
def origin():
    s = Recorder()
    yield s
    s.close()


def allowing(*servers: Recorder, **kw) -> SourcePolicy:
    return SourcePolicy(allow_hosts=tuple(f"127.0.0.1:{s.port}" for s in servers), **kw)


# ---- local paths ---------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "ok.txt").write_bytes(b"hello")
    (root / "sub" / "deep.txt").write_bytes(b"deep")
    outside = tmp_path / "canary.txt"
    outside.write_bytes(b"CANARY")
    os.symlink(outside, root / "link-out")
    os.symlink(root / "ok.txt", root / "link-in")
    os.symlink(tmp_path, root / "dirlink")
    os.mkfifo(root / "fifo")
    return root, outside


def test_local_paths_need_a_root_and_read_regular_files_under_it(tree):
    root, outside = tree
    policy = SourcePolicy(local_roots=(str(root),))
    assert read_source(str(root / "ok.txt"), field="image", policy=policy, max_bytes=100) == b"hello"
    assert read_source((root / "sub" / "deep.txt").as_uri(), field="image", policy=policy, max_bytes=100) == b"deep"
    with pytest.raises(MediaError, match="too large"):
        read_source(str(root / "ok.txt"), field="image", policy=policy, max_bytes=3)
    # the default policy: no local path at all, and the message does not tell whether it exists
    for ref in (str(root / "ok.txt"), str(root / "nope.txt"), "/etc/shadow"):
        with pytest.raises(MediaError) as info:
            read_source(ref, field="image", max_bytes=100)
        assert "local paths are not allowed" in str(info.value) and info.value.field == "image"


@pytest.mark.parametrize("name", ["link-out", "link-in", "dirlink/canary.txt", "fifo", "sub", "nope.txt",
                                  "sub/../../canary.txt", "../canary.txt"])
def test_under_a_root_only_regular_files_without_symlinks(tree, name):
    root, outside = tree
    policy = SourcePolicy(local_roots=(str(root),))
    t = time.monotonic()
    with pytest.raises(MediaError) as info:
        read_source(f"{root}/{name}", field="audio", policy=policy, max_bytes=100)
    assert time.monotonic() - t < 2, "a FIFO must not block"
    msg = str(info.value)
    assert msg.startswith("audio=") and "CANARY" not in msg
    assert "No such file" not in msg and "Errno" not in msg and "Permission" not in msg
    # a missing file and a FIFO read the same: existence is not told
    assert ("not a readable regular file" in msg) or ("only under the allowed local roots" in msg)


def test_device_files_and_proc_are_refused_even_under_a_root():
    policy = SourcePolicy(local_roots=("/dev", "/proc/self"))
    for ref in ("/dev/zero", "/dev/null", "/dev/urandom", "file:///dev/zero", "/proc/self/environ",
                "/proc/self/cmdline"):
        with pytest.raises(MediaError, match="not a readable regular file|is empty") as info:
            read_source(ref, field="image", policy=policy, max_bytes=100)
        assert "PATH" not in str(info.value)


def test_open_under_root_walks_without_following_symlinks(tree):
    root, _ = tree
    fd = open_under_root(str(root), ["sub", "deep.txt"])
    assert os.read(fd, 10) == b"deep"
    os.close(fd)
    for parts in (["dirlink", "canary.txt"], ["link-in"], ["..", "canary.txt"], [], ["fifo"]):
        with pytest.raises(OSError):
            open_under_root(str(root), parts)


def test_cli_roots_widen_only_inside_the_block(tree):
    root, _ = tree
    assert widened_roots() == ()
    with cli_local_roots(root):
        assert str(root) in policy_from_env().local_roots
    assert widened_roots() == () and policy_from_env().local_roots == ()


# ---- schemes, data:, s3:// -------------------------------------------------------------------------
@pytest.mark.parametrize("ref", ["gopher://example.com/x", "ftp://example.com/x.jpg", "javascript:alert(1)",
                                 "dict://127.0.0.1:11211/", "ldap://x/", "jar:file:///x!/y", "smb://host/share"])
def test_other_schemes_are_refused(ref):
    with pytest.raises(MediaError, match="unsupported scheme"):
        read_source(ref, field="image", max_bytes=100)


def test_data_uris_within_the_cap_and_only_when_allowed():
    assert read_source("data:text/plain,a%20b", field="audio", max_bytes=10) == b"a b"
    assert read_source("data:image/png;base64,aGVsbG8=", field="image", max_bytes=10) == b"hello"
    with pytest.raises(MediaError, match="too large"):
        read_source("data:image/png;base64," + "A" * 4000, field="image", max_bytes=100)
    with pytest.raises(MediaError, match="invalid base64"):
        read_source("data:image/png;base64,@@@", field="image", max_bytes=100)
    with pytest.raises(MediaError, match="data: URIs are not allowed"):
        read_source("data:text/plain,x", field="image", policy=SourcePolicy(allow_data=False), max_bytes=100)


def test_s3_places():
    p = SourcePolicy(archive=("arch", "team/a"), s3_allow=("media", "shared/portraits"))
    ok = [("arch", "team/a/x.jpg"), ("media", "any/x.jpg"), ("shared", "portraits/p.png")]
    bad = [("arch", "team/b/x.jpg"), ("arch", "team/a"), ("arch", "team/a/../b/x"), ("arch", "team/a//x"),
           ("other", "team/a/x.jpg"), ("shared", "portraits-evil/x"), ("shared", "x.jpg"), ("arch", "team/a/./x"),
           ("arch", "team/a/x?versionId=1")]
    assert all(s3_allowed(b, k, p) for b, k in ok)
    assert not any(s3_allowed(b, k, p) for b, k in bad)
    assert s3_allowed("arch", "anything/x", SourcePolicy(archive=("arch", "")))


def test_s3_reads_only_the_archive_prefix(s3, s3_bucket, s3_prefix):
    s3.put_object(Bucket=s3_bucket, Key=f"{s3_prefix}/in.bin", Body=b"inside")
    s3.put_object(Bucket=s3_bucket, Key="elsewhere/canary.bin", Body=b"CANARY")
    policy = SourcePolicy(archive=(s3_bucket, s3_prefix))
    assert read_source(f"s3://{s3_bucket}/{s3_prefix}/in.bin", field="image", policy=policy, s3_client=s3,
                       max_bytes=100) == b"inside"
    for ref in (f"s3://{s3_bucket}/elsewhere/canary.bin", f"s3://{s3_bucket}/{s3_prefix}/../elsewhere/canary.bin",
                "s3://some-other-bucket/x.jpg"):
        with pytest.raises(MediaError, match="only inside the archive bucket") as info:
            read_source(ref, field="image", policy=policy, s3_client=s3, max_bytes=100)
        assert "CANARY" not in str(info.value)
    with pytest.raises(MediaError, match="no such object, or not readable"):
        read_source(f"s3://{s3_bucket}/{s3_prefix}/missing.bin", field="image", policy=policy, s3_client=s3,
                    max_bytes=100)


# ---- the network guard -----------------------------------------------------------------------------
@pytest.mark.parametrize("ip,why", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"), ("0.0.0.0", "unspecified"),
    ("::", "unspecified"), ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"),
    ("192.168.1.1", "private"), ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("100.64.0.1", "CGNAT"), ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"), ("fc00::1", "private"), ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "metadata"), ("64:ff9b::a00:1", "private"), ("2002:7f00:1::", "loopback"),
    ("240.0.0.1", ""), ("0.1.2.3", ""), ("198.18.0.1", ""),
])
def test_refused_addresses(ip, why):
    reason = netguard.address_refused(ipaddress.ip_address(ip))
    assert reason and why.lower() in reason.lower()


@pytest.mark.parametrize("ip", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "8.8.8.8"])
def test_public_addresses_pass(ip):
    assert netguard.address_refused(ipaddress.ip_address(ip)) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST.", "2130706433", "0x7f000001", "0x7f.1",
                                  "127.1", "0", "0.0.0.0", "[::1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]",
                                  "vm", "runsc"])
def test_names_and_spellings_of_loopback_never_reach_the_canary(canary, host):
    for scheme in ("http", "https"):
        with pytest.raises(MediaError) as info:
            read_source(f"{scheme}://{host}:{canary.port}/secret", field="image",
                        policy=SourcePolicy(allow_http=True), max_bytes=1000)
        assert "canary-secret-body" not in str(info.value)
    assert canary.hits == []


def test_allowed_host_is_fetched_and_redirects_into_private_space_are_refused(origin, canary):
    origin.routes.update({
        "/ok": body(b"x" * 500),
        "/chunked": body(b"y" * 5000, length=False),
        "/to-canary": redirect_to(f"http://127.0.0.1:{canary.port}/secret"),
        "/to-localhost": redirect_to(f"http://localhost:{canary.port}/secret", 301),
        "/to-metadata": redirect_to("http://169.254.169.254/latest/meta-data/", 307),
        "/to-private": redirect_to("http://10.0.0.1/x", 308),
        "/to-file": redirect_to("file:///etc/passwd"),
        "/to-gopher": redirect_to("gopher://127.0.0.1:70/"),
        "/relative": redirect_to("/ok"),
        "/loop": redirect_to("/loop"),
        "/missing": lambda h: (h.send_response(404), h.send_header("content-length", "3"), h.end_headers(),
                               h.wfile.write(b"sec")),
        "/boom": lambda h: (h.send_response(503), h.send_header("content-length", "6"), h.end_headers(),
                            h.wfile.write(b"secret")),
    })
    policy = allowing(origin)
    assert read_source(f"{origin.base}/ok", field="image", policy=policy, max_bytes=1000) == b"x" * 500
    assert read_source(f"{origin.base}/relative", field="image", policy=policy, max_bytes=1000) == b"x" * 500
    assert read_source(f"{origin.base}/chunked", field="image", policy=policy, max_bytes=10_000) == b"y" * 5000
    with pytest.raises(MediaError, match="too large"):
        read_source(f"{origin.base}/ok", field="image", policy=policy, max_bytes=100)
    with pytest.raises(MediaError, match="too large"):
        read_source(f"{origin.base}/chunked", field="image", policy=policy, max_bytes=1000)
    for path in ("/to-canary", "/to-localhost", "/to-metadata", "/to-private"):
        with pytest.raises(MediaError) as info:
            read_source(f"{origin.base}{path}", field="image", policy=policy, max_bytes=1000)
        assert "never fetched" in str(info.value) or "plain http" in str(info.value), path
    for path in ("/to-file", "/to-gopher"):
        with pytest.raises(MediaError, match="unsupported scheme"):
            read_source(f"{origin.base}{path}", field="image", policy=policy, max_bytes=1000)
    with pytest.raises(MediaError, match="too many redirects"):
        read_source(f"{origin.base}/loop", field="image", policy=policy, max_bytes=1000)
    assert sum(h["path"] == "/loop" for h in origin.hits) == policy.max_redirects + 1
    with pytest.raises(MediaError, match=r"not found \(HTTP 404\)") as info:
        read_source(f"{origin.base}/missing", field="image", policy=policy, max_bytes=1000)
    assert "sec" not in str(info.value).replace("second", "")
    with pytest.raises(MediaError, match=r"HTTP 503") as info:
        read_source(f"{origin.base}/boom", field="image", policy=policy, max_bytes=1000)
    assert info.value.transient and "secret" not in str(info.value)
    assert canary.hits == []


def test_pinned_connection_keeps_the_name_in_host_and_sni(origin):
    origin.routes["/ok"] = body(b"ok")
    policy = SourcePolicy(allow_hosts=(f"localhost:{origin.port}",))
    assert read_source(f"http://localhost:{origin.port}/ok", field="image", policy=policy, max_bytes=10) == b"ok"
    assert origin.hits[-1]["headers"]["host"] == f"localhost:{origin.port}"
    url, headers, ext = netguard._pinned(__import__("httpx").URL("https://media.example.com/p.jpg"),
                                         ipaddress.ip_address("93.184.216.34"))
    assert url.host == "93.184.216.34" and headers["Host"] == "media.example.com"
    assert ext == {"sni_hostname": "media.example.com"}


def test_allow_hosts_is_exact_about_the_port(origin, canary):
    policy = allowing(origin)
    with pytest.raises(MediaError, match="plain http"):
        read_source(f"http://127.0.0.1:{canary.port}/x", field="image", policy=policy, max_bytes=100)
    with pytest.raises(MediaError, match="loopback"):
        read_source(f"http://127.0.0.1:{canary.port}/x", field="image",
                    policy=SourcePolicy(allow_http=True, allow_hosts=(f"127.0.0.1:{origin.port}",)), max_bytes=100)
    assert canary.hits == []


def test_a_slow_body_hits_the_total_deadline_not_a_per_read_timeout(origin):
    origin.routes["/slow"] = slow
    policy = allowing(origin, fetch_timeout_s=1.0)
    t = time.monotonic()
    with pytest.raises(MediaError, match="timed out") as info:
        read_source(f"{origin.base}/slow", field="audio", policy=policy, max_bytes=10**6)
    assert time.monotonic() - t < 3 and info.value.transient


def test_urls_with_credentials_and_query_strings_in_errors(origin):
    with pytest.raises(MediaError, match="credentials in the URL"):
        read_source(f"http://user:pw@127.0.0.1:{origin.port}/x", field="image", policy=allowing(origin), max_bytes=9)
    with pytest.raises(MediaError) as info:
        read_source("https://10.0.0.1/p.jpg?X-Amz-Signature=abcdef", field="image", max_bytes=9)
    assert "abcdef" not in str(info.value) and "?..." in str(info.value)


def test_service_hosts_reach_only_their_own_port(origin, canary):
    origin.routes["/ok"] = body(b"svc")
    policy = SourcePolicy(service_hosts=(f"127.0.0.1:{origin.port}",))
    assert read_source(f"{origin.base}/ok", field="image", policy=policy, max_bytes=10) == b"svc"
    with pytest.raises(MediaError):
        read_source(f"{canary.base}/x", field="image", policy=policy, max_bytes=10)
    assert canary.hits == []


def test_fetch_from_inside_an_event_loop(origin):
    import asyncio

    origin.routes["/ok"] = body(b"loop")

    async def inside():
        return read_source(f"{origin.base}/ok", field="image", policy=allowing(origin), max_bytes=10)

    assert asyncio.run(inside()) == b"loop"


def test_check_reference_refuses_without_fetching(tree, canary):
    root, _ = tree
    policy = SourcePolicy(local_roots=(str(root),), archive=("arch", "p"))
    check_reference(str(root / "ok.txt"), field="image", policy=policy)
    check_reference("s3://arch/p/x.jpg", field="image", policy=policy)
    check_reference("https://example.com/x.jpg", field="image", policy=policy)
    for ref in ("/etc/passwd", str(root / "fifo"), "s3://arch/q/x.jpg", f"{canary.base}/x", "ftp://x/y"):
        with pytest.raises(MediaError):
            check_reference(ref, field="image", policy=policy)
    assert canary.hits == []


def test_policy_messages_say_what_is_allowed():
    assert "https://" in SourcePolicy().allowed() and "local" not in SourcePolicy().allowed()
    assert "local roots" in SourcePolicy(local_roots=("/srv",)).allowed()
    assert "s3://" in SourcePolicy(archive=("b", "")).allowed()
    assert Path("/srv").is_absolute()
