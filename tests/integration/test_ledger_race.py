"""The ledger on real parts: processes race for one fingerprint through the real SeaweedFS and
the real local API over HTTP, with slot waits longer than the lease, slow POST answers and a
holder killed mid-POST. Exactly one job is created every time (the server's own job count)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from avatarflow.local.services.common import signal_group

ROOT = Path(__file__).resolve().parents[2]
LEASE_S = 1.5


@pytest.fixture
def race_config(api, s3_settings, s3_prefix, portrait_bytes):
    def config(**kw) -> dict:
        return {
            **{k: s3_settings[k] for k in ("endpoint_url", "access_key", "secret_key", "bucket")},
            "prefix": s3_prefix, "base_url": api.base_url, "api_key": api.api_key, "lease_seconds": LEASE_S,
            "image": "data:image/jpeg;base64," + base64.b64encode(portrait_bytes).decode(),
            "fingerprint": uuid.uuid4().hex, "seed": 11, "slot_wait_s": 0.0, **kw,
        }

    return config


def start(cfg: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.ledger_racer", json.dumps(cfg)], cwd=ROOT, env=dict(os.environ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def answer(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])["request_id"]


def jobs(api) -> int:
    return len(api.stats()["jobs"])


@pytest.mark.parametrize("trial", range(3))
def test_racers_with_slot_waits_longer_than_the_lease_and_slow_answers_post_once(api, race_config, trial):
    api.set_faults({"submit_delay": 2 * LEASE_S})
    before = jobs(api)
    base = race_config(seed=100 + trial)
    procs = [start({**base, "slot_wait_s": 2 * LEASE_S if i < 2 else 0.0}) for i in range(5)]
    ids = {answer(p) for p in procs}
    assert jobs(api) == before + 1, "one fingerprint, one job"
    assert len(ids) == 1


def test_a_holder_killed_mid_post_is_adopted_not_reposted(api, race_config, s3, s3_settings):
    api.set_faults({"submit_delay": 30})
    cfg = race_config(seed=200)
    key = f"{cfg['prefix']}/ledger/{cfg['fingerprint']}.json"
    before = jobs(api)
    holder = start(cfg)
    try:
        deadline = time.time() + 60
        while jobs(api) == before and time.time() < deadline:
            time.sleep(0.1)
        assert jobs(api) == before + 1, "the holder's POST never reached the server"
        assert json.loads(s3.get_object(Bucket=s3_settings["bucket"], Key=key)["Body"].read())["state"] == "posting"
    finally:
        signal_group(holder)  # SIGKILL mid-POST: the machine died
    api.set_faults({"submit_delay": 0})
    ids = {answer(p) for p in [start(cfg) for _ in range(3)]}
    assert jobs(api) == before + 1, "the job the killed holder made must be adopted"
    assert len(ids) == 1
    entry = json.loads(s3.get_object(Bucket=s3_settings["bucket"], Key=key)["Body"].read())
    assert entry["state"] == "submitted" and entry["request_id"] in ids
