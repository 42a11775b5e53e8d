"""The API's answers: submit, status, result and history rows. Tolerant: a field the vendor adds
later is kept, never an error; where the output URL sits differs by endpoint and is found here."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow")


class SubmitResponse(_Tolerant):
    request_id: str
    status: str = "QUEUED"
    status_url: str | None = None
    response_url: str | None = None
    poll_url: str | None = None


class StatusResponse(_Tolerant):
    request_id: str | None = None
    status: str
    error: str | None = None


class VideoInfo(_Tolerant):
    url: str | None = None
    content_type: str | None = None
    file_name: str | None = None
    file_size: int | None = None


class Metrics(_Tolerant):
    inference_time: float | None = None
    queue_time: float | None = None
    total_time: float | None = None
    cost: float | None = None
    remaining_credits: float | None = None


class ResultResponse(_Tolerant):
    request_id: str | None = None
    status: str
    output: Any = None
    video: VideoInfo | None = None
    metrics: Metrics | None = None
    error: str | None = None

    @property
    def output_url(self) -> str | None:
        if self.video and self.video.url:
            return self.video.url
        if isinstance(self.output, str):
            return self.output
        if isinstance(self.output, list) and self.output and isinstance(self.output[0], str):
            return self.output[0]
        if isinstance(self.output, dict):
            return self.output.get("url") or self.output.get("video")
        return None


class HistoryRecord(_Tolerant):
    """One row of the vendor's request history (any age, unlike the 1-hour request record)."""

    request_id: str
    model_name: str | None = None
    model_status: str | None = None
    status: str | None = None
    request_body: Any = None
    generation_url: Any = None
    credits_deduction: float | None = None
    latency_ms: float | None = None
    created_at: str | None = None
    updated_at: str | None = None
    error: str | None = None

    @property
    def state(self) -> str | None:
        return self.model_status or self.status

    @property
    def output_url(self) -> str | None:
        g = self.generation_url
        if isinstance(g, list):
            g = g[0] if g else None
        return g if isinstance(g, str) and g else None


def history_rows(body: Any) -> list[HistoryRecord]:
    """The rows of a history list page, whatever key the page keeps them under."""
    rows: Any = body
    if isinstance(body, dict):
        for key in ("data", "items", "results", "records", "requests", "rows"):
            if isinstance(body.get(key), list):
                rows = body[key]
                break
            if isinstance(body.get(key), dict):
                return history_rows(body[key])
        else:
            rows = []
    return [HistoryRecord.model_validate(r) for r in rows if isinstance(r, dict) and "request_id" in r]
