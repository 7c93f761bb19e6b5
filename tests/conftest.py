"""Shared fixtures: an isolated store per test, a tiny random LLaMA, and the real SmolLM2.

The tiny LLaMA has SmolLM2's real tokenizer and chat template with random
weights (2 layers, hidden 64): fast enough for unit tests of the real 4-bit
loading, LoRA, training and merging code. SmolLM2 itself is converted from its
GGUF once per machine (cached by pytest) for the end-to-end tests.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # `make test` runs two workers (pytest -n 2): torch's threads share the cores instead of each worker
    # spinning on all of them (before torch is imported; the CLI, torchrun and vLLM processes inherit it).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "appliance" / "demo"


@pytest.fixture(autouse=True)
def appliance_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("APPLIANCE_HOME", str(home))
    monkeypatch.setenv("APPLIANCE_PROFILES", str(tmp_path / "profiles"))  # the user's own profiles, none unless a test writes them
    return home


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a folder by hard links (instant, no extra disk)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            _link_tree(item, dst / item.name)
        else:
            try:
                os.link(item, dst / item.name)
            except OSError:
                shutil.copy2(item, dst / item.name)


@pytest.fixture(scope="session")
def smollm2_store(request) -> Path:
    """A store holding the imported SmolLM2 (converted once per machine, cached by pytest)."""
    from appliance.models import embedded_gguf
    from appliance.registry import Registry, sha256_file
    from appliance.store import Store

    cache = Path(request.config.cache.mkdir("appliance-smollm2"))
    stamp = cache / "source.sha256"
    digest = sha256_file(embedded_gguf())
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test workers (pytest -n) convert it once between them
        if not (stamp.is_file() and stamp.read_text() == digest and (cache / "store/models/smollm2/manifest.json").is_file()):
            shutil.rmtree(cache / "store", ignore_errors=True)
            from appliance.models import import_model

            import_model("smollm2", Registry(Store(cache / "store")))
            stamp.write_text(digest)
    return cache / "store"


@pytest.fixture(scope="session")
def tiny_model_folder(smollm2_store, tmp_path_factory) -> Path:
    """A random 2-layer LLaMA in HF layout with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    source = smollm2_store / "models" / "smollm2"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(source / name, folder / name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def store(appliance_home):
    from appliance.registry import Registry
    from appliance.store import Store

    return Registry(Store(appliance_home))


@pytest.fixture
def tiny(store, tiny_model_folder, smollm2_store):
    """The tiny model imported into this test's store as 'tiny' (through the real import path)."""
    from appliance.models import import_model

    import_model(str(tiny_model_folder), store, name="tiny")
    return store


@pytest.fixture
def smollm2(store, smollm2_store):
    """SmolLM2 in this test's store (hard-linked from the session copy)."""
    _link_tree(smollm2_store / "models" / "smollm2", store.store.root / "models" / "smollm2")
    return store


@pytest.fixture(scope="session")
def facts(smollm2_store, tmp_path_factory):
    """A store with SmolLM2, a 4-bit QLoRA adapter 'facts' trained on the demo data, and its merge."""
    from appliance.config import load_run_config
    from appliance.registry import Registry
    from appliance.store import Store
    from appliance.merge import merge_adapter
    from appliance.train.loop import run_training

    root = tmp_path_factory.mktemp("facts-store")
    _link_tree(smollm2_store / "models" / "smollm2", root / "models" / "smollm2")
    registry = Registry(Store(root))
    cfg = load_run_config(
        "sft-qlora",
        flags={
            "model": {"name": "smollm2"},
            "data": {"files": [{"path": str(DEMO / "facts.jsonl")}], "val_file": str(DEMO / "facts_val.jsonl")},
            "train": {"steps": 20, "batch_size": 8, "lr": 1e-3, "eval_every": 10, "save_every": 10},
        },
    )
    result = run_training(cfg, registry, "facts")
    assert result.metrics["val_loss"] < 0.6
    merge_adapter(registry, "facts", name="smollm2-facts")
    return registry


def serve_for_test(registry, model, adapters=(), port=8123, api_key=None, **options):
    """A real vLLM server for `model` from `registry` (the product's own start_server); returns
    (server, endpoint). Stop it yourself."""
    from appliance.serve import Endpoint, build_spec, free_port, start_server

    spec = build_spec(registry, model, adapters, port=free_port(port), **options)
    server = start_server(spec, registry.store.root / "logs" / f"test-{model}-{spec.port}.log", api_key=api_key)
    print(f"\nvLLM up in {server.healthy_s:.0f} s for {spec.served_names}")
    return server, Endpoint(spec.url, api_key)

def run_cli(
    *args: str, env: dict | None = None, timeout: float = 1800, input: str | None = None, module: str = "appliance"
) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, as a user runs it (`module`: another entry point, such as a worker)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        input=input,
        cwd=REPO,
    )


