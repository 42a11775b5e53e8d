"""Shared test set-up: each concern keeps its fixtures in its own plugin module.

Prefect gets a home and result storage of this session's own, set before Prefect is imported,
so no run sees another session's state."""

import os
import tempfile

_prefect_home = tempfile.mkdtemp(prefix="avatarflow-prefect-")
os.environ["PREFECT_HOME"] = _prefect_home
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = os.path.join(_prefect_home, "storage")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
# a child process's ephemeral server migrates a fresh database: on 2 busy cores that passes the
# default 20 s (seen here), so children of the tests wait longer for it
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
for var in ("SEGMIND_API_KEY", "SEGMIND_BASE_URL", "SEGMIND_HISTORY_URL", "AVATARFLOW_BACKEND",
            "AVATARFLOW_S3_BUCKET", "AVATARFLOW_S3_ENDPOINT_URL", "AVATARFLOW_S3_PREFIX"):
    os.environ.pop(var, None)

pytest_plugins = [
    "tests.fixtures_media",
    "tests.fixtures_api",
    "tests.fixtures_s3",
    "tests.fixtures_prefect",
    "tests.hostile_helpers",
    "tests.client_faults_helpers",
    "tests.local_api_helpers",
]
