"""Atomic file writes: a reader sees the old file or the new one, never half of one. A write
that does not fit the disk (or the quota) is a `DiskFullError` naming the file, the bytes
it needs and those free, and leaves the old file as it was."""
from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

from lzn.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError, OSError):
    """A write that did not fit the free space (or the quota) left; the file it would have
    replaced is untouched. `needed` is a lower bound (what was written before the disk
    filled, or the writer's estimate), `free` what the file system has left for this user."""

    def __init__(self, message: str, *, path: Path, needed: int, free: int, facts: str | None = None):
        super().__init__(message)
        self.message, self.path, self.needed, self.free = message, path, needed, free
        self.facts = facts or message  # the message without its advice, for a caller that knows better
        self.errno, self.strerror, self.filename = errno.ENOSPC, message, str(path)

    def __str__(self) -> str:
        return self.message


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged write may still use on the file system holding `folder`."""
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def mount_point(path: Path) -> Path:
    path = Path(path).resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _no_space(error: BaseException | None) -> bool:
    """Whether `error` or what it was raised from or during is ENOSPC/EDQUOT (torch.save, for
    one, turns the OSError of its writer into a RuntimeError raised while handling it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full(path: Path, needed: int, free: int, written: int | None = None) -> DiskFullError:
    path = Path(path)
    wrote = "" if written is None else f", {written:,} written before the disk filled"
    kept = f"the previous {path.name} is untouched" if path.exists() else f"no {path.name} was written"
    facts = (f"no space left for {path}: it needs at least {needed:,} bytes and {free:,} are free on "
             f"{mount_point(path.parent)}{wrote}; {kept}")
    return DiskFullError(f"{facts}. Free space there, or write elsewhere, and try again", path=path, needed=needed,
                         free=free, facts=facts)

# os.open's flags for the temporary file: mkstemp's (exclusive, never through a link), with
# the mode open(path, "w") would give, 0o666 less the umask, applied by the kernel.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


def write_atomically(path: Path, write: Callable[[BinaryIO], None], size_hint: int | None = None) -> None:
    """Call `write(f)` on a temporary file beside `path`, fsync, and rename it to `path`.

    `size_hint` (bytes the file will at least take) refuses a write that cannot fit before
    anything is written: a full disk hurts every other writer on it (a database, a log). A
    write that fills the disk anyway raises `DiskFullError`, the temporary removed.

    The temporary name starts with a dot and ends in `.tmp`, so nothing that globs for
    final names (checkpoints, Parquet shards) ever picks up an unfinished file.
    The file gets the mode a plain `open(path, "w")` gives (0o644 under umask 0o022), not
    mkstemp's 0o600, so other accounts on shared storage can read metrics and checkpoints.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if size_hint and (free := free_bytes(path.parent)) < size_hint:
        raise disk_full(path, size_hint, free)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        Path(tmp).unlink(missing_ok=True)
        if _no_space(e):
            raise disk_full(path, max(written, size_hint or 0), free_bytes(path.parent), written) from e
        raise


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new, empty .<name>.<random>.tmp beside `path`, open for writing: (fd, its path).

    Created with mode 0o666 and left to the kernel to apply the umask (and a folder's default
    ACL), as open() does: reading the umask needs os.umask's set-and-restore, which races
    with other threads creating files, and a chmod after it would override a default ACL."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _CREATE, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that an interrupted `write_atomically` left in `folder`."""
    folder = Path(folder)
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
