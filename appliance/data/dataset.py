"""From data files to tokenized train / validation / test splits with a report.

    load files → dedupe → split (per source, seeded) → leakage check → tokenize
    (chat template + assistant-only labels, packed raw text, preference pairs,
    labelled texts) → over-length policy → mixture

`prepare()` does it all; with `strict=False` it gathers every problem instead
of raising, which is what `appliance data check` shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import DataSpec
from appliance.data.encoders import ENCODERS, Encoded, Record
from appliance.data.load import LoadedFile, Problem, load_file
from appliance.data.mix import Mixture, mixture_probabilities
from appliance.data.split import Leak, dedupe, leakage, split, split_count
from appliance.data.template import require_chat_template
from appliance.errors import ApplianceError

SPLITS = ("train", "val", "test")
OVERLONG_SHARE = 0.25  # dropping more of the examples than this as too long is a problem, not a note


@dataclass
class SourceReport:
    path: str
    format: str
    sha256: str
    lines: int
    role: str = "train"  # train (split into train/val/test), val (a --val file), replay
    weight: float | None = None
    duplicates: int = 0
    problems: list[Problem] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)
    probability: float | None = None  # sampling probability under the mixture


@dataclass
class DataReport:
    sources: list[SourceReport]
    strategy: str = "concat"
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
    mixture: Mixture | None = None  # None: concat (every example once per epoch)

    def split(self, name: str) -> list[Encoded]:
        return getattr(self, name)

    def summary(self) -> dict[str, Any]:
        """What `appliance data check --json` prints: every figure and every problem it counts."""
        report = self.report
        problems = [{"file": s.path, "line": p.line, "unit": p.unit, "message": p.message} for s in report.sources for p in s.problems]
        problems += [{"file": None, "line": 0, "unit": None, "message": message} for message in report.problems]
        return {
            "task": self.task,
            "mixture": None if self.mixture is None else {"strategy": report.strategy, "probabilities": dict(zip(self.mixture.names, self.mixture.probs))},
            "sources": [{**{k: v for k, v in s.__dict__.items() if k != "problems"}, "problems": len(s.problems)} for s in report.sources],
            "splits": {n: len(self.split(n)) for n in SPLITS},
            "lengths": report.lengths,
            "trained_tokens": report.trained_tokens,
            "overlong": report.overlong,
            "leaks": [{"prompt": leak.prompt, "splits": list(leak.splits)} for leak in report.leaks],
            "problems": len(problems),
            "problem_list": problems,
        }


def percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _load(path: Path, task: str, strict: bool, role: str, weight: float | None = None, columns: dict[str, str] | None = None) -> tuple[LoadedFile, SourceReport]:
    loaded = load_file(path, task, columns)
    if strict:
        loaded.require_clean()
    report = SourceReport(str(path), loaded.format, loaded.sha256, len(loaded.examples), role, weight, problems=loaded.problems)
    return loaded, report


def _records(loaded: LoadedFile, source: int) -> list[Record]:
    return [Record(source, line, ex, loaded.paraphrase_of.get(line)) for line, ex in loaded.examples]


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
    splits, leakage, mixture); that is `appliance data check` without `--model`.
    """
    if not spec.files:
        raise ApplianceError("No data files given.", "pass --data FILE.jsonl")
    _check_weights(spec)
    sources: list[SourceReport] = []
    per_source: list[list[Record]] = []
    for index, data_source in enumerate(spec.files):
        loaded, report = _load(data_source.path, task, strict, "train", data_source.weight, spec.columns)
        sources.append(report)
        per_source.append(_records(loaded, index))

    train: list[Record] = []
    val: list[Record] = []
    test: list[Record] = []
    if spec.val_file is not None:
        loaded, report = _load(spec.val_file, task, strict, "val", columns=spec.columns)
        sources.append(report)
        val += _records(loaded, len(sources) - 1)
        report.splits = {"val": len(val)}
    replay: list[Record] = []
    if spec.replay is not None:
        loaded, report = _load(spec.replay.path, task, strict, "replay")
        sources.append(report)
        replay = _records(loaded, len(sources) - 1)
        report.splits = {"train": len(replay)}

    report_all = DataReport(sources=sources, strategy=spec.mix.strategy, overlong_policy=spec.overlong)
    seen: set[str] = set()
    train_by_source: list[list[Record]] = []
    for index, records in enumerate(per_source):
        if spec.dedupe:
            kept, removed = dedupe(records, lambda r: r.example.key)
            # The same example in two files is one example.
            cross = [r for r in kept if r.example.key in seen]
            kept = [r for r in kept if r.example.key not in seen]
            seen.update(r.example.key for r in kept)
            sources[index].duplicates = len(removed) + len(cross)
            records = kept
        val_size = 0 if spec.val_file is not None else spec.val
        tr, va, te = split(records, val_size, spec.test, spec.seed + index, group=lambda r: r.group)
        sources[index].splits = {"train": len(tr), "val": len(va), "test": len(te)}
        asked = split_count(len(records), val_size) + split_count(len(records), spec.test)
        if tr and (asked >= len(records) or len(va) + len(te) > len(tr)):  # none left: refused below
            _problem(report_all, strict,
                     f"{sources[index].path} has {len(records)} examples: holding out --val {val_size:g} and --test {spec.test:g} "
                     "of them leaves fewer to train on than are held out.",
                     "hold out less (--val, --test), or add examples")
        train_by_source.append(tr)
        train += tr
        val += va
        test += te
    train += replay

    report_all.leaks = leakage({"train": train, "val": val, "test": test}, lambda r: r.example.prompt_key)
    # A paraphrase in one split of an example in another is a leak in other words.
    report_all.leaks += leakage({"train": train, "val": val, "test": test}, lambda r: r.group and f"paraphrases of {r.group}")
    if task == "cpt":
        # Raw text repeats short boilerplate lines; only long shared passages are leaks.
        report_all.leaks = [leak for leak in report_all.leaks if len(leak.prompt) >= 200]
    if not any(train_by_source):
        _problem(report_all, strict, "No training examples are left after removing duplicates and holding out validation/test.",
                 "add more examples, or lower --val / data.test")

    prepared = PreparedData(task, [], [], [], report_all)
    splits = {"train": train, "val": val, "test": test}
    if tokenizer is None:
        for name in SPLITS:
            setattr(prepared, name, [Encoded(r.source, r.line, None) for r in splits[name]])
    else:
        if task in ("sft", "dpo", "kto", "grpo"):
            require_chat_template(tokenizer, model_name)
        encoder = ENCODERS[task](tokenizer, spec)
        prepared.labels = encoder.prepare_labels(splits, sources, strict)
        for name in SPLITS:
            encoded = encoder.encode_split(splits[name], sources, report_all, strict)
            setattr(prepared, name, encoded)
            lengths = [e.length for e in encoded]
            report_all.lengths[name] = {"p50": percentile(lengths, 50), "p95": percentile(lengths, 95), "max": max(lengths, default=0)}
            report_all.trained_tokens[name] = sum(e.trained_tokens for e in encoded)
        dropped = report_all.overlong if spec.overlong == "drop" else 0
        total = dropped + sum(len(prepared.split(name)) for name in SPLITS)
        if prepared.train and dropped > OVERLONG_SHARE * total:
            _problem(report_all, strict,
                     f"seq_len={spec.seq_len} drops {dropped} of {total} examples ({dropped / total:.0%}) as too long.",
                     "raise --seq-len (data check --model shows the lengths), or keep long examples cut with --set data.overlong=truncate")
        if not prepared.train:
            problem = "No training examples are left after tokenizing"
            if report_all.overlong:
                problem += f" ({report_all.overlong} were longer than seq_len={spec.seq_len} and dropped)"
            _problem(report_all, strict, problem + ".", "raise --seq-len, or keep long examples cut with --set data.overlong=truncate")

    prepared.mixture = _mixture(prepared, spec, sources, strict)
    return prepared


