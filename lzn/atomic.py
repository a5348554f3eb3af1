"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable

# os.open's flags for the temporary file: mkstemp's (exclusive, never through a link), with
# the mode open(path, "w") would give, 0o666 less the umask, applied by the kernel.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(f)` on a temporary file beside `path`, fsync, and rename it to `path`.

    The temporary name starts with a dot and ends in `.tmp`, so nothing that globs for
    final names (checkpoints, Parquet shards) ever picks up an unfinished file.
    The file gets the mode a plain `open(path, "w")` gives (0o644 under umask 0o022), not
    mkstemp's 0o600, so other accounts on shared storage can read metrics and checkpoints.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
