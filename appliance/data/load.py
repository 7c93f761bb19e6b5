"""Reading data files into records, and records into typed examples.

    JSONL          one object per line (UTF-8, with or without a BOM; UTF-16 is re-read as such)
    JSON           an array of objects (Alpaca's own alpaca_data.json)
    .gz            either of the above, gzip-compressed
    CSV, Parquet,  tables, read by the `datasets` library: a row is a record
    Arrow
    .txt / .md     raw text: documents separated by blank lines

Every problem is collected with its line (record, row) number, so `appliance data check` can
show them all; `require_clean()` turns them into one user error. `columns` maps a format's key
to the column or key a file uses for it (`--set data.columns.prompt=question`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.data.formats import (
    FORMATS,
    IGNORED_KEYS,
    TASK_FORMATS,
    Example,
    Format,
    RecordError,
    TextExample,
    detect,
    expected_keys,
)
from appliance.errors import ApplianceError

MAX_LINE_BYTES = 8 * 2**20  # a line over 8 MiB is a broken file, not an example
MAX_FILE_BYTES = 4 * 2**30  # what a compressed file may expand to
MAX_PROBLEMS_SHOWN = 10
TABLES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow"}


@dataclass(frozen=True)
class Problem:
    line: int
    message: str
    unit: str = "line"  # "record" in a JSON array, "row" in a table

    def __str__(self) -> str:
        return f"{self.unit} {self.line}: {self.message}" if self.line else self.message


@dataclass
class LoadedFile:
    path: Path
    format: str
    examples: list[tuple[int, Example]]  # (line number, example)
    problems: list[Problem] = field(default_factory=list)
    sha256: str = ""
    # line → the example a line was written from (`appliance data augment`'s meta.paraphrase_of):
    # an example and its paraphrases are one example to the split and the leakage check.
    paraphrase_of: dict[int, str] = field(default_factory=dict)

    def require_clean(self) -> "LoadedFile":
        if self.problems:
            shown = [f"  {p}" for p in self.problems[:MAX_PROBLEMS_SHOWN]]
            if len(self.problems) > MAX_PROBLEMS_SHOWN:
                shown.append(f"  ... and {len(self.problems) - MAX_PROBLEMS_SHOWN} more")
            raise ApplianceError(
                f"{self.path} has {len(self.problems)} bad line(s) ({self.format} format):",
                f"fix or remove those lines; `appliance data check {self.path}` lists every problem",
                details=shown,
            )
        return self


def _open_checked(path: Path) -> bytes:
    path = Path(path)
    if not path.exists():
        raise ApplianceError(f"Data file {path} does not exist.", "check the path (relative paths start in the current folder)")
    if path.is_dir():
        raise ApplianceError(f"{path} is a folder, not a data file.", "pass a .jsonl file (or .txt for raw text)")
    try:
        return path.read_bytes()
    except OSError as err:
        raise ApplianceError(f"Cannot read {path}: {err.strerror}.", "check the file's permissions") from None


def load_file(path: Path, task: str | None = None, columns: dict[str, str] | None = None) -> LoadedFile:
    """Parse one file; the format is detected from its records (or fixed by the extension for .txt)."""
    path = Path(path)
    raw = _open_checked(path)
    digest = hashlib.sha256(raw).hexdigest()
    name = path.name.lower()
    if raw[:2] == b"\x1f\x8b":  # gzip, whatever the name says
        raw = _gunzip(path, raw)
        name = name.removesuffix(".gz")
    suffix = Path(name).suffix
    if suffix in (".txt", ".md"):
        loaded = _load_text(path, _decoded(raw))
    elif suffix in TABLES or raw[:4] == b"PAR1":
        loaded = _load_records(path, _table_records(path, TABLES.get(suffix, "parquet")), "row", columns)
    else:
        text = _decoded(raw)
        if text.lstrip()[:1] == "[":
            loaded = _load_records(path, _array_records(path, text), "record", columns)
        else:
            records, problems = _jsonl_records(text)
            loaded = _load_records(path, records, "line", columns, problems)
    loaded.sha256 = digest
    if task is not None:
        allowed = TASK_FORMATS[task]
        if loaded.format not in allowed and loaded.format != "unknown":
            raise ApplianceError(
                f"{path} is {loaded.format} data, but the {task} recipe trains on {' or '.join(allowed)} data.",
                f"use a recipe for {loaded.format} data ({_recipes_for(loaded.format)}) or convert the file",
            )
    return loaded


def read_objects(path: Path) -> list[tuple[int, Any]]:
    """A JSONL or JSON file's records as written, with their line numbers: for tools that write a
    changed copy of the user's data (`appliance data augment`)."""
    text = _decoded(_open_checked(Path(path)))
    if text.lstrip()[:1] == "[":
        return _array_records(Path(path), text)
    return _jsonl_records(text)[0]


