"""Tokenizing examples, one encoder per task.

    sft       chat template, loss on assistant tokens only
    cpt       raw text packed into seq_len blocks, end-of-text between documents, loss everywhere
    dpo       a chosen and a rejected conversation per prompt, loss on the answers
    kto       one conversation per answer, marked desirable or not, loss on the answer
    grpo      the prompt alone, rendered up to the answer (answers are sampled in training)
    classify  the text and a class id
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.config import DataSpec
from appliance.data.formats import (
    ChatExample,
    ClassificationExample,
    Example,
    Message,
    PreferenceExample,
    PromptExample,
    TextExample,
    UnpairedExample,
)
from appliance.data.load import Problem
from appliance.data.template import IGNORE_INDEX, TemplateMismatch, TokenizedExample, end_of_text_id, end_of_turn, render, tokenize_chat
from appliance.errors import ApplianceError

if TYPE_CHECKING:
    from appliance.data.dataset import DataReport, SourceReport


@dataclass(frozen=True)
class Record:
    source: int  # index into the report's sources
    line: int
    example: Example
    group: str | None = None  # the example it paraphrases, or its own id when it has paraphrases


@dataclass(frozen=True)
class PreferencePair:
    chosen: TokenizedExample
    rejected: TokenizedExample

    @property
    def length(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))

    @property
    def trained_tokens(self) -> int:
        return self.chosen.trained_tokens + self.rejected.trained_tokens


@dataclass(frozen=True)
class UnpairedAnswer:
    """A conversation ending in one answer, and whether the answer is desirable (KTO)."""

    conversation: TokenizedExample
    desirable: bool

    @property
    def input_ids(self) -> list[int]:
        return self.conversation.input_ids

    @property
    def length(self) -> int:
        return len(self.conversation.input_ids)

    @property
    def trained_tokens(self) -> int:
        return self.conversation.trained_tokens

    @property
    def answer_start(self) -> int:
        """Where the answer begins: the first labelled token (the prompt and template before it have none)."""
        return next(i for i, x in enumerate(self.conversation.labels) if x != IGNORE_INDEX)


@dataclass(frozen=True)
class PromptTokens:
    """A prompt rendered for generation (the template's assistant header last), with what rewards read."""

    input_ids: list[int]
    prompt: str  # the last user turn, as the user wrote it
    answer: str | None

    @property
    def length(self) -> int:
        return len(self.input_ids)

    trained_tokens = 0  # the answers are sampled while training


@dataclass(frozen=True)
class LabelledText:
    input_ids: list[int]
    label: int

    @property
    def length(self) -> int:
        return len(self.input_ids)

    trained_tokens = 1


@dataclass(frozen=True)
class Encoded:
    """One tokenized training item and where it came from."""

    source: int
    line: int
    item: Any  # TokenizedExample, PreferencePair, LabelledText (None before tokenizing)

    @property
    def length(self) -> int:
        item = self.item
        return item.length if hasattr(item, "length") else len(item.input_ids)

    @property
    def trained_tokens(self) -> int:
        return self.item.trained_tokens


class Encoder:
    """Tokenizes one split; `encode` returns an item, `encode_split` applies the over-length policy."""

    def __init__(self, tokenizer: Any, spec: DataSpec):
        self.tokenizer = tokenizer
        self.spec = spec
        self.seq_len = spec.seq_len
        self.overlong = spec.overlong

    def prepare_labels(self, splits: dict[str, list[Record]], sources: list["SourceReport"], strict: bool) -> list[str]:
        """Tasks with classes settle them here, from the train split."""
        return []

    def encode(self, example: Example) -> Any:
        raise NotImplementedError

    def truncate(self, item: Any) -> Any | None:
        return None

    def encode_split(
        self, records: list[Record], sources: list["SourceReport"], report: "DataReport", strict: bool
    ) -> list[Encoded]:
        out = []
        for record in records:
            try:
                item = self.encode(record.example)
            except TemplateMismatch as err:
                problem = Problem(record.line, str(err))
                sources[record.source].problems.append(problem)
                if strict:
                    raise ApplianceError(f"{sources[record.source].path} {problem}", "check that the roles suit this model's chat template") from None
                continue
            encoded = Encoded(record.source, record.line, item)
            if encoded.length > self.seq_len:
                report.overlong += 1
                if self.overlong == "drop":
                    continue
                item = self.truncate(item)
                if item is None:
                    continue
                encoded = Encoded(record.source, record.line, item)
            out.append(encoded)
        return out


class ChatEncoder(Encoder):
    def __init__(self, tokenizer: Any, spec: DataSpec):
        super().__init__(tokenizer, spec)
        self.eot = end_of_turn(tokenizer)

    def encode(self, example: Example) -> TokenizedExample:
        assert isinstance(example, ChatExample)
        tokenized = tokenize_chat(self.tokenizer, example.messages, self.eot, example.tools)
        if tokenized.trained_tokens == 0:
            raise TemplateMismatch("the chat template left no assistant tokens to learn from")
        if self.spec.train_on_prompt:
            return TokenizedExample(tokenized.input_ids, list(tokenized.input_ids))
        return tokenized

    def truncate(self, item: TokenizedExample) -> TokenizedExample | None:
        cut = TokenizedExample(item.input_ids[: self.seq_len], item.labels[: self.seq_len])
        return cut if cut.trained_tokens else None


class TextEncoder(Encoder):
    """Continued pre-training: the split's documents end to end, an end-of-text token after each,
    cut into blocks of seq_len tokens; every token carries loss. Long documents are never dropped."""

    def __init__(self, tokenizer: Any, spec: DataSpec):
        super().__init__(tokenizer, spec)
        self.eot_id = end_of_text_id(tokenizer)

    def encode(self, example: Example) -> list[int]:
        assert isinstance(example, TextExample)
        return self.tokenizer(example.text, add_special_tokens=False)["input_ids"] + [self.eot_id]

    def encode_split(self, records, sources, report, strict) -> list[Encoded]:
        import bisect

        by_source: dict[int, list[Record]] = {}
        for record in records:
            by_source.setdefault(record.source, []).append(record)
        out = []
        for source, recs in by_source.items():  # blocks never mix files: a mixture samples files
            stream: list[int] = []
            starts: list[int] = []  # where each document begins in the stream
            for record in recs:
                starts.append(len(stream))
                stream += self.encode(record.example)
            for start in range(0, len(stream), self.seq_len):
                block = stream[start : start + self.seq_len]
                if len(block) > 1:  # a lone token predicts nothing
                    line = recs[bisect.bisect_right(starts, start) - 1].line
                    out.append(Encoded(source, line, TokenizedExample(block, list(block))))
        return out


class PreferenceEncoder(Encoder):
    """A prompt with a chosen and a rejected answer: two conversations, loss on the answer tokens."""

    def __init__(self, tokenizer: Any, spec: DataSpec):
        super().__init__(tokenizer, spec)
        self.eot = end_of_turn(tokenizer)

    def encode(self, example: Example) -> PreferencePair:
        assert isinstance(example, PreferenceExample)
        chosen = tokenize_chat(self.tokenizer, example.prompt + (Message("assistant", example.chosen),), self.eot)
        rejected = tokenize_chat(self.tokenizer, example.prompt + (Message("assistant", example.rejected),), self.eot)
        return PreferencePair(chosen, rejected)

    def truncate(self, item: PreferencePair) -> PreferencePair | None:
        cut = [TokenizedExample(x.input_ids[: self.seq_len], x.labels[: self.seq_len]) for x in (item.chosen, item.rejected)]
        return PreferencePair(*cut) if all(x.trained_tokens for x in cut) else None


class UnpairedEncoder(Encoder):
    """A prompt with one answer marked desirable or not: one conversation, loss on the answer."""

    def __init__(self, tokenizer: Any, spec: DataSpec):
        super().__init__(tokenizer, spec)
        self.eot = end_of_turn(tokenizer)

    def encode(self, example: Example) -> UnpairedAnswer:
        assert isinstance(example, UnpairedExample)
        conversation = tokenize_chat(self.tokenizer, example.prompt + (Message("assistant", example.completion),), self.eot)
        return UnpairedAnswer(conversation, example.desirable)

    def truncate(self, item: UnpairedAnswer) -> UnpairedAnswer | None:
        cut = TokenizedExample(item.conversation.input_ids[: self.seq_len], item.conversation.labels[: self.seq_len])
        return UnpairedAnswer(cut, item.desirable) if cut.trained_tokens else None


class PromptEncoder(Encoder):
    """GRPO: the prompt through the chat template, ending where the model's answer begins."""

    def encode(self, example: Example) -> PromptTokens:
        assert isinstance(example, PromptExample)
        text = render(self.tokenizer, example.prompt, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return PromptTokens(ids, next(m.content for m in reversed(example.prompt) if m.role == "user"), example.answer)


class ClassificationEncoder(Encoder):
    """Text → token ids (ending in eos, where the classifier reads), label → class id."""

    def __init__(self, tokenizer: Any, spec: DataSpec):
        super().__init__(tokenizer, spec)
        self.label_ids: dict[str, int] = {}

    def prepare_labels(self, splits, sources, strict) -> list[str]:
        train_labels = sorted({r.example.label for r in splits["train"]})
        if len(train_labels) < 2:
            raise ApplianceError(
                f"The training split has {len(train_labels)} class ({', '.join(train_labels) or 'none'}); a classifier needs two or more.",
                "add examples of the other classes",
            )
        for name in ("val", "test"):
            unseen = sorted({r.example.label for r in splits[name]} - set(train_labels))
            if unseen:
                raise ApplianceError(
                    f"Label(s) {', '.join(map(repr, unseen))} appear in the {name} split but never in training.",
                    "add training examples of those labels, or remove them from the held-out data",
                )
        self.label_ids = {label: i for i, label in enumerate(train_labels)}
        return train_labels

    def encode(self, example: Example) -> LabelledText:
        assert isinstance(example, ClassificationExample)
        ids = self.tokenizer(example.text, add_special_tokens=False)["input_ids"]
        return LabelledText(ids + [self.tokenizer.eos_token_id], self.label_ids[example.label])

    def truncate(self, item: LabelledText) -> LabelledText:
        return LabelledText(item.input_ids[: self.seq_len - 1] + [self.tokenizer.eos_token_id], item.label)


ENCODERS: dict[str, type[Encoder]] = {
    "sft": ChatEncoder,
    "cpt": TextEncoder,
    "dpo": PreferenceEncoder,
    "kto": UnpairedEncoder,
    "grpo": PromptEncoder,
    "classify": ClassificationEncoder,
}
