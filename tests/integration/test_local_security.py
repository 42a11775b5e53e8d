"""The local services refuse what they must (issue 9), all real: the local API over HTTP, the
SeaweedFS of the session (``weed mini``), a real ``prefect server start``.

* local API: every ``/_local/*`` route but ``/_local/health`` needs a key (401); the knob routes
  take only ``application/json`` (415), a capped body (413), validated values (400 naming the
  field, the value and what is allowed), and nothing is half-applied; the server keeps answering.
* SeaweedFS: the filer's HTTP port refuses unsigned GET, PUT and DELETE (401) while S3 with
  credentials and presigned URLs work; no wildcard CORS; state directories 0700, secrets 0600.
* Prefect: the server refuses a request without its auth string (401), takes one with it, and
  allows CORS only from its own UI's origin.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from tests.fixtures_api import start_local_api, stop_local_api
from tests.fixtures_prefect_server import prefect_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
JSON = {"content-type": "application/json"}


def _key(api) -> dict[str, str]:
    return {"x-api-key": api.api_key}


def _still_answers(api) -> None:
    """The server lives and its knobs are the start-up ones."""
    assert httpx.get(f"{api.base_url}/_local/health", timeout=10).status_code == 200
    r = httpx.get(f"{api.base_url}/v2/requests/nope/status", headers=_key(api), timeout=10)
    assert r.status_code == 404, r.text
    stats = api.stats()
    assert stats["settings"] == {"min_processing_time": 0.0, "requests_per_minute": 0, "retention": 3600.0}
    assert stats["faults"]["status"] == {} and stats["faults"]["fail_rate"] == 0.0
    assert stats["faults"]["count"] is None and stats["faults"]["retry_after"] == 1.0


# -- local API: keys -------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("GET", "/_local/stats"), ("POST", "/_local/faults"), ("POST", "/_local/reset"),
    ("GET", "/_local/stats/"), ("GET", "/_local/other"),
])
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_local_routes_need_a_key(api, method, path, key):
    headers = {**JSON, **({"x-api-key": key} if key else {})}
    r = httpx.request(method, f"{api.base_url}{path}", headers=headers, content=b'{"fail_rate": 1.0}', timeout=10)
    assert r.status_code == 401, (r.status_code, r.text)
    assert "request_times" not in r.text and "jobs" not in r.text
    _still_answers(api)


def test_health_needs_no_key_and_the_key_opens_the_rest(api):
    assert httpx.get(f"{api.base_url}/_local/health", timeout=10).json() == {"ok": True}
    assert httpx.get(f"{api.base_url}/_local/stats", timeout=10).status_code == 401
    assert httpx.get(f"{api.base_url}/_local/stats", headers=_key(api), timeout=10).status_code == 200
    r = httpx.post(f"{api.base_url}/_local/faults", headers=_key(api), json={"fail_rate": 0.25}, timeout=10)
    assert r.status_code == 200 and r.json()["faults"]["fail_rate"] == 0.25
    assert httpx.post(f"{api.base_url}/_local/reset", headers=_key(api), json={}, timeout=10).status_code == 200
    _still_answers(api)


def test_admin_key_alone_opens_local_routes(tmp_path):
    server = start_local_api(tmp_path, env={"AVATARFLOW_LOCAL_ADMIN_KEY": "admin-" + uuid.uuid4().hex})
    try:
        admin = {"x-api-key": server.admin_key}
        stats = f"{server.base_url}/_local/stats"
        assert httpx.get(stats, headers=_key(server), timeout=10).status_code == 401, "API key: not for knobs"
        assert httpx.get(stats, headers=admin, timeout=10).status_code == 200
        api_call = f"{server.base_url}/v2/requests/nope/status"
        assert httpx.get(api_call, headers=admin, timeout=10).status_code == 401, "admin key: not for the API"
        assert httpx.get(api_call, headers=_key(server), timeout=10).status_code == 404
        assert server.set_faults({"fail_rate": 0.5})["faults"]["fail_rate"] == 0.5
        server.reset()
        assert server.stats()["faults"]["fail_rate"] == 0.0
        assert server.admin_key not in server.log_path.read_text(errors="replace")
    finally:
        stop_local_api(server)


# -- local API: content type, size ----------------------------------------------------------------

@pytest.mark.parametrize("path", ["/_local/faults", "/_local/reset"])
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_knob_routes_take_only_json(api, path, content_type):
    headers = {**_key(api), **({"content-type": content_type} if content_type else {})}
    r = httpx.post(f"{api.base_url}{path}", headers=headers, content=b'{"fail_rate": 1.0}', timeout=10)
    assert r.status_code == 415, (r.status_code, r.text)
    assert "application/json" in r.json()["error"]
    _still_answers(api)


def test_json_with_a_charset_is_json_and_text_is_not(api):
    headers = {**_key(api), "content-type": "application/json; charset=utf-8"}
    r = httpx.post(f"{api.base_url}/_local/faults", headers=headers, content=b'{"fail_rate": 0.5}', timeout=10)
    assert r.status_code == 200 and r.json()["faults"]["fail_rate"] == 0.5
    headers["content-type"] = "text/plain; charset=utf-8"
    r = httpx.post(f"{api.base_url}/_local/faults", headers=headers, content=b'{"fail_rate": 1.0}', timeout=10)
    assert r.status_code == 415 and api.stats()["faults"]["fail_rate"] == 0.5


@pytest.mark.parametrize("path", ["/_local/faults", "/_local/reset"])
def test_oversize_bodies_are_413(api, path):
    big = json.dumps({"fail_rate": 0.5, "pad": "x" * 200_000}).encode()
    r = httpx.post(f"{api.base_url}{path}", headers={**_key(api), **JSON}, content=big, timeout=10)
    assert r.status_code == 413, (r.status_code, r.text)

    def chunks():  # no content-length: chunked, counted while read
        yield b'{"fail_rate": 0.5, "pad": "'
        for _ in range(50):
            yield b"y" * 10_000
        yield b'"}'

    r = httpx.post(f"{api.base_url}{path}", headers={**_key(api), **JSON}, content=chunks(), timeout=10)
    assert r.status_code == 413, (r.status_code, r.text)
    _still_answers(api)


# -- local API: validation ------------------------------------------------------------------------

BAD = [
    ('{"status": {"500": 2}}', "status.500", "2"),
    ('{"status": {"500": -0.1}}', "status.500", "-0.1"),
    ('{"status": {"418": 1.0}}', "status.418", "418"),
    ('{"status": {"500": "often"}}', "status.500", "often"),
    ('{"status": {"500": true}}', "status.500", "True"),
    ('{"status": "x"}', "status", "x"),
    ('{"status": 5}', "status", "5"),
    ('{"status": {"500": NaN}}', "status.500", "nan"),
    ('{"colour": 1}', "colour", "colour"),
    ('{"fail_rate": "abc"}', "fail_rate", "abc"),
    ('{"fail_rate": 1.5}', "fail_rate", "1.5"),
    ('{"submit_drop_after_accept": -1}', "submit_drop_after_accept", "-1"),
    ('{"count": -1}', "count", "-1"),
    ('{"count": 1.5}', "count", "1.5"),
    ('{"retry_after": 1e308}', "retry_after", "1e+308"),
    ('{"retry_after": Infinity}', "retry_after", "inf"),
    ('{"retry_after": -2}', "retry_after", "-2"),
    ('{"submit_delay": 1e9}', "submit_delay", "1000000000"),
    ('{"requests_per_minute": "abc"}', "requests_per_minute", "abc"),
    ('{"requests_per_minute": -5}', "requests_per_minute", "-5"),
    ('{"requests_per_minute": 2.5}', "requests_per_minute", "2.5"),
    ('{"min_processing_time": -1}', "min_processing_time", "-1"),
    ('{"min_processing_time": 1e12}', "min_processing_time", "1000000000000"),
    ('{"retention": "x"}', "retention", "x"),
    ('{"retention": null}', "retention", "None"),
    # one bad value among good ones: nothing is applied
    ('{"requests_per_minute": 5, "min_processing_time": 2, "fail_rate": 0.5, "status": {"500": 7}}', "status.500", "7"),
    ('{"fail_rate": 0.5, "status": {"500": 1}, "retention": -3}', "retention", "-3"),
    ('[1, 2]', "body", "list"),
    ('"faults"', "body", "str"),
    ('{"fail_rate": 0.5', "body", "JSON"),
    ('[' * 5000 + ']' * 5000, "body", "JSON"),
]


@pytest.mark.parametrize("body, name, value", BAD, ids=[b[:40] for b, _, _ in BAD])
def test_each_bad_fault_value_is_400_naming_it_and_nothing_changes(api, body, name, value):
    r = httpx.post(f"{api.base_url}/_local/faults", headers={**_key(api), **JSON}, content=body.encode(), timeout=10)
    assert r.status_code == 400, (r.status_code, r.text)
    out = r.json()
    assert name in out["error"] and value in out["error"], out
    assert "allowed" in out["error"], out
    assert out["fields"] == [name], out
    _still_answers(api)


def test_reset_takes_no_knobs(api):
    r = httpx.post(f"{api.base_url}/_local/reset", headers={**_key(api), **JSON}, content=b'{"fail_rate": 1}',
                   timeout=10)
    assert r.status_code == 400 and "fail_rate" in r.json()["error"]
    _still_answers(api)


# -- SeaweedFS --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_home(s3_service) -> Path:
    """The home of the session's SeaweedFS (weed runs in <home>/s3)."""
    return Path(psutil.Process(s3_service.pid).cwd()).parent


