"""avatar_watch: the bucket watcher as a flow (scheduled in deployments/prefect.yaml, and
`avatarflow watch`): one `avatarflow.portrait.uploaded` event per new portrait under `prefix`
of the archive bucket, exactly once (avatarflow.watch); the deployment `on-portrait-uploaded`
turns each into a video. A non-image (or a sidecar the contract refuses) starts no run: it is
rejected with its error, shown in this run's artifact, its log, and an
`avatarflow.portrait.rejected` event."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact
from prefect.runtime import flow_run

from avatarflow import fleet
from avatarflow.uploads import rejected_event
from avatarflow.watch import (
    DEFAULT_PREFIX,
    FULL_EVERY_S,
    LEASE_S,
    SETTLE_S,
    Watcher,
    post_event,
)
from avatarflow.flows.avatar_video import resolve_store


@flow(name="avatar_watch", flow_run_name="watch-{prefix}", persist_result=False)
async def avatar_watch(
    prefix: str = DEFAULT_PREFIX,
    archive_block: str | None = None,
    full_scan: bool | None = None,
    settle_seconds: float = SETTLE_S,
    lease_seconds: float = LEASE_S,
    full_every_seconds: float = FULL_EVERY_S,
) -> dict[str, Any]:
    """Scan `prefix` (under the archive's key prefix) for new portraits and announce each once.

    A portrait's other request fields come from its sidecar `<name>.json` beside it (an object
    of the API's names: voice_script, voice, voice_language, resolution, seed...) or, for the
    fields it does not set, the object's metadata (x-amz-meta-voice_script...). Without a seed,
    one derived from the object. `full_scan`: list the whole prefix (default: hourly), which
    also finds names sorting before the cursor. Objects younger than `settle_seconds` wait for
    the next scan (upload the sidecar first)."""
    fleet.refuse_restart_loop(flow_run.run_count, fleet.MAX_STARTS, "the next scheduled run scans again")
    logger = get_run_logger()
    store = await resolve_store(archive_block)
    watcher = Watcher(store, prefix, emit=post_event, lease_seconds=lease_seconds, settle_seconds=settle_seconds,
                      full_every_seconds=full_every_seconds, log=logger.info)
    report = await watcher.scan(full=full_scan)
    for r in report.rejected:
        logger.error("rejected %s: %s", r.uri, r.error)
        try:
            await post_event(rejected_event(r.uri, r.error, r.version or r.uri))
        except Exception as e:
            logger.warning("rejection event not sent: %s", e)
    if report.emitted or report.rejected:
        await acreate_table_artifact(
            key="avatar-watch",
            table=[{"object": u, "status": "emitted", "error": None} for u in report.emitted]
            + [{"object": r.uri, "status": "rejected", "error": r.error} for r in report.rejected],
            description=(f"{report.prefix}: {len(report.emitted)} emitted, {len(report.rejected)} rejected, "
                         f"{len(report.pending)} pending"),
        )
    logger.info("scan of s3://%s/%s (%s): %d listed, %d emitted, %d rejected, %d pending, %d held elsewhere",
                store.bucket, report.prefix, "full" if report.full else f"after {report.cursor_before!r}",
                report.listed, len(report.emitted), len(report.rejected), len(report.pending),
                report.claimed_elsewhere)
    return report.as_dict()
