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

from concept_erase.errors import UserError

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


def replace_path(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the complete `new` (a file or folder beside `target`) in place of `target`: the one place an output
    is replaced. An existing target is renamed aside first and removed only once `new` is in place, so at every
    moment one whole version is at `target` or beside it."""
    new, target = Path(new), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(new, target)
    _fsync_dir(target.parent)


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
        _share(tmp)
        replace_path(tmp, target)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _explain(err, target) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _share(folder: Path) -> None:
    """mkdtemp makes a private folder (0700): give it, and any private file in it, the modes an ordinary
    mkdir and write would (0777 / 0666 less the umask), so that another user (a web UI) can read them."""
    os.chmod(folder, 0o777 & ~_UMASK)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            p = os.path.join(root, name)
            if os.stat(p).st_mode & 0o777 == 0o700:
                os.chmod(p, 0o777 & ~_UMASK)
        for name in files:
            p = os.path.join(root, name)
            if os.stat(p).st_mode & 0o777 == 0o600:
                os.chmod(p, 0o666 & ~_UMASK)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def writer_lock(output: str | os.PathLike, log=None):
    """The output's one-writer lock, taken by the first process of a launch only (its other processes
    write into the same output, under its lock); no lock for an empty output."""
    if os.environ.get("RANK", "0") != "0" or not str(output):
        return contextlib.nullcontext()
    return output_lock(output, log=log)


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, log=None) -> Iterator[None]:
    """Hold the one-writer lock of an output path for the duration of the block.

    The lock is `.NAME.lock` beside the output, held with `flock` and holding the holder's PID. The
    operating system drops the lock when its process dies, so a lock left by a killed process is
    simply taken over (and said so). A second process is refused with a message naming the holder.
    Written by hand rather than with `filelock`, which does not expose the holder's PID (it truncates
    the lock file on every attempt). Without `fcntl` (Windows) no lock is taken.
    """
    try:
        import fcntl  # late: Windows has none, and the lock is then skipped
    except ImportError:  # pragma: no cover - not a platform the toolkit trains on
        yield
        return
    target = Path(target)
    lock = target.with_name(f".{target.name}.lock")
    made = _missing_parents(lock.parent)  # removed again at the end if nothing was written into them
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _explain(err, target) from err
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise _explain(err, lock) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise UserError(f"{target} is being written by {who} (lock {lock}); wait for it to finish, stop it, "
                            "or choose another --output") from None
        try:  # the file may have been removed by the holder that just released it: lock the current one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = os.read(fd, 64).decode(errors="replace").strip()
    if previous.isdigit() and int(previous) != os.getpid() and log is not None:
        log(f"took over the lock of {target} left by process {previous}, which is "
            + ("still running but no longer holds it" if _pid_alive(int(previous)) else "no longer running"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
        for folder in made:  # innermost first; rmdir refuses a folder that holds anything
            with contextlib.suppress(OSError):
                folder.rmdir()


def _missing_parents(folder: Path) -> list[Path]:
    """The folders, innermost first, that creating `folder` would make."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing
