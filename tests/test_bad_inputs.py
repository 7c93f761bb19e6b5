"""Every user mistake: one clear message naming the fix, exit code 2, no traceback.

Table-driven over the real CLI (click's runner, in-process, on the real steps).
Each case builds its own files. The cases carry the `bad_input` marker: the session's
summary prints how many passed (tests/conftest.py), the count the README quotes.
"""

import json
import os
import re

import pytest
from click.testing import CliRunner

from appliance.cli import main
from conftest import DEMO, chat, write_jsonl

CASES = []


def case(name, needs_tiny=False):
    def register(fn):
        CASES.append(pytest.param(fn, needs_tiny, id=name))
        return fn

    return register


def train_args(data, name="a", *extra):
    return ["train", "--model", "tiny", "--data", str(data), "--name", name, "--steps", "1", *extra]


# -- data -----------------------------------------------------------------------


@case("data: missing file")
def _(tmp):
    return ["data", "check", str(tmp / "absent.jsonl")], "does not exist"


@case("data: a folder instead of a file")
def _(tmp):
    return ["data", "check", str(tmp)], "is a folder"


@case("data: unreadable file")
def _(tmp):
    path = write_jsonl(tmp / "locked.jsonl", [chat("q", "a")])
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make it a dangling symlink instead, equally unreadable
        path.chmod(0o644)
        path.unlink()
        path.symlink_to(tmp / "nowhere")
    return ["data", "check", str(path)], "does not exist"


@case("train: a line that is not JSON", needs_tiny=True)
def _(tmp):
    path = write_jsonl(tmp / "d.jsonl", [chat("q", "a"), "{oops", chat("q2", "a2")])
    return train_args(path), "line 2: not valid JSON"


@case("train: wrong keys", needs_tiny=True)
def _(tmp):
    path = write_jsonl(tmp / "d.jsonl", [chat("q", "a"), {"question": "q", "answer": "a"}, chat("q2", "a2")])
    return train_args(path), "line 2: expected keys"


@case("train: no assistant turn", needs_tiny=True)
def _(tmp):
    path = write_jsonl(tmp / "d.jsonl", [chat("q", "a"), {"messages": [{"role": "user", "content": "q"}]}])
    return train_args(path), "line 2: messages: no assistant turn"


@case("train: roles out of order", needs_tiny=True)
def _(tmp):
    rows = [chat("q", "a"), {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}, {"role": "assistant", "content": "a"}]}]
    return train_args(write_jsonl(tmp / "d.jsonl", rows)), "roles must alternate"


@case("train: empty after filtering", needs_tiny=True)
def _(tmp):
    path = write_jsonl(tmp / "d.jsonl", [chat("q", "a")] * 4)
    return train_args(path, "a", "--val", "1"), "No training examples"


@case("train: every example too long", needs_tiny=True)
def _(tmp):
    path = write_jsonl(tmp / "d.jsonl", [chat("word " * 100 + str(i), "a") for i in range(4)])
    return train_args(path, "a", "--seq-len", "32", "--val", "0"), "longer than seq_len=32"


@case("train: data of the wrong format for the recipe", needs_tiny=True)
def _(tmp):
    path = write_jsonl(tmp / "d.jsonl", [{"text": "plain text"}] * 3)
    return train_args(path, "a", "--recipe", "sft-qlora"), "is text data"


@case("train: unknown model")
def _(tmp):
    return ["train", "--model", "nomodel", "--data", str(DEMO / "facts.jsonl"), "--name", "a"], "Unknown model 'nomodel'"


@case("train: adapter name exists", needs_tiny=True)
def _(tmp):
    from appliance.registry import AdapterManifest, Registry

    reg = Registry()
    folder = reg.adapter_dir("taken")
    folder.mkdir(parents=True)
    reg.write_manifest(folder, AdapterManifest(name="taken", base="tiny", base_fingerprint="x", task="sft", recipe="sft-qlora", rank=8, alpha=16, target_modules=[]))
    return train_args(DEMO / "facts.jsonl", "taken"), "already exists"


@case("train: resume without a checkpoint", needs_tiny=True)
def _(tmp):
    return train_args(DEMO / "facts.jsonl", "fresh", "--resume"), "no checkpoint"


@case("train: bad adapter name")
def _(tmp):
    return train_args(DEMO / "facts.jsonl", "../evil"), "not allowed"


@case("config: unknown field")
def _(tmp):
    return train_args(DEMO / "facts.jsonl", "a", "--set", "train.learning_rate=1"), "train.learning_rate: unknown field"


