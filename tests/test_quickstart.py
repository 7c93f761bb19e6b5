"""`appliance quickstart`, the README's first command: the whole path on the embedded SmolLM2."""

import re

import pytest

from appliance.quickstart import demo_questions, score

FACTS = [q for q in demo_questions() if q.group == "fact"]


def test_answers_are_scored_per_group_by_any_expected_word():
    questions = demo_questions()
    assert {q.group for q in questions} == {"fact", "control"} and FACTS
    answers = [q.expect[0].upper() if q.group == "fact" else "I do not know" for q in questions]
    controls = sum(q.group == "control" for q in questions)
    assert score(questions, answers) == {"fact": (len(FACTS), len(FACTS)), "control": (0, controls)}


@pytest.mark.slow
def test_quickstart_is_the_whole_path_as_make_demo_runs_it(smollm2):
    """`make demo` runs `appliance quickstart`: ask the base through vLLM, fine-tune in 4-bit,
    merge, serve the merged model with vLLM, ask again."""
    from conftest import run_cli

    result = run_cli("quickstart", "--port", "8171")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout[-2500:])
    text = " ".join(result.stdout.split())  # rich wraps lines at the terminal's width
    facts = re.search(r"(\d+)/(\d+) taught facts \(asked as new paraphrases\) right after fine-tuning \(base: (\d+)/", text)
    controls = re.search(r"(\d+)/(\d+) general-knowledge controls right after fine-tuning \(base: (\d+)/", text)
    assert facts and facts[1] == facts[2] == str(len(FACTS)) and facts[3] == "0", result.stdout[-2000:]
    assert controls and int(controls[1]) >= int(controls[3]), result.stdout[-2000:]
    assert "Traceback" not in result.stderr
    parity = smollm2.model("smollm2-quickstart").parity
    assert parity.evaluated.top1_agreement >= parity.gate_min_top1