@pytest.fixture(scope="module")
def weed_ports(s3_home) -> dict[str, int]:
    return json.loads((s3_home / "s3" / "ports.json").read_text())


@pytest.fixture
def stored(s3, s3_bucket, s3_prefix):
    key = f"{s3_prefix}/ledger.json"
    s3.put_object(Bucket=s3_bucket, Key=key, Body=b'{"request_id": "r1"}', ContentType="application/json")
    return key


def test_filer_refuses_unsigned_get_put_delete_while_s3_works(s3, s3_bucket, s3_prefix, stored, weed_ports):
    """Refused: 401 where the filer's HTTP API runs (its JWT keys), 404 as set up here: that API
    is off altogether (-disableHttp; nothing of ours uses it), over TCP and over its unix socket."""
    refused = (401, 404)
    filer = f"http://127.0.0.1:{weed_ports['filer']}"
    url = f"{filer}/buckets/{s3_bucket}/{stored}"
    assert httpx.get(url, timeout=10).status_code in refused
    assert httpx.get(f"{filer}/buckets/{s3_bucket}/", timeout=10).status_code in refused, "no listing"
    assert httpx.delete(url, timeout=10).status_code in refused
    assert httpx.put(f"{filer}/buckets/{s3_bucket}/planted.txt", content=b"x", timeout=10).status_code in refused
    assert httpx.post(f"{filer}/buckets/{s3_bucket}/planted.txt", content=b"x", timeout=10).status_code in refused
    for sock in Path("/tmp").glob(f"seaweedfs-filer-{weed_ports['filer']}.sock"):
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as local:
            assert local.delete(f"http://filer/buckets/{s3_bucket}/{stored}", timeout=10).status_code in refused
    assert s3.get_object(Bucket=s3_bucket, Key=stored)["Body"].read() == b'{"request_id": "r1"}', "still there"
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="planted")
    assert listed.get("KeyCount", 0) == 0
    _s3_and_presigned_urls_work(s3, s3_bucket, s3_prefix)


