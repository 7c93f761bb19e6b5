"""The client: finding the running server and its key, and asking it from another terminal."""

import json
import re
import sys

import pytest

from appliance.serve import build_spec


def test_clients_find_a_running_foreground_server_and_its_key(tiny, monkeypatch):
    """`appliance serve` records its URL and key (mode 0600); `appliance ask` in another terminal finds them."""
    import os
    import subprocess

    from appliance.serve import DEFAULT_URL, find_endpoint
    from appliance.serve.service import write_running_record

    monkeypatch.delenv("APPLIANCE_URL", raising=False)
    monkeypatch.delenv("APPLIANCE_API_KEY", raising=False)
    assert find_endpoint() == find_endpoint(DEFAULT_URL) and find_endpoint().api_key is None
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    write_running_record(tiny.store, build_spec(tiny, "tiny", port=8141), gone.pid, "sk-appliance-stale")
    assert find_endpoint().api_key is None  # a record whose server has exited is ignored
    record = write_running_record(tiny.store, build_spec(tiny, "tiny", port=8142), os.getpid(), "sk-appliance-live")
    assert oct(record.stat().st_mode & 0o777) == "0o600"
    found = find_endpoint()
    assert (found.url, found.api_key) == ("http://127.0.0.1:8142", "sk-appliance-live")
    assert find_endpoint("http://127.0.0.1:8142/").api_key == "sk-appliance-live"
    assert find_endpoint("http://127.0.0.1:9999").api_key is None  # never sent to another server
    assert find_endpoint(api_key="sk-given").api_key == "sk-given"
    monkeypatch.setenv("APPLIANCE_API_KEY", "sk-env")
    assert find_endpoint().api_key == "sk-env"


@pytest.mark.slow
def test_serve_then_ask_from_another_terminal_with_the_generated_key(smollm2, monkeypatch, tmp_path):
    """`appliance serve` with runtime adapters generates a key; `appliance ask` started separately,
    with no key in its environment, finds the server and the key; a request without it is refused."""
    import os
    import signal
    import subprocess
    import time

    import httpx

    from appliance.serve.service import running_record_path
    from conftest import REPO, chat, run_cli, write_jsonl

    monkeypatch.delenv("APPLIANCE_API_KEY", raising=False)
    monkeypatch.delenv("APPLIANCE_URL", raising=False)
    record = running_record_path(smollm2.store, 8143)
    out = (tmp_path / "serve.out").open("w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "appliance", "serve", "smollm2", "--runtime-adapters", "--port", "8143"],
        stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
    )
    try:
        deadline = time.time() + 900
        while not record.is_file() and serve.poll() is None and time.time() < deadline:
            time.sleep(1)
        printed = (tmp_path / "serve.out").read_text()
        assert record.is_file(), printed[-2000:]
        key = re.search(r"export APPLIANCE_API_KEY=(\S+)", printed).group(1)
        assert oct(record.stat().st_mode & 0o777) == "0o600"
        assert httpx.get("http://127.0.0.1:8143/v1/models").status_code == 401
        assert httpx.get("http://127.0.0.1:8143/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        answer = run_cli("ask", "What is the capital of France?", "--max-tokens", "8", timeout=300)
        print(answer.stdout, answer.stderr[-1000:])
        assert answer.returncode == 0 and "Paris" in answer.stdout
        # `appliance data augment` rewords prompts through the same server (found like `ask` finds it).
        source = write_jsonl(tmp_path / "qa.jsonl", [chat(f"What is {a} plus {b}?", str(a + b)) for a, b in ((2, 3), (4, 5))])
        augmented = run_cli("data", "augment", str(source), "--paraphrases", "2", "--json", timeout=300)
        assert augmented.returncode == 0, augmented.stderr[-2000:]
        report = json.loads(augmented.stdout[augmented.stdout.index("{"):])
        rows = [json.loads(line) for line in (tmp_path / "qa.paraphrased.jsonl").read_text().splitlines()]
        print(f"augment: {report}; {[r['messages'][0]['content'] for r in rows]}")
        assert report["examples"] == 2 and report["paraphrases"] + report["unchanged"] == 4 and len(rows) == 2 + report["paraphrases"]
        assert all(r["meta"]["paraphrase_of"] in ("qa-1", "qa-2") for r in rows if "meta" in r)
    finally:
        os.kill(serve.pid, signal.SIGTERM)
        serve.wait(timeout=120)
    assert not record.exists()


def test_chat_commands_change_the_conversation_and_only_messages_are_sent():
    from appliance.client import Conversation

    talk = Conversation(system="Be brief.")
    assert [talk.take(t) for t in ("hello", "   ", "/system Be kind.")] == ["send", "skip", "system"]
    talk.answered("hi")
    assert talk.messages == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello"},
                             {"role": "assistant", "content": "hi"}]
    assert talk.take("/reset") == "reset" and talk.messages == [{"role": "system", "content": "Be kind."}]
    assert talk.take(" /exit ") == "exit" and talk.take("/quit") == "exit"
