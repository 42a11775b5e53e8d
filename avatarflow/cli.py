"""The `avatarflow` command: run, resume, demo, local services, blocks."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from avatarflow import contract

app = typer.Typer(help="Talking-avatar videos through the p-video-avatar API, archived in S3.", no_args_is_help=True)
blocks_app = typer.Typer(help="Prefect blocks: credentials, archive, presets.", no_args_is_help=True)
app.add_typer(blocks_app, name="blocks")

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_PORTRAIT = ASSETS / "portrait.jpg"


def _local_app() -> typer.Typer:
    from avatarflow.local.cli import local_app

    return local_app


local_app = _local_app()
app.add_typer(local_app, name="local", help="Local services: the p-video-avatar API and S3 on loopback.")
importlib.import_module("avatarflow.ops_cli").register(app, local_app)


def load_flow(name: str) -> Any:
    """A flow from flows/ by module name (the library never imports flows/ statically)."""
    return getattr(importlib.import_module(f"flows.{name}"), name)


def _print_services(svcs: Any) -> None:
    if svcs.s3:
        state = "up" if svcs.s3.answering or svcs.s3.running else "down"
        typer.echo(f"s3   {state:5} {svcs.s3.endpoint_url}  bucket={svcs.s3.bucket}  pid={svcs.s3.pid}")
    if svcs.api:
        state = "up" if svcs.api.answering or svcs.api.running else "down"
        typer.echo(f"api  {state:5} {svcs.api.base_url}  pid={svcs.api.pid}")
    typer.echo(f"home {svcs.home}")


@local_app.command("up")
def local_up(
    api: bool = typer.Option(True, "--api/--no-api", help="Also start the local p-video-avatar API."),
    with_prefect: bool = typer.Option(False, "--with-prefect", help="Also start a Prefect server (SQLite) and its UI."),
) -> None:
    """Start (or reuse) the local S3 (SeaweedFS), the local API and, if asked, a Prefect server."""
    from avatarflow.local import services

    _print_services(services.up(with_api=api))
    if with_prefect:
        from avatarflow.local.prefect_server import start_prefect

        server = start_prefect()
        typer.echo(f"prefect up    {server.api_url}  pid={server.pid}")
        typer.echo(f"Prefect UI: {server.ui_url}   (export PREFECT_API_URL={server.api_url})")


@local_app.command("down")
def local_down() -> None:
    """Stop the local services (and the local Prefect server, if one runs)."""
    from avatarflow.local import services
    from avatarflow.local.prefect_server import stop_prefect

    stop_prefect()
    services.down()
    typer.echo("stopped")


@local_app.command("status")
def local_status() -> None:
    """Show the local services and whether they answer."""
    from avatarflow.local import services
    from avatarflow.local.prefect_server import prefect_status

    _print_services(services.status())
    server, alive = prefect_status()
    if server:
        typer.echo(f"prefect {'up' if alive else 'down':5} {server.api_url}  pid={server.pid}")


def _result_lines(result: dict[str, Any], local_copy: Path | None) -> str:
    lines = [
        f"s3_uri:        {result['s3_uri']}",
        f"presigned_url: {result['presigned_url']}",
        f"manifest:      {result['manifest_uri']}",
        f"request_id:    {result['request_id']}",
        f"seed:          {result['seed']}{' (random)' if result['seed_random'] else ''}",
        f"cache_hit:     {result['cache_hit']}",
        f"cost:          {result.get('cost')}",
    ]
    if local_copy:
        lines.append(f"local copy:    {local_copy}")
    return "\n".join(lines)


def cli_roots(*refs: str | None) -> list[Path]:
    """The local roots the CLI on one's own machine allows for its own run: the working
    directory and the directories of the local files it was given."""
    from avatarflow.sources import scheme_of

    roots = [Path.cwd()]
    for ref in refs:
        if ref and (not scheme_of(ref) or scheme_of(ref) == "file"):
            path = Path(ref.removeprefix("file://")).expanduser()
            roots.append(path.parent if path.is_absolute() else (Path.cwd() / path).parent)
    return roots


def _run_flow(params: dict[str, Any], *, show_progress: bool, local_roots: list[Path] = ()) -> dict[str, Any]:
    """The avatar_video flow in this process; local paths under `local_roots` are allowed for this
    run only (the CLI's own widening of the source policy; never a flow parameter)."""
    from avatarflow.sources import cli_local_roots

    with cli_local_roots(*local_roots):
        return _run_flow_here(params, show_progress=show_progress)


def _run_flow_here(params: dict[str, Any], *, show_progress: bool) -> dict[str, Any]:
    from avatarflow import progress
    from avatarflow.spec import parse_video_request

    request = parse_video_request(params.pop("request"))
    flow = load_flow("avatar_video")
    if not show_progress:
        return asyncio.run(flow(request=request, **params))
    from rich.console import Console

    console = Console(stderr=True)
    started = time.monotonic()
    with console.status("preparing...") as status:
        unsubscribe = progress.subscribe(
            lambda e: status.update(f"request {e.request_id}: {e.status} after {e.elapsed_s:.0f} s (poll {e.polls})")
        )
        try:
            return asyncio.run(flow(request=request, **params))
        finally:
            unsubscribe()
            console.print(f"done in {time.monotonic() - started:.1f} s")


@app.command()
def run(
    image: str = typer.Option(..., help="Portrait: URL, local path, s3:// URI or data: URI."),
    voice_script: Optional[str] = typer.Option(None, help="Text to speak (a Jinja2 template with --field)."),
    audio: Optional[str] = typer.Option(None, help="Recording to lip-sync instead of voice_script."),
    brief: Optional[str] = typer.Option(None, help="What to talk about: an LLM writes the script (instead of --voice-script)."),
    script_model: Optional[str] = typer.Option(None, help=f"LLM slug that writes the script (default {contract.DEFAULT_SCRIPT_MODEL})."),
    target_seconds: Optional[float] = typer.Option(None, help="How long the written script should speak, in seconds (default 30)."),
    tone: Optional[str] = typer.Option(None, help="The written script's tone."),
    audience: Optional[str] = typer.Option(None, help="Who the written script speaks to."),
    call_to_action: Optional[str] = typer.Option(None, help="What the written script asks the viewer to do."),
    voice: Optional[contract.Voice] = typer.Option(None, help="TTS voice."),
    voice_language: Optional[contract.VoiceLanguage] = typer.Option(None, help="Speech language."),
    voice_prompt: Optional[str] = typer.Option(None, help="Tone, pace, emotion."),
    video_prompt: Optional[str] = typer.Option(None, help="Framing, motion, background."),
    negative_prompt: Optional[str] = typer.Option(None, help="What to avoid."),
    strength_negative_prompt: Optional[float] = typer.Option(None, help="0 to 4."),
    resolution: Optional[contract.Resolution] = typer.Option(None, help="720p or 1080p."),
    seed: Optional[int] = typer.Option(None, help="Reuse a seed to repeat a result (and hit the cache)."),
    disable_safety_filter: Optional[bool] = typer.Option(None, "--disable-safety-filter/--enable-safety-filter"),
    disable_prompt_upsampling: Optional[bool] = typer.Option(None, "--disable-prompt-upsampling/--enable-prompt-upsampling"),
    preset: Optional[str] = typer.Option(None, help="Name of an AvatarPreset block."),
    field: list[str] = typer.Option([], help="NAME=VALUE for the voice_script template (repeatable)."),
    expected_seconds: Optional[float] = typer.Option(None, help="Expected processing time (shapes polling)."),
    resubmit_expired: bool = typer.Option(False, help="Pay for a new job if the old one expired with its output."),
    backend: Optional[str] = typer.Option(None, help="segmind or local (default: segmind when SEGMIND_API_KEY is set)."),
    output: Optional[Path] = typer.Option(None, help="Also save a local copy of the MP4 here."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Make one video, archive it in S3, print where it is."""
    given = {
        "image": image, "voice_script": voice_script, "audio": audio, "brief": brief, "script_model": script_model,
        "target_seconds": target_seconds, "tone": tone, "audience": audience, "call_to_action": call_to_action,
        "voice": voice,
        "voice_language": voice_language, "voice_prompt": voice_prompt, "video_prompt": video_prompt,
        "negative_prompt": negative_prompt, "strength_negative_prompt": strength_negative_prompt,
        "resolution": resolution, "seed": seed, "disable_safety_filter": disable_safety_filter,
        "disable_prompt_upsampling": disable_prompt_upsampling, "preset": preset,
        "expected_seconds": expected_seconds, "resubmit_expired": resubmit_expired or None,
    }
    request = {k: v for k, v in given.items() if v is not None}
    if field:
        pairs = [f.split("=", 1) for f in field]
        bad = [f for f, p in zip(field, pairs) if len(p) != 2]
        if bad:
            raise typer.BadParameter(f"--field {bad[0]!r} is not NAME=VALUE")
        request["template_fields"] = dict(pairs)
    roots = cli_roots(image, audio)
    _finish(_safe(lambda: _run_flow({"request": request, "backend": backend}, show_progress=not as_json,
                                    local_roots=roots)), output, as_json)


def _safe(fn: Any) -> Any:
    from avatarflow.contract import ContractError
    from avatarflow.errors import AvatarflowError
    from avatarflow.config import NotConfigured
    from avatarflow.media import MediaError

    try:
        return fn()
    except (ContractError, MediaError, AvatarflowError, NotConfigured, ValueError) as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None


def _finish(result: dict[str, Any], output: Path | None, as_json: bool) -> None:
    from avatarflow.pipeline import download_copy

    local_copy = download_copy(result["presigned_url"], output) if output else None
    if as_json:
        typer.echo(json.dumps({**result, "local_copy": str(local_copy) if local_copy else None}, indent=2))
    else:
        typer.echo(_result_lines(result, local_copy))


@app.command()
def resume(
    request_id: str = typer.Argument(..., help="A request id from an earlier submit."),
    expected_seconds: Optional[float] = typer.Option(None, help="Expected processing time (default: the backend's)."),
    backend: Optional[str] = typer.Option(None),
    output: Optional[Path] = typer.Option(None, help="Also save a local copy here."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Poll a known request until it completes, then archive it (no new submit): runs the
    avatar_resume flow, so the resume is a flow run like any other."""
    flow = load_flow("avatar_resume")
    params = {"request_id": request_id, "backend": backend, "expected_seconds": expected_seconds}
    _finish(_safe(lambda: asyncio.run(flow(**params))), output, as_json)


@app.command()
def demo(
    output: Path = typer.Option(Path("out/demo.mp4"), help="Where to save a local copy."),
    backend: Optional[str] = typer.Option(None, help="segmind (needs SEGMIND_API_KEY) or local."),
) -> None:
    """Start the local services, run avatar_video on the bundled portrait, print where the MP4 is."""
    from avatarflow.local import services

    from avatarflow import config

    chosen = backend or ("segmind" if config.environment().segmind_api_key.get_secret_value() else "local")
    typer.echo("starting local S3" + (" and the local API" if chosen == "local" else "") + " ...")
    _print_services(services.up(with_api=chosen == "local"))
    result = _safe(lambda: _run_flow(
        {"request": {"image": str(DEMO_PORTRAIT), "seed": 42}, "backend": chosen}, show_progress=True,
        local_roots=[ASSETS],
    ))
    _finish(result, output, as_json=False)


@blocks_app.command("register")
def blocks_register(
    prefix: str = typer.Option("avatarflow", help="Name prefix of the block documents."),
    backend: Optional[str] = typer.Option(None),
) -> None:
    """Register the block types and save credentials, archive and a default preset from the
    current settings (environment or local services)."""
    from avatarflow.config import api_settings, archive_settings

    register = importlib.import_module("blocks.register").register_blocks
    for name in register(api_settings(backend), archive_settings(), prefix=prefix):
        typer.echo(f"saved block {name}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
