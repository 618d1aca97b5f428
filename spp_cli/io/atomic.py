"""Atomic outputs: every directory and file spp publishes is written into a hidden sibling and renamed into place
only when whole, so a crash, a kill -9 or a full disk never leaves something that looks finished.

One naming scheme for every hidden sibling, `.<name>.spp-<kind>-<pid>`:
- `staging`: being written; renamed to `<name>` when complete.
- `replaced`: the previous output, moved aside for the instant between two renames; removed after.
A fine-tune's resume directory (`.<name>.spp-work`, see stages/finetune.py) is the one stable sibling: it is
kept across runs on purpose. `remove_stale` knows every kind: siblings of a process that no longer runs are
removed, except a `replaced` one whose output never arrived, which is put back.
Files and directories are created with the process's umask (no 0600/0700 temp-file modes).
"""

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spp_cli.io.ownership import remember

KINDS = ("staging", "replaced")


def sibling(target: Path, kind: str, pid: int | None = None) -> Path:
    """The hidden sibling of `target` of one kind, on the same filesystem (so the rename is atomic)."""
    return target.parent / f".{target.name}.spp-{kind}-{os.getpid() if pid is None else pid}"


def work_dir(target: Path) -> Path:
    """A stage's resume directory: stable across processes, so a rerun finds the last run's checkpoints."""
    return target.parent / f".{target.name}.spp-work"


def _running(pid: str) -> bool:
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


def remove_stale(target: Path) -> None:
    """Tidy what a killed process left beside `target`: staging siblings go; a `replaced` sibling whose
    new output never arrived goes back to being `target` (nothing the user had is lost)."""
    for kind in KINDS:
        for stale in target.parent.glob(f".{target.name}.spp-{kind}-*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if _running(pid):
                continue
            if kind == "replaced" and not target.exists():
                stale.rename(target)
            else:
                _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def publish(staging: Path, target: Path) -> None:
    """Move a finished `staging` into place; an existing `target` (an spp output the caller may replace) is moved
    aside first and removed only once the new one is there."""
    remember(staging)  # what spp wrote, so a later run can tell the user's changes apart (spp_cli/io/ownership.py)
    replaced = None
    if target.exists():
        replaced = sibling(target, "replaced")
        target.rename(replaced)
    staging.rename(target)
    if replaced is not None:
        _remove(replaced)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory; when the block ends without error it becomes `target`.

    On any error (Ctrl-C included) the staging directory is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    staging = sibling(target, "staging")
    _remove(staging)
    staging.mkdir()
    try:
        yield staging
        follow_umask(staging)
        publish(staging, target)
    except BaseException:
        _remove(staging)
        raise


def follow_umask(directory: Path) -> None:
    """Libraries write some files through private temp files (mode 0600): give every file and folder the modes a
    plain `open`/`mkdir` would have, so a shared output is readable as the user's umask intends."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_text_atomic(target: str | Path, text: str) -> None:
    """Write a text file whole or not at all (the same staging sibling, then an atomic replace)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    staging = sibling(target, "staging")
    try:
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