def write_jsonl(path: Path, rows: list) -> Path:
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


class SmallFilesystem:
    """A user and mount namespace in which `mountpoint` is a fresh tmpfs of `size`: a real full disk, without root.

    The namespace lives until the `with` block ends; `run_cli` runs the real CLI inside it and
    `path` gives a path as the namespace sees it (through /proc/PID/root), for the checks.
    """

    def __init__(self, mountpoint: Path, size: str):
        self.mountpoint, self.size = Path(mountpoint), size

    def __enter__(self) -> "SmallFilesystem":
        missing = [tool for tool in ("unshare", "nsenter") if shutil.which(tool) is None]
        if missing:
            pytest.fail(f"{' and '.join(missing)} (util-linux) is needed to give this test a small file system without root")
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.holder = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
             'mount -t tmpfs -o size="$1" tmpfs "$2" && echo mounted && exec cat', "sh", self.size, str(self.mountpoint)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        if self.holder.stdout.readline().strip() != "mounted":
            self.holder.stdin.close()
            error = self.holder.stderr.read().strip()
            self.holder.wait()
            pytest.fail(f"cannot mount a {self.size} tmpfs in a user namespace (`unshare --user --map-root-user --mount`): {error}")
        return self

    def run_cli(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        """The real CLI in a subprocess inside the namespace, as `run_cli` runs it outside."""
        return subprocess.run(
            ["nsenter", f"--target={self.holder.pid}", "--user", "--mount", "--preserve-credentials", f"--wd={REPO}",
             sys.executable, "-m", "appliance", *args],
            capture_output=True, text=True, env=dict(os.environ), timeout=timeout,
        )

    def path(self, path: Path) -> Path:
        return Path(f"/proc/{self.holder.pid}/root") / Path(path).relative_to("/")

    def __exit__(self, *exc) -> None:
        self.holder.stdin.close()  # ends `cat`, and with it the namespace and its tmpfs
        self.holder.wait(timeout=60)


# -- counts the README quotes, from the tests that passed in this session ----------------------------


def pytest_terminal_summary(terminalreporter):
    """The counts the README quotes, from the marked tests that ran in this session (in any order, any subset)."""
    for marker, label in (("fault", "fault injections"), ("bad_input", "bad inputs (exit 2, one message each)")):
        ran, passed = set(), set()
        for outcome in ("passed", "failed", "skipped", "error"):
            for report in terminalreporter.stats.get(outcome, []):
                if marker in report.keywords:
                    ran.add(report.nodeid)
                    if outcome == "passed" and report.when == "call":
                        passed.add(report.nodeid)
        if ran:
            terminalreporter.write_line(f"{label}: {len(passed)} passed of {len(ran)} run")


# -- test workers (pytest -n, --dist loadgroup): what one worker must run, and the long tests first ------


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Tests that share an expensive fixture run on one worker, so it is built once: every user of
    `facts` (SmolLM2 trained and merged), and the tests of a module sharing a module-scoped one (a
    vLLM server). The slow tests go first: a long test started last would leave the other worker idle."""
    for item in items:
        group = _shared_fixture_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _shared_fixture_group(item) -> str | None:
    if "facts" in item.fixturenames:
        return "facts"
    module = item.nodeid.split("::")[0]
    for name in item.fixturenames:
        for fixturedef in item._fixtureinfo.name2fixturedefs.get(name, ()):
            if fixturedef.scope == "module" and fixturedef.baseid == module:
                return Path(module).stem
    return None


def pytest_collection_finish(session):
    """A worker whose groups were dropped would build `facts` twice and start two servers on one port:
    stop instead (pytest-xdist 3.8 marks a group in `Item._nodeid`, which pytest 9.2 no longer reads)."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    dropped = [item.nodeid for item in session.items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if dropped:
        raise pytest.UsageError(f"pytest-xdist ignored the test groups ({dropped[0]} has none): install the pytest the dev extra pins")
