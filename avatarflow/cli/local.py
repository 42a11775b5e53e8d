"""`avatarflow local ...`: the local services (S3, the local API, Prefect on PostgreSQL) and the
local API server itself (`local serve`; its start-up is avatarflow.local.server.serve.serve_local)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from avatarflow.cli.errors import guard
from avatarflow.cli.run import print_services

local_app = typer.Typer(help="Local services: the p-video-avatar API, S3 and Prefect on loopback.",
                        no_args_is_help=True)


@local_app.command("up")
def local_up(
    api: bool = typer.Option(True, "--api/--no-api", help="Also start the local p-video-avatar API."),
    with_prefect: bool = typer.Option(False, "--with-prefect",
                                      help="Also start a Prefect server (on its own PostgreSQL) and its UI."),
) -> None:
    """Start (or reuse) the local S3 (SeaweedFS), the local API and, if asked, a Prefect server on
    PostgreSQL."""
    from avatarflow.local.services import stack

    print_services(guard(lambda: stack.up(with_api=api)))
    if with_prefect:
        from avatarflow.local.services.prefect_server import start_prefect

        server = guard(start_prefect)
        typer.echo(f"prefect up    {server.api_url}  pid={server.pid}  database={server.database}")
        typer.echo(f"Prefect UI: {server.ui_url}   (export PREFECT_API_URL={server.api_url})")


@local_app.command("down")
def local_down() -> None:
    """Stop the local services (and the local Prefect server and its PostgreSQL, if they run)."""
    from avatarflow.local.services import stack
    from avatarflow.local.services.prefect_server import stop_prefect

    stop_prefect()
    stack.down()
    typer.echo("stopped")


@local_app.command("status")
def local_status() -> None:
    """Show the local services and whether they answer."""
    from avatarflow.local.services import stack
    from avatarflow.local.services.prefect_server import prefect_status

    print_services(stack.status())
    server, alive = prefect_status()
    if server:
        typer.echo(f"prefect {'up' if alive else 'down':5} {server.api_url}  pid={server.pid}  database={server.database}")


@local_app.command("prefect-up")
def prefect_up(
    port: Optional[int] = typer.Option(None, help="Port on 127.0.0.1 (default: the last one, else a free one)."),
) -> None:
    """Start (or reuse) a Prefect server on loopback, on its own PostgreSQL (state under the
    avatarflow home)."""
    from avatarflow.local.services.prefect_server import start_prefect

    server = guard(lambda: start_prefect(port=port))
    typer.echo(f"prefect up  {server.api_url}  pid={server.pid}  database={server.database}")
    typer.echo(f"Prefect UI: {server.ui_url}")
    typer.echo(f"export PREFECT_API_URL={server.api_url}")
    typer.echo(f"export PREFECT_API_AUTH_STRING=...   # the server's auth string: \"prefect_auth_string\" in "
               f"{server.home}/secrets.json (mode 0600); clients without it get 401")


@local_app.command("prefect-down")
def prefect_down() -> None:
    """Stop the local Prefect server and its PostgreSQL."""
    from avatarflow.local.services.prefect_server import stop_prefect

    stopped = stop_prefect()
    typer.echo("prefect stopped" if stopped else "prefect was not running")


@local_app.command("prefect-status")
def prefect_status_command() -> None:
    """Whether the local Prefect server runs and answers."""
    from avatarflow.local.services.prefect_server import prefect_status

    server, alive = prefect_status()
    if server is None:
        typer.echo("prefect none")
    else:
        typer.echo(f"prefect {'up' if alive else 'down':5} {server.api_url}  pid={server.pid}")


@local_app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Loopback address to bind (anything else is refused)."),
    port: int = typer.Option(8787, help="Port."),
    api_key: list[str] = typer.Option([], help="A key the server accepts (repeatable); also AVATARFLOW_LOCAL_API_KEY (comma-separated)."),
    admin_key: list[str] = typer.Option([], help="A key for /_local/* only (repeatable); also AVATARFLOW_LOCAL_ADMIN_KEY (comma-separated). None: /_local/* takes the API keys."),
    data_dir: Optional[Path] = typer.Option(None, help="Where outputs are written (default: a temporary directory)."),
    workers: int = typer.Option(2, min=1, help="Jobs rendered at once."),
    retention: float = typer.Option(3600.0, min=0, help="Seconds a request record lives (then 404); history rows never expire."),
    min_processing_time: float = typer.Option(0.0, min=0, help="A job stays PROCESSING at least this long."),
    timing: str = typer.Option("render", help="Job times: 'render' (as long as the render takes) or 'vendor' (queue wait + cost per output second x length, seeded jitter; --min-processing-time ignored)."),
    queue_wait: float = typer.Option(3.0, min=0, help="--timing vendor: mean seconds a job stays QUEUED."),
    queue_jitter: float = typer.Option(1.0, min=0, help="--timing vendor: the queue wait varies uniformly by +- this many seconds."),
    cost_per_second: list[str] = typer.Option([], help="--timing vendor: processing seconds per output second, RES=S (default 720p=3.0, 1080p=5.4); repeatable."),
    timing_jitter: float = typer.Option(0.01, min=0, max=0.3, help="--timing vendor: relative standard deviation of the processing time."),
    timing_seed: int = typer.Option(0, help="--timing vendor: seed of the jitter (with each request's body)."),
    requests_per_minute: int = typer.Option(0, min=0, help="Requests per minute per key, then 429 (0: off)."),
    credits: float = typer.Option(100.0, help="Starting balance reported as remaining_credits."),
    faults: Optional[str] = typer.Option(None, help="Fault injection as a JSON object, or @file.json (schema: avatarflow.local.server.chaos)."),
    fault: list[str] = typer.Option([], help="One fault rate, ENDPOINT.KIND=RATE (e.g. status.500=0.1, submit.drop=0.05); repeatable."),
    fail_rate: Optional[float] = typer.Option(None, help="Share of jobs that end FAILED ('local: injected failure')."),
    submit_drop_after_accept: Optional[float] = typer.Option(None, help="Share of submits queued whose answer is then cut off."),
    submit_delay: Optional[float] = typer.Option(None, help="Seconds a submit answer is held back (the job is queued at once)."),
    fault_count: Optional[int] = typer.Option(None, help="Only this many injected faults fire, then all clear."),
    retry_after: Optional[float] = typer.Option(None, help="Retry-After seconds of injected 429s."),
) -> None:
    """Serve the Segmind-compatible p-video-avatar API on loopback (fault knobs: see
    avatarflow.local.server.serve)."""
    from avatarflow.local.server.serve import serve_local

    guard(lambda: serve_local(host=host, port=port, api_key=api_key, admin_key=admin_key, data_dir=data_dir, workers=workers, retention=retention, min_processing_time=min_processing_time, timing=timing, queue_wait=queue_wait, queue_jitter=queue_jitter, cost_per_second=cost_per_second, timing_jitter=timing_jitter, timing_seed=timing_seed, requests_per_minute=requests_per_minute, credits=credits, faults=faults, fault=fault, fail_rate=fail_rate, submit_drop_after_accept=submit_drop_after_accept, submit_delay=submit_delay, fault_count=fault_count, retry_after=retry_after))
