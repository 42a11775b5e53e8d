"""Screenshot of the Prefect UI's run form for avatar_video/on-demand (headless Chromium): the
`request` form with the voice, voice_language and resolution drop-downs.

Installs nothing. Needs Debian's chromium (`apt-get update && apt-get install -y chromium`) and
a Prefect server with the deployments:

    avatarflow local prefect-up && avatarflow deploy
    .venv/bin/python scripts/ui_screenshot.py [docs/ui-form.png] [--api-url URL]

The server is PREFECT_API_URL's, else the local one of `avatarflow local prefect-up`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx

from avatarflow.deploy import api_url

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = "avatar_video/on-demand"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def form_url(api: str) -> str:
    """The deployment's custom-run page: its parameters as a form."""
    r = httpx.get(f"{api}/deployments/name/{DEPLOYMENT}", timeout=30)
    if r.status_code != 200:
        raise SystemExit(f"no deployment {DEPLOYMENT} on {api} ({r.status_code}): run `avatarflow deploy` first")
    return f"{api.removesuffix('/api')}/deployments/deployment/{r.json()['id']}/run"


def screenshot(url: str, out: Path, *, size: str = "1400,1800", budget_ms: int = 15000) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("chromium not found: apt-get update && apt-get install -y chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ui-shot-") as profile:
        done = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={size}",
             f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url],
            timeout=180, capture_output=True, text=True,
        )
    if done.returncode != 0 or not out.is_file() or out.read_bytes()[:8] != PNG_MAGIC:
        raise SystemExit(f"chromium failed ({done.returncode}):\n{done.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=str(ROOT / "docs" / "ui-form.png"))
    ap.add_argument("--api-url", default=None, help="Prefect API URL (default: PREFECT_API_URL or the local server)")
    ap.add_argument("--window-size", default="1400,1800")
    ap.add_argument("--virtual-time-budget", type=int, default=15000, help="ms of virtual time for the SPA")
    args = ap.parse_args()
    api = (args.api_url or api_url()).rstrip("/")
    url = form_url(api)
    out = Path(args.out).resolve()
    screenshot(url, out, size=args.window_size, budget_ms=args.virtual_time_budget)
    print(f"{url} -> {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
