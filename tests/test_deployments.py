"""Deployments against a real `prefect server start` and a process worker: deploy, run with
parameters through the API, trigger by event, cron schedule, artifacts read back."""

from __future__ import annotations

import time
import uuid

import httpx

from tests.fixtures_prefect_server import ROOT, deployed, prefect_server  # noqa: F401

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _deployment(url: str, name: str) -> dict:
    r = httpx.get(f"{url}/deployments/name/{name}", timeout=30)
    r.raise_for_status()
    return r.json()


def _wait_run(url: str, run_id: str, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        run = httpx.get(f"{url}/flow_runs/{run_id}", timeout=30).json()
        if run["state_type"] in FINAL:
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not final after {timeout} s: {run['state_type']}")


def _runs_of(url: str, deployment_id: str) -> list[dict]:
    body = {"deployments": {"id": {"any_": [deployment_id]}}, "limit": 50}
    return httpx.post(f"{url}/flow_runs/filter", json=body, timeout=30).json()


def test_deploy_run_trigger_schedule_and_artifacts(prefect_server, deployed, portrait_path, s3, s3_bucket):  # noqa: F811
    url = prefect_server.api_url
    on_demand = _deployment(url, "avatar_video/on-demand")
    batch = _deployment(url, "avatar_batch/content-calendar")
    uploaded = _deployment(url, "avatar_video/on-portrait-uploaded")
    schema = on_demand["parameter_openapi_schema"]
    assert "request" in schema["properties"]

    # run a deployment with parameters through the API
    params = {"request": {"image": str(portrait_path), "voice_script": "Deployed and running.", "seed": 8080,
                          "expected_seconds": 3}}
    run = httpx.post(f"{url}/deployments/{on_demand['id']}/create_flow_run",
                     json={"parameters": params}, timeout=30).json()

    # emit the event: a portrait landed in S3
    key = f"uploads/{uuid.uuid4().hex}.jpg"
    s3.put_object(Bucket=s3_bucket, Key=key, Body=portrait_path.read_bytes(), ContentType="image/jpeg")
    event = {"id": str(uuid.uuid4()), "occurred": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "event": "avatarflow.portrait.uploaded",
             "resource": {"prefect.resource.id": f"s3://{s3_bucket}/{key}"},
             "payload": {"voice_script": "A portrait arrived."}}
    httpx.post(f"{url}/events", json=[event], timeout=30).raise_for_status()

    finished = _wait_run(url, run["id"])
    assert finished["state_type"] == "COMPLETED", deployed["worker_log"].read_text()[-3000:]

    deadline = time.time() + 120
    triggered = []
    while time.time() < deadline and not triggered:
        triggered = _runs_of(url, uploaded["id"])
        time.sleep(1)
    assert triggered, "the event started no run"
    t = _wait_run(url, triggered[0]["id"])
    assert t["state_type"] == "COMPLETED", deployed["worker_log"].read_text()[-3000:]
    assert t["parameters"]["request"]["image"] == f"s3://{s3_bucket}/{key}"

    # the cron schedule creates runs
    deadline = time.time() + 60
    scheduled = []
    while time.time() < deadline and not scheduled:
        scheduled = [r for r in _runs_of(url, batch["id"]) if r["state_type"] == "SCHEDULED"]
        time.sleep(1)
    assert scheduled and all(r["expected_start_time"][11:16] == "06:00" for r in scheduled)

    # artifacts of the on-demand run read back
    arts = httpx.post(f"{url}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}},
                      timeout=30).json()
    kinds = {a["type"] for a in arts}
    assert "markdown" in kinds and any("s3://" in str(a["data"]) for a in arts)
