"""Operations commands, mounted on the `avatarflow` CLI by `register(app, local_app)`:

    avatarflow batch CALENDAR [--today YYYY-MM-DD] [--budget USD] [--all-rows] [--json]
    avatarflow emit portrait-uploaded s3://bucket/key [--voice-script ...]
    avatarflow deploy [--rate-limit 50] [--burst N]
    avatarflow local prefect-up [--port N] / prefect-down / prefect-status

The Prefect server is the one of PREFECT_API_URL, else the local one of `avatarflow local
prefect-up` (its address in the avatarflow home)."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from avatarflow import contract

WORK_POOL = "avatarflow-process"
RATE_LIMIT_NAME = "avatarflow-api"
RATE_LIMIT_PER_MINUTE = 50
PORTRAIT_UPLOADED = "avatarflow.portrait.uploaded"
EVENTS = {"portrait-uploaded": PORTRAIT_UPLOADED}
PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = PROJECT_ROOT / "deployments" / "prefect.yaml"


# --- library: usable without the CLI --------------------------------------------------------

def api_url() -> str:
    """PREFECT_API_URL, else the running local server of `avatarflow local prefect-up`."""
    from avatarflow.config import prefect_api_url

    url = prefect_api_url()
    if url:
        return url
    from avatarflow.local.prefect_server import prefect_status

    server, alive = prefect_status()
    if not alive or server is None:
        raise RuntimeError(
            "no Prefect server: set PREFECT_API_URL, or start one with `avatarflow local prefect-up`")
    return server.api_url


def client_settings(url: str) -> dict[Any, str]:
    """Prefect settings of a client of the server at `url`: the URL and, for the local server
    (or from PREFECT_API_AUTH_STRING), its auth string."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    from avatarflow.local.prefect_server import client_auth

    auth = client_auth(url)
    return {PREFECT_API_URL: url, **({PREFECT_API_AUTH_STRING: auth} if auth else {})}


