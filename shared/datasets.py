"""Problem sets: the packaged benchmarks, user JSONL/Parquet files and Hugging Face datasets, read as `Problem`s.

`load_problems(source)` takes a benchmark name (`gsm8k`, `gsm8k_train`, `math500`, `aime24`; see `BENCHMARKS` and
`shared/data/README.md`), a path to a `.jsonl` or `.parquet` file, or a Hugging Face dataset name (`owner/name` or
`owner/name:config`, which needs the optional `datasets` library). Every row is checked before anything is returned,
so a job never starts on half a dataset: a bad file raises one `DatasetError` listing its first problems as
`path:line: reason` (at most `MAX_REPORTED_ERRORS` of them).

Row format: the question in `question` (or `problem`), the gold answer in `answer`, optionally `id` and `source`.
A GSM8K-style answer ending in `#### <number>` is reduced to the number, without thousands separators.

    from shared.datasets import load_problems
    problems = load_problems("math500", limit=50)

Pure: no torch, no vLLM. pyarrow is imported only when a Parquet file is read.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.schemas import PROBLEM_ID_PATTERN, Problem

DATA_DIR = Path(__file__).parent / "data"

BENCHMARKS: dict[str, Path] = {
    "gsm8k": DATA_DIR / "gsm8k_test.jsonl",
    "gsm8k_train": DATA_DIR / "gsm8k_train.jsonl",
    "math500": DATA_DIR / "math500.jsonl",
    "aime24": DATA_DIR / "aime24.jsonl",
}

SUPPORTED_EXTENSIONS = (".jsonl", ".parquet")

# Enough to fix a file in one pass without burying the first error under thousands of repeats.
MAX_REPORTED_ERRORS = 10

QUESTION_FIELDS = ("question", "problem")
# Every field a problem is built from; a Parquet file's other columns are never read.
ROW_FIELDS = (*QUESTION_FIELDS, "answer", "id", "source")

# Suffixes that say "this was meant as a file", so a typo gets "unsupported extension", not a Hugging Face lookup.
_FILE_LIKE_SUFFIXES = {".json", ".csv", ".tsv", ".txt", ".gz", ".zip", ".xz", ".bz2", ".arrow", ".xlsx", ".pq"}
_HF_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?$")
_ID_RE = re.compile(PROBLEM_ID_PATTERN)
_ID_MAX_LEN = 128
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class DatasetError(ValueError):
    """A problem set that cannot be used as given. `errors` holds one `location: reason` string per problem found."""

    def __init__(self, errors: list[str], *, truncated: bool = False) -> None:
        self.errors = list(errors)
        self.truncated = truncated
        message = "\n".join(self.errors)
        if truncated:
            message += f"\n(stopped after {len(self.errors)} errors)"
        super().__init__(message)


class DatasetTooLarge(DatasetError):
    """A file that would take more than the allowed bytes once read (a Parquet file decompresses and decodes), or
    holds more than the allowed problems."""


def load_problems(
    source: str | os.PathLike[str], *, split: str = "train", limit: int | None = None, case_blind_ids: bool = True
) -> list[Problem]:
    """Read a whole problem set, check every row, and return the first `limit` problems (all when None).

    `source` is a name in `BENCHMARKS`, a `.jsonl` or `.parquet` path, or a Hugging Face dataset name
    (`owner/name[:config]`). `split` only applies to Hugging Face datasets; the benchmarks and files are one split
    each (`gsm8k` is the GSM8K test split, `gsm8k_train` its train split). Validation covers the whole set even when
    `limit` is given. Raises `DatasetError` on any bad row, a missing file, an unsupported extension, an empty set,
    or a Hugging Face dataset that cannot be loaded. Ids differing only in case are duplicates unless
    `case_blind_ids` is False (a file the project stored itself, checked when it came in, perhaps by an earlier
    version that did not check case).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit}")
    text = os.fspath(source)
    if text in BENCHMARKS:
        problems = _load_file(BENCHMARKS[text])
    elif _looks_like_path(text):
        problems = _load_file(Path(text).expanduser(), case_blind_ids=case_blind_ids)
    elif _HF_NAME.match(text):
        problems = _load_hf(text, split)
    else:
        raise DatasetError(
            [
                f"{text}: not a benchmark name ({', '.join(BENCHMARKS)}), a {' or '.join(SUPPORTED_EXTENSIONS)} path, "
                "or a Hugging Face dataset name (owner/name[:config])"
            ]
        )
    return problems if limit is None else problems[:limit]


