"""Atomic file and directory writes, a lock for cache builders, and the .npz reader that never
unpickles: the one home for all three.

Every write goes to a fresh, uniquely named sibling (``.<name>.tmp-XXXX``) that is renamed into
place, so a reader never sees a half-written file, concurrent writers never share a temporary
name, and an interrupted write leaves the target as it was. Results get the permissions a plain
``open`` / ``mkdir`` would give under the current umask (``mkstemp`` / ``mkdtemp`` make them
private).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

T = TypeVar("T")


def usual_permissions(root: Path) -> None:
    """Give ``root`` (and everything below a directory) the permissions of a plain ``open`` /
    ``mkdir`` under the current umask: 0666 / 0777 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    root = Path(root)
    for path in [root, *(root.rglob("*") if root.is_dir() else ())]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def overlap(path: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """How ``path`` lies against ``other`` once both are resolved: "is", "holds" (an
    ancestor), "is inside" (a descendant), or None when they are apart."""
    a, b = Path(path).expanduser().resolve(), Path(other).expanduser().resolve()
    return "is" if a == b else "holds" if a in b.parents else "is inside" if b in a.parents \
        else None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``path`` to write; on success it is renamed to
    ``path`` (replacing it) with the usual permissions, on an exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` to ``path`` through a temporary sibling and ``os.replace``."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """JSON (indent 1, one trailing newline) to ``path``, atomically."""
    return write_bytes_atomic(path, (json.dumps(data, indent=1, allow_nan=True) + "\n").encode())


def write_npz_atomic(path: str | os.PathLike, **arrays) -> Path:
    """``arrays`` as one uncompressed .npz at ``path``, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes_atomic(path, buffer.getvalue())


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of the .npz at ``path``, read without unpickling. A file that is not an .npz
    of plain arrays (unreadable, not a zip, a single .npy array, pickled objects) is a ValueError
    whose message is the reason in one line, without the path: the caller names the file and
    what it should have been."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an .npz archive")
        with data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        message = " ".join(str(err).split())
        raise ValueError("pickled data" if "pickle" in message
                         else message or type(err).__name__) from None


def atomic_directory(out_dir: str | os.PathLike, overwrite: bool,
                     write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh sibling temp dir, then rename it to ``out_dir``.

    An existing ``out_dir`` is refused unless ``overwrite``; then it is replaced only after the
    new one is complete. Concurrent writers must hold a :func:`file_lock` (a directory cannot be
    renamed over another in one step).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True / --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        usual_permissions(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``.<name>.lock`` beside ``path``: cache builders
    take it around check-build-save, so that concurrent processes build once and the others
    wait, then load. The holder removes the lock file before releasing it (a waiter that then
    gets the lock of a removed file retries), so none is left behind. Not re-entrant. A folder
    where the lock cannot be created (read-only, or a file) is one OSError line naming it."""
    path = Path(path)
    lock = path.parent / f".{path.name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        open(lock, "a").close()
    except OSError as err:  # a read-only or full cache: one line naming the folder
        raise OSError(f"{path.parent}: cannot build {path.name} there ({err.strerror}); set "
                      "ROME_JAX_CACHE to a writable folder") from None
    while True:
        handle = open(lock, "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()  # the holder before us removed this file: lock the new one
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        handle.close()  # releases the lock


@contextlib.contextmanager
def file_locks(paths: list[str | os.PathLike]) -> Iterator[None]:
    """:func:`file_lock` on each of ``paths``, taken in the order of their names, so builders
    of overlapping sets never deadlock (each waits for the first lock it lacks)."""
    with contextlib.ExitStack() as stack:
        for path in sorted(set(map(str, paths))):
            stack.enter_context(file_lock(path))
        yield


def build_once(path: str | os.PathLike, load: Callable[[], T | None],
               build: Callable[[], T]) -> T:
    """The cache at ``path``: ``load()`` (None when it is missing or unusable), else, holding
    :func:`file_lock` on ``path``, ``load()`` again (another process may have built it
    meanwhile) or ``build()``, which must write ``path`` atomically. A hit takes no lock, so a
    read-only cache works; concurrent builders build once, and the others wait, then load."""
    found = load()
    if found is not None:
        return found
    with file_lock(path):
        found = load()
        return build() if found is None else found
