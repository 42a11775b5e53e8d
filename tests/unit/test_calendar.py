"""avatarflow.calendar: CSV and JSONL rows, per-row errors naming the line and the field, typed
cells (seeds, numbers, flags), the day's selection and the source policy applied to every row."""

from __future__ import annotations

from datetime import date

import pytest

from avatarflow.calendar import (
    Row,
    check_sources,
    due,
    parse_records,
    parse_row,
    read_calendar,
)
from avatarflow.media.errors import MediaError
from avatarflow.media.policy import SourcePolicy

DAY = date(2026, 11, 24)


def rows_of(text: str, source: str = "cal.csv") -> list[Row]:
    return [parse_row(n, raw) for n, raw in parse_records(text, source)]


# ---- records -------------------------------------------------------------------------------------
def test_csv_records_are_numbered_from_the_line_after_the_header():
    records = parse_records("image,seed,name\na.jpg,1,Ada\nb.jpg,2,Bo\n", "cal.csv")
    assert records == [(2, {"image": "a.jpg", "seed": "1", "name": "Ada"}),
                       (3, {"image": "b.jpg", "seed": "2", "name": "Bo"})]


def test_jsonl_is_recognised_by_its_name_or_its_first_brace_and_keeps_file_lines():
    text = '\n{"image": "a.jpg", "seed": 3}\n\n{"image": "b.jpg"}\n'
    assert parse_records(text, "cal.txt") == [(2, {"image": "a.jpg", "seed": 3}), (4, {"image": "b.jpg"})]
    assert parse_records('  {"image": "a.jpg"}', "cal.csv") == [(1, {"image": "a.jpg"})]
    broken = parse_records('[1, 2]\n{"image": \n"x"\n', "cal.ndjson")
    assert [n for n, _ in broken] == [1, 2, 3]
    errors = [parse_row(n, raw).error for n, raw in broken]
    assert errors[0] == "line 1 is not an object"
    assert errors[1].startswith("line 2 is not JSON: ") and errors[2] == "line 3 is not an object"


# ---- one row -------------------------------------------------------------------------------------
def test_csv_cells_are_typed_for_the_fields_that_want_numbers_or_flags():
    row = parse_row(3, {"portrait": "a.jpg", "seed": " 42 ", "disable_safety_filter": "yes",
                        "strength_negative_prompt": "0.25", "expected_seconds": "12", "voice": ""})
    assert row.error is None and row.line == 3
    r = row.request
    assert (r.image, r.seed, r.disable_safety_filter, r.strength_negative_prompt, r.expected_seconds) == (
        "a.jpg", 42, True, 0.25, 12.0), "`portrait` is the API's `image`"
    assert "voice" not in r.model_fields_set, "an empty cell is an unset field (the API's default)"
    assert parse_row(2, {"image": "a.jpg", "resubmit_expired": "0"}).request.resubmit_expired is False


@pytest.mark.parametrize("raw,named", [
    ({"image": "a.jpg", "seed": "x"}, "seed='x'"),
    ({"image": "a.jpg", "seed": "1.5"}, "seed='1.5'"),
    ({"image": "a.jpg", "resolution": "4k"}, "resolution='4k' is not allowed; allowed: 720p, 1080p"),
    ({"image": "a.jpg", "disable_safety_filter": "perhaps"}, "disable_safety_filter='perhaps'"),
    ({"voice_script": "Hello."}, "image is required"),
    ({"image": "a.jpg", "brief": "b", "voice_script": "v"}, "brief and voice_script are both given"),
])
def test_a_bad_cell_fails_its_row_naming_the_line_and_the_field(raw, named):
    row = parse_row(7, raw)
    assert row.request is None and row.error.startswith("line 7: ") and named in row.error


def test_a_misspelt_parameter_is_an_error_unless_the_template_uses_it():
    typo = parse_row(5, {"image": "a.jpg", "voice_langauge": "French", "publsh_date": "2026-11-24"})
    assert typo.request is None
    assert typo.error.startswith("line 5: column 'voice_langauge' is not a parameter (did you mean 'voice_language'?)")
    assert "publish_date" in typo.error and "or a field the voice_script template uses" in typo.error
    used = parse_row(5, {"image": "a.jpg", "voice_script": "Hi {{ voice_langauge }}!", "voice_langauge": "x"})
    assert used.error is None and used.request.template_fields == {"voice_langauge": "x"}
    other = parse_row(5, {"image": "a.jpg", "voice_script": "Hi {{ name }}.", "name": "Ada", "title": "t"})
    assert other.request.template_fields == {"name": "Ada", "title": "t"}


