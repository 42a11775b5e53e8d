"""avatar_batch: the rows of a content calendar due today, each a child run of avatar_video,
all at once under the account's request rate and a budget; a manifest of every row at the end."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import date, datetime, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_progress_artifact, acreate_table_artifact, aupdate_progress_artifact
from prefect.runtime import flow_run

from avatarflow.budget import Budget, estimate_cost
from avatarflow.calendar import Row, due, read_calendar
from flows.avatar_video import avatar_video, resolve

MANIFEST_COLUMNS = ("line", "image", "status", "s3_uri", "request_id", "seed", "cache_hit", "cost", "error")
DEFAULT_RATE_LIMIT = "avatarflow-api"


def _entry(row: Row, status: str, **kw: Any) -> dict[str, Any]:
    base = {c: None for c in MANIFEST_COLUMNS}
    return {**base, "line": row.line, "image": (row.request.image if row.request else row.raw.get("image")),
            "status": status, "error": row.error, **kw}


async def _make(row: Row, budget: Budget, slots: asyncio.Semaphore, opts: dict[str, Any]) -> dict[str, Any]:
    if row.request is None:
        return _entry(row, "invalid")
    estimate = estimate_cost(row.request)
    async with slots:
        if not budget.reserve(estimate):
            return _entry(row, "skipped", error=f"budget: next job (~${estimate:.3f}) would pass ${budget.limit:.2f}")
        try:
            out = await avatar_video(request=row.request, **opts)
        except Exception as e:  # this row's failure (or its child run's), recorded, not raised
            budget.settle(estimate, None)
            return _entry(row, "failed", error=f"{type(e).__name__}: {e}")
    cost = 0.0 if out["cache_hit"] else out.get("cost")
    budget.settle(estimate, cost)
    return _entry(row, "completed", s3_uri=out["s3_uri"], request_id=out["request_id"], seed=out["seed"],
                  cache_hit=out["cache_hit"], cost=cost)


def manifest_csv(entries: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(entries)
    return buf.getvalue()


@flow(name="avatar_batch", flow_run_name="avatar-batch-{calendar}", persist_result=False)
async def avatar_batch(
    calendar: str,
    today: date | None = None,
    budget: float | None = None,
    all_rows: bool = False,
    rate_limit: str | None = DEFAULT_RATE_LIMIT,
    max_concurrency: int = 32,
    credentials_block: str | None = None,
    archive_block: str | None = None,
    backend: str | None = None,
) -> dict[str, Any]:
    """Make the calendar's rows due `today` (default: today, UTC). A bad row fails that row; a
    budget (USD) stops submitting before a job would pass it; `rate_limit` names the Prefect
    global concurrency limit (with slot decay) that holds the account's requests per minute.
    All rows are scheduled at once; `max_concurrency` bounds the child runs in flight (what the
    Prefect API takes comfortably; at 50 requests/min and ~100 s a job, ~30 are in flight anyway)."""
    logger = get_run_logger()
    _, store = await resolve(credentials_block, archive_block, backend)
    day = today or datetime.now(timezone.utc).date()
    rows = due(await asyncio.to_thread(read_calendar, calendar, s3_client=store.s3), day, all_rows=all_rows)
    logger.info("%d rows due on %s in %s", len(rows), day, calendar)
    progress = await acreate_progress_artifact(0.0, key="avatar-batch-progress", description=f"{calendar} on {day}")
    spend = Budget(budget)
    slots = asyncio.Semaphore(max_concurrency)
    opts = {"credentials_block": credentials_block, "archive_block": archive_block, "backend": backend,
            "rate_limit": rate_limit}
    done = 0

    async def one(row: Row) -> dict[str, Any]:
        nonlocal done
        entry = await _make(row, spend, slots, opts)
        done += 1
        try:
            await aupdate_progress_artifact(progress, 100.0 * done / max(len(rows), 1))
        except Exception as e:  # progress is best effort; the manifest is the record
            logger.warning("progress artifact not updated: %s", e)
        return entry

    entries = list(await asyncio.gather(*(one(r) for r in rows)))
    if not rows:
        await aupdate_progress_artifact(progress, 100.0)
    run_id = str(flow_run.id or "local")
    prefix = store.key("batches", run_id)
    await store.put_json(f"{prefix}/manifest.json", {"calendar": calendar, "day": day.isoformat(),
                                                     "budget": budget, "spent": round(spend.spent, 6),
                                                     "rows": entries})
    await asyncio.to_thread(store.s3.put_object, Bucket=store.bucket, Key=f"{prefix}/manifest.csv",
                            Body=manifest_csv(entries).encode(), ContentType="text/csv")
    await acreate_table_artifact(table=entries, key="avatar-batch-rows", description=f"{calendar} on {day}")
    counts = {s: sum(e["status"] == s for e in entries) for s in ("completed", "failed", "invalid", "skipped")}
    logger.info("batch done: %s; spent $%.3f", json.dumps(counts), spend.spent)
    return {"day": day.isoformat(), "rows": len(entries), **counts, "spent": round(spend.spent, 6),
            "manifest_json": store.uri(f"{prefix}/manifest.json"), "manifest_csv": store.uri(f"{prefix}/manifest.csv"),
            "entries": entries}
