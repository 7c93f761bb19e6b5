"""`appliance data augment`: paraphrases written beside their examples and marked, kept on one side of
the split, and counted as leaks across splits. The rewording here is a plain function of the text (the
endpoint's own is exercised against a real vLLM server in test_client.py)."""

import json

from appliance.config import DataSource, DataSpec
from appliance.data import prepare
from appliance.data.augment import paraphrase_file
from conftest import write_jsonl


def reword(text: str) -> str:
    reword.calls += 1
    return f"Tell me, version {reword.calls}: {text.lower()}"


reword.calls = 0


def questions(tmp_path, n=20):
    return write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": f"Question {i}?"},
                                                            {"role": "assistant", "content": f"Answer {i}."}]} for i in range(n)])


def test_each_example_is_followed_by_its_marked_paraphrases(tmp_path):
    out = tmp_path / "q.paraphrased.jsonl"
    report = paraphrase_file(questions(tmp_path, 3), out, 2, reword)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert (report.examples, report.paraphrases, len(rows)) == (3, 6, 9)
    original, first, second = rows[:3]
    assert original["id"] == "q-1" and "meta" not in original
    assert first["meta"]["paraphrase_of"] == second["meta"]["paraphrase_of"] == "q-1"
    assert first["messages"][0]["content"].startswith("Tell me") and first["messages"][1] == original["messages"][1]


def test_an_identical_or_empty_rewording_is_skipped(tmp_path):
    out = tmp_path / "same.jsonl"
    report = paraphrase_file(questions(tmp_path, 2), out, 3, lambda text: text if "0" in text else "")
    assert (report.paraphrases, report.unchanged) == (0, 6) and len(out.read_text().splitlines()) == 2


def test_the_split_keeps_an_example_and_its_paraphrases_together(tmp_path):
    out = tmp_path / "q.paraphrased.jsonl"
    paraphrase_file(questions(tmp_path, 20), out, 2, reword)
    prepared = prepare(DataSpec(files=[DataSource(path=out)], val=0.2, test=0.2), "sft", None)
    side = {}
    for name in ("train", "val", "test"):
        for encoded in getattr(prepared, name):
            row = json.loads(out.read_text().splitlines()[encoded.line - 1])
            group = row.get("meta", {}).get("paraphrase_of") or row["id"]
            side.setdefault(group, set()).add(name)
    assert len(side) == 20 and all(len(names) == 1 for names in side.values())
    assert {len(prepared.val), len(prepared.test)} == {12} and not prepared.report.leaks


def test_a_paraphrase_in_the_validation_file_of_a_training_example_is_a_leak(tmp_path):
    out = tmp_path / "q.paraphrased.jsonl"
    paraphrase_file(questions(tmp_path, 4), out, 1, reword)
    rows = out.read_text().splitlines()
    train = tmp_path / "train.jsonl"
    val = tmp_path / "val.jsonl"
    train.write_text("\n".join([rows[0], *rows[2:6]]) + "\n")  # examples 1-3, the paraphrases of 2 and 3
    val.write_text("\n".join([rows[1], *rows[6:]]) + "\n")  # example 1's paraphrase, and example 4 with its own
    prepared = prepare(DataSpec(files=[DataSource(path=train)], val_file=val, val=0), "sft", None)
    assert [leak.prompt for leak in prepared.report.leaks] == ["paraphrases of q-1"]
