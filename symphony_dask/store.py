"""Writing outputs safely, and knowing a reference store is whole when it is read back.

- :func:`write_atomically`: an output (reference store, mapped AnnData) is written beside its
  target and moved into place in one step, so that the target holds the old output or the new
  one, never a mix, and a killed write leaves the old output as it was. Leftovers of writes that
  were killed are removed by the next write of the same target.
- :func:`element_checksums` / :func:`verify_checksums`: a reference store records, per element
  (``loadings``, ``embedding``, ``obs``, ...), a digest of every file under it (names, sizes and
  contents). Loading recomputes them, so a missing, truncated or altered chunk file is refused with
  the element's name, before anything is read from it (zarr reads a missing chunk as zeros).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from .checks import pass_option

#: Leftovers of killed writes whose writer cannot be checked (another host, an older naming) are
#: removed once they are this old (seconds).
STALE_AFTER_S = 24 * 3600


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------


def write_atomically(path: Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Run ``write(tmp)`` on a temporary path beside ``path``, then move the result into place.

    An existing ``path`` is an error unless ``overwrite``; then it is replaced only once the new
    output is complete, by exchanging the two in one rename where the system can (Linux
    ``renameat2``; elsewhere by two renames, between which ``path`` is briefly absent). A failed
    or killed write leaves ``path`` as it was; leftovers of killed writes of ``path`` are removed
    here (those of a process of this host that is gone, or older than a day).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; {pass_option('overwrite', True)} to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = path.parent / f".{path.name}.tmp-{_writer_tag()}"
    try:
        write(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):  # tmp now holds the old output
            _remove(tmp)
        else:
            old = path.parent / f".{path.name}.old-{_writer_tag()}"
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
    finally:
        if tmp.exists():
            _remove(tmp)
    return path


def remove_leftovers(path: Path) -> list[Path]:
    """Remove the temporary outputs of killed writes of ``path``; the paths removed."""
    removed = []
    prefixes = (f".{path.name}.tmp-", f".{path.name}.old-")
    if not path.parent.is_dir():
        return removed
    for entry in path.parent.iterdir():
        for prefix in prefixes:
            if entry.name.startswith(prefix) and _is_stale(entry.name[len(prefix):], entry):
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one rename (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    if not hasattr(os, "sched_getaffinity"):  # not Linux
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), ctypes.c_uint(rename_exchange)) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, f"could not move {a} into place at {b}: {os.strerror(code)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# checksums
# ----------------------------------------------------------------------------------------------


def element_checksums(root: Path, elements: Iterable[str]) -> dict[str, dict]:
    """Per element (a file or folder directly under ``root``): the number of files, their bytes,
    and a BLAKE2b digest of every file's relative name, size and contents."""
    return {name: _digest(root / name) for name in elements}


def verify_checksums(root: Path, expected: dict[str, dict]) -> list[str]:
    """The elements whose files do not match ``expected`` (see :func:`element_checksums`), each
    with what differs."""
    damaged = []
    for name, want in expected.items():
        if not (root / name).exists():
            damaged.append(f"{name} (missing)")
            continue
        got = _digest(root / name)
        if got["files"] != want.get("files"):
            damaged.append(f"{name} ({want.get('files')} files expected, {got['files']} found)")
        elif got["bytes"] != want.get("bytes"):
            damaged.append(f"{name} ({want.get('bytes')} bytes expected, {got['bytes']} found)")
        elif got["blake2b"] != want.get("blake2b"):
            damaged.append(f"{name} (contents altered)")
    return damaged


def _digest(path: Path) -> dict:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    total = hashlib.blake2b(digest_size=32)
    size = 0
    for f in files:
        content = hashlib.blake2b(digest_size=32)
        with open(f, "rb") as handle:
            while block := handle.read(1 << 22):
                content.update(block)
        n = f.stat().st_size
        size += n
        total.update(f"{f.relative_to(path.parent).as_posix()}\0{n}\0{content.hexdigest()}\n".encode())
    return {"files": len(files), "bytes": size, "blake2b": total.hexdigest()}
