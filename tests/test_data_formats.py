"""The files users bring, as the tools they come from write them: each loads into the same typed
examples, or is refused with a message that names the conversion (issue: everyday formats)."""

import gzip
import json

import pytest
from click.testing import CliRunner

from appliance.cli import main
from appliance.data.load import load_file
from appliance.data.template import TemplateMismatch, end_of_turn, tokenize_chat
from conftest import chat, write_jsonl

ROWS = [chat("What is 2 + 2?", "4."), chat("Name a colour.", "Blue.")]


def _same_as_chat(loaded):
    assert loaded.format in ("chat", "instruction", "prompt-completion", "sharegpt") and not loaded.problems, loaded.problems
    assert [tuple((m.role, m.content) for m in ex.messages) for _, ex in loaded.examples] == [
        (("user", "What is 2 + 2?"), ("assistant", "4.")),
        (("user", "Name a colour."), ("assistant", "Blue.")),
    ]


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_a_byte_order_mark_and_utf16_are_read(tmp_path, encoding):
    path = tmp_path / "d.jsonl"
    path.write_bytes("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS).encode(encoding))
    _same_as_chat(load_file(path))


def test_a_json_array_file_is_read_record_by_record(tmp_path):
    """Alpaca's own alpaca_data.json is one JSON array."""
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([{"instruction": "What is 2 + 2?", "input": "", "output": "4."}, {"instruction": "Name a colour.", "output": "Blue."}, 7], indent=2))
    loaded = load_file(path)
    assert [str(p) for p in loaded.problems] == ["record 3: expected a JSON object, got int"]
    assert len(loaded.examples) == 2 and loaded.format == "instruction"


def test_gzip_compressed_files_are_read(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(map(json.dumps, ROWS)).encode()))
    _same_as_chat(load_file(path))


@pytest.mark.parametrize(
    "rows",
    [
        [{"messages": [{"role": "user", "content": [{"type": "text", "text": q}]}, {"role": "assistant", "content": a}]} for q, a in (("What is 2 + 2?", "4."), ("Name a colour.", "Blue."))],
        [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in (("What is 2 + 2?", "4."), ("Name a colour.", "Blue."))],
        [{"prompt": q, "completion": a} for q, a in (("What is 2 + 2?", "4."), ("Name a colour.", "Blue."))],
        [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]} for q, a in (("What is 2 + 2?", "4."), ("Name a colour.", "Blue."))],
    ],
    ids=["openai-content-parts", "sharegpt", "prompt-completion", "conversational-prompt-completion"],
)
def test_everyday_chat_shapes_load_as_chat(tmp_path, rows):
    _same_as_chat(load_file(write_jsonl(tmp_path / "d.jsonl", rows)))


def test_llama_factory_alpaca_with_system_and_history(tmp_path):
    row = {"instruction": "And 3 + 3?", "input": "", "output": "6.", "system": "Be brief.", "history": [["What is 2 + 2?", "4."]]}
    (_, example), = load_file(write_jsonl(tmp_path / "d.jsonl", [row])).examples
    assert [(m.role, m.content) for m in example.messages] == [
        ("system", "Be brief."), ("user", "What is 2 + 2?"), ("assistant", "4."), ("user", "And 3 + 3?"), ("assistant", "6."),
    ]


