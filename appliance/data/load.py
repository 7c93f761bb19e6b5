"""Reading data files: JSONL (one object per line) or plain text for raw domain text.

Every problem is collected with its line number, so `appliance data check`
can show them all; `require_clean()` turns them into one user error.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

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
MAX_PROBLEMS_SHOWN = 10


@dataclass(frozen=True)
class Problem:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


@dataclass
class LoadedFile:
    path: Path
    format: str
    examples: list[tuple[int, Example]]  # (line number, example)
    problems: list[Problem] = field(default_factory=list)
    sha256: str = ""

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


def load_file(path: Path, task: str | None = None) -> LoadedFile:
    """Parse one file; the format is detected from its records (or fixed by the extension for .txt)."""
    path = Path(path)
    raw = _open_checked(path)
    digest = hashlib.sha256(raw).hexdigest()
    if path.suffix.lower() in (".txt", ".md"):
        loaded = _load_text(path, raw)
    else:
        loaded = _load_jsonl(path, raw)
    loaded.sha256 = digest
    if task is not None:
        allowed = TASK_FORMATS[task]
        if loaded.format not in allowed and loaded.format != "unknown":
            raise ApplianceError(
                f"{path} is {loaded.format} data, but the {task} recipe trains on {' or '.join(allowed)} data.",
                f"use a recipe for {loaded.format} data ({_recipes_for(loaded.format)}) or convert the file",
            )
    return loaded


def _recipes_for(fmt: str) -> str:
    return ", ".join(task for task, formats in TASK_FORMATS.items() if fmt in formats) or "none"


def _load_text(path: Path, raw: bytes) -> LoadedFile:
    """Plain text: documents separated by blank lines."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        return LoadedFile(path, "text", [], [Problem(line, "not valid UTF-8 text")])
    examples: list[tuple[int, Example]] = []
    block: list[str] = []
    start = 1
    for number, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip():
            if not block:
                start = number
            block.append(line)
        elif block:
            examples.append((start, TextExample("\n".join(block))))
            block = []
    return LoadedFile(path, "text", examples)


def _load_jsonl(path: Path, raw: bytes) -> LoadedFile:
    records: list[tuple[int, dict]] = []
    problems: list[Problem] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            problems.append(Problem(number, f"line is {len(line) / 2**20:.0f} MiB, over the {MAX_LINE_BYTES // 2**20} MiB limit"))
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(Problem(number, "not valid UTF-8"))
            continue
        try:
            value = json.loads(text)
        except RecursionError:
            problems.append(Problem(number, "JSON nested too deeply"))
            continue
        except json.JSONDecodeError as err:
            problems.append(Problem(number, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        if not isinstance(value, dict):
            problems.append(Problem(number, f"expected a JSON object, got {type(value).__name__}"))
            continue
        records.append((number, value))

    fmt = _file_format(records)
    if fmt is None:
        if records:
            problems.insert(0, Problem(0, f"no line has the keys of a known format ({expected_keys()})"))
        elif not problems:
            problems.append(Problem(0, "the file holds no examples"))
        return LoadedFile(path, "unknown", [], sorted(problems, key=lambda p: p.line))

    examples: list[tuple[int, Example]] = []
    for number, record in records:
        problem = _check_keys(record, fmt)
        if problem is None:
            try:
                examples.append((number, fmt.parse(record)))
                continue
            except RecordError as err:
                problem = str(err)
            except RecursionError:
                problem = "JSON nested too deeply"
        problems.append(Problem(number, problem))
    return LoadedFile(path, fmt.name, examples, sorted(problems, key=lambda p: p.line))


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


RECIPE_FOR_TASK = {"sft": "sft-qlora", "cpt": "cpt", "dpo": "dpo", "classify": "classify"}


def recipe_for(path: Path) -> str:
    """The recipe a data file's format calls for: chat and instructions sft-qlora, raw text cpt,
    preference pairs dpo, labelled texts classify."""
    fmt = load_file(path).format
    return RECIPE_FOR_TASK[next((task for task, formats in TASK_FORMATS.items() if fmt in formats), "sft")]
