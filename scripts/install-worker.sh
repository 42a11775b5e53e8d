#!/usr/bin/env bash
# Install avatarflow into the Python environment of a worker: the wheel, its locked dependencies,
# and mediapipe without its heavy extras (the local engine's face mesh; see stack notes).
# Used by deployments/Dockerfile and by tests/integration/test_wheel.py, so the image runs what the test runs.
#   scripts/install-worker.sh PYTHON WHEEL [CONSTRAINTS]
set -euo pipefail
python=${1:?python executable}
wheel=${2:?path of the avatarflow wheel}
constraints=${3:-}
pip=("$python" -m pip --disable-pip-version-check -q)
if [ -n "$constraints" ]; then
  "${pip[@]}" install -c "$constraints" "$wheel"
else
  "${pip[@]}" install "$wheel"
fi
"${pip[@]}" install --no-deps "mediapipe==0.10.21"
"$python" -I -c "import avatarflow.flows.avatar_video, mediapipe"  # -I: not a checkout in the cwd
