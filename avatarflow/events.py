"""avatarflow's Prefect events: `avatarflow.portrait.uploaded` (a portrait landed in the bucket; the
deployment on-portrait-uploaded makes its video), built and sent through Prefect's events API."""

from __future__ import annotations

from typing import Any

PORTRAIT_UPLOADED = "avatarflow.portrait.uploaded"
EVENTS = {"portrait-uploaded": PORTRAIT_UPLOADED}


def portrait_uploaded_event(s3_uri: str, request: dict[str, Any] | None = None) -> Any:
    """The `avatarflow.portrait.uploaded` event: resource id and label `avatarflow.s3_uri` are the
    portrait's URI; payload.request the other request fields (checked against the contract)."""
    from prefect.events import Event

    from avatarflow.spec import parse_video_request

    if not s3_uri.startswith("s3://") or "/" not in s3_uri[5:]:
        raise ValueError(f"resource={s3_uri!r} is not an s3:// URI; allowed: s3://bucket/key")
    fields = {k: v for k, v in (request or {}).items() if v is not None}
    parse_video_request({**fields, "image": s3_uri})  # a bad field fails here, not in the run
    return Event(event=PORTRAIT_UPLOADED, resource={"prefect.resource.id": s3_uri, "avatarflow.s3_uri": s3_uri},
                 payload={"request": fields})


async def emit(event: Any) -> None:
    """Send one event through Prefect's events API (the server's /events/in websocket)."""
    from prefect.events.clients import get_events_client

    async with get_events_client() as client:
        await client.emit(event)