def test_developer_is_the_system_role_and_image_parts_are_refused(tmp_path):
    rows = [{"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, {"role": "assistant", "content": "A cat."}]}]
    loaded = load_file(write_jsonl(tmp_path / "d.jsonl", rows))
    assert loaded.examples[0][1].messages[0].role == "system"
    assert [str(p) for p in loaded.problems] == ["line 2: messages[0].content[0] is a 'image_url' part; only text parts can be trained on ({'type': 'text', 'text': ...})"]


def test_weight_zero_turns_carry_no_loss(tmp_path, tiny_model_folder):
    """OpenAI's fine-tuning format: an assistant turn with weight 0 is context, not a target."""
    from appliance.hf import load_tokenizer

    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "WRONG OLD ANSWER", "weight": 0},
                        {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Right answer.", "weight": 1}]}
    (_, example), = load_file(write_jsonl(tmp_path / "d.jsonl", [row])).examples
    tokenizer = load_tokenizer(tiny_model_folder)
    tokens = tokenize_chat(tokenizer, example.messages, end_of_turn(tokenizer))
    trained = tokenizer.decode([t for t in tokens.labels if t != -100])
    assert "Right answer." in trained and "WRONG" not in trained
    bad = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x", "weight": 0}]},
           {"messages": [{"role": "user", "content": "Hi", "weight": 1}, {"role": "assistant", "content": "x"}]}]
    problems = [str(p) for p in load_file(write_jsonl(tmp_path / "b.jsonl", bad)).problems]
    assert problems == ["line 1: messages: every assistant turn has weight 0: nothing to learn",
                        "line 2: messages[0].weight must be 0 or 1, on an assistant turn (OpenAI's format)"]


def test_tool_turns_load_and_a_template_without_tools_is_refused_clearly(tmp_path, tiny_model_folder):
    from appliance.hf import load_tokenizer

    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}
    row = {"messages": [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": "c1", "content": "4 degrees"}, {"role": "assistant", "content": "It is 4 degrees."}],
           "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]}
    (_, example), = load_file(write_jsonl(tmp_path / "d.jsonl", [row])).examples
    assert [m.role for m in example.messages] == ["user", "assistant", "tool", "assistant"] and example.tools
    tokenizer = load_tokenizer(tiny_model_folder)  # SmolLM2's ChatML template has no tool calls
    with pytest.raises(TemplateMismatch, match="does not render tool calls"):
        tokenize_chat(tokenizer, example.messages, end_of_turn(tokenizer), example.tools)


def test_a_lone_surrogate_is_a_problem_on_its_line_not_a_traceback(tmp_path, tiny):
    """Valid JSON (a cut emoji), but not text a tokenizer can read."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat("q", "ok")) + '\n{"messages": [{"role": "user", "content": "\\ud83d"}, {"role": "assistant", "content": "ok"}]}\n')
    assert [str(p) for p in load_file(path).problems] == ["line 2: holds an unpaired surrogate \\ud83d (an emoji cut in half?): remove or repair it"]
    checked = CliRunner().invoke(main, ["data", "check", str(path), "--model", "tiny"])
    assert checked.exit_code == 1 and "unpaired surrogate" in checked.output and "Traceback" not in checked.output
    trained = CliRunner().invoke(main, ["train", "--model", "tiny", "--data", str(path), "--name", "s", "--steps", "1"])
    assert trained.exit_code == 2 and "unpaired surrogate" in trained.output


def test_tables_load_through_datasets_with_a_column_mapping(tmp_path):
    import datasets

    table = datasets.Dataset.from_list([{"question": q, "answer": a} for q, a in (("What is 2 + 2?", "4."), ("Name a colour.", "Blue."))])
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    table.to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.csv", "d.parquet"):
        unmapped = load_file(tmp_path / name)
        assert unmapped.format == "unknown" and "no row has the keys of a known format" in str(unmapped.problems[0])
        _same_as_chat(load_file(tmp_path / name, columns={"prompt": "question", "completion": "answer"}))


def test_a_csv_named_jsonl_is_named_for_what_it_is(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("question,answer\nWhat is 2 + 2?,4.\nName a colour.,Blue.\n")
    assert [str(p) for p in load_file(path).problems] == ["this looks like a CSV file, not JSONL: name it .csv (or convert it to one JSON object per line)"]


def test_the_column_mapping_is_a_run_setting(tmp_path, tiny):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": q, "a": a} for q, a in (("What is 2 + 2?", "4."), ("Name a colour.", "Blue."))] * 3)
    result = CliRunner().invoke(main, ["data", "check", str(path), "--model", "tiny", "--set", "data.columns={prompt: q, completion: a}", "--json"])
    report = json.loads(result.output)
    assert result.exit_code == 0 and report["sources"][0]["format"] == "prompt-completion", result.output