@case("config: value out of range")
def _(tmp):
    return train_args(DEMO / "facts.jsonl", "a", "--rank", "0"), "lora.rank"


@case("config: unknown recipe")
def _(tmp):
    return train_args(DEMO / "facts.jsonl", "a", "--recipe", "magic"), "Unknown recipe 'magic'"


@case("config: missing config file")
def _(tmp):
    return train_args(DEMO / "facts.jsonl", "a", "--config", str(tmp / "nope.yaml")), "does not exist"


# -- methods ---------------------------------------------------------------------


@case("dpo: chosen equals rejected", needs_tiny=True)
def _(tmp):
    rows = [{"prompt": "q", "chosen": "same answer", "rejected": "same answer"}, {"prompt": "q2", "chosen": "a", "rejected": "b"}]
    return train_args(write_jsonl(tmp / "p.jsonl", rows), "a", "--recipe", "dpo"), "line 1: 'chosen' and 'rejected' are the same"


@case("kto: a label that is not true or false", needs_tiny=True)
def _(tmp):
    rows = [{"prompt": "q", "completion": "an answer", "label": "good"}, {"prompt": "q2", "completion": "b", "label": True}]
    return train_args(write_jsonl(tmp / "u.jsonl", rows), "a", "--recipe", "kto"), "line 1: 'label' must be true (a desirable answer) or false"


@case("classify: a label only in validation", needs_tiny=True)
def _(tmp):
    rows = [{"text": f"good {i}", "label": "pos"} for i in range(6)] + [{"text": f"bad {i}", "label": "neg"} for i in range(6)]
    val = write_jsonl(tmp / "val.jsonl", [{"text": "meh", "label": "neutral"}, {"text": "fine", "label": "pos"}])
    return train_args(write_jsonl(tmp / "c.jsonl", rows), "a", "--recipe", "classify", "--set", f"data.val_file={val}"), "'neutral' appear in the val split but never in training"


@case("classify: one class only", needs_tiny=True)
def _(tmp):
    rows = [{"text": f"good {i}", "label": "pos"} for i in range(8)]
    return train_args(write_jsonl(tmp / "c.jsonl", rows), "a", "--recipe", "classify"), "a classifier needs two or more"


@case("mixing: weights that sum to zero", needs_tiny=True)
def _(tmp):
    a = write_jsonl(tmp / "a.jsonl", [chat(f"q{i}", "a") for i in range(5)])
    b = write_jsonl(tmp / "b.jsonl", [chat(f"r{i}", "b") for i in range(5)])
    return ["train", "--model", "tiny", "--data", f"{a}:0", "--data", f"{b}:0", "--name", "a", "--mix", "proportional", "--steps", "1"], "sum to zero"


@case("mixing: a weight that does not parse")
def _(tmp):
    return ["data", "check", f"{DEMO / 'facts.jsonl'}:heavy"], "is not a number"


@case("mixing: replay without a fraction")
def _(tmp):
    return ["data", "check", str(DEMO / "facts.jsonl"), "--replay", "general.jsonl"], "is not FILE:FRACTION"


@case("layers: a range outside the model", needs_tiny=True)
def _(tmp):
    return train_args(DEMO / "facts.jsonl", "a", "--layers", "0-40"), "does not fit a model with 2 layers"


@case("layers: unfreezing more groups than layers", needs_tiny=True)
def _(tmp):
    return train_args(DEMO / "facts.jsonl", "a", "--set", "train.unfreeze.groups=5"), "at most 2 groups"


@case("recipe: a field of another recipe")
def _(tmp):
    return train_args(DEMO / "facts.jsonl", "a", "--set", "dpo.beta=0.2"), "'dpo' settings apply only to the dpo task"


@case("model: offload with gradient checkpointing off")
def _(tmp):
    extra = ("--set", "model.offload_activations=true", "--set", "model.gradient_checkpointing=false")
    return train_args(DEMO / "facts.jsonl", "a", *extra), "set gradient_checkpointing to auto or true"


@case("model: an MLP tile too small to be worth a kernel launch")
def _(tmp):
    return train_args(DEMO / "facts.jsonl", "a", "--set", "model.mlp_tile_tokens=8"), "model.mlp_tile_tokens"


@case("eval: unknown adapter")
def _(tmp):
    return ["eval", "ghost"], "Unknown adapter 'ghost'"


# -- models ---------------------------------------------------------------------


@case("models: unknown source")
def _(tmp):
    return ["models", "import", "not-a-thing"], "neither the embedded model"


@case("models: HF id not in the cache")
def _(tmp):
    return ["models", "import", "acme/absent-model"], "huggingface-cli download"


