"""`avatarflow demo` (what `make demo` runs) on a fresh home: local S3 + local API + the flow in
Prefect's ephemeral mode; the MP4 it leaves is decoded and checked against the speech."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from avatarflow import contract
from avatarflow.media.video import probe_video
from avatarflow.local.render.tts import synthesize

ROOT = Path(__file__).resolve().parents[2]


def test_demo_makes_a_playable_mp4_as_long_as_the_speech(tmp_path):
    home = tmp_path / "home"
    out = tmp_path / "demo.mp4"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEGMIND_", "AVATARFLOW_", "PREFECT_API"))}
    env.update(AVATARFLOW_HOME=str(home), PREFECT_HOME=str(tmp_path / "prefect"))
    cli = str(Path(sys.executable).with_name("avatarflow"))
    try:
        done = subprocess.run([cli, "demo", "--output", str(out)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=400)
    finally:
        subprocess.run([cli, "local", "down"], cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "s3_uri:        s3://avatarflow/videos/" in done.stdout and f"local copy:    {out}" in done.stdout
    probe = probe_video(out)
    assert probe.has_video and probe.has_audio
    assert (probe.width, probe.height) == contract.RESOLUTION_SIZE[contract.DEFAULT_RESOLUTION]
    speech = synthesize(contract.DEFAULT_VOICE_SCRIPT, contract.DEFAULT_VOICE, contract.DEFAULT_VOICE_LANGUAGE,
                        contract.DEFAULT_VOICE_PROMPT)
    assert abs(probe.duration_s - speech.duration_s) <= 0.2
    assert abs(probe.audio_duration_s - speech.duration_s) <= 0.2
