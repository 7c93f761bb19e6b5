"""Training and artefacts under faults, each through the real CLI in a subprocess:
SIGKILL then --resume, a second Ctrl-C, a full disk (a real file-size limit, or a small tmpfs in a
user namespace), a corrupted checkpoint; and fuzzing of the data loader.

Each fault test carries the `fault` marker and asserts its outcome; the session's summary
prints how many passed (tests/conftest.py), the count the README quotes."""

import json
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.data.load import MAX_PROBLEMS_SHOWN, load_file
from appliance.errors import ApplianceError
from appliance.train.checkpoint import checkpoint_dirs, verify
from conftest import DEMO, REPO, SmallFilesystem
from test_train import _stop_after, _train_cli, metrics

def with_file_size_limit(limit: int):
    """A real limit on the size of any file the process writes: writes past it fail with EFBIG."""

    def preexec():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def run(args, preexec=None):
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, preexec_fn=preexec)


def adapter_tensors(path):
    from safetensors.torch import load_file as load

    return load(str(path / "adapter_model.safetensors"))


@pytest.mark.fault
def test_sigkill_at_a_random_step_then_resume_matches_an_uninterrupted_run(tiny, appliance_home):
    full = run(_train_cli("--name", "full"))
    assert full.returncode == 0, full.stderr
    reference = {m["step"]: m["loss"] for m in metrics(appliance_home / "runs" / "full") if "loss" in m}

    kill_at = random.Random().randint(6, 40)
    code, out = _stop_after(_train_cli("--name", "killed"), kill_at, signal.SIGKILL, appliance_home / "runs" / "killed")
    assert code == -signal.SIGKILL
    checkpoints = checkpoint_dirs(appliance_home / "runs" / "killed" / "checkpoints")
    resumed_from = int(checkpoints[-1].name.split("-")[1])
    resumed = run(_train_cli("--name", "killed", "--resume"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = {m["step"]: m["loss"] for m in metrics(appliance_home / "runs" / "killed") if "loss" in m}
    following = [s for s in after if s > resumed_from]
    print(f"\nSIGKILL after step {kill_at}; resumed from checkpoint {resumed_from}; {len(following)} steps compared")
    assert sorted(after) == list(range(1, 61))
    assert max(abs(after[s] - reference[s]) for s in following) <= 1e-4
    a, b = adapter_tensors(appliance_home / "adapters" / "full"), adapter_tensors(appliance_home / "adapters" / "killed")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4


@pytest.mark.fault
def test_a_second_ctrl_c_exits_at_once_and_keeps_the_last_good_checkpoint(tiny, appliance_home):
    run_dir = appliance_home / "runs" / "twice"
    proc = subprocess.Popen(_train_cli("--name", "twice", "--save-every", "1"), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not checkpoint_dirs(run_dir / "checkpoints"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    started = time.time()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert time.time() - started < 30
    complete = checkpoint_dirs(run_dir / "checkpoints")
    assert complete and all(verify(p) is None for p in complete), "every complete checkpoint verifies"
    resumed = run(_train_cli("--name", "twice", "--save-every", "1", "--resume"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr


@pytest.mark.fault
def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tiny, appliance_home):
    run_dir = appliance_home / "runs" / "full-disk"
    code, _ = _stop_after(_train_cli("--name", "full-disk"), 4, signal.SIGTERM, run_dir)
    assert code == 143
    before = checkpoint_dirs(run_dir / "checkpoints")
    assert before
    result = run(_train_cli("--name", "full-disk", "--resume"), with_file_size_limit(64 * 1024))
    text = result.stdout + result.stderr
    print("\n" + text[-600:])
    assert result.returncode == 2 and "Not enough disk space while writing" in " ".join(text.split())
    assert "Traceback" not in text
    after = checkpoint_dirs(run_dir / "checkpoints")
    assert after == before and all(verify(p) is None for p in after)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


@pytest.mark.fault
def test_disk_full_while_merging_leaves_no_model(tiny, appliance_home):
    from appliance.config import load_run_config
    from appliance.train.loop import run_training

    run_training(load_run_config("sft-qlora", flags={"model": {"name": "tiny"}, "data": {"files": [{"path": str(DEMO / "facts.jsonl")}]}, "train": {"steps": 1}}), tiny, "a")
    result = run([sys.executable, "-m", "appliance", "merge", "a", "--name", "merged"], with_file_size_limit(2 * 2**20))
    assert result.returncode == 2 and "Not enough disk space" in result.stderr, result.stderr
    assert not (appliance_home / "models" / "merged").exists()
    assert not list((appliance_home / "models").glob(".tmp-*"))
    assert tiny.model("tiny")  # the base is untouched


@pytest.mark.fault
def test_disk_full_while_writing_a_manifest_keeps_the_old_one(tiny, appliance_home, tiny_model_folder):
    manifest = appliance_home / "models" / "tiny" / "manifest.json"
    old = manifest.read_text()
    result = run([sys.executable, "-m", "appliance", "models", "import", str(tiny_model_folder), "--name", "tiny", "--overwrite"], with_file_size_limit(256))
    assert result.returncode == 2 and "Not enough disk space" in result.stderr, result.stderr
    assert manifest.read_text() == old and tiny.model("tiny")


@pytest.mark.fault
def test_disk_full_for_an_adapter_keeps_the_previous_adapter(tiny, appliance_home):
    """A real 200 KiB file system under adapters/ (no root needed): the new adapter is refused, the old one stays."""
    adapters = appliance_home / "adapters"
    train = ("train", "--model", "tiny", "--data", str(DEMO / "facts.jsonl"), "--name", "kept", "--steps", "1")
    with SmallFilesystem(adapters, "200k") as fs:
        first = fs.run_cli(*train)
        assert first.returncode == 0, first.stdout + first.stderr
        old = fs.path(adapters / "kept" / "adapter_model.safetensors").read_bytes()
        second = fs.run_cli(*train, "--overwrite")
        text = " ".join((second.stdout + second.stderr).split())
        print("\n" + text[-400:])
        assert second.returncode == 2 and "Not enough disk space for the adapter" in text, text
        assert "Traceback" not in text
        assert fs.path(adapters / "kept" / "adapter_model.safetensors").read_bytes() == old
        assert not list(fs.path(adapters).glob(".tmp-*"))
        shown = fs.run_cli("adapters", "show", "kept")
        assert shown.returncode == 0, shown.stdout + shown.stderr


@pytest.mark.fault
def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous(tiny, appliance_home):
    run_dir = appliance_home / "runs" / "corrupt"
    code, _ = _stop_after(_train_cli("--name", "corrupt"), 12, signal.SIGTERM, run_dir)
    assert code == 143
    dirs = checkpoint_dirs(run_dir / "checkpoints")
    assert len(dirs) >= 2
    newest = dirs[-1]
    with open(newest / "optimizer.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\xff" * 16)  # bit rot
    resumed = run(_train_cli("--name", "corrupt", "--resume"))
    text = " ".join((resumed.stdout + resumed.stderr).split())
    assert resumed.returncode == 0, text
    assert f"checkpoint {newest.name} is damaged" in text and "falling back" in text
    assert f"resumed from {dirs[-2].name}" in text


# -- fuzzing the data loader ------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
roles = st.sampled_from(["user", "assistant", "system", "tool", "", "USER", None, 3])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=30), st.none(), st.integers())}), max_size=5)
records = st.one_of(
    json_values,
    st.fixed_dictionaries({"messages": messages}),
    st.fixed_dictionaries({"instruction": json_values, "output": json_values}),
    st.fixed_dictionaries({"prompt": json_values, "chosen": json_values, "rejected": json_values}),
    st.fixed_dictionaries({"text": json_values, "label": json_values}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(records.map(json.dumps), st.binary(max_size=60).map(lambda b: b.decode("latin-1"))), max_size=12))
