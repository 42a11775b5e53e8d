"""`avatarflow deploy`, `emit` and `blocks register`: the Prefect side. The set-up itself lives in
avatarflow.deploy (checked through the Prefect client); these commands call it."""

from __future__ import annotations

import asyncio
import importlib
from typing import Any, Optional

import typer

from avatarflow import contract
from avatarflow.cli.errors import guard
from avatarflow.deploy import WORK_POOL
from avatarflow.request_limit import REQUESTS_PER_MINUTE

blocks_app = typer.Typer(help="Prefect blocks: credentials, archive, presets.", no_args_is_help=True)


def deploy(
    requests_per_minute: int = typer.Option(
        REQUESTS_PER_MINUTE, help="The account's API requests per minute (vendor pro plan: 50)."),
    burst: Optional[float] = typer.Option(None, help="Requests allowed at once (default: a twentieth of --requests-per-minute, at least 1 plus half a second of it)."),
    backend: Optional[str] = typer.Option(None, help="Backend whose credentials the blocks hold (segmind or local)."),
    blocks: bool = typer.Option(True, "--blocks/--no-blocks", help="Register the blocks."),
) -> None:
    """Register the blocks, the concurrency limit `avatarflow-api` (slot decay: at most
    --requests-per-minute API requests in any minute, across all workers), the process work pool
    `avatarflow-process`, the crash automation, and every deployment of prefect.yaml; each read
    back through the Prefect client."""
    from avatarflow.deploy import api_url, setup

    register: Any = None
    if blocks:
        def register() -> list[str]:
            from avatarflow.config import api_settings, archive_settings

            return importlib.import_module("avatarflow.blocks.register").register_blocks(api_settings(backend), archive_settings())

    url = guard(api_url)
    guard(lambda: asyncio.run(setup(url, requests_per_minute=requests_per_minute, burst=burst,
                                    register_blocks=register, log=typer.echo)))
    typer.echo(f"worker:     PREFECT_API_URL={url} PREFECT_API_AUTH_STRING=... prefect worker start --pool {WORK_POOL} --limit 5")


def emit(
    event: str = typer.Argument(..., help="The event: portrait-uploaded."),
    s3_uri: str = typer.Argument(..., help="The portrait: s3://bucket/key."),
    voice_script: Optional[str] = typer.Option(None, help="Text to speak."),
    voice: Optional[str] = typer.Option(None, help=f"One of the {len(contract.VOICES)} voices, e.g. 'Kore (Female)'."),
    voice_language: Optional[str] = typer.Option(None, help="e.g. 'English (US)'."),
    resolution: Optional[str] = typer.Option(None, help="720p or 1080p."),
    seed: Optional[int] = typer.Option(None, help="Seed (none: random)."),
) -> None:
    """Emit an event to the Prefect server through its events API; the deployment
    avatar_video/on-portrait-uploaded makes a video of the portrait."""
    from avatarflow.events import EVENTS, portrait_uploaded_event
    from avatarflow.events import emit as send_event

    if event not in EVENTS:
        raise typer.BadParameter(f"event={event!r} is not known; allowed: {', '.join(EVENTS)}")
    request = {"voice_script": voice_script, "voice": voice, "voice_language": voice_language,
               "resolution": resolution, "seed": seed}

    def send() -> Any:
        from prefect.settings import temporary_settings

        from avatarflow.deploy import api_url, client_settings

        ev = portrait_uploaded_event(s3_uri, request)
        with temporary_settings(client_settings(api_url())):
            asyncio.run(send_event(ev))
        return ev

    sent = guard(send)
    typer.echo(f"emitted {sent.event} {sent.id} for {s3_uri}")


@blocks_app.command("register")
def blocks_register(
    prefix: str = typer.Option("avatarflow", help="Name prefix of the block documents."),
    backend: Optional[str] = typer.Option(None),
) -> None:
    """Register the block types and save credentials, archive and a default preset from the
    current settings (environment or local services)."""
    from avatarflow.config import api_settings, archive_settings

    register = importlib.import_module("avatarflow.blocks.register").register_blocks
    for name in guard(lambda: register(api_settings(backend), archive_settings(), prefix=prefix)):
        typer.echo(f"saved block {name}")


def register(app: typer.Typer) -> None:
    app.command()(deploy)
    app.command()(emit)
    app.add_typer(blocks_app, name="blocks")
