"""avatar_batch: the rows of a content calendar due today, each a child run of avatar_video,
all at once under the account's request rate and a budget; a manifest of every row at the end.

Order of work: read and validate every row (a bad row is recorded as failed, with its line and
field, before anything is submitted); decide the budget (the first job whose estimate would pass
it, and every later one, is `skipped`); then fan out the rest as child runs of avatar_video
(asyncio; a row that fails fails that row only, recorded with the child's error; each child
run is named `<batch run name>-line-<n>`). Every API request of
every child takes a slot of the `concurrency_limit` global concurrency limit (slot decay) first: the
account's requests per minute, held across all workers. At the end: a table artifact, a report
artifact (a grid of thumbnails, each with its row's status, cost and link), and the manifest as
CSV and JSON beside the videos (`batches/<flow run id>/manifest.csv|json`).

Where the rows run (`fan_out`): when the batch runs from a deployment, each row is a run of the
on-demand deployment (`run_deployment`, a child run linked to the batch), so rows spread over
every worker of the pool and outlive the batch's own worker; an orchestrator failure never fails
a row, and a row's outcome is read from the archive (avatarflow.fleet). Run here (the CLI, a
script), rows are in-process subflows. Either way a row without a seed gets one derived from the
calendar, the day and the line, and each row's outcome is recorded in the bucket: a rerun for the
same calendar and day finds archived rows there (no child run), and re-made rows resume their
request through the ledger (nothing is submitted twice). A batch run put back in the queue
(avatarflow.automations: its worker died) that had finished returns its manifest; one started
more than MAX_BATCH_STARTS times fails."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import time
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    acreate_link_artifact,
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.runtime import flow_run

from avatarflow import fleet
from avatarflow.budget import estimate_cost, plan
from avatarflow.calendar import Row, check_sources, due, read_calendar
from avatarflow.inputs import TemplateError
from avatarflow.media.policy import display_source, resolve_policy
from avatarflow.flows.avatar_video import avatar_video, resolve

MANIFEST_COLUMNS = (
    "line", "image", "publish_date", "status", "s3_uri", "request_id", "seed", "cache_hit",
    "estimated_cost", "cost", "run_name", "error",
)
STATUSES = ("completed", "failed", "skipped")
FAN_OUT = ("auto", "deployment", "subflow")
REPORT_COLUMNS = 4
PRESIGN_S = 7 * 24 * 3600
DEFAULT_CONCURRENCY_LIMIT = "avatarflow-api"
PROGRESS_EVERY_S = 2.0
DISPATCH_AT_ONCE = 4  # child runs being created (or found again) at once: see fleet.run_row
MAX_BATCH_STARTS = 50  # a batch run put back in the queue (its worker died) this often fails instead


def _entry(row: Row, status: str, **kw: Any) -> dict[str, Any]:
    image = row.request.image if row.request else row.raw.get("image") or row.raw.get("portrait")
    base = dict.fromkeys(MANIFEST_COLUMNS)
    return {**base, "line": row.line, "image": display_source(image),
            "publish_date": row.publish_date.isoformat() if row.publish_date else None,
            "status": status, "error": row.error, **kw}


async def _make(row: Row, estimate: float, slots: asyncio.Semaphore, opts: dict[str, Any],
                run_name: str) -> dict[str, Any]:
    """One row as a child run of avatar_video; its failure is this row's, never the batch's.

    The child is awaited for its return value, not with `return_state=True`: avatar_video keeps
    no persisted result, and under load the state Prefect hands back can come from the API
    without its data (MissingResult for a run that completed). The return value is kept in
    memory by the engine; a failed child raises, and is recorded here."""
    child = avatar_video.with_options(flow_run_name=run_name)
    async with slots:
        try:
            out = await child(request=row.request, **opts)
        except Exception as e:  # the child run failed (or could not start): this row only
            return _entry(row, "failed", estimated_cost=estimate, run_name=run_name,
                          error=f"{type(e).__name__}: {e}")
    script = out.get("script") or {}
    cost = (0.0 if out.get("cache_hit") else out.get("cost") or 0.0) + (
        0.0 if script.get("cached", True) else script.get("cost") or 0.0)
    return _entry(row, "completed", s3_uri=out["s3_uri"], request_id=out["request_id"], seed=out["seed"],
                  cache_hit=out["cache_hit"], estimated_cost=estimate, cost=cost, run_name=run_name)


async def _make_remote(row: Row, estimate: float, slots: asyncio.Semaphore, opts: dict[str, Any], run_name: str,
                       *, store: Any, key: str, deployment: str, logger: Any,
                       dispatching: asyncio.Semaphore | None = None, silent_s: float | None = None) -> dict[str, Any]:
    """One row as a run of the on-demand deployment (a linked child run on any worker of the
    pool); its outcome from the archive, orchestrator failures retried (avatarflow.fleet)."""
    async with slots:
        try:
            out = await fleet.run_row(
                store=store, request=row.request.model_dump(mode="json", exclude_none=True), line=row.line,
                key=key, options={k: v for k, v in opts.items() if v is not None}, run_name=run_name,
                deployment=deployment, log=logger.info, request_sha=fleet.request_sha(row.request),
                dispatching=dispatching, silent_s=silent_s)
        except Exception as e:  # the archive or the server out of reach past every retry
            return _entry(row, "failed", estimated_cost=estimate, run_name=run_name,
                          error=f"not brought home: {type(e).__name__}: {e}")
    if out["status"] != "completed":
        return _entry(row, "failed", estimated_cost=estimate, run_name=out.get("run_name"), error=out.get("error"))
    return _entry(row, "completed", s3_uri=out["s3_uri"], request_id=out["request_id"], seed=out["seed"],
                  cache_hit=out.get("cache_hit"), estimated_cost=estimate, cost=out.get("cost"),
                  run_name=out.get("run_name"))


async def _make_here(row: Row, estimate: float, slots: asyncio.Semaphore, opts: dict[str, Any], run_name: str,
                     *, store: Any, key: str, logger: Any) -> dict[str, Any]:
    """One row as an in-process subflow; a row an earlier run of this calendar and day archived
    is taken from the archive (no child run); the outcome is recorded for a rerun."""
    sha = fleet.request_sha(row.request)
    try:
        prev = await fleet.previous_outcome(store, key, row.line, sha)
    except Exception as e:
        logger.warning("line %d: earlier outcome not read: %s", row.line, e)
        prev = None
    if prev:
        return _entry(row, "completed", s3_uri=prev["s3_uri"], request_id=prev["request_id"], seed=prev["seed"],
                      cache_hit=True, estimated_cost=estimate, cost=0.0, run_name=prev.get("run_name"))
    entry = await _make(row, estimate, slots, opts, run_name)
    try:
        await fleet.record_outcome(store, key, row.line, entry, sha)
    except Exception as e:  # the record only saves a rerun some work
        logger.warning("line %d: outcome not recorded: %s", row.line, e)
    return entry


async def _report(store: Any, entries: list[dict[str, Any]], title: str, logger: Any) -> None:
    """The report artifact: a grid of thumbnails with each row's status, cost and link."""
    urls: dict[int, dict[str, str]] = {}
    for e in entries:
        fp = fleet.fingerprint_of(e.get("s3_uri"))
        if e["status"] != "completed" or not fp:
            continue
        try:
            urls[e["line"]] = {"thumbnail": await store.presign(store.thumbnail_key(fp), PRESIGN_S),
                               "video": await store.presign(store.video_key(fp), PRESIGN_S)}
        except Exception as ex:
            logger.warning("line %d: no presigned links: %s", e["line"], ex)
    try:
        await acreate_markdown_artifact(key="avatar-batch-report", description=title,
                                        markdown=fleet.thumbnail_grid(entries, urls, columns=REPORT_COLUMNS, title=title))
    except Exception as ex:
        logger.warning("report artifact not created: %s", ex)