def test_publish_dates_and_their_errors():
    assert parse_row(2, {"image": "a.jpg", "publish_date": "2026-11-24"}).publish_date == DAY
    assert parse_row(2, {"image": "a.jpg", "publish_date": "2026-11-24T23:30:00+01:00"}).publish_date == DAY
    assert parse_row(2, {"image": "a.jpg"}).publish_date is None
    bad = parse_row(9, {"image": "a.jpg", "publish_date": "24/11/2026"})
    assert bad.request is None
    assert bad.error == "line 9: publish_date='24/11/2026' is not a date; allowed: YYYY-MM-DD"


def test_seeds_survive_from_csv_and_jsonl_alike():
    csv_rows = rows_of("image,seed\na.jpg,0\nb.jpg,4294967295\nc.jpg,\n")
    assert [r.request.seed for r in csv_rows] == [0, 4294967295, None], "an empty seed: the run chooses one"
    jsonl = rows_of('{"image": "a.jpg", "seed": 7}\n{"image": "b.jpg", "seed": "8"}\n', "cal.jsonl")
    assert [r.request.seed for r in jsonl] == [7, 8]
    assert parse_row(2, {"image": "a.jpg", "seed": "-1"}).request.random_seed, "-1: a random seed"
    error = parse_row(6, {"image": "a.jpg", "seed": "-2"}).error
    assert error.startswith("line 6: seed=-2 is out of range; allowed: -1 to ")


def test_the_label_is_the_end_of_the_image_reference():
    long = "https://media.example.com/" + "x" * 60 + "/portrait.jpg"
    row = parse_row(2, {"image": long})
    assert row.label == long[-40:] and len(row.label) == 40


# ---- the day's rows ------------------------------------------------------------------------------
def test_due_selects_the_rows_published_today_or_all():
    rows = rows_of("image,publish_date\na.jpg,2026-11-24\nb.jpg,2026-11-25\nc.jpg,\nd.jpg,2026-11-24\n")
    assert [r.line for r in due(rows, DAY)] == [2, 5]
    assert [r.line for r in due(rows, date(2026, 11, 25))] == [3]
    assert due(rows, date(2027, 1, 1)) == []
    assert due(rows, DAY, all_rows=True) == rows


# ---- sources -------------------------------------------------------------------------------------
def test_check_sources_fails_refused_references_and_keeps_failed_rows_failed(tmp_path):
    (tmp_path / "p.jpg").write_bytes(b"\xff\xd8\xff")
    policy = SourcePolicy(local_roots=(str(tmp_path),))
    rows = [parse_row(2, {"image": "p.jpg"}), parse_row(3, {"image": "/etc/hostname"}),
            parse_row(4, {"image": "p.jpg", "audio": "http://example.com/a.wav"}),
            parse_row(5, {"image": "a.jpg", "seed": "x"})]
    out = check_sources(rows, base=tmp_path, policy=policy)
    assert out is rows
    assert [r.request is not None for r in rows] == [True, False, False, False]
    assert rows[1].error.startswith("line 3: ") and "image='/etc/hostname'" in rows[1].error
    assert rows[2].error.startswith("line 4: ") and "audio=" in rows[2].error
    assert "seed='x'" in rows[3].error, "a row that already failed keeps its own error"


def test_read_calendar_through_the_policy(tmp_path):
    cal = tmp_path / "cal.csv"
    cal.write_bytes("\ufeffimage,seed\na.jpg,1\n".encode())
    with pytest.raises(MediaError, match="local paths are not allowed"):
        read_calendar(str(cal), policy=SourcePolicy())
    policy = SourcePolicy(local_roots=(str(tmp_path),))
    rows = read_calendar(str(cal), policy=policy)
    assert [(r.line, r.request.image, r.request.seed) for r in rows] == [(2, "a.jpg", 1)], "the BOM is dropped"
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,name\na.jpg,Jos\xe9\n".encode("latin-1"))
    with pytest.raises(MediaError, match="not UTF-8") as info:
        read_calendar(str(latin), policy=policy)
    assert "calendar" in str(info.value)

def test_csv_errors_name_the_rows_line_in_the_file_after_a_blank_line_or_a_multi_line_cell():
    """csv.DictReader skips blank lines and a quoted cell may span lines: the row's line must be
    the reader's line_num, not its index + 2, or the error points at the wrong row."""
    text = 'image,voice_script,seed\na.jpg,Hello.,1\n\nb.jpg,"Two\nlines",2\nc.jpg,Bad seed,x\n'
    records = parse_records(text, "cal.csv")
    assert records[0][0] == 2 and records[1][0] in (4, 5) and records[2][0] == 6
    assert parse_row(*records[2]).error.startswith("line 6: seed='x'")
