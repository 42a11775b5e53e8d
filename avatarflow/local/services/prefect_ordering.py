"""Prefect's causal ordering of events for the local server, remembering across a restart.

The server holds a state event until it has seen the one it follows (a state set within 5 min
of the previous one follows its event), for up to 15 min. Prefect keeps the events it has seen
in memory only: after a restart every run whose previous state came before it has its next
state event held for 15 min, so no automation sees it (the fleet bench: a child killed before
its first heartbeat stayed RUNNING, a batch run taken by a dying worker stayed PENDING). Here an
event stored before this server started counts as seen: the server processed it then, or lost
it with its memory. Events stored since are still ordered as Prefect does (they may be in flight
here). Held events are kept in the database (Prefect's own ``ordering.db``), not in memory.

The server uses it through ``PREFECT_SERVER_EVENTS_CAUSAL_ORDERING`` (prefect_server.prefect_env).
"""

from __future__ import annotations

from datetime import datetime, timezone
from uuid import UUID

import psutil
import sqlalchemy as sa
from prefect.server.database import PrefectDBInterface, db_injector
from prefect.server.events.ordering import db as _db
from prefect.server.events.schemas.events import Event

STARTED = datetime.fromtimestamp(psutil.Process().create_time(), timezone.utc)  # this server's start


class CausalOrdering(_db.CausalOrdering):
    async def event_has_been_seen(self, event: UUID | Event) -> bool:
        if await super().event_has_been_seen(event):
            return True
        return await _stored_before_start(event.id if isinstance(event, Event) else event)


@db_injector
async def _stored_before_start(db: PrefectDBInterface, event_id: UUID) -> bool:
    async with db.session_context() as session:
        found = await session.execute(
            sa.select(db.Event.id).where(db.Event.id == event_id, db.Event.received < STARTED).limit(1))
        return found.first() is not None
