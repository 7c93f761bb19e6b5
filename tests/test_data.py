"""Data formats, line-numbered validation, dedupe, seeded split and the leakage check."""

import json

import pytest

from appliance.config import DataSpec, DataSource
from appliance.data.dataset import prepare
from appliance.data.formats import ChatExample, ClassificationExample, PreferenceExample, TextExample
from appliance.data.load import load_file
from appliance.data.split import leakage, split
from appliance.errors import ApplianceError
from conftest import chat, write_jsonl


@pytest.mark.parametrize(
    "row, fmt, cls",
    [
        (chat("q", "a"), "chat", ChatExample),
        ({"instruction": "Add", "input": "2 and 2", "output": "4"}, "instruction", ChatExample),
        ({"instruction": "Say hi", "output": "hi"}, "instruction", ChatExample),
        ({"text": "Some domain text."}, "text", TextExample),
        ({"prompt": "q", "chosen": "good", "rejected": "bad"}, "preference", PreferenceExample),
        ({"text": "great film", "label": "positive"}, "classification", ClassificationExample),
    ],
)
def test_formats_are_detected_per_file(tmp_path, row, fmt, cls):
    loaded = load_file(write_jsonl(tmp_path / "d.jsonl", [row, row]))
    assert loaded.format == fmt and not loaded.problems
    assert isinstance(loaded.examples[0][1], cls)


def test_instruction_with_input_becomes_a_user_turn(tmp_path):
    loaded = load_file(write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Add", "input": "2 and 2", "output": "4"}]))
    ex = loaded.examples[0][1]
    assert [m.role for m in ex.messages] == ["user", "assistant"]
    assert ex.messages[0].content == "Add\n\n2 and 2"


def test_every_bad_line_is_reported_with_its_number(tmp_path):
    rows = [
        chat("q1", "a1"),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}),
        json.dumps({"prompt": "wrong keys"}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps([1, 2]),
        chat("q2", "a2"),
    ]
    loaded = load_file(write_jsonl(tmp_path / "d.jsonl", rows))
    by_line = {p.line: p.message for p in loaded.problems}
    assert set(by_line) == {2, 3, 4, 5, 6, 7}
    assert "not valid JSON" in by_line[2]
    assert "no assistant turn" in by_line[3]
    assert "first turn" in by_line[4]
    assert "expected keys" in by_line[5] and "messages" in by_line[5]
    assert "robot" in by_line[6]
    assert "JSON object" in by_line[7]
    with pytest.raises(ApplianceError) as err:
        loaded.require_clean()
    assert "6 bad line(s)" in err.value.message and "appliance data check" in err.value.fix


def test_invalid_utf8_and_deep_json_are_problems_not_crashes(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(chat("q", "a")).encode() + b"\n\xff\xfe\n" + b"[" * 100000 + b"\n")
    loaded = load_file(path)
    assert {p.line for p in loaded.problems} == {2, 3}


def test_missing_and_folder_paths_are_clear_errors(tmp_path):
    with pytest.raises(ApplianceError, match="does not exist"):
        load_file(tmp_path / "nope.jsonl")
    with pytest.raises(ApplianceError, match="is a folder"):
        load_file(tmp_path)


def test_text_files_split_into_documents_at_blank_lines(tmp_path):
    path = tmp_path / "domain.txt"
    path.write_text("First doc line one.\nline two.\n\n\nSecond doc.\n")
    loaded = load_file(path)
    assert [ex.text for _, ex in loaded.examples] == ["First doc line one.\nline two.", "Second doc."]
    assert [line for line, _ in loaded.examples] == [1, 5]


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    a = split(items, 0.2, 0.1, seed=3)
    assert a == split(items, 0.2, 0.1, seed=3)
    assert a != split(items, 0.2, 0.1, seed=4)
    train, val, test = a
    assert (len(train), len(val), len(test)) == (70, 20, 10)
    assert not (set(train) & set(val)) and not (set(train) & set(test)) and sorted(train + val + test) == items
    # Counts work as well as fractions.
    assert [len(x) for x in split(items, 5, 0, seed=0)] == [95, 5, 0]


def test_duplicates_removed_and_leakage_reported(tmp_path):
    rows = [chat(f"question {i}", f"answer {i}") for i in range(20)]
    rows += [chat("question 3", "answer 3")] * 2  # exact duplicates
    rows += [chat("question 5", "a different answer")]  # same prompt, new answer: may leak
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    leaks_seen = False
    for seed in range(10):
        prepared = prepare(DataSpec(files=[DataSource(path=path)], val=0.3, seed=seed), "sft", None)
        assert prepared.report.sources[0].duplicates == 2
        assert len(prepared.train) + len(prepared.val) == 21
        for leak in prepared.report.leaks:
            assert "question 5" in leak.prompt and set(leak.splits) == {"train", "val"}
            leaks_seen = True
    assert leaks_seen