def parse_problem_file(
    data: bytes, name: str, *, max_read_bytes: int | None = None, max_problems: int | None = None,
    case_blind_ids: bool = True,
) -> list[Problem]:
    """The problems of an uploaded file's bytes: JSONL or Parquet, chosen by `name`'s extension, every row checked
    as `load_problems` checks a file (errors name `name:line` for JSONL, `name:row N` for Parquet).

    `max_read_bytes` bounds what a Parquet file's columns may grow to once decompressed and decoded (a few kilobytes
    can hold gigabytes of repeated text): above it, `DatasetTooLarge`, before those bytes are held. Past
    `max_problems` problems, `DatasetTooLarge` too, before the rest are read (64 MiB of short rows is 2 million
    problems: 1.8 GB and 18 s to hold them all)."""
    suffix = Path(name).suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DatasetError(
            [f"{name}: unsupported file type {suffix or '(no extension)'!r}; use {' or '.join(SUPPORTED_EXTENSIONS)}"]
        )
    stem = Path(name).stem
    rows = _jsonl_rows(data) if suffix == ".jsonl" else _parquet_rows(data, name, max_read_bytes)
    return _build_problems(rows, where=name, stem=stem, source_prefix=Path(name).name, max_problems=max_problems,
                           case_blind_ids=case_blind_ids)


def parse_problem_rows(rows: list[Any], where: str = "rows", *, max_problems: int | None = None) -> list[Problem]:
    """Problems from rows already parsed from JSON (a request body): errors name `where:row N`, from 0; past
    `max_problems`, `DatasetTooLarge`."""
    numbered = (_Row(f"row {index}", index, data=data) for index, data in enumerate(rows))
    return _build_problems(numbered, where=where, stem=where, source_prefix=where, max_problems=max_problems)


def problem_to_json(problem: Problem) -> str:
    """One problem as one JSON line (`id`, `question`, `answer`, and `source` when set)."""
    return json.dumps(problem.model_dump(exclude_none=True), ensure_ascii=False)


def write_problems_jsonl(problems: Iterable[Problem], path: str | os.PathLike[str]) -> Path:
    """Write problems as JSONL (`id`, `question`, `answer`, and `source` when set), atomically; return the path.

    The file appears complete or not at all: rows go to a temporary file in the same directory, which then replaces
    `path`. `load_problems` reads the result back to the same problems.
    """
    from shared.storage import replace_atomically

    return replace_atomically(Path(path), "".join(problem_to_json(problem) + "\n" for problem in problems))


def parse_gold_answer(answer: str) -> str:
    """The gold final answer: `... #### 1,000` becomes `1000`; anything without `####` is only stripped."""
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1]
        answer = _THOUSANDS_COMMA.sub("", answer.strip())
    return answer.strip()


