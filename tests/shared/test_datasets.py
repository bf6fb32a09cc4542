"""Loading problem sets: the packaged benchmarks, JSONL and Parquet files, and every way a file can be bad."""

from __future__ import annotations

import builtins
import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.datasets import (
    BENCHMARKS,
    MAX_REPORTED_ERRORS,
    DatasetError,
    DatasetTooLarge,
    load_problems,
    parse_gold_answer,
    parse_problem_file,
    parse_problem_rows,
    write_problems_jsonl,
)
from shared.schemas import PROBLEM_ID_PATTERN, Problem


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(question: str = "What is 1 + 1?", answer: str = "2", **extra: object) -> str:
    return json.dumps({"question": question, "answer": answer, **extra})


def load_error(source: Path | str) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        load_problems(source)
    return info.value


# Packaged benchmarks


@pytest.mark.parametrize(
    ("name", "count", "first_id"),
    [("gsm8k", 1319, "gsm8k_test-1"), ("gsm8k_train", 7473, "gsm8k_train-1"), ("math500", 500, "math500-1"),
     ("aime24", 30, "aime24-1")],
)
def test_packaged_benchmark_loads_every_problem(name: str, count: int, first_id: str) -> None:
    problems = load_problems(name)
    assert len(problems) == count
    assert problems[0].id == first_id
    assert problems[0].source == f"{BENCHMARKS[name].name}:1"
    assert len({p.id for p in problems}) == count
    assert all(re.match(PROBLEM_ID_PATTERN, p.id) for p in problems)


def test_gsm8k_gold_is_the_number_after_hashes() -> None:
    problems = load_problems("gsm8k")
    assert problems[0].answer == "18"  # Janet's ducks
    assert all("####" not in p.answer and "," not in p.answer for p in problems)
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", p.answer) for p in problems)


def test_math_answers_are_kept_as_written() -> None:
    assert load_problems("math500", limit=1)[0].answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert load_problems("aime24", limit=1)[0].answer == "204"


@pytest.mark.parametrize(
    ("raw", "gold"),
    [("So 1,000 in all.\n#### 1,000", "1000"), ("#### 1,450,000", "1450000"), ("x\n####  -10 ", "-10"),
     ("#### 3.5", "3.5"), (" 42 ", "42"), (r"\frac{1,2}{3}", r"\frac{1,2}{3}"), ("(1,2)", "(1,2)")],
)
def test_parse_gold_answer(raw: str, gold: str) -> None:
    assert parse_gold_answer(raw) == gold


def test_limit_returns_the_first_problems() -> None:
    problems = load_problems("aime24", limit=5)
    assert [p.id for p in problems] == [f"aime24-{i}" for i in range(1, 6)]
    assert len(load_problems("aime24", limit=1000)) == 30
    with pytest.raises(ValueError, match="limit"):
        load_problems("aime24", limit=0)


# User JSONL files


def test_jsonl_fields_ids_and_sources(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "my set.jsonl",
        [
            row("Q one?", "Step.\n#### 1,000"),
            "",
            json.dumps({"problem": "Q two?", "answer": 7}),
            row("Q three?", "x", id=12),
            row("Q four?", "y", id="weird id/with spaces"),
        ],
    )
    problems = load_problems(path)
    assert [(p.id, p.question, p.answer, p.source) for p in problems] == [
        ("my-set-1", "Q one?", "1000", "my set.jsonl:1"),
        ("my-set-3", "Q two?", "7", "my set.jsonl:3"),
        ("12", "Q three?", "x", "my set.jsonl:4"),
        ("weird-id-with-spaces", "Q four?", "y", "my set.jsonl:5"),
    ]
    assert load_problems(str(path), limit=2) == problems[:2]


