"""Which files spp wrote, so that it never deletes or replaces anything else (README: "a user's files are never
modified").

Every folder spp publishes or writes into keeps a record, `.spp-written.json`: each file spp put there with its size
and modification time (nanoseconds) at that moment. A file the record does not list, or whose size or time changed
since, is the user's: an output holding one is neither replaced (`--overwrite`, `spp run` with changed options) nor
skipped as finished, and a file of that name is never overwritten by `spp run` or `spp report`. Size and time, not a
content hash, so that checking a 140 GB checkpoint costs no reading.
"""

import json
import os
from pathlib import Path

from spp_cli.errors import BadInput

RECORD = ".spp-written.json"


def _stamp(path: Path) -> list[int]:
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def read_record(folder: Path) -> dict[str, list[int]] | None:
    """name -> [size, mtime_ns] of what spp wrote in `folder` (relative paths), None when there is no record."""
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def remember(folder: Path, names: list[str] | None = None) -> None:
    """Add files of `folder` to its record: `names` (relative paths), or every file under it."""
    folder = Path(folder)
    if names is None:
        names = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != RECORD]
    record = read_record(folder) or {}
    record |= {name: _stamp(folder / name) for name in names}
    staging = folder / f"{RECORD}.{os.getpid()}"
    staging.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(staging, folder / RECORD)


def changed_files(folder: Path) -> tuple[list[str], list[str]]:
    """(files of spp's changed or removed since it wrote them, files spp did not write) under `folder`, by
    relative path. A folder without a record counts every file as not spp's."""
    folder = Path(folder)
    record = read_record(folder) or {}
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != RECORD}
    changed = [name for name in sorted(record)
               if name not in present or _stamp(folder / name) != record[name]]
    return changed, sorted(present - set(record))


def check_replaceable_file(path: Path) -> None:
    """BadInput unless `path` is free or a file spp wrote there and nobody changed since."""
    path = Path(path)
    if not path.exists():
        return
    stamp = (read_record(path.parent) or {}).get(path.name)
    if path.is_dir() or stamp is None or _stamp(path) != stamp:
        raise BadInput(f"'{path}' is not a file spp wrote (or it was changed since), and spp never replaces "
                       "those: move it away or choose another output folder")


def write_owned(path: Path, text: str) -> None:
    """Write a text file that spp owns in a folder it shares with the user (run.json, report.md, recipe.yaml)."""
    path = Path(path)
    check_replaceable_file(path)
    staging = path.parent / f".{path.name}.spp-staging-{os.getpid()}"
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)
    remember(path.parent, [path.name])