def test_master_http_api_cannot_drop_a_collection(s3, weed_ports):
    """The master's HTTP API has no key: /col/delete would drop a bucket's data. It is off."""
    bucket = f"canary-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="canary.txt", Body=b"alive")
    master = f"http://127.0.0.1:{weed_ports['master']}"
    for path in (f"/col/delete?collection={bucket}", "/dir/assign", "/vol/status"):
        r = httpx.get(master + path, timeout=10)
        assert r.status_code in (401, 403, 404), (path, r.status_code, r.text[:200])
    assert s3.get_object(Bucket=bucket, Key="canary.txt")["Body"].read() == b"alive"
    s3.delete_object(Bucket=bucket, Key="canary.txt")
    s3.delete_bucket(Bucket=bucket)


def test_volume_server_refuses_unsigned_reads_and_writes(weed_ports):
    volume = f"http://127.0.0.1:{weed_ports['volume']}"
    assert httpx.get(f"{volume}/1,01637037d6", timeout=10).status_code == 401
    assert httpx.post(f"{volume}/1,01637037d6", content=b"x", timeout=10).status_code == 401


def _s3_and_presigned_urls_work(s3, s3_bucket, s3_prefix):
    key = f"{s3_prefix}/video.mp4"
    body = os.urandom(300_000)
    s3.put_object(Bucket=s3_bucket, Key=key, Body=body, ContentType="video/mp4")
    assert s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == body
    url = s3.generate_presigned_url("get_object", Params={"Bucket": s3_bucket, "Key": key}, ExpiresIn=300)
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200 and r.content == body
    put = s3.generate_presigned_url("put_object", Params={"Bucket": s3_bucket, "Key": key + ".2"}, ExpiresIn=300)
    assert httpx.put(put, content=b"staged", timeout=30).status_code == 200
    assert s3.get_object(Bucket=s3_bucket, Key=key + ".2")["Body"].read() == b"staged"
    s3.delete_object(Bucket=s3_bucket, Key=key + ".2")
    anonymous = httpx.get(url.split("?")[0], timeout=10)
    assert anonymous.status_code == 403, "no anonymous S3 read"