@pytest.mark.parametrize(
    ("lines", "line", "reason"),
    [
        ([row(), '{"question": "Q", "answer": '], 2, "malformed JSON"),
        ([row(), "[1, 2]"], 2, "expected a JSON object, got list"),
        ([row(), '"just a string"'], 2, "expected a JSON object, got str"),
        ([row(), '{"answer": "2"}'], 2, "missing question field"),
        ([row(), '{"question": "Q?"}'], 2, "missing answer field"),
        ([row(), row(question="   ")], 2, "empty question"),
        ([row(), row(answer="")], 2, "empty answer"),
        ([row(), row(answer="Work.\n#### ")], 2, "empty answer"),
        ([row(), '{"question": ["Q"], "answer": "2"}'], 2, "'question' must be a string"),
        ([row(), '{"question": "Q", "answer": true}'], 2, "'answer' must be a string or a number"),
        ([row(), '{"question": "Q", "answer": NaN}'], 2, "'answer' must be a finite number, got nan"),
        ([row(), '{"question": "Q", "answer": -Infinity}'], 2, "'answer' must be a finite number, got -inf"),
        ([row(), "", row(id="!!!")], 3, "has no letters or digits"),
        ([row(), "[" * 200_000 + "]" * 200_000], 2, "JSON nested too deeply"),
        ([row(), '{"question": "Q", "answer": ' + "[" * 200_000 + "]" * 200_000 + "}"], 2, "JSON nested too deeply"),
        ([row(), r'{"question": "What is 2+\ud800 2?", "answer": "4"}'], 2, "'question': Input should be a valid"),
        ([row(), r'{"question": "Q", "answer": "4\udfff"}'], 2, "'answer': Input should be a valid string"),
    ],
)
def test_bad_jsonl_line_is_reported_with_its_number(tmp_path: Path, lines: list[str], line: int, reason: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", lines)
    error = load_error(path)
    assert str(error).startswith(f"{path}:{line}: ")
    assert reason in str(error)
    assert error.errors == [str(error)]


def test_uploaded_bytes_and_rows_report_deep_nesting_and_lone_surrogates_by_row() -> None:
    """The curator's entry points (an uploaded file's bytes, rows from a request body) report the same per-row errors,
    which it turns into a 422 naming the row."""
    deep = ("[" * 200_000 + "]" * 200_000).encode()
    surrogate = rb'{"question": "\ud800", "answer": "1"}'
    huge_number = b'{"question": "Q", "answer": "1", "note": ' + b"9" * 5000 + b"}"
    surrogate_source = rb'{"question": "Q", "answer": "1", "source": "x\ud800"}'
    upload = b"\n".join([row().encode(), deep, surrogate, huge_number, surrogate_source])
    with pytest.raises(DatasetError) as info:
        parse_problem_file(upload, "up.jsonl")
    assert info.value.errors == [
        "up.jsonl:2: JSON nested too deeply to read",
        "up.jsonl:3: 'question': Input should be a valid string, unable to parse raw data as a unicode string",
        "up.jsonl:4: unreadable JSON: a number of more than 4300 digits",
        "up.jsonl:5: 'source': a lone surrogate (character 2) is not valid Unicode",
    ]
    with pytest.raises(DatasetError, match=r"^rows:row 1: 'question': Input should be a valid string"):
        parse_problem_rows([json.loads(row()), {"question": "Q\ud800", "answer": "1"}])


def test_non_utf8_bytes_are_reported_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(row().encode() + b"\n\n" + '{"question": "caf\xe9?", "answer": "1"}'.encode("latin-1") + b"\n")
    error = load_error(path)
    assert str(error).startswith(f"{path}:3: not valid UTF-8")


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "dup.jsonl", [row(id="a"), row(id="b"), row(id="a")])
    assert str(load_error(path)) == f"{path}:3: duplicate id 'a' (also at {path}:1)"


def test_ids_that_collide_after_sanitizing_are_duplicates(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "dup.jsonl", [row(id="a b"), row(id="a-b")])
    assert "duplicate id 'a-b'" in str(load_error(path))


def test_ids_that_differ_only_in_case_are_duplicates(tmp_path: Path) -> None:
    """`a` and `A` would be one pair file on a disk that ignores case (macOS, SMB): one problem lost silently."""
    path = write_lines(tmp_path / "dup.jsonl", [row(id="Apple"), row(id="apple")])
    assert "dup.jsonl:2: duplicate id 'apple' (also at" in str(load_error(path))
    assert "as 'Apple': one file name on a disk that ignores case" in str(load_error(path))
    # a file the project stored itself, accepted when it came in (perhaps before ids' case was compared), reads
    assert [p.id for p in load_problems(path, case_blind_ids=False)] == ["Apple", "apple"]


def test_number_answers_and_ids_are_read_as_written() -> None:
    """A float answer in plain digits, never `1e-05` or `1e+16` (no grader takes them for the number); a whole float
    id (an integer column with gaps, as pandas writes it) as the integer; an id of any other kind refused."""
    values = [0.00001, 1e16, 2.5, 1000.0, -0.0, 6.02e23]
    rows = [{"question": "Q", "answer": value, "id": i} for i, value in enumerate(values)]
    assert [p.answer for p in parse_problem_rows(rows)] == [
        "0.00001", "10000000000000000", "2.5", "1000", "0", "602000000000000000000000",  # not the float's binary value
    ]
    assert [p.id for p in parse_problem_rows([{"question": "Q", "answer": "1", "id": 7.0}])] == ["7"]
    for bad in (7.5, True, {"a": 1}, [1, 2]):
        with pytest.raises(DatasetError, match="'id' must be a string or a whole number"):
            parse_problem_rows([{"question": "Q", "answer": "1", "id": bad}])


