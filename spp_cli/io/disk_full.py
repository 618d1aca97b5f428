"""A full disk, anywhere in a stage, as one line: the output being written, and the stage's resume folder with its
size (kept on purpose for the rerun, so often what filled the disk), instead of a raw OSError or SafetensorError.

    @names_output_on_disk_full      # on a stage's entry function, whose `out` argument is what it writes
    def prune(model, out, ...): ...
"""

import errno
import functools
import inspect
from pathlib import Path

from spp_cli.errors import RuntimeFailure
from spp_cli.io.atomic import work_dir

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how libraries that do not raise OSError say it (safetensors: "IoError(Os { code: 28, kind: StorageFull, ...})",
# torch.save: "... file write failed" with the OS message)
DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "storagefull")


class DiskFull(RuntimeFailure):
    """The disk (or the quota) filled up while a stage wrote: exit 3."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, is a full disk or quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(error).lower() for text in DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(out: Path) -> str:
    """The one line for a full disk while writing `out`."""
    resume = work_dir(out)
    kept = ""
    if resume.is_dir():
        kept = (f"; the resume folder '{resume}' holds {human_size(folder_size(resume))} (kept for the rerun to "
                "continue from; delete it to start over)")
    return f"the disk is full while writing '{out}'{kept}: free space on that disk (or choose another --out) and rerun"


def names_output_on_disk_full(stage_function):
    """Wrap a stage's entry function: a full disk inside it becomes DiskFull naming its `out` argument."""
    signature = inspect.signature(stage_function)

    @functools.wraps(stage_function)
    def wrapper(*args, **kwargs):
        try:
            return stage_function(*args, **kwargs)
        except Exception as error:
            if isinstance(error, DiskFull) or not is_disk_full(error):
                raise
            out = Path(signature.bind_partial(*args, **kwargs).arguments["out"])
            raise DiskFull(disk_full_message(out)) from error

    return wrapper


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def human_size(size: float) -> str:
    """1536 -> "1.5 KB" (binary units)."""
    if size < 1024:
        return f"{int(size)} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1024
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}"
