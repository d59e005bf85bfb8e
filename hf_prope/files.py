"""Local files: telling a local path from a Hub name, checking a folder can be written, writing atomically.

One rule for each, used by every module that reads a user's path or writes a result:

* :func:`local_path` decides whether a string names something on this machine or on the Hub.
* :func:`check_writable` proves an output folder could be written *without creating it*, so a
  run that fails its checks leaves nothing behind.
* :func:`atomic_path` is the one way anything is written: to a temporary sibling, renamed into
  place once complete, so a reader sees the old file/folder or the whole new one, never half.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def local_path(source: str | os.PathLike[str], *, file_suffixes: Sequence[str] = ()) -> Path | None:
    """The local path ``source`` names, or ``None`` when it can only be a Hub name.

    An existing file or folder is local. So is a missing one that could not be a Hub id:
    starting with ``.``, ``/`` or ``~``, holding a backslash or more than one ``/`` (a Hub id
    is ``name`` or ``namespace/name``), or ending with one of ``file_suffixes`` (e.g.
    ``.gguf``, ``.jsonl``). The caller reports a missing local path; ``None`` means "ask the Hub".
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        return path
    suffixes = {s.lower() for s in file_suffixes}
    if (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or (path.suffix and path.suffix.lower() in suffixes)
    ):
        return path
    return None


def check_writable(folder: str | os.PathLike[str]) -> Path:
    """The absolute path of ``folder`` once it is known it can be created and written; creates nothing.

    The folder itself or, when it does not exist yet, its nearest existing ancestor must be a
    writable directory. Raises ``PermissionError`` (with the reason) otherwise.
    """
    path = Path(folder).expanduser().resolve()
    probe = path
    while not probe.exists():
        probe = probe.parent
    reason = None
    if not probe.is_dir():
        reason = f"{probe} is a file, not a folder"
    elif not os.access(probe, os.W_OK | os.X_OK):
        reason = f"{probe} is not writable"
    if reason is not None:
        raise PermissionError(f"The output folder {path} cannot be written ({reason}); choose another output_dir.")
    return path


def _temporary_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.hf-prope-tmp-{uuid.uuid4().hex[:8]}")


def _old_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}.hf-prope-old")


def recover(target: str | os.PathLike[str]) -> None:
    """Put back a folder that a replacement interrupted between its two renames left aside."""
    target = Path(target)
    old = _old_sibling(target)
    if old.exists() and not target.exists():
        os.replace(old, target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``, on error it is deleted.

    With ``folder=True`` the temporary path is an empty directory (an existing folder at
    ``target`` is replaced as a whole: two renames, undone by :func:`recover` if the process
    dies between them); otherwise the caller writes one file there. Parent folders are created.
    Files get the permissions a plain ``open()`` would give them.
    """
    target = Path(target).expanduser().resolve()
    recover(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(target)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if folder:
            old = _old_sibling(target)
            if old.exists():
                shutil.rmtree(old)
            if target.exists():
                os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if tmp.exists():
                os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write a whole file through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def write_json(path: str | os.PathLike[str], value: Any) -> None:
    """``value`` as indented JSON (non-JSON values as their ``str``), written atomically."""
    write_atomic(path, json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")