def test_errors_are_collected_up_to_a_bound(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "many.jsonl", [row()] + ["not json"] * (MAX_REPORTED_ERRORS + 5))
    error = load_error(path)
    assert len(error.errors) == MAX_REPORTED_ERRORS
    assert error.errors[0].startswith(f"{path}:2: malformed JSON")
    assert error.errors[1].startswith(f"{path}:3: ")
    assert error.truncated
    assert str(error).endswith(f"(stopped after {MAX_REPORTED_ERRORS} errors)")


def test_one_bad_line_rejects_the_whole_file(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "mixed.jsonl", [row(id=str(i)) for i in range(50)] + ["{"])
    with pytest.raises(DatasetError, match=":51: malformed JSON"):
        load_problems(path, limit=1)


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_empty_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    assert str(load_error(path)) == f"{path}: no problems (the source is empty)"


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.jsonl"
    assert str(load_error(path)) == f"{path}: file not found"


@pytest.mark.parametrize("name", ["data.csv", "data.json", "data.txt"])
def test_unknown_extension_names_the_supported_ones(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(row() + "\n", encoding="utf-8")
    message = str(load_error(path))
    assert message.startswith(f"{path}: unsupported file type")
    assert ".jsonl" in message and ".parquet" in message


def test_existing_file_without_extension_is_not_taken_for_a_hub_name(tmp_path: Path) -> None:
    path = tmp_path / "problems"
    path.write_text(row() + "\n", encoding="utf-8")
    assert "unsupported file type '(no extension)'" in str(load_error(path))


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    problems = [
        Problem(id="p-1", question="Héllo, 2 + 2?", answer="4", source="hand"),
        Problem(id="p-2", question="Line one\nline two", answer=r"\frac{1}{2}"),
    ]
    path = write_problems_jsonl(problems, tmp_path / "out" / "set.jsonl")
    assert [p.name for p in path.parent.iterdir()] == ["set.jsonl"]  # no temp file left behind
    loaded = load_problems(path)
    assert loaded[0] == problems[0]
    assert loaded[1] == problems[1].model_copy(update={"source": "set.jsonl:2"})


# Parquet files


def test_parquet_round_trip(tmp_path: Path) -> None:
    table = pa.table(
        {"problem": ["What is 2 + 3?", "How many?"], "answer": ["5", "Count.\n#### 1,000"], "level": [1, 2]}
    )
    pq.write_table(table, tmp_path / "set.parquet")
    problems = load_problems(tmp_path / "set.parquet")
    assert [(p.id, p.question, p.answer, p.source) for p in problems] == [
        ("set-0", "What is 2 + 3?", "5", "set.parquet:row 0"),
        ("set-1", "How many?", "1000", "set.parquet:row 1"),
    ]


def test_narrow_float_answers_in_parquet_keep_their_stored_digits(tmp_path: Path) -> None:
    """A float32 column read through Python floats gave 1234.56 as 1234.56005859375: a gold answer no right answer
    equals. Each value is read as its shortest digits, and a NaN is still refused."""
    for dtype in (pa.float32(), pa.float16()):
        table = pa.table({"question": ["a?", "b?", "c?"], "answer": pa.array([12.5, 0.3, 3.0], type=dtype)})
        pq.write_table(table, tmp_path / "narrow.parquet")
        assert [p.answer for p in load_problems(tmp_path / "narrow.parquet")] == ["12.5", "0.3", "3"]
    table = pa.table({"question": ["a?"], "answer": pa.array([1234.56], type=pa.float32())})
    pq.write_table(table, tmp_path / "narrow.parquet")
    assert [p.answer for p in load_problems(tmp_path / "narrow.parquet")] == ["1234.56"]
    table = pa.table({"question": ["a?"], "answer": pa.array([float("nan")], type=pa.float32())})
    pq.write_table(table, tmp_path / "narrow.parquet")
    with pytest.raises(DatasetError, match="must be a finite number"):
        load_problems(tmp_path / "narrow.parquet")


def test_parquet_bad_row_is_reported_by_index(tmp_path: Path) -> None:
    path = tmp_path / "set.parquet"
    pq.write_table(pa.table({"question": ["Q?", "Q2?"], "answer": ["1", None]}), path)
    assert str(load_error(path)) == f"{path}:row 1: missing answer field ('answer')"


def test_corrupt_parquet_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    assert str(load_error(path)).startswith(f"{path}: not a readable Parquet file")


def parquet_bytes(table: pa.Table, **options: object) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    return buffer.getvalue()


# An upload's Parquet file is bounded by what its columns take once read, not by its size on the wire.
@pytest.mark.parametrize(
    ("table", "says", "a_dataset_without_the_limit"),
    [
        # one megabyte of one letter: a few hundred bytes compressed
        (pa.table({"question": ["a" * 1_000_000], "answer": ["1"]}), "decompress to", True),
        # one 20 kB question stored once in the column's dictionary, used by 400 rows: 8 MB decoded
        (pa.table({"question": ["b" * 20_000] * 400, "answer": ["1"] * 400}), "once decoded", True),
        # nulls cost a few bits per row on disk
        (pa.table({"question": pa.nulls(100_000, pa.string()), "answer": pa.nulls(100_000, pa.string())}),
         "100000 rows of 2 columns", False),
    ],
    ids=["compressed", "dictionary", "rows"],
)
def test_an_uploaded_parquet_file_over_its_read_limit_is_refused(
    table: pa.Table, says: str, a_dataset_without_the_limit: bool
) -> None:
    data = parquet_bytes(table, compression="zstd")
    assert len(data) < 100_000
    with pytest.raises(DatasetTooLarge, match=re.escape(says)) as info:
        parse_problem_file(data, "up.parquet", max_read_bytes=1_000_000)
    assert str(info.value).startswith("up.parquet: ")
    if a_dataset_without_the_limit:  # only its size is refused
        assert len(parse_problem_file(data, "up.parquet")) == table.num_rows


def test_a_parquet_column_of_a_type_no_problem_has_is_refused_as_invalid_not_as_too_large() -> None:
    """A list in one row can hold millions of values (no row count bounds it): refused before its rows are read, as a
    wrong file (the curator's 422), not a large one."""
    data = parquet_bytes(pa.table({"question": [["c" * 20_000] * 400], "answer": ["1"]}), compression="zstd")
    with pytest.raises(DatasetError, match=re.escape("up.parquet: column 'question' holds list<")) as info:
        parse_problem_file(data, "up.parquet", max_read_bytes=1_000_000)
    assert not isinstance(info.value, DatasetTooLarge)


def test_a_parquet_file_without_a_question_column_is_refused_before_its_rows_are_read() -> None:
    data = parquet_bytes(pa.table({"notes": pa.nulls(1_000_000, pa.string())}), compression="zstd")
    for limit in (None, 1_000_000):
        with pytest.raises(DatasetError, match=re.escape("up.parquet: no question column ('question' or 'problem');")):
            parse_problem_file(data, "up.parquet", max_read_bytes=limit)


def test_an_uploaded_parquet_file_reads_only_the_problem_columns() -> None:
    # a large column nothing reads does not count; the problems are as without a limit
    table = pa.table({"problem": ["What is 2 + 3?", "How many?"], "answer": [5, 6], "notes": ["x" * 2_000_000] * 2})
    data = parquet_bytes(table)
    problems = parse_problem_file(data, "up.parquet", max_read_bytes=100_000)
    assert [(p.id, p.question, p.answer) for p in problems] == [
        ("up-0", "What is 2 + 3?", "5"),
        ("up-1", "How many?", "6"),
    ]
    assert problems == parse_problem_file(data, "up.parquet")


# Hugging Face names


def test_hub_name_without_datasets_library_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_datasets(name: str, *args: object, **kwargs: object) -> object:
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    message = str(load_error("openai/gsm8k:main"))
    assert message.startswith("openai/gsm8k:main: loading a Hugging Face dataset needs the `datasets` library")
    assert "gsm8k_train" in message


def test_source_that_is_neither_file_nor_name_is_an_error() -> None:
    assert "not a benchmark name" in str(load_error("two words"))


def test_an_upload_past_its_problem_cap_stops_at_the_first_problem_over_it() -> None:
    """`max_problems` (the curator's SSB_MAX_PROBLEMS): the first problem past it ends the read with `DatasetTooLarge`
    naming its line or row, before the rest are read; at the cap, every problem is returned."""
    from shared.datasets import DatasetTooLarge, parse_problem_rows

    lines = "".join(row() + "\n" for _ in range(5)).encode()
    assert len(parse_problem_file(lines, "up.jsonl", max_problems=5)) == 5
    with pytest.raises(DatasetTooLarge, match=r"^up.jsonl:4: more than 3 problems; at most 3 per dataset"):
        parse_problem_file(lines + b"not json\n", "up.jsonl", max_problems=3)
    with pytest.raises(DatasetTooLarge, match=r"^rows:row 2: more than 2 problems"):
        parse_problem_rows([{"question": "Q", "answer": "1"}] * 4, max_problems=2)