def test_fuzz_json_records_give_problems_never_crashes(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogateescape")
    _check_loads_cleanly(path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2000))
def test_fuzz_arbitrary_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    path.write_bytes(data)
    _check_loads_cleanly(path)
    txt = path.with_suffix(".txt")
    txt.write_bytes(data)
    _check_loads_cleanly(txt)


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 200_000,  # deep JSON
        b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"text": "' + b"x" * (9 * 2**20) + b'"}',  # a huge line
        b"\xff\xfe\xfa\n" * 1000,  # invalid UTF-8
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n' * 2000,
    ],
    ids=["deep", "deep-messages", "huge-line", "bad-utf8", "many-lines"],
)
def test_hostile_files_finish_quickly_with_clear_problems(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    started = time.time()
    _check_loads_cleanly(path)
    assert time.time() - started < 30


def _check_loads_cleanly(path):
    """No crash; every problem names its line (or is about the whole file); the error lists them and says what to do."""
    try:
        loaded = load_file(path)
    except ApplianceError as err:
        assert err.fix, err  # a clear, user-facing error
        return
    raw = path.read_bytes()
    lines = raw.count(b"\n") + 1
    for problem in loaded.problems:
        assert isinstance(problem.line, int) and problem.message
        if problem.line:
            # A JSON array's problems name its records, a file of lines its lines.
            last = len(json.loads(raw)) if problem.unit == "record" else lines
            assert problem.unit in ("line", "record") and 1 <= problem.line <= last
            assert str(problem) == f"{problem.unit} {problem.line}: {problem.message}"
        else:  # about the file as a whole: no line to name
            assert problem.message.startswith(("no line has", "no record has", "the file holds no examples", "this looks like a CSV file")), problem
    assert [p.line for p in loaded.problems] == sorted(p.line for p in loaded.problems)
    if not loaded.problems:
        assert loaded.require_clean() is loaded
        return
    with pytest.raises(ApplianceError) as raised:
        loaded.require_clean()
    err = raised.value
    assert f"has {len(loaded.problems)} bad line(s)" in err.message
    assert f"appliance data check {path}" in err.fix
    shown = loaded.problems[:MAX_PROBLEMS_SHOWN]
    assert err.details[: len(shown)] == [f"  {p}" for p in shown]
