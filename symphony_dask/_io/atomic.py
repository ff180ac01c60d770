"""Writing outputs safely, and knowing a reference store is whole when it is read back.

- :func:`write_atomically`: an output (reference store, mapped AnnData) is written beside its
  target and moved into place in one step, so that the target holds the old output or the new
  one, never a mix, and a killed write leaves the old output as it was. Leftovers of writes that
  were killed are removed by the next write of the same target. An existing target is replaced
  only when asked and only if symphony_dask wrote it (:func:`check_replaceable`), and "does not
  exist" is checked by the move itself, so two writers racing for one path cannot both succeed.
- :func:`refuse_overlap`: an output may never be, hold or lie inside one of the inputs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from symphony_dask._io.validation import pass_option

#: Leftovers of killed writes whose writer cannot be checked (another host, an older naming) are
#: removed once they are this old (seconds).
STALE_AFTER_S = 24 * 3600


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------


def write_atomically(
    path: Path,
    write: Callable[[Path], None],
    *,
    overwrite: bool = False,
    ours: Callable[[Path], bool] | None = None,
    what: str = "file or folder",
) -> Path:
    """Run ``write(tmp)`` on a temporary path beside ``path``, then move the result into place.

    Parameters
    ----------
    path
        The target.
    write
        Writes the output to the path it is given.
    overwrite
        Replace an existing ``path``, but only one that ``ours`` recognises as an output of
        symphony_dask. Without it an existing ``path`` is a :class:`FileExistsError`, also when it
        appears while the output is written (the final move cannot replace anything).
    ours
        Whether an existing path is an output of this kind that symphony_dask wrote (a reference
        store, a mapped AnnData); without it nothing may be replaced.
    what
        What the output is, for messages ("reference store").

    Returns
    -------
    Path
        ``path``.

    Notes
    -----
    The new output replaces the old one in one rename where the system can (Linux
    ``renameat2(RENAME_EXCHANGE)``; elsewhere two renames, between which ``path`` is briefly
    absent), and the old one is deleted only after it is checked again to be ours. A failed or
    killed write leaves ``path`` as it was; leftovers of killed writes of ``path`` are removed here
    (those of a process of this host that is gone, or older than a day).
    """
    path = Path(path)
    check_replaceable(path, overwrite=overwrite, ours=ours, what=what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unwritable(path, err) from err
    remove_leftovers(path)
    tmp = path.parent / f".{path.name}.tmp-{_writer_tag()}"
    try:
        try:
            write(tmp)
        except Exception as err:
            cause = _refusal(err)
            if cause is not None:
                raise _unwritable(path, cause) from err
            raise
        _move_into_place(tmp, path, overwrite=overwrite, ours=ours, what=what)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
    return path


def check_replaceable(
    path: Path, *, overwrite: bool, ours: Callable[[Path], bool] | None = None, what: str = "file or folder"
) -> None:
    """Refuse, before any work, a ``path`` that exists when it may not be replaced.

    Always without ``overwrite``, and with it unless ``ours(path)`` says symphony_dask wrote it.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{path} already exists; {pass_option('overwrite', True)} to replace it")
    if ours is None or path.is_symlink() or not ours(path):
        raise FileExistsError(
            f"{path} is not a {what} written by symphony_dask (it is {describe(path)}); overwriting replaces only "
            f"symphony_dask's own outputs, so it was left untouched: choose another path, or move it away yourself"
        )


def _move_into_place(tmp: Path, path: Path, *, overwrite: bool, ours: Callable[[Path], bool] | None, what: str) -> None:
    """Move the finished output ``tmp`` to ``path``.

    "Does not exist" and "is ours" are checked at the moment of the move, not only before the work.
    """
    try:
        _rename_noreplace(tmp, path)
        return
    except FileExistsError:
        if not overwrite:
            raise FileExistsError(
                f"{path} appeared while this {what} was written (another process wrote it); "
                f"it was left as it is: {pass_option('overwrite', True)} to replace it"
            ) from None
    check_replaceable(path, overwrite=True, ours=ours, what=what)
    if _exchange(tmp, path):  # tmp now holds what was at path
        if tmp.is_symlink() or not ours(tmp):  # replaced between the check and the exchange: put it back
            _exchange(tmp, path)
            check_replaceable(path, overwrite=True, ours=ours, what=what)
        _remove(tmp)
        return
    old = path.parent / f".{path.name}.old-{_writer_tag()}"
    os.replace(path, old)
    try:
        _rename_noreplace(tmp, path)
    except FileExistsError:
        raise FileExistsError(
            f"{path} appeared again while this {what} replaced it (another process wrote it); it was left as it is"
        ) from None
    finally:
        _remove(old)


