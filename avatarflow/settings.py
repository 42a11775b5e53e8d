"""Where the API and the archive are: explicit values, then environment, then the local services.

With no key in the environment the embedded default applies: the local API and the local S3 that
`avatarflow local up` started (their addresses and generated credentials in services.json).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from avatarflow.client import DEFAULT_BASE_URL, SegmindClient
from avatarflow.contract import EXPECTED_DURATION_S

# The local engine renders a short script in seconds, not the vendor's ~100 s.
LOCAL_EXPECTED_S = 5.0


def local_services() -> dict[str, Any]:
    """services.json of the local services (empty when none were started)."""
    from avatarflow.local.services import load_services

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
        from avatarflow.archive import s3_client

        return s3_client(self.endpoint_url, self.access_key, self.secret_key, self.region)


class NotConfigured(RuntimeError):
    """Neither the environment nor the local services say where something is."""


def api_settings(backend: str | None = None) -> ApiSettings:
    """`segmind`: the vendor (SEGMIND_API_KEY required); `local`: the local API; None: segmind if
    SEGMIND_API_KEY is set, else local."""
    key = os.environ.get("SEGMIND_API_KEY", "")
    backend = backend or os.environ.get("AVATARFLOW_BACKEND") or ("segmind" if key else "local")
    if backend == "segmind":
        if not key:
            raise NotConfigured("backend 'segmind' needs SEGMIND_API_KEY in the environment")
        return ApiSettings(
            base_url=os.environ.get("SEGMIND_BASE_URL") or DEFAULT_BASE_URL,
            history_url=os.environ.get("SEGMIND_HISTORY_URL") or None,
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
    bucket = os.environ.get("AVATARFLOW_S3_BUCKET")
    prefix = os.environ.get("AVATARFLOW_S3_PREFIX", "")
    if bucket:
        return ArchiveSettings(
            bucket=bucket,
            endpoint_url=os.environ.get("AVATARFLOW_S3_ENDPOINT_URL") or None,
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
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
