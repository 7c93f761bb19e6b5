"""From data files to tokenized train / validation / test splits with a report.

    load files → dedupe → split (per source, seeded) → leakage check → tokenize
    (chat template + assistant-only labels, or raw text) → over-length policy

`prepare()` does it all; with `strict=False` it gathers every problem instead
of raising, which is what `appliance data check` shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import DataSpec
from appliance.data.formats import ChatExample, ClassificationExample, Example, PreferenceExample, TextExample
from appliance.data.load import LoadedFile, Problem, load_file
from appliance.data.split import Leak, dedupe, leakage, split
from appliance.data.template import (
    IGNORE_INDEX,
    TemplateMismatch,
    TokenizedExample,
    end_of_text_id,
    end_of_turn,
    require_chat_template,
    tokenize_chat,
)
from appliance.errors import ApplianceError


@dataclass(frozen=True)
class Record:
    source: int  # index into the data files
    line: int
    example: Example


@dataclass(frozen=True)
class Encoded:
    """One tokenized training item and where it came from."""

    source: int
    line: int
    item: Any  # TokenizedExample, or a task's own encoding (preference pair, labelled text)

    @property
    def length(self) -> int:
        return self.item.length if hasattr(self.item, "length") else len(self.item.input_ids)


@dataclass
class SourceReport:
    path: str
    format: str
    sha256: str
    lines: int
    duplicates: int = 0
    problems: list[Problem] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)


@dataclass
class DataReport:
    sources: list[SourceReport]
    leaks: list[Leak] = field(default_factory=list)
    overlong: int = 0
    overlong_policy: str = "drop"
    lengths: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> p50/p95/max
    trained_tokens: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # problems not tied to a file line


@dataclass
class PreparedData:
    task: str
    train: list[Encoded]
    val: list[Encoded]
    test: list[Encoded]
    report: DataReport
    labels: list[str] = field(default_factory=list)  # classification label names, index = class id

    def split(self, name: str) -> list[Encoded]:
        return getattr(self, name)


def percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# -- encoding per task ----------------------------------------------------------


class Encoder:
    """Tokenizes examples of one task; `encode` returns items (several for long raw text)."""

    def __init__(self, tokenizer: Any, seq_len: int, overlong: str):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.overlong = overlong

    def encode(self, example: Example) -> list[Any]:
        raise NotImplementedError

    def too_long(self, length: int) -> bool:
        return length > self.seq_len


class ChatEncoder(Encoder):
    def __init__(self, tokenizer: Any, seq_len: int, overlong: str):
        super().__init__(tokenizer, seq_len, overlong)
        self.eot = end_of_turn(tokenizer)

    def encode(self, example: Example) -> list[Any]:
        assert isinstance(example, ChatExample)
        tokenized = tokenize_chat(self.tokenizer, example.messages, self.eot)
        if tokenized.trained_tokens == 0:
            raise TemplateMismatch("the chat template left no assistant tokens to learn from")
        return [tokenized]

    def truncate(self, item: TokenizedExample) -> TokenizedExample | None:
        cut = TokenizedExample(item.input_ids[: self.seq_len], item.labels[: self.seq_len])
        return cut if cut.trained_tokens else None


class TextEncoder(Encoder):
    """Raw text: every token carries loss; a long document becomes several seq_len chunks
    (continued pre-training wants all of a domain's text, not only what fits)."""

    def __init__(self, tokenizer: Any, seq_len: int, overlong: str):
        super().__init__(tokenizer, seq_len, overlong)
        self.eot_id = end_of_text_id(tokenizer)

    def encode(self, example: Example) -> list[Any]:
        assert isinstance(example, TextExample)
        ids = self.tokenizer(example.text, add_special_tokens=False)["input_ids"] + [self.eot_id]
        return [TokenizedExample(ids[i : i + self.seq_len], ids[i : i + self.seq_len]) for i in range(0, len(ids), self.seq_len)]

    def too_long(self, length: int) -> bool:
        return False  # chunked above, never dropped


ENCODERS: dict[str, type[Encoder]] = {"sft": ChatEncoder, "cpt": TextEncoder}


def register_encoder(task: str, encoder: type[Encoder]) -> None:
    ENCODERS[task] = encoder


# -- the pipeline ---------------------------------------------------------------


def _records(loaded: LoadedFile, source: int) -> list[Record]:
    return [Record(source, line, ex) for line, ex in loaded.examples]


def prepare(
    spec: DataSpec,
    task: str,
    tokenizer: Any | None,
    *,
    model_name: str = "the model",
    strict: bool = True,
) -> PreparedData:
    """Load, validate, split and tokenize every data file of `spec` for `task`.

    With `tokenizer=None` only the text-level steps run (formats, duplicates,
    splits, leakage); that is `appliance data check` without `--model`.
    """
    if not spec.files:
        raise ApplianceError("No data files given.", "pass --data FILE.jsonl")
    sources: list[SourceReport] = []
    per_source: list[list[Record]] = []
    val_records: list[Record] = []
    for index, data_source in enumerate(spec.files):
        loaded = load_file(data_source.path, task)
        if strict:
            loaded.require_clean()
        report = SourceReport(str(data_source.path), loaded.format, loaded.sha256, len(loaded.examples), problems=loaded.problems)
        sources.append(report)
        per_source.append(_records(loaded, index))

    if spec.val_file is not None:
        loaded = load_file(spec.val_file, task)
        if strict:
            loaded.require_clean()
        sources.append(SourceReport(str(spec.val_file), loaded.format, loaded.sha256, len(loaded.examples), problems=loaded.problems))
        val_records = _records(loaded, len(spec.files))

    report = DataReport(sources=sources, overlong_policy=spec.overlong)
    train: list[Record] = []
    val: list[Record] = list(val_records)
    test: list[Record] = []
    seen: set[str] = set()
    for index, records in enumerate(per_source):
        if spec.dedupe:
            kept, removed = dedupe(records, lambda r: r.example.key)
            # Duplicates across files count too: the same line in two files is one example.
            cross = [r for r in kept if r.example.key in seen]
            kept = [r for r in kept if r.example.key not in seen]
            seen.update(r.example.key for r in kept)
            sources[index].duplicates = len(removed) + len(cross)
            records = kept
        val_size = 0 if spec.val_file is not None else spec.val
        tr, va, te = split(records, val_size, spec.test, spec.seed + index)
        sources[index].splits = {"train": len(tr), "val": len(va), "test": len(te)}
        train += tr
        val += va
        test += te
    if spec.val_file is not None:
        sources[-1].splits = {"val": len(val_records)}

    report.leaks = leakage({"train": train, "val": val, "test": test}, lambda r: r.example.prompt_key)
    if task == "cpt":
        # Raw text repeats boilerplate lines; only long shared passages are leaks.
        report.leaks = [leak for leak in report.leaks if len(leak.prompt) >= 200]

    if not train:
        problem = "No training examples are left after removing duplicates and holding out validation/test."
        if strict:
            raise ApplianceError(problem, "add more examples, or lower --val / data.test")
        report.problems.append(problem)

    prepared = PreparedData(task, [], [], [], report)
    if tokenizer is None:
        for name, records in (("train", train), ("val", val), ("test", test)):
            setattr(prepared, name, [Encoded(r.source, r.line, None) for r in records])
        return prepared

    if task in ("sft", "dpo"):
        require_chat_template(tokenizer, model_name)
    encoder = ENCODERS[task](tokenizer, spec.seq_len, spec.overlong)
    setup = getattr(encoder, "setup", None)
    if setup is not None:
        setup(train, val, test, prepared, strict)
    for name, records in (("train", train), ("val", val), ("test", test)):
        encoded: list[Encoded] = []
        for record in records:
            try:
                items = encoder.encode(record.example)
            except TemplateMismatch as err:
                problem = Problem(record.line, str(err))
                sources[record.source].problems.append(problem)
                if strict:
                    raise ApplianceError(
                        f"{sources[record.source].path} {problem}",
                        "check that the roles suit this model's chat template",
                    ) from None
                continue
            for item in items:
                length = item.length if hasattr(item, "length") else len(item.input_ids)
                if encoder.too_long(length):
                    report.overlong += 1
                    if spec.overlong == "drop":
                        continue
                    item = encoder.truncate(item)
                    if item is None:
                        continue
                encoded.append(Encoded(record.source, record.line, item))
        setattr(prepared, name, encoded)
        lengths = [e.length for e in encoded]
        report.lengths[name] = {
            "p50": percentile(lengths, 50),
            "p95": percentile(lengths, 95),
            "max": max(lengths, default=0),
        }
        report.trained_tokens[name] = sum(
            sum(1 for x in e.item.labels if x != IGNORE_INDEX) if hasattr(e.item, "labels") else e.length for e in encoded
        )

    if not prepared.train:
        problem = "No training examples are left after tokenizing"
        if report.overlong:
            problem += f" ({report.overlong} were longer than seq_len={spec.seq_len} and dropped)"
        if strict:
            raise ApplianceError(problem + ".", "raise --seq-len, or keep long examples cut with --set data.overlong=truncate")
        report.problems.append(problem)
    return prepared


def data_records(prepared: PreparedData, spec: DataSpec) -> list[dict[str, Any]]:
    """What an adapter's manifest records about its data."""
    return [
        {"path": str(Path(s.path).resolve()), "sha256": s.sha256, "format": s.format, "examples": s.lines}
        for s in prepared.report.sources
    ]


__all__ = [
    "ClassificationExample",
    "PreferenceExample",
    "PreparedData",
    "Encoded",
    "prepare",
    "register_encoder",
]
