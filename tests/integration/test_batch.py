"""The batch flow: calendar rows due today as child runs of avatar_video, bad rows failing alone
(validated up front, or failing in their own child run), a budget that stops submitting, the
rate limit passed down, and a manifest (CSV and JSON, in S3) and artifacts of every row."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import date
from pathlib import Path

import pytest
from typer.testing import CliRunner

from avatarflow.budget import estimate_cost, plan
from avatarflow.calendar import check_sources, parse_records, parse_row, read_calendar
from avatarflow.inputs import TemplateError
from avatarflow.media.errors import MediaError
from avatarflow.media.policy import SourcePolicy
from avatarflow.request_limit import limit_slots
from avatarflow.spec import VideoRequest
from avatarflow.flows.avatar_batch import MANIFEST_COLUMNS, avatar_batch

ROOT = Path(__file__).resolve().parents[2]
DAY = date(2026, 11, 24)
COLUMNS = ["image", "voice_script", "voice", "seed", "publish_date", "name"]


def _write(path: Path, rows: list[dict]) -> str:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return str(path)


def _calendar(tmp_path: Path, portrait_path: Path) -> str:
    p = str(portrait_path)
    not_a_portrait = tmp_path / "not-a-portrait.jpg"
    not_a_portrait.write_bytes(b"this is text, not a JPEG")
    return _write(tmp_path / "calendar.csv", [
        {"image": p, "voice_script": "Row one, {{ name }}.", "name": "Ada", "seed": "1", "publish_date": "2026-11-24"},
        {"image": p, "voice_script": "Row two.", "voice": "Puck (Male)", "seed": "2", "publish_date": "2026-11-24"},
        {"image": p, "voice_script": "Row three.", "voice": "Nobody (Male)", "seed": "3", "publish_date": "2026-11-24"},
        {"image": str(tmp_path / "missing.jpg"), "voice_script": "Row four.", "seed": "4", "publish_date": "2026-11-24"},
        {"image": str(not_a_portrait), "voice_script": "Row five.", "seed": "5", "publish_date": "2026-11-24"},
        {"image": p, "voice_script": "Row six is for tomorrow.", "seed": "6", "publish_date": "2026-11-25"},
        {"image": p, "voice_script": " ".join(["word"] * 400), "seed": "7", "publish_date": "2026-11-24"},
        {"image": p, "voice_script": "Short, but after the budget stopped.", "seed": "8", "publish_date": "2026-11-24"},
    ])


def test_calendar_rows_parse_with_per_row_errors(tmp_path, portrait_path):
    policy = SourcePolicy(local_roots=(str(tmp_path), str(portrait_path.parent)))
    with pytest.raises(MediaError, match="local paths are not allowed"):
        read_calendar(_calendar(tmp_path, portrait_path))  # the default policy: no local calendar
    rows = check_sources(read_calendar(_calendar(tmp_path, portrait_path), policy=policy), policy=policy)
    assert [r.line for r in rows] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert rows[0].request.template_fields == {"name": "Ada"} and rows[0].request.seed == 1
    assert rows[2].request is None and "voice='Nobody (Male)'" in rows[2].error and "line 4" in rows[2].error
    assert rows[3].request is None and "missing.jpg" in rows[3].error
    assert "not a readable regular file" in rows[3].error
    assert rows[4].request is not None, "a file that is there is checked when its row runs"
    assert rows[5].publish_date == date(2026, 11, 25)
    jsonl = parse_records('{"image": "a.jpg", "seed": 7, "publish_date": "2026-11-24"}\nnot json\n[1]\n', "c.jsonl")
    assert parse_row(*jsonl[0]).request.seed == 7 and parse_row(*jsonl[0]).publish_date == DAY
    assert "line 2 is not JSON" in parse_row(*jsonl[1]).error and "not an object" in parse_row(*jsonl[2]).error
    assert "publish_date='tomorrow'" in parse_row(2, {"image": "a.jpg", "publish_date": "tomorrow"}).error
    typo = parse_row(2, {"image": "a.jpg", "voice_langauge": "French"})
    assert typo.request is None and "did you mean 'voice_language'" in typo.error
    assert parse_row(2, {"image": "a.jpg", "title": "kept as a template field"}).request.template_fields
    assert "seed='x'" in parse_row(2, {"image": "a.jpg", "seed": "x"}).error


def test_check_sources_applies_the_policy_to_every_row(tmp_path, portrait_path):
    policy = SourcePolicy(local_roots=(str(portrait_path.parent),), archive=("arch", "team"))
    raws = [{"image": str(portrait_path)}, {"image": "/etc/passwd"}, {"image": "s3://arch/team/p.jpg"},
            {"image": "s3://arch/other/p.jpg"}, {"image": "http://127.0.0.1:9/p.jpg"},
            {"image": "https://example.com/p.jpg", "audio": "file:///proc/self/environ"},
            {"image": "ftp://x/y.jpg"}]
    rows = check_sources([parse_row(n, r) for n, r in enumerate(raws, start=2)], policy=policy)
    assert [r.request is not None for r in rows] == [True, False, True, False, False, False, False]
    assert "image='/etc/passwd'" in rows[1].error and "only under the allowed local roots" in rows[1].error
    assert "audio=" in rows[5].error and "ftp" in rows[6].error


def test_budget_estimates_from_the_rendered_script_and_stops_at_the_first_job_past_it():
    short = VideoRequest(image="a.jpg", voice_script="one two three four five")  # 1 + 5 / 2.5 = 3 s
    assert estimate_cost(short) == pytest.approx(3 * 0.025)
    assert estimate_cost(short.model_copy(update={"resolution": "1080p"})) == pytest.approx(3 * 0.045)
    # the words as spoken: a loop in the template counts as what it renders to, not its source
    looped = VideoRequest(image="a.jpg", voice_script="{% for i in range(n) %}word {% endfor %}",
                          template_fields={"n": 400})
    assert estimate_cost(looped) == pytest.approx((1 + 400 / 2.5) * 0.025)
    field = VideoRequest(image="a.jpg", voice_script="{{ text }}", template_fields={"text": "w " * 1000})
    assert estimate_cost(field) == pytest.approx((1 + 1000 / 2.5) * 0.025)
    with pytest.raises(TemplateError, match="5000"):
        estimate_cost(VideoRequest(image="a.jpg", voice_script="{{ 'ab ' * 10**7 }}", template_fields={"x": 1}))
    p = plan([0.4, 0.4, 0.4, 0.1], 1.0)
    assert p.submit == [True, True, False, False] and p.stopped_at == 2 and p.planned == pytest.approx(0.8)
    assert "budget" in p.reason(3)
    assert plan([5.0, 5.0], None).submit == [True, True]
    with pytest.raises(ValueError):
        plan([1.0], -1)


def test_limit_slots_hold_the_rate_in_any_minute():
    for per_minute, burst in ((50, None), (50, 50), (300, 30), (5, None)):
        limit, decay = limit_slots(per_minute, burst)
        worst = limit + 60 * decay if limit < per_minute else per_minute
        assert worst == pytest.approx(per_minute), (per_minute, burst)
    assert limit_slots(50) == (2.5, pytest.approx(47.5 / 60))  # 95 % of the rate while it binds


def test_batch_fails_bad_rows_alone_respects_the_budget_and_writes_a_manifest(
    api, pipeline_env, tmp_path, portrait_path, s3
):
    from prefect.client.orchestration import get_client

    from avatarflow.request_limit import ensure_concurrency_limit

    limit = asyncio.run(ensure_concurrency_limit(600, name="test-batch-rate"))
    assert limit["limit"] == 30 and limit["slot_decay_per_second"] == pytest.approx(9.5)
    # then a limit that hardly decays, so its taken slots count the API requests made through it
    limit = asyncio.run(ensure_concurrency_limit(10_000, burst=9_999, name="test-batch-rate"))
    assert limit["slot_decay_per_second"] == pytest.approx(1 / 60)
    out = asyncio.run(avatar_batch(
        calendar=_calendar(tmp_path, portrait_path), today=DAY, budget=1.0, concurrency_limit="test-batch-rate",
    ))
    by_line = {e["line"]: e for e in out["entries"]}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 8, 9], "row 7 is due tomorrow"
    assert by_line[2]["status"] == "completed" and by_line[3]["status"] == "completed"
    assert by_line[2]["cost"] > 0 and by_line[2]["s3_uri"].startswith("s3://")
    assert by_line[2]["run_name"].startswith("avatar-batch-calendar-") and by_line[2]["run_name"].endswith("-line-2")
    assert by_line[4]["status"] == "failed" and "Nobody" in by_line[4]["error"] and not by_line[4]["run_name"]
    assert by_line[5]["status"] == "failed" and "missing.jpg" in by_line[5]["error"]
    assert by_line[6]["status"] == "failed" and by_line[6]["run_name"], "failed in its own child run"
    assert "not-a-portrait" in by_line[6]["error"] or "image" in by_line[6]["error"]
    assert by_line[8]["status"] == "skipped" and by_line[8]["error"].startswith("budget:")
    assert by_line[9]["status"] == "skipped" and by_line[9]["error"].startswith("budget:"), "submitting stopped"
    assert (out["completed"], out["failed"], out["skipped"]) == (2, 3, 2)
    stats = api.stats()["requests"]
    assert stats["submit"] == 2
    assert 0 < out["spent"] <= 1.0 and out["spent"] == pytest.approx(by_line[2]["cost"] + by_line[3]["cost"])

    # the manifest, CSV and JSON, beside the videos
    bucket, key = out["manifest_json"][5:].split("/", 1)
    assert key.endswith(f"batches/{out['flow_run_id']}/manifest.json")
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert [r["status"] for r in manifest["rows"]] == [by_line[n]["status"] for n in sorted(by_line)]
    assert manifest["columns"] == list(MANIFEST_COLUMNS) and manifest["spent"] == out["spent"]
    bucket, key = out["manifest_csv"][5:].split("/", 1)
    table = list(csv.DictReader(io.StringIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode())))
    assert len(table) == 7 and {r["request_id"] for r in table if r["status"] == "completed"} == {
        by_line[2]["request_id"], by_line[3]["request_id"]}
    assert all(r["error"] for r in table if r["status"] != "completed")

    # the artifacts: progress at 100 %, the table, a link to the manifest; the rate limit was taken
    async def read_back():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        async with get_client() as client:
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[out["flow_run_id"]])))
            gcl = await client.read_global_concurrency_limit_by_name("test-batch-rate")
        return arts, gcl

    arts, gcl = asyncio.run(read_back())
    by_key = {a.key: a for a in arts}
    assert by_key["avatar-batch-progress"].data == 100.0
    table = by_key["avatar-batch-rows"].data
    assert len(table if isinstance(table, list) else json.loads(table)) == 7
    assert out["manifest_csv"] in by_key["avatar-batch-manifest"].data
    api_requests = sum(stats.get(k, 0) for k in ("submit", "status", "result", "history"))
    taken = gcl.active_slots / 100  # hundredths of a request (avatarflow.request_limit.SLOTS_PER_REQUEST)
    assert api_requests >= 4 and api_requests - 3 <= taken <= api_requests, (gcl, stats)


def test_a_finished_batch_run_started_again_returns_its_manifest_and_makes_nothing(
    api, pipeline_env, tmp_path, portrait_path, s3, monkeypatch
):
    """A batch run that finished and is started again (the requeue automation, when a server
    restart held back its Completed event) does not make its rows again: it returns the
    manifest it wrote. Before, it ran every row again (cache hits, cost 0) and overwrote the
    manifest with them."""
    calendar = _write(tmp_path / "one.csv", [
        {"image": str(portrait_path), "voice_script": "Once.", "seed": "11", "publish_date": "2026-11-24"}])
    first = asyncio.run(avatar_batch(calendar=calendar, today=DAY, concurrency_limit=None))
    assert first["completed"] == 1 and first["entries"][0]["cache_hit"] is False
    before = api.stats()["requests"]
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", first["flow_run_id"])
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__RUN_COUNT", "2")
    again = asyncio.run(avatar_batch(calendar=calendar, today=DAY, concurrency_limit=None))
    assert again["flow_run_id"] == first["flow_run_id"]
    assert again["entries"] == first["entries"], "the rows were made again"
    assert api.stats()["requests"] == before
    bucket, key = first["manifest_json"][5:].split("/", 1)
    assert json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())["rows"] == first["entries"]


def test_a_batch_run_started_too_many_times_fails_and_makes_nothing(api, pipeline_env, tmp_path, portrait_path,
                                                                    monkeypatch):
    """The requeue automations put a batch run whose worker died back in the queue; one that
    kills its worker every time (out of memory, say) would be started for ever."""
    import uuid

    from avatarflow.errors import AvatarflowError
    from avatarflow.flows.avatar_batch import MAX_BATCH_STARTS

    calendar = _write(tmp_path / "one.csv", [
        {"image": str(portrait_path), "voice_script": "Never.", "seed": "12", "publish_date": "2026-11-24"}])
    before = api.stats()["requests"]
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__ID", str(uuid.uuid4()))
    monkeypatch.setenv("PREFECT__RUNTIME__FLOW_RUN__RUN_COUNT", str(MAX_BATCH_STARTS + 1))
    with pytest.raises(AvatarflowError, match=f"started {MAX_BATCH_STARTS + 1} times"):
        asyncio.run(avatar_batch(calendar=calendar, today=DAY, concurrency_limit=None))
    assert api.stats()["requests"] == before


def test_batch_command(pipeline_env, tmp_path, portrait_path):
    """`avatarflow batch`: a calendar with nothing to make but a bad row (exit 1: a row failed), a
    bad --today (exit 2: bad input)."""
    from avatarflow.cli import app

    calendar = _write(tmp_path / "bad.csv", [
        {"image": str(portrait_path), "voice_script": "Hi.", "voice": "Nobody (Male)", "publish_date": "2026-11-24"},
        {"image": str(portrait_path), "voice_script": "Not today.", "publish_date": "2026-11-25"},
    ])
    result = CliRunner().invoke(app, ["batch", calendar, "--today", "2026-11-24", "--json", "--concurrency-limit", ""])
    assert result.exit_code == 1, result.output
    out = json.loads(result.stdout)
    assert out["rows"] == 1 and out["failed"] == 1 and "Nobody" in out["entries"][0]["error"]
    result = CliRunner().invoke(app, ["batch", calendar, "--today", "24/11/2026"])
    assert result.exit_code == 2 and "YYYY-MM-DD" in result.output


@pytest.mark.parametrize("example", ["examples/calendar.csv", "examples/calendar.jsonl"])
def test_examples_parse(example):
    policy = SourcePolicy(local_roots=(str(ROOT),))
    rows = check_sources(read_calendar(str(ROOT / example), policy=policy), base=ROOT, policy=policy)
    assert rows and all(r.error is None for r in rows)