def _gunzip(path: Path, raw: bytes) -> bytes:
    try:
        with gzip.GzipFile(fileobj=__import__("io").BytesIO(raw)) as f:
            out = f.read(MAX_FILE_BYTES + 1)
    except (OSError, EOFError) as err:
        raise ApplianceError(f"{path} is a damaged gzip file ({err}).", "check that the download is complete") from None
    if len(out) > MAX_FILE_BYTES:
        raise ApplianceError(f"{path} expands to more than {MAX_FILE_BYTES // 2**30} GiB.", "split it into smaller files")
    return out


def _decoded(raw: bytes) -> str:
    """UTF-8 (a byte-order mark dropped), or UTF-16 when its byte-order mark says so; bytes that are
    not UTF-8 become U+FFFD here and are reported line by line by the JSONL reader."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            pass
    return raw.decode("utf-8-sig", errors="surrogateescape")


def _jsonl_records(text: str) -> tuple[list[tuple[int, Any]], list[Problem]]:
    records, problems = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            problems.append(Problem(number, f"line is {len(line) / 2**20:.0f} MiB, over the {MAX_LINE_BYTES // 2**20} MiB limit"))
            continue
        if any("\udc80" <= ch <= "\udcff" for ch in line):  # bytes that were not UTF-8
            problems.append(Problem(number, "not valid UTF-8"))
            continue
        try:
            value = json.loads(line)
        except RecursionError:
            problems.append(Problem(number, "JSON nested too deeply"))
            continue
        except json.JSONDecodeError as err:
            problems.append(Problem(number, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        records.append((number, value))
    if records == [] and problems and all("not valid JSON" in p.message for p in problems) and "," in text.split("\n", 1)[0]:
        problems = [Problem(0, "this looks like a CSV file, not JSONL: name it .csv (or convert it to one JSON object per line)")]
    return records, problems


def _array_records(path: Path, text: str) -> list[tuple[int, Any]]:
    try:
        value = json.loads(text)
    except RecursionError:
        raise ApplianceError(f"{path} is JSON nested too deeply.", "check the file") from None
    except json.JSONDecodeError as err:
        raise ApplianceError(
            f"{path} starts like a JSON array but is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}).",
            "fix the JSON, or write one object per line (JSONL)",
        ) from None
    if not isinstance(value, list):
        raise ApplianceError(f"{path} is JSON but not an array of examples.", "write a list of objects, or one object per line (JSONL)")
    return list(enumerate(value, start=1))


def _table_records(path: Path, kind: str) -> list[tuple[int, Any]]:
    """The rows of a CSV, Parquet or Arrow file, read by the `datasets` library."""
    try:
        import datasets
    except ImportError:
        raise ApplianceError(f"Reading {path} needs the `datasets` library.", "pip install datasets  (make install does it)") from None
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    datasets.disable_progress_bars()
    try:
        if kind == "csv":
            table = datasets.Dataset.from_csv(str(path), sep="\t" if path.suffix.lower() == ".tsv" else ",", keep_in_memory=True)
        elif kind == "parquet":
            table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
        else:
            table = datasets.Dataset.from_file(str(path), in_memory=True)
    except Exception as err:  # noqa: BLE001 - pyarrow and pandas raise many types for a bad table
        raise ApplianceError(f"{path} cannot be read as a {kind} table ({str(err).splitlines()[0][:200]}).", "check the file") from None
    return list(enumerate(table.to_list(), start=1))


def _recipes_for(fmt: str) -> str:
    return ", ".join(task for task, formats in TASK_FORMATS.items() if fmt in formats) or "none"


def _load_text(path: Path, text: str) -> LoadedFile:
    """Plain text: documents separated by blank lines."""
    lines = text.split("\n")  # lines as editors count them (a stray \r or form feed does not start one)
    bad = next((i for i, line in enumerate(lines, start=1) if any("\udc80" <= ch <= "\udcff" for ch in line)), None)
    if bad is not None:
        return LoadedFile(path, "text", [], [Problem(bad, "not valid UTF-8 text")])
    examples: list[tuple[int, Example]] = []
    block: list[str] = []
    start = 1
    for number, line in enumerate(lines + [""], start=1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            examples.append((start, TextExample("\n".join(block))))
            block = []
    return LoadedFile(path, "text", examples)


def _load_records(path: Path, records: list[tuple[int, Any]], unit: str, columns: dict[str, str] | None,
                  problems: list[Problem] | None = None) -> LoadedFile:
    problems = [Problem(p.line, p.message, unit) for p in problems or []]
    objects: list[tuple[int, dict]] = []
    for number, value in records:
        if not isinstance(value, dict):
            problems.append(Problem(number, f"expected a JSON object, got {type(value).__name__}", unit))
            continue
        if columns:
            value = _renamed(value, columns)
        surrogate = _lone_surrogate(value)
        if surrogate:
            problems.append(Problem(number, f"holds an unpaired surrogate {surrogate} (an emoji cut in half?): remove or repair it", unit))
            continue
        objects.append((number, value))

    fmt = _file_format(objects)
    if fmt is None:
        if objects:
            mapped = f" (with the columns mapped: {columns})" if columns else ""
            found = ", ".join(sorted({str(k) for _, r in objects for k in r})[:12]) or "none"
            hint = "; map yours with --set data.columns.KEY=yours, e.g. data.columns.prompt=question" if not columns else ""
            problems.insert(0, Problem(0, f"no {unit} has the keys of a known format{mapped}: its keys are {found} "
                                          f"({expected_keys()}){hint}"))
        elif not problems:
            problems.append(Problem(0, "the file holds no examples"))
        return LoadedFile(path, "unknown", [], sorted(problems, key=lambda p: p.line))

    examples: list[tuple[int, Example]] = []
    paraphrase_of: dict[int, str] = {}
    for number, record in objects:
        problem = _check_keys(record, fmt)
        if problem is None:
            try:
                examples.append((number, fmt.parse(record)))
                meta = record.get("meta")
                if isinstance(meta, dict) and meta.get("paraphrase_of") is not None:
                    paraphrase_of[number] = str(meta["paraphrase_of"])
                elif record.get("id") is not None:
                    paraphrase_of[number] = str(record["id"])  # an original: its paraphrases name its id
                continue
            except RecordError as err:
                problem = str(err)
            except RecursionError:
                problem = "JSON nested too deeply"
        problems.append(Problem(number, problem, unit))
    groups = paraphrase_of if any("meta" in r and isinstance(r["meta"], dict) and "paraphrase_of" in r["meta"] for _, r in objects) else {}
    return LoadedFile(path, fmt.name, examples, sorted(problems, key=lambda p: p.line), paraphrase_of=groups)


def _renamed(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """The record with its columns under the names a format reads (`columns`: format key → file's)."""
    out = dict(record)
    for key, column in columns.items():
        if column in out:
            out[key] = out.pop(column)
    return out


def _lone_surrogate(value: Any, depth: int = 0) -> str | None:
    """The first unpaired UTF-16 surrogate in a record's strings (valid JSON, but not text a
    tokenizer can read), as its escape."""
    if depth > 64:
        return None
    if isinstance(value, str):
        return next((f"\\u{ord(ch):04x}" for ch in value if "\ud800" <= ch <= "\udfff"), None)
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((found for item in items if (found := _lone_surrogate(item, depth + 1))), None)


def _file_format(records: list[tuple[int, dict]]) -> Format | None:
    """The format most lines have: one file holds one format."""
    counts = Counter(f.name for _, r in records if (f := detect(r)) is not None)
    if not counts:
        return None
    return FORMATS[counts.most_common(1)[0][0]]


def _check_keys(record: dict, fmt: Format) -> str | None:
    keys = set(record)
    missing = fmt.required - keys
    unknown = keys - fmt.required - fmt.optional - IGNORED_KEYS
    if missing or unknown:
        found = ", ".join(sorted(map(str, keys))) or "none"
        return f"expected keys {fmt.describe} for {fmt.name} data, found: {found}"
    return None


RECIPE_FOR_TASK = {"sft": "sft-qlora", "cpt": "cpt", "dpo": "dpo", "kto": "kto", "grpo": "grpo", "classify": "classify"}


def recipe_for(path: Path) -> str:
    """The recipe a data file's format calls for: chat and instructions sft-qlora, raw text cpt,
    preference pairs dpo, unpaired answers marked desirable or not kto, labelled texts classify."""
    fmt = load_file(path).format
    return RECIPE_FOR_TASK[next((task for task, formats in TASK_FORMATS.items() if fmt in formats), "sft")]