@case("models: a file that is not GGUF")
def _(tmp):
    path = tmp / "weights.safetensors"
    path.write_bytes(b"\0" * 32)
    return ["models", "import", str(path)], "not a GGUF model"


@case("models: a broken GGUF")
def _(tmp):
    path = tmp / "broken.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00")
    return ["models", "import", str(path)], "truncated header"


@case("models: show an unknown model")
def _(tmp):
    return ["models", "show", "ghost"], "Unknown model 'ghost'"


@case("models: bad name")
def _(tmp):
    return ["models", "import", "smollm2", "--name", "a/b"], "not allowed"


# -- merge and serve -------------------------------------------------------------------


def _adapter(name="a", rank=16):
    from appliance.config import load_run_config
    from appliance.registry import Registry
    from appliance.train.loop import run_training

    cfg = load_run_config(
        "sft-qlora",
        flags={"model": {"name": "tiny"}, "data": {"files": [{"path": str(DEMO / "facts.jsonl")}]}, "train": {"steps": 1}, "lora": {"rank": rank}},
    )
    run_training(cfg, Registry(), name)


def _other_base():
    """The tiny model again under another name, with other weights: another fingerprint."""
    from appliance.registry import Registry

    reg = Registry()
    src = reg.model_dir("tiny")
    dst = src.parent / "src-other"
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["rms_norm_eps"] = 1e-4
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "manifest.json").unlink()
    from appliance.models import import_model

    import_model(str(dst), reg, name="other")
    shutil.rmtree(dst)


@case("merge: unknown adapter")
def _(tmp):
    return ["merge", "ghost"], "Unknown adapter 'ghost'"


@case("merge: adapter whose base is missing", needs_tiny=True)
def _(tmp):
    import shutil

    from appliance.registry import Registry

    _adapter()
    shutil.rmtree(Registry().model_dir("tiny"))
    return ["merge", "a"], "is not in the store"


@case("serve: port already in use", needs_tiny=True)
def _(tmp):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    _open_sockets.append(sock)
    return ["serve", "tiny", "--port", str(sock.getsockname()[1])], f"pid {os.getpid()}"


@case("serve: vLLM not installed", needs_tiny=True)
def _(tmp):
    bare = tmp / "bare-python"
    bare.write_text("#!/bin/sh\nexec python3 -I -S \"$@\"\n")  # an interpreter without site-packages
    bare.chmod(0o755)
    return ["serve", "tiny", "--python", str(bare)], "vLLM is not installed"


@case("serve: adapter rank above the server's limit", needs_tiny=True)
def _(tmp):
    _adapter("big", rank=32)
    return ["serve", "tiny", "--adapter", "big", "--max-lora-rank", "16"], "above the server's limit of 16"


@case("serve: adapter trained on another base", needs_tiny=True)
def _(tmp):
    _adapter()
    _other_base()
    return ["serve", "other", "--adapter", "a"], "was trained on 'tiny'"


@case("serve: unknown adapter", needs_tiny=True)
def _(tmp):
    return ["serve", "tiny", "--adapter", "ghost"], "Unknown adapter 'ghost'"


@case("serve: binding beyond loopback without the flag", needs_tiny=True)
def _(tmp):
    return ["serve", "tiny", "--host", "0.0.0.0"], "--allow-remote"


@case("serve: a max-lora-rank vLLM does not accept", needs_tiny=True)
def _(tmp):
    _adapter()
    return ["serve", "tiny", "--adapter", "a", "--max-lora-rank", "20"], "not one vLLM accepts"


@case("ask: no server running")
def _(tmp):
    return ["ask", "hello", "--url", "http://127.0.0.1:9"], "No server answers at http://127.0.0.1:9"


@case("chat: no server running")
def _(tmp):
    return ["chat", "--url", "http://127.0.0.1:9"], "No server answers"


@case("data check: validation and test leave almost nothing to train on")
def _(tmp):
    return ["data", "check", str(DEMO / "facts.jsonl"), "--val", "0.9", "--test", "0.5"], "leaving almost nothing to train on"


@case("data check: a split count that is not a whole number")
def _(tmp):
    return ["data", "check", str(DEMO / "facts.jsonl"), "--val", "2.5"], "a fraction below 1, or a whole number"


@case("train: --steps and --epochs together")
def _(tmp):
    return train_args(DEMO / "facts.jsonl", "a", "--epochs", "2"), "--epochs and --steps were both given"


