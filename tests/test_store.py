"""Atomic writes and store paths: nothing half-written, nothing outside the store."""

import os

import pytest

from appliance.errors import ApplianceError
from appliance.store import Store, atomic_dir, atomic_write, check_name


def test_atomic_dir_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "artefact"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_bytes(b"x" * 100)
            raise KeyboardInterrupt
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "artefact"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("crash half-way")
    assert (target / "v").read_text() == "1"
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (target / "v").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["artefact"]


def test_atomic_write_sets_the_mode(tmp_path):
    path = atomic_write(tmp_path / "secret.env", "KEY=1\n", mode=0o600)
    assert oct(path.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b", "..", ".hidden", "", "x" * 81, "a..b"])
def test_names_cannot_escape_the_store(name):
    with pytest.raises(ApplianceError):
        check_name(name)


def test_symlinks_out_of_the_store_are_refused(tmp_path):
    store = Store(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, store.kind_dir("models") / "evil")
    with pytest.raises(ApplianceError, match="outside the store"):
        store.path("models", "evil")


def test_incomplete_folders_are_ignored(tmp_path):
    store = Store(tmp_path / "store")
    (store.kind_dir("adapters") / "half").mkdir()
    (store.kind_dir("adapters") / ".tmp-x.123").mkdir()
    done = store.kind_dir("adapters") / "done"
    done.mkdir()
    (done / "manifest.json").write_text("{}")
    assert store.names("adapters") == ["done"]
