"""The batch flow: calendar rows due today as child runs, a bad row failing alone, a budget,
and a manifest (CSV and JSON, in S3) of every row."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import date

import pytest

from avatarflow.calendar import parse_records, parse_row, read_calendar
from flows.avatar_batch import avatar_batch

DAY = date(2026, 11, 24)


def _calendar(tmp_path, portrait_path) -> str:
    p = str(portrait_path)
    rows = [
        {"image": p, "voice_script": "Row one, {{ name }}.", "name": "Ada", "seed": "1", "publish_date": "2026-11-24"},
        {"image": p, "voice_script": "Row two.", "voice": "Puck (Male)", "seed": "2", "publish_date": "2026-11-24"},
        {"image": p, "voice_script": "Row three.", "voice": "Nobody (Male)", "seed": "3", "publish_date": "2026-11-24"},
        {"image": str(tmp_path / "missing.jpg"), "voice_script": "Row four.", "seed": "4", "publish_date": "2026-11-24"},
        {"image": p, "voice_script": "Row five is for tomorrow.", "seed": "5", "publish_date": "2026-11-25"},
        {"image": p, "voice_script": " ".join(["word"] * 400), "seed": "6", "publish_date": "2026-11-24"},
    ]
    path = tmp_path / "calendar.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "voice_script", "voice", "seed", "publish_date", "name"])
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_calendar_rows_parse_with_per_row_errors(tmp_path, portrait_path):
    rows = read_calendar(_calendar(tmp_path, portrait_path))
    assert [r.line for r in rows] == [2, 3, 4, 5, 6, 7]
    assert rows[0].request.template_fields == {"name": "Ada"} and rows[0].request.seed == 1
    assert rows[2].request is None and "voice='Nobody (Male)'" in rows[2].error and "line 4" in rows[2].error
    assert rows[4].publish_date == date(2026, 11, 25)
    jsonl = parse_records('{"image": "a.jpg", "seed": 7}\nnot json\n', "c.jsonl")
    assert parse_row(*jsonl[0]).request.seed == 7 and "not JSON" in parse_row(*jsonl[1]).error
    bad_date = parse_row(2, {"image": "a.jpg", "publish_date": "tomorrow"})
    assert "publish_date='tomorrow'" in bad_date.error


def test_batch_fails_bad_rows_alone_respects_the_budget_and_writes_a_manifest(
    api, pipeline_env, tmp_path, portrait_path, s3
):
    out = asyncio.run(avatar_batch(
        calendar=_calendar(tmp_path, portrait_path), today=DAY, budget=1.0, rate_limit=None,
    ))
    by_line = {e["line"]: e for e in out["entries"]}
    assert sorted(by_line) == [2, 3, 4, 5, 7], "row 6 is due tomorrow"
    assert by_line[2]["status"] == "completed" and by_line[3]["status"] == "completed"
    assert by_line[2]["cost"] > 0 and by_line[2]["s3_uri"].startswith("s3://")
    assert by_line[4]["status"] == "invalid" and "Nobody" in by_line[4]["error"]
    assert by_line[5]["status"] == "failed" and "missing.jpg" in by_line[5]["error"]
    assert by_line[7]["status"] == "skipped" and "budget" in by_line[7]["error"]
    assert api.stats()["requests"]["submit"] == 2
    assert out["spent"] <= 1.0
    bucket, key = out["manifest_json"][5:].split("/", 1)
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert [r["status"] for r in manifest["rows"]] == [by_line[n]["status"] for n in sorted(by_line)]
    bucket, key = out["manifest_csv"][5:].split("/", 1)
    table = list(csv.DictReader(io.StringIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode())))
    assert len(table) == 5 and {r["request_id"] for r in table if r["status"] == "completed"} == {
        by_line[2]["request_id"], by_line[3]["request_id"]}


@pytest.mark.parametrize("example", ["examples/calendar.csv", "examples/calendar.jsonl"])
def test_examples_parse(example):
    from pathlib import Path

    rows = read_calendar(str(Path(__file__).resolve().parent.parent / example))
    assert rows and all(r.error is None for r in rows)
