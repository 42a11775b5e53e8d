"""avatarflow.config: the one reader of the environment (no services: AVATARFLOW_HOME points at
an empty place, or `local_services` is replaced), and the client that takes explicit values."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from avatarflow import config
from avatarflow.client import DEFAULT_BASE_URL, DEFAULT_HISTORY_URL, SegmindClient
from avatarflow.media.policy import SourcePolicy, policy_from_env

ROOT = Path(__file__).resolve().parents[2]
VARS = ("SEGMIND_API_KEY", "SEGMIND_BASE_URL", "SEGMIND_HISTORY_URL", "AVATARFLOW_BACKEND",
        "AVATARFLOW_S3_BUCKET", "AVATARFLOW_S3_ENDPOINT_URL", "AVATARFLOW_S3_PREFIX", "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION", "AVATARFLOW_HOME", "PREFECT_API_URL",
        "AVATARFLOW_LEDGER_SINGLE_WORKER", "AVATARFLOW_CREDENTIALS_BLOCKS", "AVATARFLOW_ARCHIVE_BLOCKS")


@pytest.fixture
def env(monkeypatch, tmp_path):
    for v in VARS:
        monkeypatch.delenv(v, raising=False)
    for v in list(os.environ):
        if v.startswith("AVATARFLOW_SOURCES_"):
            monkeypatch.delenv(v)
    monkeypatch.setenv("AVATARFLOW_HOME", str(tmp_path / "no-services"))
    return monkeypatch


def set_vars(env, **values: str) -> None:
    for name, value in values.items():
        env.setenv(name, value)


def test_config_is_the_only_reader_of_the_environment():
    """No other module of the library, the flows, tasks or blocks reads os.environ (the local
    services' launcher passes environments to the processes it starts, and is not counted)."""
    import re

    offenders = []
    for folder in ("avatarflow", "flows", "tasks", "blocks"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "avatarflow/config.py" or rel.startswith("avatarflow/local/"):
                continue
            for n, line in enumerate(path.read_text().splitlines(), start=1):
                if re.search(r"os\.environ\.get|os\.getenv|os\.environ\[", line):
                    offenders.append(f"{rel}:{n}")
    assert offenders == []


def test_api_settings_from_the_environment(env):
    with pytest.raises(config.NotConfigured, match="local API is not running"):
        config.api_settings()
    with pytest.raises(config.NotConfigured, match="needs SEGMIND_API_KEY"):
        config.api_settings("segmind")
    with pytest.raises(config.NotConfigured, match="allowed: segmind, local"):
        config.api_settings("vendor-x")
    env.setenv("SEGMIND_API_KEY", "sk-1")
    env.setenv("SEGMIND_BASE_URL", "")  # empty counts as unset
    a = config.api_settings()
    assert (a.backend, a.base_url, a.history_url, a.api_key) == ("segmind", DEFAULT_BASE_URL, None, "sk-1")
    assert "sk-1" not in repr(a) and "sk-1" not in repr(config.environment())
    env.setenv("SEGMIND_BASE_URL", "https://proxy.example.com")
    env.setenv("SEGMIND_HISTORY_URL", "https://history.example.com")
    a = config.api_settings()
    assert (a.base_url, a.history_url) == ("https://proxy.example.com", "https://history.example.com")
    env.setenv("AVATARFLOW_BACKEND", "local")
    with pytest.raises(config.NotConfigured):
        config.api_settings()
    assert config.default_backend() == "local"


def test_archive_settings_from_the_environment(env):
    with pytest.raises(config.NotConfigured, match="AVATARFLOW_S3_BUCKET"):
        config.archive_settings()
    set_vars(env, AVATARFLOW_S3_BUCKET="b1", AVATARFLOW_S3_PREFIX="team", AWS_DEFAULT_REGION="eu-west-1",
             AWS_ACCESS_KEY_ID="AK", AWS_SECRET_ACCESS_KEY="SK")
    a = config.archive_settings()
    assert (a.bucket, a.prefix, a.region, a.access_key, a.secret_key, a.endpoint_url) == (
        "b1", "team", "eu-west-1", "AK", "SK", None)
    assert "SK" not in repr(a)
    env.setenv("AWS_REGION", "us-west-2")
    assert config.archive_settings().region == "us-west-2"


def test_source_settings_defaults_are_the_safe_ones(env):
    s = config.source_settings()
    assert s.local_roots == [] and s.s3_allow == [] and s.allow_hosts == [] and s.block is None
    assert s.allow_data is True and s.allow_http is False and s.max_redirects == 5 and s.fetch_timeout_s == 30
    p = policy_from_env()
    assert p.local_roots == () and p.archive is None and p.service_hosts == ()
    assert p == SourcePolicy()


def test_source_settings_parse_lists(env, tmp_path):
    set_vars(env, AVATARFLOW_SOURCES_LOCAL_ROOTS=f"{tmp_path}/a{os.pathsep}{tmp_path}/b,{tmp_path}/c/../d",
             AVATARFLOW_SOURCES_S3_ALLOW="s3://media/, shared/portraits/",
             AVATARFLOW_SOURCES_ALLOW_HOSTS="127.0.0.1:8080, Media.Internal", AVATARFLOW_SOURCES_ALLOW_HTTP="true",
             AVATARFLOW_SOURCES_FETCH_TIMEOUT_S="5", AVATARFLOW_SOURCES_MAX_REDIRECTS="2")
    s = config.source_settings()
    assert s.local_roots == [f"{tmp_path}/a", f"{tmp_path}/b", f"{tmp_path}/d"]
    assert s.s3_allow == ["media", "shared/portraits"]
    assert s.allow_hosts == ["127.0.0.1:8080", "media.internal"]
    assert s.allow_http and s.fetch_timeout_s == 5 and s.max_redirects == 2
    env.setenv("AVATARFLOW_SOURCES_S3_ALLOW", '["a", "b/c"]')
    assert config.source_settings().s3_allow == ["a", "b/c"]
    p = policy_from_env()
    assert p.allow_http and p.guard().timeout_s == 5 and p.guard().exempt("media.internal", 443)
    assert p.guard().exempt("127.0.0.1", 8080) and not p.guard().exempt("127.0.0.1", 8081)


@pytest.mark.parametrize("var,value", [
    ("AVATARFLOW_SOURCES_LOCAL_ROOTS", "relative/dir"),
    ("AVATARFLOW_SOURCES_S3_ALLOW", ".."),
    ("AVATARFLOW_SOURCES_MAX_REDIRECTS", "100"),
    ("AVATARFLOW_SOURCES_FETCH_TIMEOUT_S", "0"),
    ("AVATARFLOW_SOURCES_ALLOW_HTTP", "perhaps"),
])
def test_bad_source_settings_are_refused(env, var, value):
    env.setenv(var, value)
    with pytest.raises(config.NotConfigured) as info:
        config.source_settings()
    assert f"{var}={value!r}" in str(info.value), "the message names the variable and its value"


def test_local_service_hosts_are_loopback_only(env):
    env.setenv("AVATARFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:8333")
    env.setenv("SEGMIND_BASE_URL", "https://api.segmind.com")
    assert config.local_service_hosts() == ["127.0.0.1:8333"]
    assert config.local_service_hosts("http://localhost:9000/") == ["localhost:9000", "127.0.0.1:8333"]
    env.setenv("SEGMIND_BASE_URL", "http://[::1]:7000")
    assert "[::1]:7000" in config.local_service_hosts()
    assert config.host_port("https://x.example.com") == "x.example.com:443"
    assert config.is_loopback_host("127.9.9.9") and not config.is_loopback_host("10.0.0.1")


def test_client_takes_explicit_values_only(env):
    env.setenv("SEGMIND_API_KEY", "from-env")
    env.setenv("SEGMIND_BASE_URL", "https://env.example.com")
    c = SegmindClient()
    assert c.base_url == DEFAULT_BASE_URL and c.history_url == DEFAULT_HISTORY_URL and c._api_key == ""
    c = SegmindClient("k", "https://api.example.com/")
    assert c.base_url == "https://api.example.com" and c.history_url == "https://api.example.com"


@pytest.mark.parametrize("base,history,ok", [
    ("https://api.example.com", None, True),
    ("http://127.0.0.1:9000", None, True),
    ("http://localhost:9000", None, True),
    ("http://[::1]:9000", None, True),
    ("http://api.example.com", None, False),
    ("http://10.0.0.5", None, False),
    ("https://api.example.com", "http://history.example.com", False),
    ("ftp://api.example.com", None, False),
])
def test_client_refuses_to_send_the_key_over_plain_http(base, history, ok):
    if ok:
        SegmindClient("k", base, history)
    else:
        with pytest.raises(ValueError) as info:
            SegmindClient("k", base, history)
        assert "k" != str(info.value) and ("http" in str(info.value))
    SegmindClient("", base if base.startswith("http") else "https://x.example.com")  # no key: nothing to protect


# ---- the blocks a flow parameter may name --------------------------------------------------------
def test_check_block_allows_only_the_operators_names(env):
    assert config.check_block("credentials", "avatarflow-api") == "avatarflow-api"
    assert config.check_block("archive", "avatarflow-archive") == "avatarflow-archive"
    with pytest.raises(config.NotConfigured) as info:
        config.check_block("archive", "someone-elses-bucket")
    text = str(info.value)
    assert "archive_block='someone-elses-bucket' is not allowed" in text
    assert "allowed: avatarflow-archive" in text and "AVATARFLOW_ARCHIVE_BLOCKS" in text
    with pytest.raises(config.NotConfigured, match="allowed: avatarflow-api "):
        config.check_block("credentials", "avatarflow-archive")  # each kind has its own list


def test_check_block_reads_a_comma_separated_list_each_call(env):
    env.setenv("AVATARFLOW_CREDENTIALS_BLOCKS", " team-a , team-b,,")
    assert config.check_block("credentials", "team-b") == "team-b"
    with pytest.raises(config.NotConfigured, match="allowed: team-a, team-b "):
        config.check_block("credentials", "avatarflow-api")
    env.setenv("AVATARFLOW_CREDENTIALS_BLOCKS", ",")
    with pytest.raises(config.NotConfigured, match="allowed: none"):
        config.check_block("credentials", "team-a")
    with pytest.raises(config.NotConfigured):
        config.check_block("credentials", "")


# ---- the environment -------------------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("YES", True), ("0", False),
                                            ("false", False), ("", False)])