def sanitize_problem_id(raw: str) -> str:
    """Map any string onto `PROBLEM_ID_PATTERN`: other characters become `-`, leading non-alphanumerics go."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", raw)
    cleaned = re.sub(r"^[^A-Za-z0-9]+", "", cleaned)
    return cleaned[:_ID_MAX_LEN]


def _looks_like_path(text: str) -> bool:
    path = Path(text).expanduser()
    if path.suffix.lower() in SUPPORTED_EXTENSIONS or path.suffix.lower() in _FILE_LIKE_SUFFIXES:
        return True
    if text.startswith(("/", "./", "../", "~")):
        return True
    return path.exists()


def _load_file(path: Path, *, case_blind_ids: bool = True) -> list[Problem]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DatasetError(
            [f"{path}: unsupported file type {suffix or '(no extension)'!r}; use {' or '.join(SUPPORTED_EXTENSIONS)}"]
        )
    if not path.is_file():
        reason = "is a directory, not a file" if path.is_dir() else "file not found"
        raise DatasetError([f"{path}: {reason}"])
    if suffix == ".jsonl":
        try:
            content = path.read_bytes()
        except OSError as exc:  # no permission to read it, an I/O error
            raise DatasetError([f"{path}: cannot be read ({exc.strerror or exc})"]) from exc
        rows = _jsonl_rows(content)
    else:
        rows = _parquet_rows(path, str(path))
    return _build_problems(
        rows, where=str(path), stem=path.stem, source_prefix=path.name, case_blind_ids=case_blind_ids
    )


class _Row:
    """One raw row: its location for messages, its number for the default id, and either a dict or a read error."""

    __slots__ = ("label", "number", "data", "error")

    def __init__(self, label: str, number: int, data: Any = None, error: str | None = None) -> None:
        self.label, self.number, self.data, self.error = label, number, data, error


def _jsonl_rows(raw: bytes) -> Iterator[_Row]:
    """Lines are numbered from 1 as editors show them; blank lines are skipped but still counted."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield _Row(str(number), number, error=f"not valid UTF-8 (byte {exc.start + 1} of the line)")
            continue
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            yield _Row(str(number), number, error=f"malformed JSON: {exc.msg} (column {exc.colno})")
            continue
        except RecursionError:  # json's decoder recurses once per level of [ or {; no problem row is this deep
            yield _Row(str(number), number, error="JSON nested too deeply to read")
            continue
        except ValueError:  # the one other error json.loads raises: an integer over Python's conversion limit
            yield _Row(str(number), number, error="unreadable JSON: a number of more than 4300 digits")
            continue
        yield _Row(str(number), number, data=data)


def _parquet_rows(source: Path | bytes, name: str, max_read_bytes: int | None = None) -> Iterator[_Row]:
    """Rows of a Parquet file (a path or its bytes) are numbered from 0, as in the table. Only the columns a problem
    is built from are read. With `max_read_bytes`, their size is checked as the file's metadata states it before they
    are read (their rows, and their bytes once decompressed), and once read, before their values are decoded (a
    column's dictionary counted once per use); a column of a type that cannot be bounded so is refused."""
    try:
        import numpy
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pyarrow is a core dependency; this only fires in a broken install
        raise DatasetError([f"{name}: reading Parquet needs pyarrow, which is not installed"]) from exc

    def open_file(**options):
        return pq.ParquetFile(pa.BufferReader(source) if isinstance(source, bytes) else source, **options)

    try:
        parquet = open_file()
        schema = parquet.schema_arrow
        used = [field for field in schema if field.name in ROW_FIELDS]
        if not any(field.name in QUESTION_FIELDS for field in used):
            shown = [column[:40] for column in schema.names[:20]]
            raise DatasetError([f"{name}: no question column ('question' or 'problem'); its columns are {shown}"])
        columns = [field.name for field in used]
        if max_read_bytes is not None:
            _check_parquet_metadata(parquet, used, name, max_read_bytes)
            # Text stays dictionary-encoded, as stored, until its decoded size is known.
            parquet = open_file(read_dictionary=[field.name for field in used if _is_text(field.type)])
        table = parquet.read(columns=columns, use_threads=False)
    except DatasetError:
        raise
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise DatasetError([f"{name}: not a readable Parquet file ({exc})"]) from exc
    if max_read_bytes is not None:
        decoded = sum(_decoded_bytes(chunk) for column in table.columns for chunk in column.chunks)
        if decoded > max_read_bytes:
            raise DatasetTooLarge(
                [f"{name}: its columns {columns} hold {decoded} bytes once decoded; at most {max_read_bytes}"]
            )
    # A float32 (or float16) value comes out as the float64 nearest it, whose digits are not the ones stored
    # (1234.56 as 1234.56005859375, a gold answer no right answer equals): each is read back as its shortest digits.
    narrow = {
        field.name: field.type.to_pandas_dtype()
        for field in table.schema
        if pa.types.is_floating(field.type) and field.type.bit_width < 64
    }
    for index, data in enumerate(table.to_pylist()):
        for column, dtype in narrow.items():
            if isinstance(data.get(column), float):
                data[column] = float(numpy.format_float_positional(dtype(data[column]), trim="-"))
        yield _Row(f"row {index}", index, data=data)


