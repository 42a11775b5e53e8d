"""Deployments against a real `prefect server start` and a process worker: `avatarflow deploy`
(prefect deploy --all over prefect.yaml), a run with parameters through the API, the event
trigger, the cron schedule, the batch deployment over an s3:// calendar, artifacts read back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from tests.fixtures_prefect_server import ROOT, deployed, prefect_server  # noqa: F401

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
AUTH: dict[str, str] = {}  # the server's Authorization header (its auth string), set by the test


def _call(method: str, url: str, **kw) -> httpx.Response:
    """One API call; a 503 (the SQLite server busy: it says so and means "again") is retried."""
    for attempt in range(6):
        r = httpx.request(method, url, timeout=30, headers=AUTH, **kw)
        if r.status_code != 503:
            return r
        time.sleep(1 + attempt)
    return r


def _deployment(url: str, name: str) -> dict:
    r = _call("GET", f"{url}/deployments/name/{name}")
    assert r.status_code == 200, f"{name}: {r.status_code} {r.text[:500]}"
    return r.json()


def _run(url: str, deployment: dict, parameters: dict) -> dict:
    r = _call("POST", f"{url}/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters})
    assert r.status_code == 201, f"{r.status_code} {r.text[:1000]}"
    return r.json()


def _wait_run(url: str, run_id: str, log, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    run = {}
    while time.time() < deadline:
        r = _call("GET", f"{url}/flow_runs/{run_id}")
        if r.status_code != 200:
            time.sleep(1)
            continue
        run = r.json()
        if run["state_type"] in FINAL:
            assert run["state_type"] == "COMPLETED", f"{run['state']}\n{log.read_text()[-4000:]}"
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} not final after {timeout} s: {run.get('state_type')}\n"
                         f"{log.read_text()[-4000:]}")


def _runs_of(url: str, deployment_id: str) -> list[dict]:
    body = {"deployments": {"id": {"any_": [deployment_id]}}, "limit": 50}
    return _call("POST", f"{url}/flow_runs/filter", json=body).json()


def _artifacts(url: str, run_id: str) -> dict[str, dict]:
    """A run's artifacts by key (a link artifact is stored as markdown)."""
    arts = _call("POST", f"{url}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    return {a["key"] or a["id"]: a for a in arts}


def test_deploy_run_trigger_schedule_batch_and_artifacts(
    prefect_server, deployed, portrait_path, s3, s3_bucket  # noqa: F811
):
    url, log = prefect_server.api_url, deployed["worker_log"]
    AUTH.update(prefect_server.headers)
    out = deployed["deploy_output"]
    assert "limit       avatarflow-api: 600/min" in out and "work pool   avatarflow-process" in out, out
    assert "deployment  avatar_watch/bucket-watch" in out and "automation  " in out, out
    gcl = _call("GET", f"{url}/v2/concurrency_limits/avatarflow-api").json()
    # in hundredths of a request (avatarflow.request_limit.SLOTS_PER_REQUEST)
    assert gcl["limit"] + 60 * gcl["slot_decay_per_second"] == pytest.approx(600 * 100)
    on_demand = _deployment(url, "avatar_video/on-demand")
    batch = _deployment(url, "avatar_batch/content-calendar")
    uploaded = _deployment(url, "avatar_video/on-portrait-uploaded")
    # the batch's queue is first in the pool: a requeued batch run is taken before its rows
    queues = {q["name"]: q for q in _call("POST", f"{url}/work_pools/avatarflow-process/queues/filter", json={}).json()}
    assert queues["batch"]["priority"] == 1 and queues["default"]["priority"] > 1, queues
    assert batch["work_queue_name"] == "batch" and on_demand["work_queue_name"] == "default"

    # the UI form: request's voice, voice_language and resolution are enums (drop-downs)
    schema = on_demand["parameter_openapi_schema"]
    props = schema["definitions"]["VideoRequest"]["properties"]
    assert len(props["voice"]["enum"]) == 30 and "Hindi" in props["voice_language"]["enum"]
    assert props["resolution"]["enum"] == ["720p", "1080p"]
    assert on_demand["parameters"] == {"concurrency_limit": "avatarflow-api"}

    # 1. a deployment run with parameters through the API
    run = _run(url, on_demand, {"request": {"image": str(portrait_path), "voice_script": "Deployed and running.",
                                            "voice": "Kore (Female)", "seed": 8080, "expected_seconds": 3}})

    # 2. the event: a portrait landed in S3 (sent by `avatarflow emit`, through the events API)
    key = f"{deployed['prefix']}/uploads/{uuid.uuid4().hex}.jpg"
    s3.put_object(Bucket=s3_bucket, Key=key, Body=portrait_path.read_bytes(), ContentType="image/jpeg")
    sent = subprocess.run(
        [sys.executable, "-m", "avatarflow.cli", "emit", "portrait-uploaded", f"s3://{s3_bucket}/{key}",
         "--voice-script", "A portrait arrived.", "--voice", "Puck (Male)", "--seed", "77"],
        cwd=ROOT, env=deployed["env"], capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0 and "emitted avatarflow.portrait.uploaded" in sent.stdout, sent.stdout + sent.stderr

    # 3. the content calendar in S3, run through the batch deployment
    cal_key = f"{deployed['prefix']}/calendars/{uuid.uuid4().hex}.jsonl"
    rows = [{"image": str(portrait_path), "voice_script": "Batch row.", "seed": 31, "publish_date": "2026-11-24"},
            {"image": str(portrait_path), "voice_script": "Bad voice.", "voice": "Nobody", "publish_date": "2026-11-24"},
            {"image": str(portrait_path), "voice_script": "Not today.", "publish_date": "2026-11-25"}]
    s3.put_object(Bucket=s3_bucket, Key=cal_key, Body="\n".join(json.dumps(r) for r in rows).encode())
    batch_run = _run(url, batch, {"calendar": f"s3://{s3_bucket}/{cal_key}", "today": "2026-11-24"})

    finished = _wait_run(url, run["id"], log)
    assert finished["parameters"]["request"]["voice"] == "Kore (Female)"
    arts = _artifacts(url, run["id"])
    link = next(a for k, a in arts.items() if k.startswith("avatar-") and not k.endswith("-summary"))
    summary = next(a for k, a in arts.items() if k.endswith("-summary"))
    assert f"s3://{s3_bucket}/" in link["data"] and "http" in link["data"]
    assert f"s3://{s3_bucket}/" in summary["data"] and "Kore (Female)" in summary["data"]

    deadline, triggered = time.time() + 120, []
    while time.time() < deadline and not triggered:
        triggered = _runs_of(url, uploaded["id"])
        time.sleep(1)
    assert triggered, "the event started no run"
    t = _wait_run(url, triggered[0]["id"], log)
    assert t["parameters"]["request"] == {"image": f"s3://{s3_bucket}/{key}", "voice_script": "A portrait arrived.",
                                          "voice": "Puck (Male)", "seed": 77}
    assert t["parameters"]["concurrency_limit"] == "avatarflow-api"
    assert any(k.endswith("-summary") for k in _artifacts(url, t["id"]))

    b = _wait_run(url, batch_run["id"], log)
    arts = _artifacts(url, b["id"])
    assert arts["avatar-batch-progress"]["data"] == 100.0
    assert "manifest.csv" in arts["avatar-batch-manifest"]["data"]
    table = arts["avatar-batch-rows"]["data"]
    table = json.loads(table) if isinstance(table, str) else table
    assert [(r["line"], r["status"]) for r in table] == [(1, "completed"), (2, "failed")]
    manifest_key = f"{deployed['prefix']}/batches/{b['id']}/manifest.json"
    manifest = json.loads(s3.get_object(Bucket=s3_bucket, Key=manifest_key)["Body"].read())
    assert manifest["completed"] == 1 and manifest["rows"][0]["s3_uri"].startswith(f"s3://{s3_bucket}/")
    children = _call("POST", f"{url}/flow_runs/filter", json={
        "flow_runs": {"parent_flow_run_id": {"any_": [b["id"]]}}}).json()
    assert children, "a row is a child run of the batch"

    # 4. the cron schedule creates runs (06:00 UTC)
    deadline, scheduled = time.time() + 60, []
    while time.time() < deadline and not scheduled:
        scheduled = [r for r in _runs_of(url, batch["id"]) if r["state_type"] == "SCHEDULED"]
        time.sleep(1)
    assert scheduled and all(r["expected_start_time"][11:16] == "06:00" for r in scheduled)
    assert all(r["parameters"]["calendar"] == "examples/calendar.csv" for r in scheduled)