def test_ledger_single_worker_flag(env, value, expected):
    env.setenv("AVATARFLOW_LEDGER_SINGLE_WORKER", value)
    assert config.environment().avatarflow_ledger_single_worker is expected


def test_a_bad_flag_names_the_variable_and_the_value(env):
    env.setenv("AVATARFLOW_LEDGER_SINGLE_WORKER", "maybe")
    with pytest.raises(config.NotConfigured) as info:
        config.environment()
    assert "AVATARFLOW_LEDGER_SINGLE_WORKER='maybe'" in str(info.value)


def test_default_backend_follows_the_key_unless_named(env):
    assert config.default_backend() == "local"
    env.setenv("SEGMIND_API_KEY", "sk-1")
    assert config.default_backend() == "segmind"
    env.setenv("AVATARFLOW_BACKEND", "local")
    assert config.default_backend() == "local"
    env.setenv("AVATARFLOW_BACKEND", "")  # empty counts as unset
    assert config.default_backend() == "segmind"


def test_prefect_api_url(env):
    assert config.prefect_api_url() is None
    env.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api/")
    assert config.prefect_api_url() == "http://127.0.0.1:4200/api"


def test_local_backend_and_archive_from_the_local_services(env, monkeypatch):
    services = {"api": {"base_url": "http://127.0.0.1:7001", "api_key": "local-key"},
                "s3": {"endpoint_url": "http://127.0.0.1:8333", "bucket": "avatarflow", "access_key": "ak",
                       "secret_key": "sk-local"}}
    monkeypatch.setattr(config, "local_services", lambda: services)
    a = config.api_settings()
    assert (a.backend, a.base_url, a.api_key, a.history_url) == ("local", "http://127.0.0.1:7001", "local-key", None)
    assert a.expected_seconds == config.LOCAL_EXPECTED_S
    with pytest.raises(config.NotConfigured, match="needs SEGMIND_API_KEY"):
        config.api_settings("segmind")  # local services do not stand in for the vendor's key
    env.setenv("AVATARFLOW_S3_PREFIX", "runs")
    s = config.archive_settings()
    assert (s.bucket, s.endpoint_url, s.region, s.access_key, s.secret_key, s.prefix) == (
        "avatarflow", "http://127.0.0.1:8333", "us-east-1", "ak", "sk-local", "runs")
    assert "sk-local" not in repr(s) and "local-key" not in repr(a)
    env.setenv("AVATARFLOW_S3_BUCKET", "real-bucket")
    assert config.archive_settings().bucket == "real-bucket", "the environment wins over the local services"