# Bytes counted for every value of a column besides its text: an offset or a number.
_VALUE_BYTES = 8


def _check_parquet_metadata(parquet, used: list, name: str, limit: int) -> None:
    """Refuse a file whose columns (`used`: Arrow fields) are of a type whose decoded size cannot be bounded before
    reading (lists, structs, views), or whose metadata says they decompress to more than `limit` bytes, or whose row
    count alone (a column of nulls or one repeated number costs a few bytes per million rows) would."""
    import pyarrow as pa

    for field in used:
        value_type = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        if not (_is_text(value_type) or _is_scalar(value_type)):  # a wrong file, not a large one: 422, not 413
            raise DatasetError(
                [f"{name}: column {field.name!r} holds {field.type}; an uploaded file's question, answer, id and "
                 "source columns hold text (string), integers or floats"]
            )
    metadata = parquet.metadata
    columns = [field.name for field in used]
    groups = [metadata.row_group(index) for index in range(metadata.num_row_groups)]
    chunks = [group.column(index) for group in groups for index in range(group.num_columns)]
    chunks = [chunk for chunk in chunks if chunk.path_in_schema in columns]  # flat columns: the path is the name
    rows = max(
        metadata.num_rows,
        sum(group.num_rows for group in groups),
        max((sum(c.num_values for c in chunks if c.path_in_schema == column) for column in columns), default=0),
    )
    rows_bytes = rows * _VALUE_BYTES * len(columns)
    if rows_bytes > limit:
        raise DatasetTooLarge(
            [f"{name}: {rows} rows of {len(columns)} columns take {rows_bytes} bytes once read; at most {limit}"]
        )
    uncompressed = sum(chunk.total_uncompressed_size for chunk in chunks)
    if uncompressed > limit:
        raise DatasetTooLarge([f"{name}: its columns {columns} decompress to {uncompressed} bytes; at most {limit}"])


def _is_text(arrow_type) -> bool:
    import pyarrow as pa

    return any(test(arrow_type) for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                             pa.types.is_large_binary))


def _is_scalar(arrow_type) -> bool:
    """An integer, a float, a boolean or null: at most 8 bytes a value."""
    import pyarrow as pa

    return any(test(arrow_type) for test in (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean,
                                             pa.types.is_null))