def test_leakage_covers_all_three_splits():
    leaks = leakage({"train": ["a", "b"], "val": ["c"], "test": ["a", "c"]}, lambda x: x)
    assert {(leak.prompt, leak.splits) for leak in leaks} == {("a", ("train", "test")), ("c", ("val", "test"))}


def test_empty_after_filtering_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")] * 3)
    with pytest.raises(ApplianceError, match="No training examples"):
        prepare(DataSpec(files=[DataSource(path=path)], val=1), "sft", None)


def test_overlong_examples_are_counted_and_dropped_or_truncated(tmp_path, smollm2_store):
    from appliance.hf import load_tokenizer

    tokenizer = load_tokenizer(smollm2_store / "models" / "smollm2")
    rows = [chat("short", "ok")] * 1 + [chat(f"long {i} " + "word " * 200, "fine") for i in range(3)] + [chat("q2", "a2")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dropped = prepare(DataSpec(files=[DataSource(path=path)], val=0, seq_len=64), "sft", tokenizer, strict=False)
    assert dropped.report.overlong == 3 and len(dropped.train) == 2
    # Dropping most of the data is a problem, not a note (data check counts it; training refuses).
    assert dropped.report.problems == ["seq_len=64 drops 3 of 5 examples (60%) as too long."]
    with pytest.raises(ApplianceError, match="drops 3 of 5 examples"):
        prepare(DataSpec(files=[DataSource(path=path)], val=0, seq_len=64), "sft", tokenizer)
    # Truncating a long prompt leaves no assistant tokens: such examples go too; none pass the limit.
    cut = prepare(DataSpec(files=[DataSource(path=path)], val=0, seq_len=64, overlong="truncate"), "sft", tokenizer)
    assert cut.report.overlong == 3 and all(e.length <= 64 for e in cut.train)
    with pytest.raises(ApplianceError, match="longer than seq_len=16|drops 5 of 5"):
        prepare(DataSpec(files=[DataSource(path=path)], val=0, seq_len=16), "sft", tokenizer)


def test_chat_data_needs_a_chat_template(tmp_path, smollm2_store):
    from appliance.hf import load_tokenizer

    tokenizer = load_tokenizer(smollm2_store / "models" / "smollm2")
    tokenizer.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")])
    with pytest.raises(ApplianceError, match="no chat template"):
        prepare(DataSpec(files=[DataSource(path=path)], val=0), "sft", tokenizer, model_name="plain")


def _two_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"a question {i}", f"answer {i}") for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [chat(f"b question {i}", f"answer {i}") for i in range(30)])
    return a, b


def test_weights_are_refused_by_concat_and_equal_and_used_by_the_sampling_strategies(tmp_path):
    from appliance.config import MixSpec

    a, b = _two_sources(tmp_path)
    files = [DataSource(path=a, weight=3), DataSource(path=b)]
    for strict in (True, False):  # `data check` gathers problems, but a contradiction in the settings stops it
        for mix in (MixSpec(), MixSpec(strategy="equal")):  # concat (the default) and equal do not sample by weight
            with pytest.raises(ApplianceError, match=f"--mix {mix.strategy}") as refused:
                prepare(DataSpec(files=files, val=0, mix=mix), "sft", None, strict=strict)
            assert "--mix proportional" in refused.value.fix and f"{a}:3" in refused.value.message
    prepared = prepare(DataSpec(files=files, val=0, mix=MixSpec(strategy="proportional")), "sft", None)
    assert prepared.mixture.probs == pytest.approx([30 / 60, 30 / 60])  # 10 × 3 against 30 × 1
    unweighted = prepare(DataSpec(files=[DataSource(path=a), DataSource(path=b)], val=0), "sft", None)
    assert unweighted.mixture is None and len(unweighted.train) == 40  # concat: every example once


def _cli_text(result) -> str:
    import re

    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


def test_data_check_and_train_refuse_weights_under_concat(tmp_path, tiny):
    from click.testing import CliRunner

    from appliance.cli import main

    a, b = _two_sources(tmp_path)
    runner = CliRunner()
    for args in (
        ["data", "check", f"{a}:3", str(b)],
        ["data", "check", f"{a}:3", str(b), "--mix", "concat"],
        ["train", "--model", "tiny", "--data", f"{a}:3", "--data", str(b), "--name", "weighted", "--steps", "1"],
    ):
        result = runner.invoke(main, args)
        text = _cli_text(result)
        print(text[-400:])
        assert result.exit_code == 2 and "--mix proportional" in text and "Traceback" not in text
    assert not tiny.adapter_dir("weighted").exists()
    result = runner.invoke(main, ["data", "check", f"{a}:3", str(b), "--mix", "proportional", "--json"])
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.output)["mixture"]["probabilities"].values()) == pytest.approx([0.5, 0.5])
