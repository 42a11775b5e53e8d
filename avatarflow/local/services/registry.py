"""services.json: what local services run where (endpoints, credentials, pids), and whether each
one answers. The dataclasses keep secrets out of ``repr``."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avatarflow.local.services.common import read_json, resolve_home, write_private_json

SERVICES_FILE = "services.json"
DEFAULT_BUCKET = "avatarflow"
DEFAULT_REGION = "us-east-1"
API_HEALTH_PATH = "/_local/health"


@dataclass
class S3Service:
    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    bucket: str = DEFAULT_BUCKET
    region: str = DEFAULT_REGION
    pid: int | None = None
    # runtime view, filled by status(); not persisted
    running: bool = field(default=False, compare=False)
    answering: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.endpoint_url,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "bucket": self.bucket,
            "region": self.region,
            "pid": self.pid,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> S3Service:
        return cls(
            endpoint_url=d["endpoint_url"],
            access_key=d["access_key"],
            secret_key=d["secret_key"],
            bucket=d.get("bucket", DEFAULT_BUCKET),
            region=d.get("region", DEFAULT_REGION),
            pid=d.get("pid"),
        )

    def client(self, **kwargs: Any):
        """A boto3 S3 client for this service (path-style, retries, timeouts)."""
        from avatarflow.s3io import s3_client

        return s3_client(self.endpoint_url, self.access_key, self.secret_key, self.region, **kwargs)

    def answers(self, timeout: float = 2.0) -> bool:
        """Whether its bucket answers a HEAD within ``timeout`` (one attempt)."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(connect_timeout=timeout, read_timeout=timeout, max_attempts=1)
        try:
            client.head_bucket(Bucket=self.bucket)
            return True
        except (BotoCoreError, ClientError):
            return False
        finally:
            with contextlib.suppress(Exception):
                client.close()


@dataclass
class ApiService:
    base_url: str
    api_key: str = field(repr=False)
    pid: int | None = None
    running: bool = field(default=False, compare=False)
    answering: bool = field(default=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "api_key": self.api_key, "pid": self.pid}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ApiService:
        return cls(base_url=d["base_url"], api_key=d["api_key"], pid=d.get("pid"))

    def answers(self, timeout: float = 2.0) -> bool:
        """Whether its health route answers 200 within ``timeout``."""
        import httpx

        try:
            r = httpx.get(
                self.base_url + API_HEALTH_PATH,
                headers={"x-api-key": self.api_key},
                timeout=timeout,
                trust_env=False,
            )
            return r.status_code == 200
        except httpx.HTTPError:
            return False


@dataclass
class Services:
    home: Path
    s3: S3Service | None = None
    api: ApiService | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.s3 is not None:
            out["s3"] = self.s3.to_json()
        if self.api is not None:
            out["api"] = self.api.to_json()
        return out


def save_services(home: Path, *, s3: S3Service | None | bool = False, api: ApiService | None | bool = False) -> None:
    """Update one or both entries of services.json (False: leave as is; None: remove)."""
    path = home / SERVICES_FILE
    data = read_json(path)
    for name, value in (("s3", s3), ("api", api)):
        if value is False:
            continue
        if value is None:
            data.pop(name, None)
        else:
            data[name] = value.to_json()
    write_private_json(path, data)


def load_services(home: str | os.PathLike[str] | None = None) -> Services | None:
    """What services.json records (no liveness check), or None if nothing was ever started."""
    home_path = resolve_home(home)
    data = read_json(home_path / SERVICES_FILE)
    if not data:
        return None
    return Services(
        home=home_path,
        s3=S3Service.from_json(data["s3"]) if data.get("s3") else None,
        api=ApiService.from_json(data["api"]) if data.get("api") else None,
    )
