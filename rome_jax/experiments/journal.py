"""Resumable experiment results: one JSON line per finished unit of work (``rows.jsonl``).

The first line is the header ``{"experiment": NAME, "settings": {...}}``; every later line is a
row with a ``"key"`` (a case id, an edit step...). A rerun with the same settings reads the
finished rows and skips their keys; a rerun with other settings is refused, naming what
differs (``model``, a path, may differ: ``digest`` names the weights). Each row is written with
one ``write`` of a whole line, then flushed and fsynced, so an interrupted run loses at most the
row it was computing: a torn last line (no newline) is cut off when the journal is reopened.
One process at a time writes a journal (an exclusive ``flock`` held while it is open); a second
one is refused at once instead of interleaving rows.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Mapping


def _normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(value))


class Journal:
    """The rows of ``path`` (created with ``experiment`` / ``settings`` when missing or when
    ``overwrite``). Use as a context manager, or call ``close``."""

    def __init__(self, path: str | os.PathLike, experiment: str, settings: Mapping[str, Any],
                 overwrite: bool = False):
        self.path = Path(path)
        self.experiment = experiment
        self.settings = _normal(dict(settings))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a+b")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise ValueError(f"{self.path}: another process is writing this experiment; wait "
                             "for it or use another --out") from None
        try:
            if overwrite:
                self._handle.truncate(0)
            self.rows = self._read()
        except BaseException:
            self.close()
            raise
        self.keys = {_key(r["key"]) for r in self.rows}

    def _read(self) -> list[dict]:
        self._handle.seek(0)
        data = self._handle.read()
        complete = data[:data.rfind(b"\n") + 1]  # a torn last line is dropped
        if len(complete) != len(data):
            self._handle.truncate(len(complete))
        lines = complete.decode("utf-8", errors="strict").splitlines() if complete else []
        if not lines:
            self._write({"experiment": self.experiment, "settings": self.settings})
            return []
        try:
            header, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
        except ValueError as err:
            raise ValueError(f"{self.path}: not an experiment journal ({err}); use another "
                             "--out, or --overwrite to start over") from None
        if not isinstance(header, dict) or header.get("experiment") != self.experiment:
            raise ValueError(f"{self.path}: holds experiment "
                             f"{header.get('experiment') if isinstance(header, dict) else '?'!r}"
                             f", not {self.experiment!r}; use another --out")
        old = header.get("settings", {})
        differ = sorted(k for k in set(old) | set(self.settings)
                        if k != "model" and old.get(k) != self.settings.get(k))
        if differ:
            raise ValueError(f"{self.path}: was made with other settings ({', '.join(differ)} "
                             "differ); use the same settings, another --out, or --overwrite "
                             "to start over")
        if any(not isinstance(r, dict) or "key" not in r for r in rows):
            raise ValueError(f"{self.path}: a row without a 'key'; not an experiment journal")
        return rows

    def _write(self, obj: Mapping) -> None:
        self._handle.seek(0, os.SEEK_END)
        self._handle.write((json.dumps(obj, allow_nan=True) + "\n").encode())
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def __contains__(self, key) -> bool:
        return _key(key) in self.keys

    def append(self, row: Mapping[str, Any]) -> dict:
        """Write ``row`` (which must have a new ``key``) as one line; returns it as read back."""
        if "key" not in row:
            raise ValueError("row: needs a 'key'")
        if row["key"] in self:
            raise ValueError(f"row {row['key']!r}: already in {self.path}")
        row = _normal(dict(row))
        self._write(row)
        self.rows.append(row)
        self.keys.add(_key(row["key"]))
        return row

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()  # releases the lock

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _key(key: Any) -> str:
    return json.dumps(_normal(key), sort_keys=True)


def read_rows(path: str | os.PathLike, experiment: str | None = None
              ) -> tuple[dict, list[dict]]:
    """(header, rows) of a journal, read only (no lock; a torn last line is ignored)."""
    path = Path(path)
    data = path.read_bytes()
    lines = data[:data.rfind(b"\n") + 1].decode().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty, not an experiment journal")
    header = json.loads(lines[0])
    if experiment is not None and header.get("experiment") != experiment:
        raise ValueError(f"{path}: holds experiment {header.get('experiment')!r}, not "
                         f"{experiment!r}")
    return header, [json.loads(line) for line in lines[1:]]
