"""All-or-nothing directory writes: build a directory beside its target, then swap it in with one rename.

:func:`atomic_directory` yields a hidden temporary directory next to ``target`` (same filesystem, so the final
step is a rename, never a copy). Everything is written there; only when the block finishes does it become
``target``:

* ``target`` absent: one ``rename``;
* ``target`` an existing directory: the entries of the old directory that the new one does not replace (a
  tokenizer, a README, ``checkpoint-*`` folders) are carried over as hard links (no data copied; a plain copy
  where the filesystem has no hard links), except those ``drop_old`` names (stale weight shards), then the two
  directories are exchanged in one step (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere two renames, the
  old one kept until the new one is in place) and the old one is deleted.

Before the swap every file is ``fsync``-ed (and the parent directory after it), so even a power loss never
exposes a directory whose data is not on disk. On any exception inside the block, or in the swap, the
temporary directory is removed and ``target`` is left as it was. A process killed mid-write leaves only a hidden ``.<name>.partial-<pid>-*`` directory, never a
half-written ``target``; the next :func:`atomic_directory` on the same target removes such leftovers of dead
processes.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory"]

logger = logging.getLogger(__name__)

_PARTIAL = ".partial-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _partial_prefix(target: Path) -> str:
    return f".{target.name}{_PARTIAL}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_leftovers(target: Path) -> None:
    """Delete ``.<name>.partial-<pid>-*`` directories beside ``target`` whose writing process is gone."""
    prefix = _partial_prefix(target)
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_dir() or entry.is_symlink():
            continue
        pid_text = entry.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _pid_alive(int(pid_text)):
            logger.info("removing %s, left by an interrupted write (process %s is gone)", entry, pid_text)
            shutil.rmtree(entry, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry_over(old: Path, new: Path, drop_old: Callable[[str], bool]) -> None:
    """Give ``new`` every top-level entry of ``old`` it lacks (hard links), except those ``drop_old`` names."""
    for entry in old.iterdir():
        destination = new / entry.name
        if destination.exists() or destination.is_symlink() or drop_old(entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), destination)
        elif entry.is_dir():
            shutil.copytree(entry, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(destination))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def _swap_in(partial: Path, target: Path) -> None:
    """Make ``partial`` be ``target``; an existing ``target`` ends up at ``partial`` (for the caller to delete)."""
    if not target.exists():
        os.rename(partial, target)
        return
    if _exchange(partial, target):
        return
    aside = partial.with_name(partial.name + "-old")
    os.rename(target, aside)
    try:
        os.rename(partial, target)
    except OSError:
        os.rename(aside, target)
        raise
    os.rename(aside, partial)


def _flush_to_disk(folder: Path) -> None:
    """``fsync`` every regular file under ``folder`` and the folder itself, so the swap never exposes files
    whose data is still only in the page cache (a power loss right after the rename)."""
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(folder)


def _fsync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # platforms without directory descriptors
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextmanager
def atomic_directory(target: str | os.PathLike, drop_old: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``target`` as a whole when the block succeeds.

    ``drop_old(name)`` says which top-level entries of an existing ``target`` must not survive (e.g. weight
    shards the new write does not produce); every other old entry is kept unless the new directory has one
    of the same name (Transformers' ``save_pretrained`` semantics, made atomic). ``target`` may be a symlink
    to a directory (its real directory is replaced) but not a file. Raises ``NotADirectoryError`` for a file.
    """
    target = Path(os.path.realpath(os.fspath(target)))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_leftovers(target)
    partial = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(target)}{os.getpid()}-", dir=target.parent))
    try:
        yield partial
        if target.exists():
            _carry_over(target, partial, drop_old or (lambda name: False))
            shutil.copymode(target, partial)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(partial, 0o777 & ~umask)
        _flush_to_disk(partial)
        _swap_in(partial, target)
        _fsync_directory(target.parent)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