def _decoded_bytes(chunk) -> int:
    """What one chunk of a column takes once every value is decoded: a dictionary's text counted once per use."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(chunk.type) and _is_text(chunk.type.value_type):
        lengths = pc.take(pc.binary_length(chunk.dictionary), chunk.indices)
        return (pc.sum(lengths).as_py() or 0) + _VALUE_BYTES * len(chunk)
    return chunk.nbytes + _VALUE_BYTES * len(chunk)


def _load_hf(name: str, split: str) -> list[Problem]:
    dataset_name, _, config = name.partition(":")
    try:
        import datasets  # optional: only Hugging Face sources need it
    except ImportError as exc:
        raise DatasetError(
            [
                f"{name}: loading a Hugging Face dataset needs the `datasets` library, which is not installed; "
                f"install it (pip install datasets), or pass a benchmark name ({', '.join(BENCHMARKS)}) "
                f"or a local {' or '.join(SUPPORTED_EXTENSIONS)} file"
            ]
        ) from exc
    try:
        dataset = datasets.load_dataset(dataset_name, config or None, split=split)
    except Exception as exc:  # network, auth, unknown name or split: all mean "cannot use this source"
        raise DatasetError(
            [f"{name}: could not load split {split!r} from Hugging Face (offline, unknown name, or bad split?): {exc}"]
        ) from exc
    rows = (_Row(f"row {index}", index, data=data) for index, data in enumerate(dataset))
    return _build_problems(
        rows, where=f"{name}[{split}]", stem=f"{dataset_name}-{split}", source_prefix=f"hf:{name}[{split}]"
    )


def _build_problems(
    rows: Iterable[_Row], *, where: str, stem: str, source_prefix: str, max_problems: int | None = None,
    case_blind_ids: bool = True,
) -> list[Problem]:
    """Turn every row into a Problem or an error message; raise if there is any error or no problem at all, or
    `DatasetTooLarge` at the first problem past `max_problems`."""
    default_stem = sanitize_problem_id(stem) or "problem"
    problems: list[Problem] = []
    errors: list[str] = []
    first_label_of_id: dict[str, tuple[str, str]] = {}  # casefolded id: (where first, as written)
    truncated = False
    for row in rows:
        if len(errors) >= MAX_REPORTED_ERRORS:
            truncated = True
            break
        result = _row_to_problem(row, default_stem, source_prefix)
        if isinstance(result, str):
            errors.append(f"{where}:{row.label}: {result}")
            continue
        key = result.id.casefold() if case_blind_ids else result.id  # a pair store on a case-blind disk (macOS, SMB)
        previous = first_label_of_id.get(key)
        if previous is not None:
            label, first_id = previous
            also = f"also at {where}:{label}"
            if first_id != result.id:
                also += f" as {first_id!r}: one file name on a disk that ignores case"
            errors.append(f"{where}:{row.label}: duplicate id {result.id!r} ({also})")
            continue
        if max_problems is not None and len(problems) >= max_problems:
            raise DatasetTooLarge([f"{where}:{row.label}: more than {max_problems} problems; at most {max_problems} "
                                   "per dataset (SSB_MAX_PROBLEMS)"])
        first_label_of_id[key] = (row.label, result.id)
        problems.append(result)
    if errors:
        raise DatasetError(errors, truncated=truncated)
    if not problems:
        raise DatasetError([f"{where}: no problems (the source is empty)"])
    return problems


def number_text(value: float) -> str:
    """A number as it is written, never in scientific notation (`str` gives 1e-05 and 1e+16, which no grader takes for
    0.00001 and 10000000000000000): its shortest digits (6.02e23 is 602000000000000000000000, not the float's exact
    binary value), whole numbers without a fraction."""
    if value == 0:
        return "0"
    return format(Decimal(repr(value)).normalize(), "f")


def _row_to_problem(row: _Row, default_stem: str, source_prefix: str) -> Problem | str:
    """A Problem, or the reason this row cannot be one."""
    if row.error is not None:
        return row.error
    data = row.data
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"

    question_field = next((f for f in QUESTION_FIELDS if data.get(f) is not None), None)
    if question_field is None:
        return "missing question field ('question' or 'problem')"
    question = data[question_field]
    if not isinstance(question, str):
        return f"{question_field!r} must be a string, got {type(question).__name__}"
    question = question.strip()
    if not question:
        return f"empty question ({question_field!r})"

    answer = data.get("answer")
    if answer is None:
        return "missing answer field ('answer')"
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        return f"'answer' must be a string or a number, got {type(answer).__name__}"
    if isinstance(answer, float) and not math.isfinite(answer):  # JSON's NaN and Infinity, which Python reads
        return f"'answer' must be a finite number, got {answer}"
    answer = parse_gold_answer(number_text(answer) if isinstance(answer, float) else str(answer))
    if not answer:
        return "empty answer"

    raw_id = data.get("id")
    if isinstance(raw_id, float) and raw_id.is_integer():  # an integer id column with gaps, as pandas writes it
        raw_id = int(raw_id)
    if raw_id is None:
        suffix = f"-{row.number}"
        problem_id = default_stem[: _ID_MAX_LEN - len(suffix)] + suffix
    elif isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        return f"'id' must be a string or a whole number, got {raw_id!r}"
    else:
        problem_id = sanitize_problem_id(str(raw_id))
        if not _ID_RE.match(problem_id):
            return f"id {raw_id!r} has no letters or digits to build an id from"

    source = data.get("source")
    if not isinstance(source, str) or not source:
        source = f"{source_prefix}:{row.label}"
    try:
        source.encode("utf-8")  # the schema refuses a lone surrogate ("\ud800") in the other fields, not in this one
    except UnicodeEncodeError as exc:
        return f"'source': a lone surrogate (character {exc.start + 1}) is not valid Unicode"
    try:
        return Problem(id=problem_id, question=question, answer=answer, source=source)
    except ValidationError as exc:  # what the checks above leave to the schema, e.g. a lone surrogate ("\ud800")
        return "; ".join(f"{'.'.join(map(str, e['loc']))!r}: {e['msg']}" for e in exc.errors())
