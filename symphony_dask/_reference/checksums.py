"""Knowing a reference store is whole when it is read back: per-element checksums.

A reference store records, per element (``loadings``, ``embedding``, ``obs``, ...), a digest of every
file under it (names, sizes and contents). Loading recomputes them, so a missing, truncated or
altered chunk file is refused with the element's name, before anything is read from it (zarr reads a
missing chunk as zeros). The checksums guard against accidental damage, not against tampering:
whoever can edit a store can edit its checksums too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

#: An element is a plain name directly under the store's root: no separators, no ``..``.
_ELEMENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def element_checksums(root: Path, elements: Iterable[str]) -> dict[str, dict]:
    """Per element (a file or folder directly under ``root``).

    The number of files, their bytes, and a BLAKE2b digest of every file's relative name, size and contents.
    """
    checksums = {}
    for name in elements:
        digest = _digest(root / check_element_name(name))
        checksums[name] = {key: digest[key] for key in ("files", "bytes", "blake2b")}
    return checksums


def check_element_name(name: object) -> str:
    """``name`` if it is a plain element name (letters, digits, ``_``, ``.``, ``-``.

    Not ``..``); a ``ValueError`` for anything that could reach outside the store (``../x``, ``/usr``).
    """
    if not isinstance(name, str) or not _ELEMENT_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{name!r} is not an element name of a reference store (a plain name inside the store)")
    return name


def verify_checksums(root: Path, expected: dict[str, dict]) -> list[str]:
    """The elements whose files do not match ``expected`` (see :func:`element_checksums`), each with what differs.

    Names are checked first (:func:`check_element_name`), so nothing outside ``root`` is read; symbolic links,
    which a store never holds, count as damage.
    """
    for name in expected:
        check_element_name(name)
    damaged = []
    for name, want in expected.items():
        want = want if isinstance(want, dict) else {}
        target = root / name
        if not (target.exists() or target.is_symlink()):
            damaged.append(f"{name} (missing)")
            continue
        got = _digest(target)
        if got["links"]:
            damaged.append(f"{name} (holds a symbolic link, {got['links'][0]})")
        elif got["files"] != want.get("files"):
            damaged.append(f"{name} ({want.get('files')} files expected, {got['files']} found)")
        elif got["bytes"] != want.get("bytes"):
            damaged.append(f"{name} ({want.get('bytes')} bytes expected, {got['bytes']} found)")
        elif got["blake2b"] != want.get("blake2b"):
            damaged.append(f"{name} (contents altered)")
    return damaged


def json_digest(value: object) -> str:
    """BLAKE2b digest of ``value`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.blake2b(text.encode(), digest_size=32).hexdigest()


def _digest(path: Path) -> dict:
    """Digest of the file ``path`` or of every file under the folder ``path`` (links not followed.

    They are listed under ``links``).
    """
    links: list[str] = []
    if path.is_symlink():
        files, links = [], [path.name]
    elif path.is_file():
        files = [path]
    else:
        files = []
        for folder, dirs, names in os.walk(path, followlinks=False):
            for name in dirs + names:
                entry = Path(folder) / name
                if entry.is_symlink():
                    links.append(entry.relative_to(path.parent).as_posix())
                elif name in names:
                    files.append(entry)
        files.sort()
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
    return {"files": len(files), "bytes": size, "blake2b": total.hexdigest(), "links": sorted(links)}
