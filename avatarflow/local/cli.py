"""`avatarflow local ...`: the local API server (and, mounted by the main CLI, up/down/status)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import typer

local_app = typer.Typer(help="Local services: the p-video-avatar API and S3 on loopback.", no_args_is_help=True)


@local_app.callback()
def _group() -> None:
    """Local services: the p-video-avatar API and S3 on loopback."""


@local_app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Loopback address to bind."),
    port: int = typer.Option(8787, help="Port."),
    api_key: list[str] = typer.Option([], help="A key the server accepts (repeatable); also AVATARFLOW_LOCAL_API_KEY."),
    data_dir: Optional[Path] = typer.Option(None, help="Where outputs are written (default: a temporary directory)."),
    workers: int = typer.Option(2, help="Jobs rendered at once."),
    retention: float = typer.Option(3600.0, help="Seconds a request record lives (then 404)."),
    min_processing_time: float = typer.Option(0.0, help="A job stays PROCESSING at least this long."),
    rate_limit: int = typer.Option(0, help="Requests per minute per key (0: off)."),
    credits: float = typer.Option(100.0, help="Starting balance reported as remaining_credits."),
    faults: Optional[str] = typer.Option(None, help="Fault injection as JSON (see avatarflow.local.chaos)."),
) -> None:
    """Serve the Segmind-compatible p-video-avatar API on loopback."""
    import json

    from avatarflow.local.api import ServerConfig, serve as run
    from avatarflow.local.chaos import Faults, Settings

    keys = list(api_key) + [k for k in os.environ.get("AVATARFLOW_LOCAL_API_KEY", "").split(",") if k]
    config = ServerConfig(
        data_dir=data_dir or Path(tempfile.mkdtemp(prefix="avatarflow-api-")),
        api_keys=keys,
        workers=workers,
        settings=Settings(min_processing_time=min_processing_time, rate_limit=rate_limit, retention=retention),
        faults=Faults.model_validate(json.loads(faults)) if faults else Faults(),
        credits=credits,
    )
    try:
        run(host, port, config)
    except ValueError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    local_app()