# Strategies that have no use for weights, and what they do instead.
UNWEIGHTED = {"concat": "(the default) takes every example once per epoch", "equal": "samples every file alike"}


def _check_weights(spec: DataSpec) -> None:
    """Weights steer proportional and temperature sampling; under the other strategies they would
    be ignored without a word. A contradiction in the settings, not in the data: raised even when
    `data check` gathers problems."""
    weighted = [f"{s.path}:{s.weight:g}" for s in spec.files if s.weight is not None]
    if weighted and spec.mix.strategy in UNWEIGHTED:
        raise ApplianceError(
            f"{', '.join(weighted)}: a weight needs a strategy that samples by it, and --mix {spec.mix.strategy} "
            f"{UNWEIGHTED[spec.mix.strategy]}.",
            "add --mix proportional (probability ∝ size × weight) or --mix temperature (∝ (size × weight)^(1/T)); "
            "or drop the :WEIGHT",
        )


def _problem(report: DataReport, strict: bool, message: str, fix: str) -> None:
    if strict:
        raise ApplianceError(message, fix)
    report.problems.append(message)


def _mixture(prepared: PreparedData, spec: DataSpec, sources: list[SourceReport], strict: bool) -> Mixture | None:
    """Group the train split by source and give each group its sampling probability."""
    task_sources = [i for i, s in enumerate(sources) if s.role == "train"]
    replay_sources = [i for i, s in enumerate(sources) if s.role == "replay"]
    if spec.mix.strategy == "concat" and not replay_sources:
        return None
    groups = {i: [] for i in task_sources + replay_sources}
    for position, item in enumerate(prepared.train):
        groups[item.source].append(position)
    empty = [sources[i].path for i, g in groups.items() if not g]
    if empty:
        _problem(prepared.report, strict, f"No training examples left in {', '.join(empty)} to sample from.", "check those files")
        return None
    sizes = [len(groups[i]) for i in task_sources]
    fraction = spec.replay.fraction if spec.replay is not None else 0.0
    probs = mixture_probabilities(sizes, [sources[i].weight for i in task_sources], spec.mix.strategy, spec.mix.temperature, fraction)
    order = task_sources + replay_sources
    for i, p in zip(order, probs):
        sources[i].probability = p
    return Mixture([groups[i] for i in order], probs, [sources[i].path for i in order])


def examples_per_epoch(prepared: PreparedData, replay_fraction: float) -> int:
    """An epoch under a mixture: as many draws as the task examples, plus the replay share."""
    task_examples = sum(1 for e in prepared.train if prepared.report.sources[e.source].role == "train")
    return int(round(task_examples / (1.0 - replay_fraction)))


def data_records(prepared: PreparedData) -> list[dict[str, Any]]:
    """What an adapter's manifest records about its data."""
    return [
        {"path": str(Path(s.path).resolve()), "sha256": s.sha256, "format": s.format, "examples": s.lines, "role": s.role}
        for s in prepared.report.sources
    ]