@pytest.mark.parametrize("port_name", ["s3", "filer"])
def test_no_wildcard_cors(s3_bucket, weed_ports, port_name):
    url = f"http://127.0.0.1:{weed_ports[port_name]}/{s3_bucket}/x" if port_name == "s3" else \
        f"http://127.0.0.1:{weed_ports[port_name]}/buckets/{s3_bucket}/x"
    r = httpx.options(url, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "DELETE"},
                      timeout=10)
    allowed = r.headers.get("access-control-allow-origin")
    assert allowed not in ("*", "https://evil.example"), (r.status_code, dict(r.headers))
    r = httpx.get(url, headers={"Origin": "https://evil.example"}, timeout=10)
    assert r.headers.get("access-control-allow-origin") not in ("*", "https://evil.example"), dict(r.headers)


def test_bucket_aborts_incomplete_multipart_uploads(s3, s3_bucket):
    rules = s3.get_bucket_lifecycle_configuration(Bucket=s3_bucket)["Rules"]
    abort = [r for r in rules if r.get("AbortIncompleteMultipartUpload")]
    assert abort and abort[0]["Status"] == "Enabled", rules
    assert 1 <= abort[0]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] <= 7


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_directories_0700_and_secrets_0600(s3_home):
    for sub in ("", "s3", "s3/data", "logs", "logs/weed", "api"):
        assert _mode(s3_home / sub) == 0o700, f"{sub or '.'}: {oct(_mode(s3_home / sub))}"
    for name in ("secrets.json", "services.json", "s3/S3.json", "s3/security.toml"):
        assert _mode(s3_home / name) == 0o600, f"{name}: {oct(_mode(s3_home / name))}"
    toml = (s3_home / "s3" / "security.toml").read_text()
    for section in ("[jwt.signing]", "[jwt.signing.read]", "[jwt.filer_signing]", "[jwt.filer_signing.read]"):
        assert section in toml
    assert 'values = "*"' not in toml


def test_resolve_home_tightens_an_existing_home(tmp_path):
    from avatarflow.local.services.common import resolve_home

    home = tmp_path / "old-home"
    (home / "s3" / "data").mkdir(parents=True)
    for p in (home, home / "s3", home / "s3" / "data"):
        p.chmod(0o755)
    resolve_home(home)
    for sub in ("", "s3", "s3/data", "logs", "logs/weed", "api"):
        assert _mode(home / sub) == 0o700, sub


# -- Prefect ----------------------------------------------------------------------------------------

