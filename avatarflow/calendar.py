"""Content calendars: CSV or JSONL rows (local path, URL or s3:// URI), one video per row.

Columns named like the API (`image`, `voice_script`, `audio`, `voice`, `voice_language`,
`resolution`, `seed`, ...) plus `preset` and `publish_date`; any other column is a field for the
`voice_script` template (`Hello {{ name }}!`), unless it looks like a misspelt parameter
(`voice_langauge`), which is an error. A bad row is reported with its line and the field, not
raised: it fails that row, not the batch. `check_sources` also fails, before anything is
submitted, the rows whose `image` or `audio` the source policy refuses (avatarflow.media.policy).
The calendar is fetched through the same policy.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from avatarflow.media.errors import MediaError
from avatarflow.contract import ContractError
from avatarflow.spec import VideoRequest, parse_video_request

MAX_CALENDAR_BYTES = 20 * 1024 * 1024
ALIASES = {"portrait": "image"}
REQUEST_FIELDS = frozenset(VideoRequest.model_fields) - {"template_fields"}


@dataclass
class Row:
    """One calendar row: a valid request, or the reason it is not one."""

    line: int
    raw: dict[str, Any]
    publish_date: date | None = None
    request: VideoRequest | None = None
    error: str | None = None
    label: str = field(default="")


def parse_records(text: str, source: str) -> list[tuple[int, dict[str, Any]]]:
    """(line, record) pairs from CSV (a header row) or JSONL (an object a line)."""
    stripped = text.lstrip()
    if source.lower().endswith((".jsonl", ".ndjson")) or stripped.startswith("{"):
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                obj = {"__error__": f"line {n} is not JSON: {e.msg}"}
            records.append((n, obj if isinstance(obj, dict) else {"__error__": f"line {n} is not an object"}))
        return records
    reader = csv.DictReader(io.StringIO(text))
    # a row's own line: the reader skips blank lines, and a quoted cell may span lines
    return [(reader.line_num - sum(str(v).count("\n") for v in r.values()), dict(r)) for r in reader]


_INTS, _FLOATS = {"seed"}, {"strength_negative_prompt", "expected_seconds"}
_BOOLS = {"disable_safety_filter", "disable_prompt_upsampling", "resubmit_expired"}


def _typed(name: str, value: Any) -> Any:
    """CSV cells are text: numbers and booleans converted where the field wants them (a cell
    that does not convert stays text, so the contract's message names it)."""
    if not isinstance(value, str):
        return value
    v = value.strip()
    try:
        if name in _INTS:
            return int(v)
        if name in _FLOATS:
            return float(v)
    except ValueError:
        return value
    if name in _BOOLS and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    return value


def parse_row(line: int, raw: dict[str, Any]) -> Row:
    if "__error__" in raw:
        return Row(line, raw, error=raw["__error__"])
    values = {ALIASES.get(k.strip(), k.strip()): v for k, v in raw.items() if k is not None}
    values = {k: v for k, v in values.items() if v not in (None, "")}
    row = Row(line, raw, label=str(values.get("image", ""))[-40:])
    published = values.pop("publish_date", None)
    try:
        row.publish_date = _date(published)
    except ValueError:
        row.error = f"line {line}: publish_date={published!r} is not a date; allowed: YYYY-MM-DD"
        return row
    request = {k: _typed(k, v) for k, v in values.items() if k in REQUEST_FIELDS}
    extra = {k: v for k, v in values.items() if k not in REQUEST_FIELDS}
    script = str(values.get("voice_script", ""))
    for name in extra:
        close = difflib.get_close_matches(name, sorted(REQUEST_FIELDS | {"publish_date"}), n=1, cutoff=0.8)
        if close and not re.search(r"{{\s*%s\b" % re.escape(name), script):
            row.error = (f"line {line}: column {name!r} is not a parameter (did you mean {close[0]!r}?); "
                         f"allowed: {', '.join(sorted(REQUEST_FIELDS | {'publish_date'}))}, "
                         "or a field the voice_script template uses")
            return row
    if extra:
        request["template_fields"] = extra
    try:
        row.request = parse_video_request(request)
    except ContractError as e:
        row.error = f"line {line}: {e}"
    return row


def _date(value: Any) -> date | None:
    if value in (None, ""):
        return None
    if isinstance(value, date):
        return value if not isinstance(value, datetime) else value.date()
    text = str(value).strip()
    return date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text).date()


def check_sources(rows: list[Row], base: Path | None = None, *, policy: Any = None) -> list[Row]:
    """Fail (before any submit) the valid rows whose `image` or `audio` the source policy refuses
    outright: a scheme it does not allow, an s3:// URI outside the allowed places, plain http,
    a local path outside the allowed roots or not a readable regular file there. Relative paths
    are taken from `base` (default: the working directory). `policy`: a media.policy.SourcePolicy
    (default: the operator's, from the environment)."""
    from avatarflow.media.fetch import check_reference
    from avatarflow.media.policy import policy_from_env, scheme_of

    policy = policy if policy is not None else policy_from_env()
    for row in rows:
        if row.request is None:
            continue
        for name in ("image", "audio"):
            ref = getattr(row.request, name)
            if not ref:
                continue
            if base is not None and not scheme_of(ref) and not Path(ref).expanduser().is_absolute():
                ref = str(base / ref)
            try:
                check_reference(ref, field=name, policy=policy)
            except MediaError as e:
                row.error = f"line {row.line}: {e}"
                row.request = None
                break
    return rows


def read_calendar(source: str, *, s3_client: Any = None, policy: Any = None) -> list[Row]:
    """Every row of the calendar at `source` (fetched through the source policy: `policy`, default
    the operator's from the environment), each valid or carrying its error."""
    from avatarflow.media.fetch import read_source
    from avatarflow.media.policy import display_source, policy_from_env

    policy = policy if policy is not None else policy_from_env()
    data = read_source(source, field="calendar", s3_client=s3_client, max_bytes=MAX_CALENDAR_BYTES,
                       policy=policy)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise MediaError("calendar", "is not UTF-8 text", value=display_source(source),
                         allowed="CSV or JSONL") from None
    return [parse_row(line, raw) for line, raw in parse_records(text, source)]


def due(rows: list[Row], today: date, *, all_rows: bool = False) -> list[Row]:
    """The rows to make today: published today (or every row with `all_rows`)."""
    return rows if all_rows else [r for r in rows if r.publish_date == today]
