"""Prefect for tests: one test harness (temporary database) per session, and the pipeline's
environment pointed at the real local API and the real SeaweedFS."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def pipeline_variables(local_api, s3_settings, prefix: str, local_roots: tuple[str, ...] = ()) -> dict[str, str]:
    """The pipeline's variables: the local API as the vendor, the test S3 as archive, and local
    paths readable under the bundled assets and `local_roots` (an operator's setting)."""
    from tests.fixtures_media import ASSETS

    return {
        "AVATARFLOW_SOURCES_LOCAL_ROOTS": os.pathsep.join((str(ASSETS), *local_roots)),
        "SEGMIND_API_KEY": local_api.api_key,
        "SEGMIND_BASE_URL": local_api.base_url,
        "AVATARFLOW_S3_BUCKET": s3_settings["bucket"],
        "AVATARFLOW_S3_ENDPOINT_URL": s3_settings["endpoint_url"],
        "AWS_ACCESS_KEY_ID": s3_settings["access_key"],
        "AWS_SECRET_ACCESS_KEY": s3_settings["secret_key"],
        "AWS_REGION": s3_settings["region"],
        "AVATARFLOW_S3_PREFIX": prefix,
    }


@pytest.fixture
def pipeline_env(monkeypatch, prefect_harness, local_api, s3_settings, s3_prefix, tmp_path_factory):
    """The pipeline's environment with a key prefix of this test's own, local paths readable
    under the test session's temporary directory. Yields the prefix."""
    roots = (str(tmp_path_factory.getbasetemp()),)
    for k, v in pipeline_variables(local_api, s3_settings, s3_prefix, roots).items():
        monkeypatch.setenv(k, v)
    return s3_prefix
