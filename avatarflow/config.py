"""The one reader of the environment (pydantic-settings); everything else takes arguments.

Where the API and the archive are (explicit values, then the environment, then the local
services that `avatarflow local up` started), and the source policy's settings:

    SEGMIND_API_KEY, SEGMIND_BASE_URL, SEGMIND_HISTORY_URL, AVATARFLOW_BACKEND
    AVATARFLOW_S3_BUCKET, AVATARFLOW_S3_ENDPOINT_URL, AVATARFLOW_S3_PREFIX
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (or AWS_DEFAULT_REGION)
    AVATARFLOW_SOURCES_*  (see SourceSettings), AVATARFLOW_SOURCES_BLOCK

Blocks resolve through the same models: a SegmindCredentials block gives an ApiSettings, a
SourcePolicy block's fields are SourceSettings' fields (validated by the same model).
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from avatarflow.api_http import is_loopback_host
from avatarflow.client import DEFAULT_BASE_URL, SegmindClient
from avatarflow.contract import EXPECTED_DURATION_S
from avatarflow.errors import AvatarflowError

# The local engine renders a short script in seconds, not the vendor's ~100 s.
LOCAL_EXPECTED_S = 5.0


class Environment(BaseSettings):
    """The variables that say where the API and the archive are (empty counts as unset)."""

    model_config = SettingsConfigDict(case_sensitive=False, env_ignore_empty=True, extra="ignore")

    segmind_api_key: SecretStr = SecretStr("")
    segmind_base_url: str | None = None
    segmind_history_url: str | None = None
    avatarflow_backend: str | None = None
    avatarflow_s3_bucket: str | None = None
    avatarflow_s3_endpoint_url: str | None = None
    avatarflow_s3_prefix: str = ""
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_region: str | None = None
    aws_default_region: str | None = None
    prefect_api_url: str | None = None
    # a store that ignores conditional writes is refused unless one worker alone uses it
    avatarflow_ledger_single_worker: bool = False
    # the blocks a flow parameter may name (the names `avatarflow blocks register` saves)
    avatarflow_credentials_blocks: str = "avatarflow-api"
    avatarflow_archive_blocks: str = "avatarflow-archive"


def check_block(kind: str, name: str) -> str:
    """A block named by a flow parameter (untrusted), if the operator allows it: the names in
    AVATARFLOW_CREDENTIALS_BLOCKS / AVATARFLOW_ARCHIVE_BLOCKS (comma-separated). Choosing
    another S3Bucket or credentials block would widen what a run may read or where its key goes."""
    allowed = [n.strip() for n in str(getattr(environment(), f"avatarflow_{kind}_blocks")).split(",") if n.strip()]
    if name not in allowed:
        raise NotConfigured(f"{kind}_block={name!r} is not allowed; allowed: {', '.join(allowed) or 'none'} "
                            f"(the operator's AVATARFLOW_{kind.upper()}_BLOCKS)")
    return name


def environment() -> Environment:
    """The environment as it is now (read on every call: tests and operators change it)."""
    return _read(Environment, "")


def _read(settings: type[BaseSettings], prefix: str) -> Any:
    """`settings` from the environment; a bad value is NotConfigured naming the variable."""
    try:
        return settings()
    except ValidationError as e:
        bad = [f"{prefix}{'_'.join(map(str, err['loc'])).upper()}={err.get('input')!r}: "
               f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors()]
        raise NotConfigured("; ".join(bad)) from None


# ---- the source policy's settings --------------------------------------------------------------
def _split(v: Any, paths: bool = False) -> Any:
    """A list from a comma-separated string (for paths, os.pathsep separates too); a JSON list
    and a list pass through."""
    if v is None:
        return []
    if isinstance(v, str):
        text = v.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        if paths:
            text = text.replace(os.pathsep, ",")
        return [p.strip() for p in text.split(",") if p.strip()]
    return v


class SourceFields(BaseModel):
    """What untrusted parameters (`image`, `audio`, `calendar`) may name. The defaults are the
    safe ones: https URLs, s3:// in the archive bucket (under its prefix), data: URIs within the
    size cap; no local path, no plain http, no private or loopback address."""

    local_roots: list[str] = Field(
        default_factory=list,
        description="Directories whose regular files may be read by path or file:// URL "
                    "(symlinks are not followed). Default: none.")
    s3_allow: list[str] = Field(
        default_factory=list,
        description="Buckets (`bucket`) or prefixes (`bucket/prefix`) readable by s3:// besides "
                    "the archive's own bucket/prefix.")
    allow_data: bool = Field(default=True, description="Accept data: URIs (within the size cap).")
    allow_http: bool = Field(default=False, description="Accept plain http:// URLs to public hosts.")
    allow_hosts: list[str] = Field(
        default_factory=list,
        description="TRUSTED OPERATORS ONLY: hosts (`host` or `host:port`) fetched even when they "
                    "resolve to a loopback or private address, over http or https (a test server, "
                    "an internal media host). Default: none.")
    max_redirects: int = Field(default=5, ge=0, le=20, description="Redirects followed per fetch.")
    fetch_timeout_s: float = Field(default=30.0, gt=0, le=600,
                                   description="Total deadline of one fetch (DNS, connect, every hop, the body).")

    @field_validator("local_roots", "s3_allow", "allow_hosts", mode="before")
    @classmethod
    def _lists(cls, v: Any, info: Any) -> Any:
        return _split(v, paths=info.field_name == "local_roots")

    @field_validator("s3_allow")
    @classmethod
    def _s3_entries(cls, v: list[str]) -> list[str]:
        out = []
        for entry in v:
            e = entry.strip().removeprefix("s3://").strip("/")
            if not e or e.split("/", 1)[0] in ("", ".", ".."):
                raise ValueError(f"s3_allow entry {entry!r} is not allowed; allowed: bucket or bucket/prefix")
            out.append(e)
        return out

    @field_validator("local_roots")
    @classmethod
    def _roots(cls, v: list[str]) -> list[str]:
        for root in v:
            if not os.path.isabs(os.path.expanduser(root)):
                raise ValueError(f"local_roots entry {root!r} is not an absolute path")
        return [os.path.abspath(os.path.expanduser(r)) for r in v]

    @field_validator("allow_hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        return [h.strip().lower() for h in v if h.strip()]


class SourceSettings(SourceFields, BaseSettings):
    """SourceFields from AVATARFLOW_SOURCES_* (lists comma-separated; local roots may also be
    separated by os.pathsep), plus AVATARFLOW_SOURCES_BLOCK: the name of a SourcePolicy block
    whose fields replace these (selected by the operator, never by a flow parameter)."""

    model_config = SettingsConfigDict(env_prefix="AVATARFLOW_SOURCES_", case_sensitive=False,
                                      env_ignore_empty=True, extra="ignore")

    local_roots: Annotated[list[str], NoDecode] = Field(default_factory=list)
    s3_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    block: str | None = Field(default=None, description="Name of a SourcePolicy block.")


def source_settings() -> SourceSettings:
    return _read(SourceSettings, "AVATARFLOW_SOURCES_")


SOURCE_POLICY_BLOCK_TYPE = "source-policy"


async def source_fields() -> SourceFields:
    """The source policy's fields: from the SourcePolicy block named by AVATARFLOW_SOURCES_BLOCK
    when set (read through the Prefect API, validated by the same model), else the environment."""
    env = source_settings()
    if not env.block:
        return SourceFields.model_validate(env.model_dump(exclude={"block"}))
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        doc = await client.read_block_document_by_name(
            name=env.block, block_type_slug=SOURCE_POLICY_BLOCK_TYPE, include_secrets=False)
    data = {k: v for k, v in (doc.data or {}).items() if k in SourceFields.model_fields}
    return SourceFields.model_validate(data)


# ---- loopback --------------------------------------------------------------------------------
def host_port(url: str | None) -> str | None:
    """'host:port' of an http(s) URL (the scheme's default port when none is given)."""
    if not url:
        return None
    p = urllib.parse.urlsplit(url)
    if p.scheme not in ("http", "https") or not p.hostname:
        return None
    port = p.port or (443 if p.scheme == "https" else 80)
    host = p.hostname.lower()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_service_hosts(*urls: str | None) -> list[str]:
    """host:port of the local backend's own services on loopback: the local S3 endpoint and the
    local API (from services.json and the configured URLs), the only loopback addresses a fetch
    of user media may reach."""
    svcs = local_services()
    env = environment()
    candidates = [*urls, env.avatarflow_s3_endpoint_url, env.segmind_base_url,
                  (svcs.get("s3") or {}).get("endpoint_url"), (svcs.get("api") or {}).get("base_url")]
    out: list[str] = []
    for url in candidates:
        hp = host_port(url)
        if hp and is_loopback_host(urllib.parse.urlsplit(url).hostname) and hp not in out:
            out.append(hp)
    return out


# ---- the API and the archive -------------------------------------------------------------------
def local_services() -> dict[str, Any]:
    """services.json of the local services (empty when none were started)."""
    from avatarflow.local.services.registry import load_services

    svcs = load_services()
    return svcs.to_json() if svcs else {}


@dataclass(frozen=True)
class ApiSettings:
    base_url: str
    history_url: str | None = None
    api_key: str = field(default="", repr=False)
    backend: str = "segmind"
    expected_seconds: float = EXPECTED_DURATION_S

    def client(self, **kw: Any) -> SegmindClient:
        return SegmindClient(api_key=self.api_key, base_url=self.base_url, history_url=self.history_url, **kw)


@dataclass(frozen=True)
class ArchiveSettings:
    bucket: str
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    prefix: str = ""

    def s3(self) -> Any:
        from avatarflow.s3io import s3_client

        return s3_client(self.endpoint_url, self.access_key, self.secret_key, self.region)


class NotConfigured(AvatarflowError, RuntimeError):
    """Neither the environment nor the local services say where something is."""

    bad_input = True


def default_backend() -> str:
    """AVATARFLOW_BACKEND, else segmind when SEGMIND_API_KEY is set, else local."""
    env = environment()
    return env.avatarflow_backend or ("segmind" if env.segmind_api_key.get_secret_value() else "local")


def api_settings(backend: str | None = None) -> ApiSettings:
    """`segmind`: the vendor (SEGMIND_API_KEY required); `local`: the local API; None: segmind if
    SEGMIND_API_KEY is set, else local."""
    env = environment()
    key = env.segmind_api_key.get_secret_value()
    backend = backend or default_backend()
    if backend == "segmind":
        if not key:
            raise NotConfigured("backend 'segmind' needs SEGMIND_API_KEY in the environment")
        return ApiSettings(
            base_url=env.segmind_base_url or DEFAULT_BASE_URL,
            history_url=env.segmind_history_url or None,
            api_key=key,
            backend="segmind",
        )
    if backend != "local":
        raise NotConfigured(f"backend={backend!r} is not known; allowed: segmind, local")
    api = local_services().get("api") or {}
    if not api.get("base_url"):
        raise NotConfigured("the local API is not running: start it with `avatarflow local up`")
    return ApiSettings(
        base_url=api["base_url"], api_key=api.get("api_key", ""), backend="local", expected_seconds=LOCAL_EXPECTED_S
    )


def archive_settings() -> ArchiveSettings:
    """AVATARFLOW_S3_BUCKET (+ AVATARFLOW_S3_ENDPOINT_URL and the AWS_* variables), else the local S3."""
    env = environment()
    prefix = env.avatarflow_s3_prefix
    if env.avatarflow_s3_bucket:
        return ArchiveSettings(
            bucket=env.avatarflow_s3_bucket,
            endpoint_url=env.avatarflow_s3_endpoint_url or None,
            region=env.aws_region or env.aws_default_region or "us-east-1",
            access_key=env.aws_access_key_id,
            secret_key=env.aws_secret_access_key.get_secret_value() if env.aws_secret_access_key else None,
            prefix=prefix,
        )
    s3 = local_services().get("s3") or {}
    if not s3.get("endpoint_url"):
        raise NotConfigured(
            "no archive: set AVATARFLOW_S3_BUCKET, or start the local S3 with `avatarflow local up`"
        )
    return ArchiveSettings(
        bucket=s3["bucket"],
        endpoint_url=s3["endpoint_url"],
        region=s3.get("region", "us-east-1"),
        access_key=s3.get("access_key"),
        secret_key=s3.get("secret_key"),
        prefix=prefix,
    )


def prefect_api_url() -> str | None:
    """PREFECT_API_URL, when set."""
    url = environment().prefect_api_url
    return url.rstrip("/") if url else None
