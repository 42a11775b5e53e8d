"""The wheel alone: built from a clean clone, installed with the lock into a new virtual
environment outside the repository, and run from a directory with no checkout: the local
services, `avatarflow deploy`, a process worker, and a deployment run whose video is archived.
Also: only the `avatarflow` namespace lands in site-packages, and the same wheel installs beside
another patch release of Prefect (resolved by pip, without the lock)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = "scripts/install-worker.sh"
OTHER_PREFECT = "prefect==3.8.7"  # inside the declared range, not the lock's 3.8.8


def sh(*cmd: str | Path, cwd: Path | None = None, env: dict | None = None, timeout: float = 900) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a clean clone of this repository (what is committed, nothing else)."""
    base = tmp_path_factory.mktemp("wheel")
    sh("git", "clone", "-q", ROOT, base / "clone")
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", base / "dist", base / "clone")
    (built,) = (base / "dist").glob("avatarflow-*.whl")
    return built


def venv(path: Path) -> Path:
    sh(shutil.which("python3") or sys.executable, "-m", "venv", path)
    return path / "bin" / "python"


def clean_env(home: Path, python: Path) -> dict[str, str]:
    """No PYTHONPATH, no checkout on the path, Prefect and the local services of `home`."""
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "AVATARFLOW_", "SEGMIND_", "AWS_", "PYTHON"))}
    return {**keep, "PATH": f"{python.parent}{os.pathsep}{keep.get('PATH', '')}",
            "AVATARFLOW_HOME": str(home / ".avatarflow"), "PREFECT_HOME": str(home / ".prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@pytest.fixture
def open_tmp():
    """A directory others may traverse: as root, the embedded PostgreSQL runs as its own user and
    must reach its binaries in the new environment (pytest's own temporary tree is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="avatarflow-wheel-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_wheel_runs_a_deployment_with_no_checkout(wheel, open_tmp):
    tmp_path = open_tmp
    python = venv(tmp_path / "venv")
    sh("bash", ROOT / INSTALL, python, wheel, ROOT / "constraints.txt")
    files = sh(python, "-m", "pip", "show", "-f", "avatarflow").split("Files:", 1)[1].split()
    tops = {f.split("/")[0] for f in files if not f.startswith("..")}
    assert tops == {"avatarflow", "avatarflow-0.1.0.dist-info"}, tops

    work = tmp_path / "no-checkout"
    work.mkdir()
    env = clean_env(work, python)
    avatarflow = python.parent / "avatarflow"
    try:
        sh(avatarflow, "local", "up", "--with-prefect", cwd=work, env=env)
        state = json.loads((work / ".avatarflow" / "prefect.json").read_text())
        secrets = json.loads((work / ".avatarflow" / "secrets.json").read_text())
        env = {**env, "PREFECT_API_URL": state["api_url"], "PREFECT_API_AUTH_STRING": secrets["prefect_auth_string"]}
        out = sh(avatarflow, "deploy", cwd=work, env=env)
        assert "avatar_video/on-demand" in out
        worker = subprocess.Popen([python.parent / "prefect", "worker", "start", "--pool", "avatarflow-process"],
                                  cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            portrait = base64.b64encode((ROOT / "avatarflow" / "assets" / "portrait.jpg").read_bytes()).decode()
            params = {"request": {"image": f"data:image/jpeg;base64,{portrait}", "voice_script": "No checkout here.",
                                  "seed": 5, "expected_seconds": 3}}
            (work / "params.json").write_text(json.dumps(params))
            script = ("import json, sys\nfrom prefect.deployments import run_deployment\n"
                      "run = run_deployment('avatar_video/on-demand', parameters=json.load(open('params.json')),"
                      " timeout=300)\nprint(json.dumps({'state': run.state.type.value, 'id': str(run.id)}))\n")
            done = json.loads(sh(python, "-I", "-c", script, cwd=work, env=env).strip().splitlines()[-1])
            assert done["state"] == "COMPLETED", done
            # the video is in the local bucket, with its manifest
            check = ("import json\nfrom avatarflow import config\na = config.archive_settings()\n"
                     "s3 = a.s3()\nkeys = [o['Key'] for o in s3.list_objects_v2(Bucket=a.bucket)['Contents']]\n"
                     "print(json.dumps(keys))\n")
            keys = json.loads(sh(python, "-I", "-c", check, cwd=work, env=env).strip().splitlines()[-1])
            assert any(k.endswith("/video.mp4") for k in keys) and any(k.endswith("/manifest.json") for k in keys)
        finally:
            os.killpg(worker.pid, signal.SIGINT)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
    finally:
        subprocess.run([avatarflow, "local", "down"], cwd=work, env=env, capture_output=True, timeout=120)
        time.sleep(0.5)


def test_the_wheel_installs_beside_another_prefect_patch_release(wheel, tmp_path):
    python = venv(tmp_path / "venv")
    sh(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, OTHER_PREFECT, timeout=1500)
    out = sh(python, "-I", "-c", "import prefect, avatarflow.flows.avatar_video, avatarflow.cli; print(prefect.__version__)",
             cwd=tmp_path)
    assert out.strip() == OTHER_PREFECT.split("==")[1]