def describe(path: Path) -> str:
    """What is at ``path``, in a few words, for messages.

    A link, a file and its size, or a folder and the first of its entries.
    """
    path = Path(path)
    if path.is_symlink():
        return f"a symbolic link to {os.readlink(path)}"
    if path.is_dir():
        try:
            names = sorted(entry.name + ("/" if entry.is_dir() else "") for entry in os.scandir(path))
        except OSError as err:
            return f"a folder that cannot be listed ({err.strerror})"
        if not names:
            return "an empty folder"
        shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)" if len(names) > 5 else "")
        return f"a folder holding {len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}"
    if path.is_file():
        return f"a file of {path.stat().st_size:,} bytes"
    return "not a regular file or folder"


def refuse_overlap(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], *, flag: str = "the output") -> None:
    """Refuse an ``output`` that is, contains or lies inside one of the ``inputs``.

    Symbolic links, hard links and bind mounts are included, so that writing it can never destroy what
    is read.

    Raises
    ------
    ValueError
        Naming the output, the input and how they overlap.
    """
    out = Path(output)
    for source in inputs:
        relation = _overlap(out, Path(source))
        if relation is not None:
            raise ValueError(
                f"{flag} {output} {relation} the input {source}; writing it would destroy the input, "
                f"so nothing was done: choose an output path outside the inputs"
            )


def _overlap(out: Path, source: Path) -> str | None:
    out_real, source_real = out.resolve(), source.resolve()
    if out_real == source_real or _same(out, source):
        return "is"
    if out_real in source_real.parents or any(_same(out, parent) for parent in source_real.parents):
        return "is a folder holding"
    if source_real in out_real.parents or any(_same(parent, source) for parent in out_real.parents):
        return "lies inside"
    return None


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


#: errno values of a write that cannot succeed where it is: no space, read-only, no permission.
_CANNOT_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _refusal(err: BaseException) -> OSError | None:
    """The file system's refusal (full, read-only, no permission) behind ``err``, if any.

    Writers wrap it in their own errors (anndata names the element it was writing).
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _CANNOT_WRITE:
            return err
        err = err.__cause__ or err.__context__
    return None


def _unwritable(path: Path, err: OSError) -> OSError:
    """An error that names the output and what to do, for a write the file system refuses."""
    fix = {
        errno.ENOSPC: "free some space or write elsewhere",
        errno.EDQUOT: "free some of your quota or write elsewhere",
        errno.EROFS: "the file system is read-only; write elsewhere",
    }.get(err.errno, "write to a folder you may write to")
    return OSError(err.errno, f"cannot write {path}: {err.strerror}; {fix} (nothing was replaced)")


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist, in one step.

    Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere a claim that cannot replace (``mkdir`` of the target
    folder, then a rename onto the empty folder; ``link`` for a file). ``FileExistsError`` if ``dst`` exists.
    """
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if src.is_dir() and not src.is_symlink():
        os.mkdir(dst)  # FileExistsError if it exists: this claims the name
        try:
            os.replace(src, dst)
        except OSError:
            os.rmdir(dst)
            raise
    else:
        os.link(src, dst, follow_symlinks=False)
        os.unlink(src)


def remove_leftovers(path: Path) -> list[Path]:
    """Remove the temporary outputs of killed writes of ``path``; the paths removed."""
    removed = []
    prefixes = (f".{path.name}.tmp-", f".{path.name}.old-")
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        for prefix in prefixes:
            if entry.name.startswith(prefix) and _is_stale(entry.name[len(prefix) :], entry):
                _remove(entry)
                removed.append(entry)
    return removed


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _writer_tag() -> str:
    """``host-pid-random`` of this writer, so that a later write can tell whether it still runs."""
    return f"{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _is_stale(tag: str, entry: Path) -> bool:
    parts = tag.split("-")
    if len(parts) == 3 and parts[1].isdigit() and parts[0] == _host():
        return not _alive(int(parts[1]))
    try:
        return time.time() - entry.lstat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one rename (Linux ``renameat2(RENAME_EXCHANGE)``).

    False where the system or file system cannot.
    """
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2(src, dst, flags)``.

    True if done, False where the system or file system does not have it; ``FileExistsError`` where
    ``RENAME_NOREPLACE`` finds ``dst``.
    """
    if not hasattr(os, "sched_getaffinity"):  # not Linux
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    if code == errno.EEXIST or (code == errno.ENOTEMPTY and flags == _RENAME_NOREPLACE):
        raise FileExistsError(code, os.strerror(code), str(dst))
    raise OSError(code, f"could not move {src} into place at {dst}: {os.strerror(code)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
