"""A REAL `prefect server start` on a free loopback port (its own PREFECT_HOME, on its own
PostgreSQL: avatarflow.local.services.postgres; both stopped at the end of the session), the
deployments of prefect.yaml on it, and a
process worker serving the avatarflow work pool with the pipeline's environment (the test API
as the vendor, the test S3 as the archive).

Fixtures:
  prefect_server  (session) PrefectServer: api_url, ui_url, auth_string, headers (the server
                  refuses requests without its auth string), client_env()
  deployed        (session) after `avatarflow deploy` (python -m avatarflow.cli deploy) and
                  with a worker running: {"env", "deploy_output", "worker_log", "prefix"}
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from avatarflow.deploy import WORK_POOL
from avatarflow.local.services.common import signal_group
from tests.fixtures_prefect import pipeline_variables

ROOT = Path(__file__).resolve().parent.parent
# The tests' rate limit: high enough not to slow them, low enough to be a real limit.
TEST_RATE_PER_MINUTE = 600


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    from avatarflow.local.services.prefect_server import start_prefect, stop_prefect

    home = tmp_path_factory.mktemp("prefect-server-home")
    saved = os.environ.get("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS")
    os.environ["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "2"  # cron runs appear within seconds
    try:
        server = start_prefect(home, timeout=120)
    finally:
        if saved is None:
            os.environ.pop("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS")
        else:
            os.environ["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = saved
    yield server
    stop_prefect(home)
    from avatarflow.local.services.postgres import purge_postgres

    purge_postgres(home)


def pipeline_environment(local_api, s3_settings, prefix: str, server, home: Path) -> dict[str, str]:
    """What a worker (and the flow runs it starts) sees: the pipeline's variables, the server
    (its URL and auth string)."""
    return {
        **os.environ,
        **pipeline_variables(local_api, s3_settings, prefix),
        **server.client_env(),
        "PREFECT_HOME": str(home),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_PREFETCH_SECONDS": "2",
    }


def _stop_worker(worker: subprocess.Popen) -> None:
    """SIGINT twice (a worker sometimes ignores the first signal), then SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGINT, signal.SIGKILL):
        if worker.poll() is not None or not signal_group(worker, sig):
            return


@pytest.fixture(scope="session")
def deployed(prefect_server, local_api, s3_settings, tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-client-home")
    prefix = f"deployments-{os.getpid()}"
    env = pipeline_environment(local_api, s3_settings, prefix, prefect_server, home)
    done = subprocess.run(
        [sys.executable, "-m", "avatarflow.cli", "deploy", "--requests-per-minute", str(TEST_RATE_PER_MINUTE)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    log_path = home / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", WORK_POOL],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.time() + 60  # the worker has registered with its pool
        while time.time() < deadline:
            r = httpx.post(f"{prefect_server.api_url}/work_pools/{WORK_POOL}/workers/filter", json={},
                           headers=prefect_server.headers, timeout=10)
            if r.status_code == 200 and r.json():
                break
            assert worker.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield {"env": env, "deploy_output": done.stdout, "worker_log": log_path, "prefix": prefix}
    finally:
        _stop_worker(worker)
