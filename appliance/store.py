"""Where things live, and how they are written so that nothing is half-written.

Layout under the store root (`APPLIANCE_HOME`, else the platform's user data
directory):

    models/<name>/      HF folders (imported bases and merged models) + manifest.json
    adapters/<name>/    peft adapter folders + manifest.json
    runs/<name>/        training runs: checkpoints/, metrics.jsonl, config.yaml
    service/            env files of installed services

Every artefact folder is built under a temporary name in the same parent and
renamed into place when complete, so a reader sees either nothing or the
whole folder. A folder without manifest.json is incomplete and ignored.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from appliance.errors import ApplianceError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
KINDS = ("models", "adapters", "runs", "service")
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"


def check_name(name: str, what: str = "name") -> str:
    """Names become folder names: letters, digits, '.', '_', '-'; no path tricks."""
    if not NAME_RE.match(name or "") or ".." in name:
        raise ApplianceError(
            f"{what} {name!r} is not allowed.",
            "use letters, digits, '.', '_' and '-' (at most 80, starting with a letter or digit), no '/' or '..'",
        )
    return name


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Writers in Rust (safetensors) report the OS error in their message rather than as an OSError.
DISK_FULL_TEXT = re.compile(r"os error (28|27|122)\b|No space left on device|File too large|Disk quota exceeded")


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return True
    return bool(DISK_FULL_TEXT.search(str(err)))


def disk_full_error(target: Path, err: BaseException) -> ApplianceError:
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
    return ApplianceError(
        f"Not enough disk space while writing {target} ({reason}); nothing was changed.",
        f"free space on {target.parent} and run the command again",
    )


def atomic_write(path: Path, data: bytes | str, mode: int | None = None) -> Path:
    """Write a file under a temporary name in the same directory, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    raw = data.encode() if isinstance(data, str) else data
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode if mode is not None else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full_error(path, err) from None
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: Path, obj: Any, mode: int | None = None) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", mode)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_dir(final: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success rename it to `final`.

    On any error (disk full, Ctrl-C, a bug) the temporary folder is removed and
    `final` is left as it was. With `overwrite`, an existing `final` is replaced
    only after the new folder is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise ApplianceError(f"{final} already exists.", "choose another name or pass --overwrite")
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if final.exists():
            old = final.with_name(f"{TMP_PREFIX}old-{final.name}.{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, ApplianceError) and is_disk_full(err):
            raise disk_full_error(final, err) from None
        raise


def free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def ensure_free_space(path: Path, needed: int, what: str) -> None:
    """Refuse before writing, rather than fail half-way (with 10 % headroom)."""
    free = free_bytes(path)
    if free < needed * 1.1:
        raise ApplianceError(
            f"Not enough disk space for {what}: need about {needed / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB free on {path}.",
            "free some space (old runs: `appliance adapters rm`, `rm -r` of runs you no longer need) and try again",
        )


def default_root() -> Path:
    env = os.environ.get("APPLIANCE_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("appliance"))


class Store:
    """The store's folders; every path handed out stays inside the root."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_root()

    def kind_dir(self, kind: str) -> Path:
        assert kind in KINDS, kind
        path = self.root / kind
        path.mkdir(parents=True, exist_ok=True)
        return path

    def path(self, kind: str, name: str) -> Path:
        """The folder for `name` of `kind`, refusing names and symlinks that leave the store."""
        check_name(name, kind.rstrip("s") + " name")
        base = self.kind_dir(kind).resolve()
        path = base / name
        if path.is_symlink() or not path.resolve().is_relative_to(base):
            raise ApplianceError(
                f"{kind.rstrip('s')} {name!r} points outside the store ({path.resolve()}).",
                f"remove the link {path} and import the folder instead",
            )
        return path

    def names(self, kind: str) -> list[str]:
        """Complete artefacts of a kind: folders with a manifest, not temporary ones."""
        out = []
        for child in sorted(self.kind_dir(kind).iterdir()):
            if child.name.startswith(TMP_PREFIX) or child.is_symlink():
                continue
            if (child / MANIFEST).is_file():
                out.append(child.name)
        return out

    def clean_stale(self, kind: str) -> list[Path]:
        """Remove temporary folders left by an interrupted write (safe: never complete)."""
        removed = []
        for child in self.kind_dir(kind).glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
        return removed