def test_the_segmind_backend_gets_the_vendors_expected_time(env):
    from avatarflow.contract import EXPECTED_DURATION_S

    env.setenv("SEGMIND_API_KEY", "sk-1")
    assert config.api_settings().expected_seconds == EXPECTED_DURATION_S != config.LOCAL_EXPECTED_S
    assert config.api_settings().client().base_url == DEFAULT_BASE_URL


@pytest.mark.parametrize("url,expected", [
    ("http://Example.com", "example.com:80"),
    ("https://example.com:8443/x", "example.com:8443"),
    ("http://[::1]/", "[::1]:80"),
    ("s3://bucket/key", None),
    ("", None),
    (None, None),
])
def test_host_port(url, expected):
    assert config.host_port(url) == expected


def test_source_fields_from_a_json_list_and_a_block_name(env, tmp_path):
    env.setenv("AVATARFLOW_SOURCES_LOCAL_ROOTS", f'["{tmp_path}/x", "{tmp_path}/y/.."]')
    env.setenv("AVATARFLOW_SOURCES_BLOCK", "ops-policy")
    s = config.source_settings()
    assert s.local_roots == [f"{tmp_path}/x", str(tmp_path)] and s.block == "ops-policy"
    with pytest.raises(ValueError, match="s3_allow entry 's3:///' is not allowed"):
        config.SourceFields(s3_allow=["s3:///"])