def manifest_csv(entries: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(entries)
    return buf.getvalue()


class _Progress:
    """The progress artifact, updated at most every PROGRESS_EVERY_S (hundreds of rows finish
    close together) and at the end; best effort: the manifest is the record."""

    def __init__(self, artifact_id: UUID | None, total: int, logger: Any):
        self.id, self.total, self.done, self.logger, self.last = artifact_id, total, 0, logger, 0.0

    async def step(self, final: bool = False) -> None:
        now = time.monotonic()
        if self.id is None or not (final or now - self.last >= PROGRESS_EVERY_S):
            return
        self.last = now
        try:
            await aupdate_progress_artifact(self.id, 100.0 * self.done / max(self.total, 1))
        except Exception as e:
            self.logger.warning("progress artifact not updated: %s", e)


def _run_name() -> str:
    """avatar-batch-<calendar file stem>; child runs: <that>-<run id prefix>-line-<n>."""
    calendar = str(display_source(str((flow_run.parameters or {}).get("calendar", "calendar"))))
    stem = Path(calendar.split("?", 1)[0].rstrip("/")).stem or "calendar"
    return "avatar-batch-" + re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-")[:40]


@flow(name="avatar_batch", flow_run_name=_run_name, persist_result=False)
async def avatar_batch(
    calendar: str,
    today: date | None = None,
    budget: float | None = None,
    concurrency_limit: str | None = DEFAULT_CONCURRENCY_LIMIT,
    credentials_block: str | None = None,
    archive_block: str | None = None,
    backend: str | None = None,
    all_rows: bool = False,
    max_concurrency: int = 32,
    fan_out: str = "auto",
    child_deployment: str = fleet.CHILD_DEPLOYMENT,
) -> dict[str, Any]:
    """Make the content calendar's rows due `today` (default: today, UTC), each a child run of
    avatar_video.

    `calendar`: CSV or JSONL, an https URL, an s3:// URI in the archive (or an allowed
    bucket/prefix), or a local path under the operator's allowed roots (the source policy); a row per video with the API's
    names (`image`, `voice_script` or `audio`, `voice`, `voice_language`, `resolution`, `seed`)
    plus `preset` and `publish_date`. `budget` (USD): stop submitting before the next job's
    estimate (speech seconds x price per second) would pass it. `concurrency_limit`: the Prefect global
    concurrency limit (slot decay) every API request takes a slot of. `all_rows`: every row,
    whatever its publish_date. `max_concurrency`: child runs in flight at once (at 50
    requests/min and ~100 s a job, about 30 are in flight anyway). `fan_out`: `deployment` (each
    row a run of `child_deployment` on the work pool), `subflow` (in this process), or `auto`:
    `deployment` when this batch runs from a deployment."""
    if fan_out not in FAN_OUT:
        raise ValueError(f"fan_out={fan_out!r} is not allowed; allowed: {', '.join(FAN_OUT)}")
    logger = get_run_logger()
    _, store = await resolve(credentials_block, archive_block, backend)
    starts = flow_run.run_count or 0
    if starts > 1 and flow_run.id:  # started again (put back in the queue)
        done, _ = await store.read_json(f"{store.key('batches', str(flow_run.id))}/manifest.json")
        if done:  # it had finished (a server restart held back its Completed event): nothing to make
            logger.info("this run finished before (its manifest is in the archive): its rows are not made again")
            return _result(store, done)
        fleet.refuse_restart_loop(starts, MAX_BATCH_STARTS, "run the deployment again for the same calendar and "
                                                            "day (archived rows are kept, in-flight requests resumed)")
    day = today or datetime.now(timezone.utc).date()
    # the calendar and its rows' sources are untrusted: fetched and checked through the operator's
    # source policy (no parameter of this flow widens it)
    policy = await resolve_policy(store)
    every = await asyncio.to_thread(read_calendar, calendar, s3_client=store.s3, policy=policy)
    rows = await asyncio.to_thread(check_sources, due(every, day, all_rows=all_rows), policy=policy)
    shown = display_source(calendar)
    logger.info("%d of %d rows due on %s in %s", len(rows), len(every), day, shown)

    estimates: dict[int, float] = {}
    for row in rows:  # the cost of what will be spoken: the template rendered (bounded) with the row
        if row.request is None:
            continue
        try:
            estimates[row.line] = estimate_cost(row.request)
        except TemplateError as e:
            row.error, row.request = f"line {row.line}: {e}", None
    valid = [r for r in rows if r.request is not None]
    key = fleet.batch_key(shown, day, all_rows)
    for row in valid:  # reproducible: a row made again is the same job (cache, ledger)
        if row.request.seed is None or row.request.seed == -1:
            row.request = row.request.model_copy(update={"seed": fleet.row_seed(key, row.line)})
    budget_plan = plan((estimates[r.line] for r in valid), budget)
    go: list[tuple[Row, float]] = []
    entries_by_line: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row.request is None:
            entries_by_line[row.line] = _entry(row, "failed")
    for i, row in enumerate(valid):
        estimate = budget_plan.estimates[i]
        if budget_plan.submit[i]:
            go.append((row, estimate))
        else:
            entries_by_line[row.line] = _entry(row, "skipped", estimated_cost=estimate, error=budget_plan.reason(i))
    logger.info("%d invalid, %d skipped by the budget, %d to submit (~$%.3f estimated)",
                len(rows) - len(valid), len(valid) - len(go), len(go), budget_plan.planned)

    try:
        progress_id = await acreate_progress_artifact(
            0.0, key="avatar-batch-progress", description=f"{shown} on {day}: {len(go)} videos")
    except Exception as e:
        logger.warning("progress artifact not created: %s", e)
        progress_id = None
    progress = _Progress(progress_id, len(go), logger)
    slots = asyncio.Semaphore(max(1, max_concurrency))
    dispatching = asyncio.Semaphore(DISPATCH_AT_ONCE)
    opts = {"credentials_block": credentials_block, "archive_block": archive_block, "backend": backend,
            "concurrency_limit": concurrency_limit}

    batch_name = f"{flow_run.name or 'avatar-batch'}-{str(flow_run.id or 'local')[:8]}"
    from prefect.runtime import deployment as this_deployment

    mode = fan_out if fan_out != "auto" else ("deployment" if this_deployment.id else "subflow")
    logger.info("rows as %s", f"runs of the deployment {child_deployment}" if mode == "deployment"
                else "subflows in this process")
    silent_s = None
    if mode == "deployment":
        try:
            silent_s = await fleet.patient(lambda: fleet.silent_after_s(child_deployment), "child deployment",
                                           logger.info, deadline_s=300)
        except Exception as e:  # no heartbeat window: children lost unseen by the automations wait
            logger.warning("heartbeat window of %s not read (%s): lost children are left to the automations",
                           child_deployment, e)

    async def one(row: Row, estimate: float) -> dict[str, Any]:
        name = f"{batch_name}-line-{row.line}"
        if mode == "deployment":
            entry = await _make_remote(row, estimate, slots, opts, name, store=store, key=key,
                                       deployment=child_deployment, logger=logger, dispatching=dispatching,
                                       silent_s=silent_s)
        else:
            entry = await _make_here(row, estimate, slots, opts, name, store=store, key=key, logger=logger)
        progress.done += 1
        await progress.step()
        return entry

    for entry in await asyncio.gather(*(one(r, e) for r, e in go)):
        entries_by_line[entry["line"]] = entry
    await progress.step(final=True)
    entries = [entries_by_line[r.line] for r in rows]

    counts = {s: sum(e["status"] == s for e in entries) for s in STATUSES}
    spent = round(sum(e["cost"] or 0.0 for e in entries if e["status"] == "completed"), 6)
    run_id = str(flow_run.id or f"local-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}")
    prefix = store.key("batches", run_id)
    summary = {"calendar": shown, "day": day.isoformat(), "flow_run_id": run_id, "budget": budget,
               "estimated": budget_plan.planned, "spent": spent, "concurrency_limit": concurrency_limit, **counts}
    manifest = {**summary, "columns": list(MANIFEST_COLUMNS), "rows": entries}
    await store.put_json(f"{prefix}/manifest.json", manifest)
    await asyncio.to_thread(store.s3.put_object, Bucket=store.bucket, Key=f"{prefix}/manifest.csv",
                            Body=manifest_csv(entries).encode(), ContentType="text/csv")
    manifest_json, manifest_csv_uri = store.uri(f"{prefix}/manifest.json"), store.uri(f"{prefix}/manifest.csv")

    name = Path(shown.split("?", 1)[0].rstrip("/")).name
    description = (f"{name} on {day}: {counts['completed']} completed, {counts['failed']} failed, "
                   f"{counts['skipped']} skipped; spent ${spent:.3f}; manifest {manifest_csv_uri}")
    await acreate_table_artifact(
        table=[{c: e[c] for c in MANIFEST_COLUMNS} for e in entries], key="avatar-batch-rows",
        description=description)
    await _report(store, entries, description, logger)
    try:
        url = await store.presign(f"{prefix}/manifest.csv")
        await acreate_link_artifact(link=url, link_text=manifest_csv_uri, key="avatar-batch-manifest",
                                    description=f"Manifest of {name} on {day} (also {manifest_json})")
    except Exception as e:
        logger.warning("manifest link artifact not created: %s", e)
    logger.info("batch done: %s; spent $%.3f; manifest %s", counts, spent, manifest_csv_uri)
    return _result(store, manifest)


def _result(store: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """What the flow returns: the manifest's summary, its rows as `entries`, and its URIs."""
    prefix = store.key("batches", manifest["flow_run_id"])
    return {**{k: v for k, v in manifest.items() if k not in ("columns", "rows")}, "rows": len(manifest["rows"]),
            "manifest_json": store.uri(f"{prefix}/manifest.json"), "manifest_csv": store.uri(f"{prefix}/manifest.csv"),
            "entries": manifest["rows"]}
