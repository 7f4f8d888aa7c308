"""Write files and folders so that a crash never leaves a half-written one where a good one was.

Everything goes to a temporary name in the same folder and is renamed into place when complete
(a rename within one file system is atomic). A full disk or any other error removes the
temporary and leaves the previous file untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError

# mkstemp makes its file private (0600); a finished file gets the mode an ordinary write would give.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _explain(err: OSError, target: Path) -> UserError:
    if err.errno == errno.ENOSPC:
        return UserError(f"no space left on the device while writing {target}; free some space and run again "
                         "(earlier files were left as they were)")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {target}: permission denied; choose another output path")
    return UserError(f"could not write {target}: {err.strerror or err}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with contextlib.suppress(OSError):
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _explain(err, target) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike, obj) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def refuse_existing(target: str | os.PathLike, overwrite: bool) -> None:
    """Never replace an output without --overwrite; checked early, before any expensive work."""
    if Path(target).exists() and not overwrite:
        raise UserError(f"{target} already exists; choose another --output or pass --overwrite")


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; move it onto `target` when the block succeeds.

    With `overwrite`, an existing `target` is replaced only after the new one is complete.
    """
    target = Path(target)
    refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _explain(err, target) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
