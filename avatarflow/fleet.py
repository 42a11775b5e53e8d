"""A batch's rows across a Prefect work pool, and nothing lost when a part dies.

When the batch runs from a deployment, each row is a run of the on-demand deployment
(`run_deployment`, linked to the batch as a child run), so rows spread over every worker of the
pool and outlive the batch's own worker. The orchestrator is not the row's truth:

* **The truth is the archive and the ledger.** A child that ended (completed or failed) is
  looked up in the archive through the fingerprint its link artifact names (``store.cached``:
  the manifest and a video with the recorded size and sha256): archived is completed, whatever
  the run's state says; a child that completed without an archived video is dispatched again.
  The ledger makes every new child of a row resume the row's request instead of posting again;
  only a failure the ledger records as final (the API's FAILED: ``JobFailed``) or the row's own
  (its portrait, its fields) ends the row as failed.
* **Orchestrator failures never fail a row** (a 503, a reset connection, a server restart, a
  child that never started, a crashed worker): every call to the server is retried with backoff
  until it answers; a crashed child goes back to the queue by itself (avatarflow.automations)
  and is followed; a child left CRASHED past ``requeue_grace_s``, cancelled, or not started
  within ``start_timeout_s`` after a worker took it is dispatched again (a new child, with an
  idempotency key per attempt).
  Dispatching again is safe: a row's request carries a seed (rows without one get
  :func:`row_seed`, derived from the calendar, the day and the line), so a second child makes
  the same fingerprint: an archived video is a cache hit, a submitted request is resumed by the
  ledger, and nothing is posted twice.
* A child that failed on its own (the portrait, the API's FAILED) fails its row, after one more
  attempt (a failure caused by the orchestrator mid-run looks the same from here).
* **Reruns pick up where the last run stopped**: each row's outcome is recorded in the bucket
  under a key of the calendar and the day (:func:`batch_key`); a rerun finds archived rows there
  (checked against the archive again) and does not dispatch them.

Crashed runs are detected by Prefect itself: flow runs send heartbeats
(``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``), an automation (``avatarflow deploy``) marks a run whose
heartbeats stop as CRASHED and another puts it back in the queue (avatarflow.automations), so a
row goes on while its batch's own worker is dead. A child the automation missed (a server
restart inside its window) is found by the batch itself, later (:func:`lost`)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date
from typing import Any, TypeVar

from avatarflow.store import Store

T = TypeVar("T")
CHILD_DEPLOYMENT = "avatar_video/on-demand"
RETRYABLE = ("CRASHED", "CANCELLED")
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
SEED_SPACE = 1_000_000_000
SILENT_BEATS = 10  # heartbeats missed before the batch takes a RUNNING child as lost (the automation: 3)
MAX_STARTS = 8  # a row's run put back in the queue after each crash: starts before it fails
REQUEUE_GRACE_S = 90.0  # a CRASHED child is left to the automation that puts it back this long
# A child that failed with one of these failed for its row's own reason: not dispatched again
# (JobFailed: the API's FAILED, recorded `failed` in the ledger; a new child would post again).
FINAL_ERRORS = ("JobFailed", "MediaError", "ContractError", "TemplateError", "BadRequest", "Unauthorized",
                "Forbidden", "InsufficientCredits", "JobExpired", "ValidationError", "SourceError", "TooManyStarts")
_FP = re.compile(r"/videos/([0-9a-f]{64})/video\.mp4")

Log = Callable[[str], Any]


def batch_key(calendar: str, day: date, all_rows: bool = False) -> str:
    """The calendar (as shown, no query string) and the day: the key a rerun finds its rows by."""
    text = json.dumps({"calendar": calendar, "day": day.isoformat(), "all_rows": all_rows}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def row_seed(key: str, line: int) -> int:
    """The seed of a row that names none: the same on every rerun of the calendar and day, so a
    row dispatched twice makes one fingerprint (a cache hit, or the ledger's resumed request)."""
    return int(hashlib.sha256(f"{key}:{line}".encode()).hexdigest()[:12], 16) % SEED_SPACE


def request_sha(request: Any) -> str:
    """A row's request as made (its seed included): a rerun reuses a row's outcome only if the
    row still asks for the same thing."""
    data = request.model_dump(mode="json") if hasattr(request, "model_dump") else request
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _age_s(state: Any) -> float:
    """Seconds since `state` was set (by the server's clock): a batch run started again finds a
    child PENDING since long before it."""
    from datetime import datetime, timezone

    stamp = getattr(state, "timestamp", None)
    return (datetime.now(timezone.utc) - stamp).total_seconds() if stamp else 0.0


def never_started(state: str | None, waited_s: float, start_timeout_s: float) -> bool:
    """A child that a worker took (PENDING) and did not start within `start_timeout_s` (its
    worker died in between): cancelled and dispatched again. The pending automation of
    `avatarflow deploy` puts such a run back in the queue earlier (`automations.PENDING_S`); this
    is for a server without it. A SCHEDULED child is waiting its turn in the pool's queue
    (workers take runs as their `--limit` allows): it is left there."""
    return state == "PENDING" and waited_s > start_timeout_s


def awaiting_requeue(state: str | None, state_age_s: float, grace_s: float) -> bool:
    """A child CRASHED for at most `grace_s`: followed, as `avatarflow deploy`'s crash requeue
    puts it back in the queue (in seconds, and while the batch's own worker is dead too) and the
    same run goes on. Past it (a server without the automation, a Crashed event lost), the batch
    dispatches the row again."""
    return state == "CRASHED" and state_age_s <= grace_s


def refuse_restart_loop(starts: int | None, limit: int, again: str) -> None:
    """Fail a flow run started more than `limit` times: each crash puts it back in the queue
    (avatarflow.automations), and a run that crashes on its own would start for ever."""
    from avatarflow.errors import TooManyStarts

    if (starts or 0) > limit:
        raise TooManyStarts(f"this run has started {starts} times (it crashed each time; out of memory?); it is "
                            f"not started again: {again}")


def lost(state: str | None, *, state_age_s: float, beat_age_s: float | None, silent_s: float | None) -> bool:
    """A RUNNING child neither in a new state nor beating for `silent_s` (None: its deployment
    sends no heartbeats, nothing to judge by): its worker died and the crash automation missed
    it (the fleet bench: a server restart inside the detector's window, RUNNING for 45 min)."""
    if state != "RUNNING" or silent_s is None or state_age_s <= silent_s:
        return False
    return beat_age_s is None or beat_age_s > silent_s


async def _last_beat_age_s(client: Any, flow_run_id: str, within_s: float) -> float | None:
    """Seconds since the child's last heartbeat event within `within_s` (None: none)."""
    from datetime import datetime, timedelta, timezone

    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    now = datetime.now(timezone.utc)
    page = await client.read_events(filter=EventFilter(
        occurred=EventOccurredFilter(since=now - timedelta(seconds=within_s), until=now + timedelta(seconds=60)),
        event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"])), limit=1)
    return (now - page.events[0].occurred).total_seconds() if page.events else None


async def silent_after_s(deployment: str, beats: int = SILENT_BEATS) -> float | None:
    """How long a child of `deployment` may go without a heartbeat before the batch takes it
    as lost: `beats` of the deployment's PREFECT_FLOWS_HEARTBEAT_FREQUENCY (None when it sets
    none: its runs do not beat)."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        dep = await client.read_deployment_by_name(deployment)
    every = ((dep.job_variables or {}).get("env") or {}).get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
    return float(every) * beats if every else None


def row_record_key(store: Store, key: str, line: int) -> str:
    return store.key("batches", "by-day", key, "rows", f"{line}.json")


def fingerprint_of(text: str | None) -> str | None:
    """The fingerprint in an archived video's URI (``.../videos/<fp>/video.mp4``)."""
    m = _FP.search(text or "")
    return m.group(1) if m else None


async def archived_entry(store: Store, fingerprint: str) -> dict[str, Any] | None:
    """What the archive says of a fingerprint (None unless the video is there, intact)."""
    manifest = await store.cached(fingerprint)
    if manifest is None:
        return None
    return {"status": "completed", "fingerprint": fingerprint, "s3_uri": manifest["video"]["s3_uri"],
            "request_id": manifest.get("request_id"), "seed": manifest.get("seed"), "cost": manifest.get("cost"),
            "thumbnail_key": store.thumbnail_key(fingerprint)}


async def patient(call: Callable[[], Awaitable[T]], what: str, log: Log, *, deadline_s: float = 1800.0,
                  first: float = 1.0, cap: float = 15.0, give_up: tuple[type[BaseException], ...] = ()) -> T:
    """`call()` until it answers: an orchestrator that is down, restarting or answering 5xx is
    waited for with backoff and jitter, up to `deadline_s` (exceptions in `give_up` are raised
    at once)."""
    end = time.monotonic() + deadline_s
    delay, attempt = first, 0
    while True:
        attempt += 1
        try:
            return await call()
        except give_up:
            raise
        except Exception as e:
            if time.monotonic() + delay > end:
                raise
            if attempt in (1, 3) or attempt % 10 == 0:
                log(f"{what}: {type(e).__name__}: {str(e)[:200]}; again in {delay:.0f} s (attempt {attempt})")
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(cap, delay * 2)


@dataclass
class Child:
    """One row's child runs: the last one's id and state, how many were dispatched."""

    attempts: int = 0
    failed_attempts: int = 0
    flow_run_id: str | None = None
    state: str | None = None
    message: str | None = None


def in_flight(record: dict[str, Any]) -> Child:
    """The row's last child as its record has it, when the row was in flight (a batch run
    started again after its worker died): read again by its id, not dispatched again by its
    idempotency key (a flow run created from the deployment per row in flight, all at once, on
    a server the fleet bench keeps busy), nor every earlier child."""
    if record.get("status") != "running" or not record.get("flow_run_id"):
        return Child()
    return Child(attempts=int(record.get("attempts") or 1), flow_run_id=str(record["flow_run_id"]))


async def _fingerprint_from_artifacts(client: Any, flow_run_id: str) -> str | None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    arts = await client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    for a in arts:
        fp = fingerprint_of(str(a.data)) or fingerprint_of(str(a.description))
        if fp:
            return fp
    return None


async def run_row(
    *, store: Store, request: dict[str, Any], line: int, key: str, options: dict[str, Any], run_name: str,
    deployment: str = CHILD_DEPLOYMENT, log: Log = print, start_timeout_s: float = 420.0,
    poll_s: float = 3.0, max_attempts: int = 8, row_deadline_s: float = 3 * 3600.0, request_sha: str | None = None,
    dispatching: asyncio.Semaphore | None = None, silent_s: float | None = None,
    requeue_grace_s: float = REQUEUE_GRACE_S,
) -> dict[str, Any]:
    """One row through the work pool, brought home or failed for a reason of its own.

    Returns {status: completed|failed, fingerprint, s3_uri, request_id, seed, cost, run_name,
    attempts, error, flow_run_id}; the outcome is also recorded for reruns. `dispatching`: the
    batch's bound on child runs being created at once (a batch run started again looks for all
    its in-flight children at once, on the server its children ask for their request slots).
    `silent_s`: a RUNNING child silent that long is set CRASHED (:func:`lost`; None: not judged).
    A CRASHED child is followed for `requeue_grace_s` (the crash requeue puts it back in the
    queue), then its row is dispatched again (:func:`awaiting_requeue`)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled, Crashed

    record_key = row_record_key(store, key, line)
    record, _ = await patient(lambda: store.read_json(record_key), f"line {line}: row record", log)
    record = record or {}
    if record.get("request_sha") != request_sha:  # another row's (the calendar changed): start afresh
        record = {"request_sha": request_sha}
    if record.get("fingerprint"):
        done = await patient(lambda: archived_entry(store, record["fingerprint"]), f"line {line}: archive", log)
        if done:  # a rerun: archived by an earlier run of this calendar and day
            return {**done, "cache_hit": True, "cost": 0.0, "run_name": record.get("run_name"), "attempts": 0,
                    "flow_run_id": record.get("flow_run_id"), "error": None}

    child = in_flight(record)
    resume = child.flow_run_id is not None  # its last child is read again first, not dispatched
    name = record.get("run_name") or run_name
    started = time.monotonic()
    outcome: dict[str, Any] | None = None
    async with get_client() as client:
        while outcome is None:
            if resume:
                resume = False
            elif child.attempts >= max_attempts or time.monotonic() - started > row_deadline_s:
                outcome = {"status": "failed", "error": f"not brought home after {child.attempts} child runs "
                                                        f"(last: {child.state} {child.message or ''})".strip()}
                break
            else:
                child.attempts += 1
                name = run_name if child.attempts == 1 else f"{run_name}-retry-{child.attempts - 1}"
                idem = f"{key}:{line}:{child.attempts}"

                async def dispatch() -> Any:
                    async with dispatching or contextlib.nullcontext():
                        return await run_deployment(
                            deployment, parameters={"request": request, **options}, timeout=0, as_subflow=True,
                            flow_run_name=name, idempotency_key=idem, client=client)

                child.flow_run_id = str((await patient(dispatch, f"line {line}: dispatch", log)).id)
                await _record(store, record_key, {**record, "line": line, "flow_run_id": child.flow_run_id,
                                                  "run_name": name, "attempts": child.attempts, "status": "running"},
                              log)
            fr_id = child.flow_run_id
            delay = poll_s
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 1.3, 15.0)
                try:
                    run = await patient(lambda: client.read_flow_run(fr_id), f"line {line}: state", log,
                                        give_up=(ObjectNotFound,))
                except ObjectNotFound:  # the server lost it (restored from an older state): again
                    child.state, child.message = "LOST", "the server no longer knows the child run"
                    break
                st = run.state
                child.state = st.type.value if st else None
                child.message = (st.message or "")[:500] if st else None
                if child.state == "COMPLETED":
                    fp = await patient(lambda: _fingerprint_from_artifacts(client, fr_id),
                                       f"line {line}: artifacts", log)
                    found = await patient(lambda: archived_entry(store, fp), f"line {line}: archive", log) if fp else None
                    if found:
                        outcome = {**found, "cache_hit": None}
                    else:  # completed, but the archive does not show it: ask again (a cache hit if it is there)
                        log(f"line {line}: child {name} completed but its video is not in the archive; again")
                    break
                if child.state == "FAILED":
                    child.failed_attempts += 1
                    fp = await patient(lambda: _fingerprint_from_artifacts(client, fr_id),
                                       f"line {line}: artifacts", log)
                    found = await patient(lambda: archived_entry(store, fp), f"line {line}: archive", log) if fp else None
                    if found:  # archived, then failed (reporting it, say): the archive decides
                        outcome = {**found, "cache_hit": None}
                    elif any(t in (child.message or "") for t in FINAL_ERRORS) or child.failed_attempts >= 2:
                        outcome = {"status": "failed", "error": child.message or "the child run failed"}
                    else:  # maybe the orchestrator's doing (its API gone mid-run): once more
                        log(f"line {line}: child {name} failed ({child.message}); once more")
                    break
                age = _age_s(st)
                if awaiting_requeue(child.state, age, requeue_grace_s):
                    continue
                if child.state in RETRYABLE:
                    log(f"line {line}: child {name} {child.state} ({child.message}); dispatching again")
                    break
                if never_started(child.state, age, start_timeout_s):
                    log(f"line {line}: child {name} not started after {start_timeout_s:.0f} s; cancelling it, again")
                    await _end(client, fr_id, Cancelled(message="not started in time; dispatched again"), log)
                    break
                if lost(child.state, state_age_s=age, beat_age_s=None, silent_s=silent_s):  # its beats decide
                    beat = await patient(lambda: _last_beat_age_s(client, fr_id, silent_s), f"line {line}: beats", log)
                    if lost(child.state, state_age_s=age, beat_age_s=beat, silent_s=silent_s):
                        log(f"line {line}: child {name} RUNNING with no heartbeat for {silent_s:.0f} s; crashing it")
                        await _end(client, fr_id, Crashed(message=f"no heartbeat for {silent_s:.0f} s (the batch's "
                                                                  "check): its worker is gone"), log)
            if outcome is None:
                await asyncio.sleep(min(30.0, 2.0 * child.attempts) * random.uniform(0.8, 1.2))
    outcome.update(line=line, run_name=name, attempts=child.attempts, flow_run_id=child.flow_run_id)
    outcome.setdefault("error", None)
    await _record(store, record_key, {**record, "request_sha": request_sha, **{k: outcome.get(k) for k in (
        "line", "status", "fingerprint", "s3_uri", "request_id", "run_name", "attempts", "flow_run_id", "error")}}, log)
    return outcome


async def _end(client: Any, flow_run_id: Any, state: Any, log: Log) -> None:
    """Set a child given up on to `state` (best effort: a child that goes on after all makes
    the same fingerprint, and the ledger resumes its request)."""
    try:
        await client.set_flow_run_state(flow_run_id, state, force=True)
    except Exception as e:
        log(f"setting {flow_run_id} {state.type.value} failed: {e}")


async def _record(store: Store, key: str, doc: dict[str, Any], log: Log) -> None:
    try:
        await patient(lambda: store.put_json(key, doc), "row record", log, deadline_s=300)
    except Exception as e:  # the record only saves a rerun some work
        log(f"row record {key} not written: {e}")


async def previous_outcome(store: Store, key: str, line: int, request_sha: str | None) -> dict[str, Any] | None:
    """A row archived by an earlier run of the same calendar and day, asking for the same thing
    (checked in the archive)."""
    record, _ = await store.read_json(row_record_key(store, key, line))
    if not record or not record.get("fingerprint") or record.get("request_sha") != request_sha:
        return None
    found = await archived_entry(store, record["fingerprint"])
    return {**found, "run_name": record.get("run_name")} if found else None


async def record_outcome(store: Store, key: str, line: int, outcome: dict[str, Any], request_sha: str | None) -> None:
    """Record a row's outcome made in-process (the CLI's subflows), for a rerun."""
    fp = outcome.get("fingerprint") or fingerprint_of(outcome.get("s3_uri"))
    await store.put_json(row_record_key(store, key, line), {
        "line": line, "status": outcome.get("status"), "fingerprint": fp, "s3_uri": outcome.get("s3_uri"),
        "request_id": outcome.get("request_id"), "run_name": outcome.get("run_name"), "error": outcome.get("error"),
        "request_sha": request_sha})


def thumbnail_grid(entries: list[dict[str, Any]], urls: dict[int, dict[str, str]], *, columns: int = 4,
                   title: str = "") -> str:
    """A markdown grid of thumbnails: each cell the row's thumbnail, line, status, cost and link.

    `urls[line]`: {"thumbnail": presigned URL, "video": presigned URL} for archived rows."""
    def cell(e: dict[str, Any]) -> str:
        u = urls.get(e["line"], {})
        img = f"![line {e['line']}]({u['thumbnail']})" if u.get("thumbnail") else "(no video)"
        cost = "n/a" if e.get("cost") is None else f"${e['cost']:.3f}"
        link = f"[video]({u['video']})" if u.get("video") else ""
        mark = {"completed": "✅", "failed": "❌", "skipped": "⏭️"}.get(e.get("status"), "")
        err = f"<br>{str(e.get('error'))[:80]}" if e.get("error") and e.get("status") != "completed" else ""
        return f"{img}<br>**line {e['line']}** {mark} {e.get('status')} · {cost} {link}{err}".replace("|", "\\|")

    rows = [entries[i:i + columns] for i in range(0, len(entries), columns)]
    head = "| " + " | ".join([" "] * columns) + " |\n|" + "---|" * columns + "\n"
    body = "".join("| " + " | ".join([cell(e) for e in r] + [" "] * (columns - len(r))) + " |\n" for r in rows)
    return (f"## {title}\n\n" if title else "") + head + body