def test_prefect_server_needs_its_auth_string(prefect_server):  # noqa: F811
    url = prefect_server.api_url
    assert prefect_server.auth_string and prefect_server.auth_string not in repr(prefect_server)
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200, "health stays open (probes)"
    assert httpx.post(f"{url}/flows/filter", json={}, timeout=10).status_code == 401
    assert httpx.post(f"{url}/flows/filter", json={}, auth=("avatarflow", "wrong"), timeout=10).status_code == 401
    assert httpx.get(f"{url}/admin/settings", timeout=10).status_code == 401
    r = httpx.post(f"{url}/flows/filter", json={}, headers=prefect_server.headers, timeout=10)
    assert r.status_code == 200 and isinstance(r.json(), list)
    home = Path(prefect_server.home)
    assert json.loads((home / "secrets.json").read_text())["prefect_auth_string"] == prefect_server.auth_string
    assert _mode(home / "secrets.json") == 0o600


def test_prefect_clients_get_the_auth_string(prefect_server):  # noqa: F811
    """A real Prefect client in a subprocess, with the environment the project hands its clients."""
    code = ("import asyncio\nfrom prefect.client.orchestration import get_client\n"
            "async def main():\n    async with get_client() as c:\n"
            "        print('pools', len(await c.read_work_pools()))\nasyncio.run(main())\n")
    bare = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    ok = subprocess.run([sys.executable, "-c", code], env={**bare, **prefect_server.client_env()}, cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "pools" in ok.stdout, ok.stderr[-2000:]
    refused = subprocess.run([sys.executable, "-c", code], env={**bare, "PREFECT_API_URL": prefect_server.api_url},
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr[-2000:]


def test_prefect_cors_only_from_its_own_ui(prefect_server):  # noqa: F811
    url = f"{prefect_server.api_url}/flows/filter"
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    evil = httpx.options(url, headers={"Origin": "https://evil.example", **pre}, timeout=10)
    assert evil.headers.get("access-control-allow-origin") not in ("*", "https://evil.example"), dict(evil.headers)
    own = httpx.options(url, headers={"Origin": prefect_server.ui_url, **pre}, timeout=10)
    assert own.status_code == 200 and own.headers.get("access-control-allow-origin") == prefect_server.ui_url


def test_deploy_and_emit_find_the_local_servers_auth_string(prefect_server):  # noqa: F811
    """`avatarflow deploy` and `emit` with neither PREFECT_API_URL nor PREFECT_API_AUTH_STRING set
    reach the local server of the avatarflow home, auth string included (avatarflow.deploy.client_settings)."""
    code = ("import asyncio\nfrom prefect.settings import temporary_settings\n"
            "from prefect.client.orchestration import get_client\n"
            "from avatarflow.deploy import api_url, client_settings\n"
            "async def main():\n    async with get_client() as c:\n"
            "        print('pools', len(await c.read_work_pools()))\n"
            "with temporary_settings(client_settings(api_url())):\n    asyncio.run(main())\n")
    bare = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
    done = subprocess.run([sys.executable, "-c", code], env={**bare, "AVATARFLOW_HOME": str(prefect_server.home)},
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "pools" in done.stdout, done.stderr[-2000:]


def test_a_seaweedfs_started_without_the_keys_is_restarted_with_them(tmp_path):
    """`local up` on a home whose weed predates the keys does not reuse it as it is."""
    from avatarflow.local.services import stack
    from avatarflow.local.services.common import live_process
    from avatarflow.local.services.seaweed import start_s3, weed_marker

    home = tmp_path / "home"
    svc = start_s3(home, timeout=60, attempts=4, die_with_parent=True)
    try:
        again = start_s3(home, timeout=60, die_with_parent=True)
        assert again.pid == svc.pid, "a hardened weed is reused"
        (home / "s3" / "security.toml").unlink()  # as a home made before the keys
        fresh = start_s3(home, timeout=60, attempts=4, die_with_parent=True)
        assert fresh.pid != svc.pid
        assert live_process(svc.pid, weed_marker(home)) is None, "the old weed is stopped"
        assert _mode(home / "s3" / "security.toml") == 0o600
        assert "-disableHttp" in psutil.Process(fresh.pid).cmdline()
        client = fresh.client()
        client.put_object(Bucket=fresh.bucket, Key="k", Body=b"v")
        assert client.get_object(Bucket=fresh.bucket, Key="k")["Body"].read() == b"v"
        client.close()
    finally:
        stack.down(home)