def rate_limit_slots(per_minute: int, burst: int | None = None) -> tuple[int, float]:
    """(limit, slot_decay_per_second) of a global concurrency limit that lets at most
    `per_minute` requests through in ANY 60 s window.

    A limit with slot decay is a token bucket: `limit` slots taken at once (the burst), freed at
    `slot_decay_per_second`. A 60 s window can see the burst plus a minute of decay, so the two
    share the budget: burst + 60 x decay = per_minute (default burst: a fifth of it)."""
    if per_minute < 1:
        raise ValueError(f"rate_limit={per_minute} is not allowed; allowed: 1 or more requests per minute")
    burst = max(1, per_minute // 5) if burst is None else burst
    if not 1 <= burst <= per_minute:
        raise ValueError(f"burst={burst} is not allowed; allowed: 1 to {per_minute}")
    if burst == per_minute:  # all of it at once, then a minute to refill: per_minute per minute on average
        return burst, per_minute / 60.0
    return burst, (per_minute - burst) / 60.0


async def ensure_rate_limit(per_minute: int = RATE_LIMIT_PER_MINUTE, burst: int | None = None,
                            name: str = RATE_LIMIT_NAME) -> dict[str, Any]:
    """Create or update the global concurrency limit `name` with slot decay (Prefect client)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    limit, decay = rate_limit_slots(per_minute, burst)
    async with get_client() as client:
        try:
            await client.read_global_concurrency_limit_by_name(name)
            await client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=limit, slot_decay_per_second=decay, active=True))
        except ObjectNotFound:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit, slot_decay_per_second=decay, active=True))
        got = await client.read_global_concurrency_limit_by_name(name)
    return {"name": got.name, "limit": got.limit, "slot_decay_per_second": got.slot_decay_per_second,
            "per_minute": per_minute}


async def ensure_work_pool(name: str = WORK_POOL) -> bool:
    """The process work pool; True when it was created now."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    async with get_client() as client:
        try:
            await client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True
        except ObjectAlreadyExists:
            return False


def deploy_all(url: str, prefect_file: Path = PREFECT_FILE) -> str:
    """`prefect --no-prompt deploy --all` from the project root; its output."""
    env = {**os.environ, **{s.name: v for s, v in client_settings(url).items()}, "COLUMNS": "200"}
    prefect = str(Path(sys.executable).with_name("prefect"))
    proc = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0 or "successfully created" not in re.sub(r"[\s│]+", " ", proc.stdout):
        raise RuntimeError(f"prefect deploy failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def portrait_uploaded_event(s3_uri: str, request: dict[str, Any] | None = None) -> Any:
    """The `avatarflow.portrait.uploaded` event: resource id and label `avatarflow.s3_uri` are the
    portrait's URI; payload.request the other request fields (checked against the contract)."""
    from prefect.events import Event

    from avatarflow.spec import parse_video_request

    if not s3_uri.startswith("s3://") or "/" not in s3_uri[5:]:
        raise ValueError(f"resource={s3_uri!r} is not an s3:// URI; allowed: s3://bucket/key")
    fields = {k: v for k, v in (request or {}).items() if v is not None}
    parse_video_request({**fields, "image": s3_uri})  # a bad field fails here, not in the run
    return Event(event=PORTRAIT_UPLOADED, resource={"prefect.resource.id": s3_uri, "avatarflow.s3_uri": s3_uri},
                 payload={"request": fields})


async def emit(event: Any) -> None:
    """Send one event through Prefect's events API (the server's /events/in websocket)."""
    from prefect.events.clients import get_events_client

    async with get_events_client() as client:
        await client.emit(event)


def run_batch(calendar: str, *, local_roots: Any = (), **kw: Any) -> dict[str, Any]:
    """The avatar_batch flow, here (Prefect's ephemeral mode, or the server of PREFECT_API_URL).
    `local_roots`: directories whose files the rows may name by path, for this in-process run
    only (the CLI's widening of the source policy; never a flow parameter)."""
    from avatarflow.sources import cli_local_roots

    flow = importlib.import_module("flows.avatar_batch").avatar_batch
    with cli_local_roots(*local_roots):
        return asyncio.run(flow(calendar=calendar, **kw))


# --- the commands ----------------------------------------------------------------------------

def _safe(fn: Callable[[], Any]) -> Any:
    from avatarflow.errors import AvatarflowError
    from avatarflow.config import NotConfigured
    from avatarflow.media import MediaError

    try:
        return fn()
    except (contract.ContractError, MediaError, AvatarflowError, NotConfigured, ValueError, RuntimeError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None


def _day(value: Optional[str]) -> Optional[date]:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"--today={value!r} is not a date; allowed: YYYY-MM-DD") from None


def batch(
    calendar: str = typer.Argument(..., help="CSV or JSONL content calendar: a local path, URL or s3:// URI."),
    today: Optional[str] = typer.Option(None, help="The day whose rows to make, YYYY-MM-DD (default: today, UTC)."),
    budget: Optional[float] = typer.Option(None, help="USD: stop submitting before the next job's estimate would pass it."),
    all_rows: bool = typer.Option(False, "--all-rows", help="Every row, whatever its publish_date."),
    rate_limit: Optional[str] = typer.Option(
        RATE_LIMIT_NAME, help="Prefect global concurrency limit (slot decay) each API request takes a slot of; "
                              "'' for none. Ignored where it does not exist."),
    backend: Optional[str] = typer.Option(None, help="segmind or local (default: segmind if SEGMIND_API_KEY is set)."),
    max_concurrency: int = typer.Option(32, help="Child runs in flight at once."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole result as JSON."),
) -> None:
    """Make a content calendar's rows due today, each a child run of avatar_video; print every
    row's outcome and where the manifest is (batches/<run id>/manifest.csv|json in the archive)."""
    from avatarflow.cli import cli_roots

    day = _day(today)
    roots = cli_roots(calendar)  # the working directory and the calendar's own directory
    out = _safe(lambda: run_batch(calendar, today=day, budget=budget, all_rows=all_rows,
                                  rate_limit=rate_limit or None, backend=backend, max_concurrency=max_concurrency,
                                  local_roots=roots))
    if as_json:
        typer.echo(json.dumps(out, indent=2, default=str))
    else:
        for e in out["entries"]:
            typer.echo(f"line {e['line']:>4}  {e['status']:9}  {e['s3_uri'] or e['error'] or ''}")
        typer.echo(f"{out['day']}: {out['completed']} completed, {out['failed']} failed, {out['skipped']} skipped; "
                   f"spent ${out['spent']:.3f}")
        typer.echo(f"manifest: {out['manifest_csv']}  {out['manifest_json']}")
    if out["failed"]:
        raise typer.Exit(1)


def emit_command(
    event: str = typer.Argument(..., help="The event: portrait-uploaded."),
    s3_uri: str = typer.Argument(..., help="The portrait's s3:// URI (the event's resource)."),
    voice_script: Optional[str] = typer.Option(None, help="What the avatar says (default: the API's)."),
    voice: Optional[str] = typer.Option(None, help=f"One of the {len(contract.VOICES)} voices, e.g. 'Kore (Female)'."),
    voice_language: Optional[str] = typer.Option(None, help="e.g. 'English (US)'."),
    resolution: Optional[str] = typer.Option(None, help="720p or 1080p."),
    seed: Optional[int] = typer.Option(None, help="Seed (none: random)."),
) -> None:
    """Emit an event to the Prefect server through its events API; the deployment
    avatar_video/on-portrait-uploaded makes a video of the portrait."""
    if event not in EVENTS:
        raise typer.BadParameter(f"event={event!r} is not known; allowed: {', '.join(EVENTS)}")
    request = {"voice_script": voice_script, "voice": voice, "voice_language": voice_language,
               "resolution": resolution, "seed": seed}

    def send() -> Any:
        from prefect.settings import temporary_settings

        ev = portrait_uploaded_event(s3_uri, request)
        with temporary_settings(client_settings(api_url())):
            asyncio.run(emit(ev))
        return ev

    sent = _safe(send)
    typer.echo(f"emitted {sent.event} {sent.id} for {s3_uri}")


def deploy(
    rate_limit: int = typer.Option(RATE_LIMIT_PER_MINUTE, help="The account's API requests per minute (vendor pro plan: 50)."),
    burst: Optional[int] = typer.Option(None, help="Requests allowed at once (default: a fifth of --rate-limit)."),
    backend: Optional[str] = typer.Option(None, help="Backend whose credentials the blocks hold (segmind or local)."),
    blocks: bool = typer.Option(True, "--blocks/--no-blocks", help="Register the blocks."),
) -> None:
    """Register the blocks, the rate limit (global concurrency limit `avatarflow-api` with slot
    decay: --rate-limit requests in any minute), the process work pool `avatarflow-process`, and
    every deployment of prefect.yaml (`prefect --no-prompt deploy --all` from the project root)."""
    from prefect.settings import temporary_settings

    url = _safe(api_url)
    with temporary_settings(client_settings(url)):
        if blocks:
            from avatarflow.config import api_settings, archive_settings

            register = importlib.import_module("blocks.register").register_blocks
            for name in _safe(lambda: register(api_settings(backend), archive_settings())):
                typer.echo(f"block       {name}")
        limit = _safe(lambda: asyncio.run(ensure_rate_limit(rate_limit, burst)))
        typer.echo(f"rate limit  {limit['name']}: {limit['per_minute']}/min in any minute "
                   f"(limit {limit['limit']}, slot decay {limit['slot_decay_per_second']:.3f}/s)")
        created = asyncio.run(ensure_work_pool())
        typer.echo(f"work pool   {WORK_POOL}{' (created)' if created else ''}")
    out = _safe(lambda: deploy_all(url))
    for name in re.findall(r"Deployment '([^']+)' successfully created", re.sub(r"[\s│]+", " ", out)):
        typer.echo(f"deployment  {name}")
    typer.echo(f"worker:     PREFECT_API_URL={url} PREFECT_API_AUTH_STRING=... prefect worker start --pool {WORK_POOL}")


def prefect_up(
    port: Optional[int] = typer.Option(None, help="Port on 127.0.0.1 (default: a free one)."),
) -> None:
    """Start (or reuse) a Prefect server (SQLite, state under the avatarflow home) on loopback."""
    from avatarflow.local.prefect_server import start_prefect

    server = _safe(lambda: start_prefect(port=port))
    typer.echo(f"prefect up  {server.api_url}  pid={server.pid}")
    typer.echo(f"Prefect UI: {server.ui_url}")
    typer.echo(f"export PREFECT_API_URL={server.api_url}")
    typer.echo(f"export PREFECT_API_AUTH_STRING=...   # the server's auth string: \"prefect_auth_string\" in "
               f"{server.home}/secrets.json (mode 0600); clients without it get 401")


def prefect_down() -> None:
    """Stop the local Prefect server."""
    from avatarflow.local.prefect_server import stop_prefect

    stopped = stop_prefect()
    typer.echo("prefect stopped" if stopped else "prefect was not running")


def prefect_status_command() -> None:
    """Whether the local Prefect server runs and answers."""
    from avatarflow.local.prefect_server import prefect_status

    server, alive = prefect_status()
    if server is None:
        typer.echo("prefect none")
    else:
        typer.echo(f"prefect {'up' if alive else 'down':5} {server.api_url}  pid={server.pid}")


def register(app: typer.Typer, local_app: typer.Typer) -> None:
    """Mount the operations commands: batch, emit, deploy on `app`; prefect-up/-down/-status on
    `local_app`."""
    app.command("batch")(batch)
    app.command("emit")(emit_command)
    app.command("deploy")(deploy)
    local_app.command("prefect-up")(prefect_up)
    local_app.command("prefect-down")(prefect_down)
    local_app.command("prefect-status")(prefect_status_command)


def main() -> None:  # pragma: no cover - `python -m avatarflow.ops_cli ...`, before the CLI mounts it
    app = typer.Typer(help="avatarflow operations: batch, emit, deploy.", no_args_is_help=True)
    local_app = typer.Typer(help="Local Prefect server.", no_args_is_help=True)
    app.add_typer(local_app, name="local")
    register(app, local_app)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
