"""Atomic folder writes: a checkpoint folder appears whole or not at all, and what it replaces is removed only
after the new one is in place. `refuse_nonempty` is the check every writer makes before replacing anything."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

# The advice of writers that take `overwrite=`.
OVERWRITE_ADVICE = "pass overwrite=True to replace it or choose another path"


def atomic_write_lines(path: Path, lines: Iterable[str]) -> None:
    """Writes `lines` (each given without its newline) as UTF-8 text with "\n" line ends to `path`, atomically: a
    temporary file in the same folder, synced, then os.replace. On an error the temporary file is removed and
    `path` is left as it was."""
    path = Path(path)
    temp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temp, "x", encoding="utf-8", newline="\n") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yields a fresh temporary folder beside `target` to write into. When the block ends without an error, the
    folder takes `target`'s name in one rename (an existing `target` is moved aside first and deleted after);
    on an error the temporary folder is removed and `target` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; the final folder gets the usual permissions
    try:
        yield tmp
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, backup / target.name)
            os.replace(tmp, target)
            shutil.rmtree(backup)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_nonempty(target: Path, advice: str, *, label: str = "") -> None:
    """Raises FileExistsError when `target` is a file or a non-empty folder (a missing or empty folder passes).
    The message names the path (after `label`, e.g. "--out") and ends with `advice`, what the caller's user can
    do instead (e.g. OVERWRITE_ADVICE)."""
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{label + ' ' if label else ''}{str(target)!r} already exists and is not empty; "
                              f"{advice}")
