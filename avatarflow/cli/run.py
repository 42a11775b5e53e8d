"""`avatarflow run`, `resume`, `demo`, `batch` and `watch`: the pipelines, run in this process
(Prefect's ephemeral mode, or the server of PREFECT_API_URL)."""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import json
import os
import tempfile
import time
import types
import typing
from datetime import date
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from avatarflow.cli.errors import EXIT_BAD_INPUT, EXIT_FAILED, guard
from avatarflow.request_limit import CONCURRENCY_LIMIT

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_PORTRAIT = ASSETS / "portrait.jpg"


def load_flow(name: str) -> Any:
    """A flow from flows/ by module name (the library never imports flows/ statically)."""
    return getattr(importlib.import_module(f"avatarflow.flows.{name}"), name)


def print_services(svcs: Any) -> None:
    if svcs.s3:
        state = "up" if svcs.s3.answering or svcs.s3.running else "down"
        typer.echo(f"s3   {state:5} {svcs.s3.endpoint_url}  bucket={svcs.s3.bucket}  pid={svcs.s3.pid}")
    if svcs.api:
        state = "up" if svcs.api.answering or svcs.api.running else "down"
        typer.echo(f"api  {state:5} {svcs.api.base_url}  pid={svcs.api.pid}")
    typer.echo(f"home {svcs.home}")


def download_copy(url: str, dest: Path) -> Path:
    """A local copy of a (presigned) URL, written beside and renamed into place."""
    import httpx

    from avatarflow.client import DOWNLOAD_CHUNK

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, httpx.stream("GET", url, timeout=60) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                f.write(chunk)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


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
    from avatarflow.media.policy import scheme_of

    roots = [Path.cwd()]
    for ref in refs:
        if ref and (not scheme_of(ref) or scheme_of(ref) == "file"):
            path = Path(ref.removeprefix("file://")).expanduser()
            roots.append(path.parent if path.is_absolute() else (Path.cwd() / path).parent)
    return roots


def _run_flow(params: dict[str, Any], *, show_progress: bool, local_roots: list[Path] = ()) -> dict[str, Any]:
    """The avatar_video flow in this process; local paths under `local_roots` are allowed for this
    run only (the CLI's own widening of the source policy; never a flow parameter)."""
    from avatarflow.media.policy import cli_local_roots

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
        def show(e: Any) -> None:
            status.update(f"request {e.request_id}: {e.status} after {e.elapsed_s:.0f} s (poll {e.polls})")

        try:
            with progress.listening(show):
                return asyncio.run(flow(request=request, **params))
        finally:
            console.print(f"done in {time.monotonic() - started:.1f} s")


# the flags of a bool field whose default is False: "--disable-x/--enable-x" reads better than "--no-disable-x"
_SWITCHES = {"disable_safety_filter": "--disable-safety-filter/--enable-safety-filter",
             "disable_prompt_upsampling": "--disable-prompt-upsampling/--enable-prompt-upsampling"}