@case("train: --val-file and --val together")
def _(tmp):
    return train_args(DEMO / "facts.jsonl", "a", "--val-file", str(DEMO / "facts_val.jsonl"), "--val", "0.2"), "--val and --val-file were both given"


@case("data check: --temperature without --mix temperature")
def _(tmp):
    return ["data", "check", str(DEMO / "facts.jsonl"), "--temperature", "3"], "--temperature is the exponent of --mix temperature"


@case("train: holding out more examples than there are", needs_tiny=True)
def _(tmp):
    return train_args(DEMO / "facts.jsonl", "a", "--val", "100"), "leaves fewer to train on than are held out"


@case("train: a sequence length that drops most examples", needs_tiny=True)
def _(tmp):
    return train_args(DEMO / "facts.jsonl", "a", "--seq-len", "50"), "as too long"


@case("service install: a context longer than the model's", needs_tiny=True)
def _(tmp):
    return ["service", "install", "tiny", "--max-model-len", "999999", "--dry-run"], "longer than tiny's context"


@case("service install: zero adapters in a batch", needs_tiny=True)
def _(tmp):
    return ["service", "install", "tiny", "--max-loras", "0", "--dry-run"], "0 is not in the range"


@case("service install: an interpreter that does not exist", needs_tiny=True)
def _(tmp):
    return ["service", "install", "tiny", "--python", str(tmp / "no-python"), "--dry-run"], "no such interpreter"


@case("service install: a privileged port in a user unit", needs_tiny=True)
def _(tmp):
    return ["service", "install", "tiny", "--port", "80", "--dry-run"], "Port 80 is privileged"


@case("service install: a port already in use", needs_tiny=True)
def _(tmp):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    _open_sockets.append(sock)
    return ["service", "install", "tiny", "--port", str(sock.getsockname()[1]), "--dry-run"], "already in use"


@case("ask: a server that is not an OpenAI endpoint, given with /v1")
def _(tmp):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501 to everything
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _open_sockets.append(server.socket)
    return ["ask", "hi", "--url", f"http://127.0.0.1:{server.server_address[1]}/v1"], "is not an OpenAI-compatible endpoint"


@case("ask: a URL without http://")
def _(tmp):
    return ["ask", "hello", "--url", "127.0.0.1:9"], "No server answers at http://127.0.0.1:9"


_open_sockets = []


@pytest.mark.bad_input
@pytest.mark.parametrize("build, needs_tiny", CASES)
def test_bad_input(build, needs_tiny, tmp_path, request):
    if needs_tiny:
        request.getfixturevalue("tiny")
    try:
        args, expected = build(tmp_path)
        result = CliRunner().invoke(main, args, catch_exceptions=False)
    finally:
        for sock in _open_sockets:
            sock.close()
        _open_sockets.clear()
    # The panel wraps lines; compare the words.
    output = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())
    assert result.exit_code == 2, f"exit {result.exit_code}: {output}"  # the README promises exit 2
    assert expected in output, output
    assert "Traceback" not in output
    assert "Fix:" in output or "problem(s) found" in output



# -- export ------------------------------------------------------------------------------------------
# Appended after the runner above: `case` registers into CASES, which the parametrize reads at
# collection time, after the whole module has run.


@case("export: unknown GGUF type")
def _(tmp):
    return ["export", "tiny", "--quant", "q7"], "'q7' is not one of"


@case("export: unknown model or adapter")
def _(tmp):
    return ["export", "ghost"], "No model or adapter named 'ghost'"


@case("export: a classification adapter", needs_tiny=True)
def _(tmp):
    rows = [{"text": f"good {i}", "label": "pos"} for i in range(6)] + [{"text": f"bad {i}", "label": "neg"} for i in range(6)]
    result = CliRunner().invoke(main, train_args(write_jsonl(tmp / "c.jsonl", rows), "clf", "--recipe", "classify"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return ["export", "clf"], "is a classifier"


@case("export: an --out folder that cannot be written", needs_tiny=True)
def _(tmp):
    (tmp / "a-file").write_text("x")
    return ["export", "tiny", "--out", str(tmp / "a-file" / "gguf")], "Cannot write into --out"


@case("export: an export of the same name without --overwrite", needs_tiny=True)
def _(tmp):
    first = CliRunner().invoke(main, ["export", "tiny", "--quant", "f16"], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    return ["export", "tiny", "--quant", "f16"], "already in the store"


@case("export: --ollama without ollama on PATH", needs_tiny=True)
def _(tmp):
    import shutil

    if shutil.which("ollama"):
        pytest.skip("ollama is installed here")
    return ["export", "tiny", "--ollama", "tiny-chat"], "`ollama` is not on PATH"
