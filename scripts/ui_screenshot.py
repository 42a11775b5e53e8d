"""Screenshot of the Prefect UI's run form for avatar_video/on-demand (headless Chromium).

Needs Debian's chromium (`apt-get install -y chromium`) and a Prefect server with the
deployments (`avatarflow local up --with-prefect && avatarflow deploy`).

    .venv/bin/python scripts/ui_screenshot.py [docs/ui-form.png]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from avatarflow import ops


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/ui-form.png").resolve()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    url = ops.api_url()
    deployment = httpx.get(f"{url}/deployments/name/avatar_video/on-demand", timeout=30).json()
    page = f"{url.removesuffix('/api')}/deployments/deployment/{deployment['id']}/run"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1400,2200", "--hide-scrollbars",
             "--virtual-time-budget=20000", f"--screenshot={out}", page],
            check=True, timeout=120, capture_output=True,
        )
    print(f"{page} -> {out}")


if __name__ == "__main__":
    main()
