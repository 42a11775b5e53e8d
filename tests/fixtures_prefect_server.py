"""A real `prefect server start` on loopback for the deployment tests (its own home and SQLite
database), and a process worker serving the avatarflow work pool, with the pipeline's
environment pointed at the test API and S3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_prefect import pipeline_variables

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    from avatarflow.local.prefect_server import start_prefect, stop_prefect

    home = tmp_path_factory.mktemp("prefect-server-home")
    saved = os.environ.get("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS")
    os.environ["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "2"
    try:
        server = start_prefect(home, timeout=120)
    finally:
        if saved is None:
            os.environ.pop("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS")
    yield server
    stop_prefect(home)


def pipeline_environment(local_api, s3_settings, prefix: str, api_url: str, home: Path) -> dict[str, str]:
    return {
        **os.environ,
        **pipeline_variables(local_api, s3_settings, prefix),
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_WORKER_QUERY_SECONDS": "2",
    }


@pytest.fixture(scope="session")
def deployed(prefect_server, local_api, s3_settings, tmp_path_factory):
    """`avatarflow deploy` against the server, then a process worker; yields the environment."""
    home = tmp_path_factory.mktemp("prefect-client-home")
    env = pipeline_environment(local_api, s3_settings, "deployments", prefect_server.api_url, home)
    cli = str(Path(sys.executable).with_name("avatarflow"))
    done = subprocess.run([cli, "deploy", "--rate-limit", "600"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    log = open(home / "worker.log", "wb")
    worker = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", "avatarflow-process"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    yield {"env": env, "deploy_output": done.stdout, "worker_log": home / "worker.log"}
    for sig in (signal.SIGINT, signal.SIGINT, signal.SIGKILL):
        if worker.poll() is not None:
            break
        os.killpg(worker.pid, sig)
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            pass