def request_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` with an option for each field of the request model, its help the field's
    description; it receives the options given as `request` (a dict). `template_fields` is given
    as `--template-field NAME=VALUE` (repeatable)."""
    from avatarflow.spec import VideoRequest

    fields: list[inspect.Parameter] = []
    for name, info in VideoRequest.model_fields.items():
        if name == "template_fields":
            option = typer.Option([], "--template-field", metavar="NAME=VALUE",
                                  help=f"Repeatable. {info.description}")
            fields.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=list[str]))
            continue
        kind = [info.annotation]
        if typing.get_origin(info.annotation) in (typing.Union, types.UnionType):
            kind = [t for t in typing.get_args(info.annotation) if t is not type(None)]
        shown = None if info.is_required() or info.default in (None, False) else str(info.default)
        decls = [_SWITCHES[name]] if name in _SWITCHES else []
        option = typer.Option(... if info.is_required() else None, *decls, help=info.description,
                              show_default=shown or False)
        annotation = kind[0] if info.is_required() else Optional[kind[0]]
        fields.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "request"]

    @functools.wraps(command)
    def with_request(**options: Any) -> Any:
        request = {f.name: options.pop(f.name) for f in fields}
        pairs = [item.split("=", 1) for item in request.pop("template_fields")]
        if any(len(pair) != 2 for pair in pairs):
            bad = next("=".join(pair) for pair in pairs if len(pair) != 2)
            raise typer.BadParameter(f"--template-field {bad!r} is not NAME=VALUE; allowed: NAME=VALUE")
        request = {k: v for k, v in request.items() if v is not None}
        if pairs:
            request["template_fields"] = dict(pairs)
        return command(request=request, **options)

    params = fields + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    with_request.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    with_request.__annotations__ = {p.name: p.annotation for p in params}
    return with_request


@request_options
def run(
    request: dict[str, Any],
    backend: Optional[str] = typer.Option(None, help="segmind or local (default: segmind when SEGMIND_API_KEY is set)."),
    output: Optional[Path] = typer.Option(None, help="Also save a local copy of the MP4 here."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Make one video, archive it in S3, print where it is."""
    roots = cli_roots(request["image"], request.get("audio"))
    _finish(guard(lambda: _run_flow({"request": request, "backend": backend}, show_progress=not as_json,
                                    local_roots=roots)), output, as_json)


def _finish(result: dict[str, Any], output: Path | None, as_json: bool) -> None:
    local_copy = download_copy(result["presigned_url"], output) if output else None
    if as_json:
        typer.echo(json.dumps({**result, "local_copy": str(local_copy) if local_copy else None}, indent=2))
    else:
        typer.echo(_result_lines(result, local_copy))


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
    _finish(guard(lambda: asyncio.run(flow(**params))), output, as_json)


def demo(
    output: Path = typer.Option(Path("out/demo.mp4"), help="Where to save a local copy."),
    backend: Optional[str] = typer.Option(None, help="segmind (needs SEGMIND_API_KEY) or local."),
) -> None:
    """Start the local services, run avatar_video on the bundled portrait, print where the MP4 is."""
    from avatarflow import config
    from avatarflow.local.services import stack

    chosen = backend or config.default_backend()
    typer.echo("starting local S3" + (" and the local API" if chosen == "local" else "") + " ...")
    print_services(stack.up(with_api=chosen == "local"))
    result = guard(lambda: _run_flow(
        {"request": {"image": str(DEMO_PORTRAIT), "seed": 42}, "backend": chosen}, show_progress=True,
        local_roots=[ASSETS],
    ))
    _finish(result, output, as_json=False)


def run_batch(calendar: str, *, local_roots: Any = (), **kw: Any) -> dict[str, Any]:
    """The avatar_batch flow, here (Prefect's ephemeral mode, or the server of PREFECT_API_URL).
    `local_roots`: directories whose files the rows may name by path, for this in-process run
    only (the CLI's widening of the source policy; never a flow parameter)."""
    from avatarflow.media.policy import cli_local_roots

    flow = load_flow("avatar_batch")
    with cli_local_roots(*local_roots):
        return asyncio.run(flow(calendar=calendar, **kw))



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
    concurrency_limit: Optional[str] = typer.Option(
        CONCURRENCY_LIMIT, help="Prefect global concurrency limit (slot decay) each API request takes a slot of; "
                                "'' for none. Ignored where it does not exist."),
    backend: Optional[str] = typer.Option(None, help="segmind or local (default: segmind if SEGMIND_API_KEY is set)."),
    max_concurrency: int = typer.Option(32, help="Child runs in flight at once."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole result as JSON."),
) -> None:
    """Make a content calendar's rows due today, each a child run of avatar_video; print every
    row's outcome and where the manifest is (batches/<run id>/manifest.csv|json in the archive)."""
    day = _day(today)
    roots = cli_roots(calendar)  # the working directory and the calendar's own directory
    out = guard(lambda: run_batch(calendar, today=day, budget=budget, all_rows=all_rows,
                                  concurrency_limit=concurrency_limit or None, backend=backend, max_concurrency=max_concurrency,
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
        raise typer.Exit(EXIT_FAILED)



def watch(
    prefix: str = typer.Option("incoming/", help="The watched prefix, under the archive's key prefix."),
    full_scan: Optional[bool] = typer.Option(None, "--full-scan/--incremental",
                                             help="The whole prefix (default: hourly), or after the cursor only."),
    settle_seconds: float = typer.Option(5.0, help="Objects younger than this wait for the next scan."),
    as_json: bool = typer.Option(False, "--json", help="Print the scan's report as JSON."),
) -> None:
    """One scan of the bucket watcher (the flow avatar_watch, here): each new portrait under the
    prefix announced once as avatarflow.portrait.uploaded (the deployment on-portrait-uploaded
    makes its video); non-images rejected with their error. Needs a Prefect server for the events
    (PREFECT_API_URL, or the local one)."""
    from prefect.settings import temporary_settings

    from avatarflow.deploy import api_url, client_settings

    flow = load_flow("avatar_watch")

    def scan() -> dict[str, Any]:
        with temporary_settings(client_settings(api_url())):
            return asyncio.run(flow(prefix=prefix, full_scan=full_scan, settle_seconds=settle_seconds))

    out = guard(scan)
    if as_json:
        typer.echo(json.dumps(out, indent=2))
    else:
        for uri in out["emitted"]:
            typer.echo(f"emitted   {uri}")
        for r in out["rejected"]:
            typer.echo(f"rejected  {r['uri']}: {r['error']}")
        typer.echo(f"{out['listed']} listed, {len(out['emitted'])} emitted, {len(out['rejected'])} rejected, "
                   f"{len(out['pending'])} pending")
    if out["rejected"]:  # an upload that is not a portrait (or its fields): bad input
        raise typer.Exit(EXIT_BAD_INPUT)


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(resume)
    app.command()(demo)
    app.command()(batch)
    app.command()(watch)
