"""Resumable experiment results: one JSON line per finished unit of work (``rows.jsonl``).

The first line is the header ``{"experiment": NAME, "settings": {...}}``; every later line is a
row with a ``"key"`` (a case id, an edit step...). A rerun with the same settings reads the
finished rows and skips their keys; a rerun with other settings is refused, naming what
differs (``model``, a path, may differ: ``digest`` names the weights; a ROME setting the
journal predates counts as its default). Each row is written with one ``write`` of a whole
line, then flushed and fsynced, so an interrupted run loses at most the row it was computing:
a torn last line (no newline, opening with ``{``) is cut off when the journal is reopened.
Anything else that is not a journal (no complete line, a header or row of another shape, a row
its experiment cannot read) is refused and left as it is.
One process at a time writes a journal (an exclusive ``flock`` held while it is open); a second
one is refused at once instead of interleaving rows, while a reader (``read_only``, a report of
a run under way) reads the rows written so far. Nothing is written before the first row
or a run that ends without an exception: a refused run leaves no header-only journal, and a
refused ``--overwrite`` run keeps the old rows.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from rome_jax.rome.hparams import filled

NUMBER = (int, float)
NEWLINE = b"\n"

CheckRow = Callable[[dict], None]


def _normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(value))


def filled_settings(settings: Mapping[str, Any]) -> dict:
    """Results ``settings`` (a journal's, a screen's or an evaluation's) with the ROME settings
    (``"hparams"``) that a file written before they existed lacks set to their defaults
    (``rome.hparams.filled``)."""
    hparams = settings.get("hparams")
    if not isinstance(hparams, Mapping):
        return dict(settings)
    return {**settings, "hparams": filled(hparams)}


def require(obj: Mapping, spec: Mapping[str, Any], where: str = "") -> None:
    """ValueError ``FIELD: ...`` for the first field of ``spec`` that ``obj`` lacks or holds
    with another type. ``spec`` maps a field to a type, a tuple of types, or a nested spec (the
    field must then be an object holding it)."""
    for field, want in spec.items():
        name = f"{where}{field}"
        if field not in obj:
            raise ValueError(f"{name}: missing")
        value = obj[field]
        if isinstance(want, Mapping):
            if not isinstance(value, dict):
                raise ValueError(f"{name}: expected an object, got {type(value).__name__}")
            require(value, want, f"{name}.")
        elif not isinstance(value, want):
            names = "/".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise ValueError(f"{name}: expected {names}, got {type(value).__name__}")


def parse(data: bytes, path: Path, experiment: str | None = None,
          check_row: CheckRow | None = None) -> tuple[dict, list[dict], int]:
    """(header, rows, byte length of the complete lines) of a journal's bytes; ValueError
    naming ``path`` and the line for anything that is not a journal (of ``experiment``, with
    rows ``check_row`` accepts). A torn last line is left out when it opens with ``{``."""
    def refuse(why: str):
        raise ValueError(f"{path}: not an experiment journal ({why})")

    end = data.rfind(NEWLINE) + 1
    if end == 0:
        refuse("no complete line")
    if data[end:] and not data[end:].startswith(b"{"):
        refuse(f"line {data.count(NEWLINE) + 1} has no newline and is not the start of a row")
    try:
        lines = data[:end].decode("utf-8").split("\n")[:-1]
    except UnicodeDecodeError as err:
        refuse(f"not UTF-8 text: {err}")
    try:
        header = json.loads(lines[0])
    except ValueError as err:
        refuse(f"line 1: {err}")
    if not (isinstance(header, dict) and isinstance(header.get("experiment"), str)
            and isinstance(header.get("settings"), dict)):
        refuse('line 1 is not {"experiment": NAME, "settings": {...}}')
    if experiment is not None and header["experiment"] != experiment:
        raise ValueError(f"{path}: holds experiment {header['experiment']!r}, not "
                         f"{experiment!r}")
    rows = []
    for number, line in enumerate(lines[1:], 2):
        try:
            row = json.loads(line)
        except ValueError as err:
            refuse(f"line {number}: {err}")
        if not isinstance(row, dict) or "key" not in row:
            refuse(f"line {number}: a row without a 'key'")
        if check_row is not None:
            try:
                check_row(row)
            except ValueError as err:
                refuse(f"line {number}: {' '.join(str(err).split())}")
        rows.append(row)
    return header, rows, end


class Journal:
    """The rows of ``path`` (started with ``experiment`` / ``settings`` when missing or when
    ``overwrite``). ``check_row(row)`` raises ValueError for a row the experiment cannot read;
    ``read_only``: the file must exist and is never changed (no row can be appended); while
    another process writes it, the rows written so far are read (``being_written``). Use as a
    context manager, or call ``close``."""

    def __init__(self, path: str | os.PathLike, experiment: str, settings: Mapping[str, Any],
                 overwrite: bool = False, check_row: CheckRow | None = None,
                 read_only: bool = False):
        self.path = Path(path)
        self.experiment = experiment
        self.settings = _normal(dict(settings))
        self.check_row = check_row
        self.read_only = read_only and not overwrite
        absolute = self.path.absolute()
        self._made = [d for d in absolute.parents if not d.exists()]  # deepest first
        if not self.read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._created = not self.path.exists()
        self._handle = open(self.path, "rb" if self.read_only else "a+b")
        self.being_written = False
        try:
            fcntl.flock(self._handle, (fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX)
                        | fcntl.LOCK_NB)
        except BlockingIOError:
            if not self.read_only:
                self._handle.close()
                raise ValueError(f"{self.path}: another process is writing this experiment; "
                                 "wait for it or use another --out") from None
            self.being_written = True  # read its whole lines so far (each is one write)
        self._started = not overwrite  # an old file is replaced at the first write
        self._torn_at = None
        try:
            self.rows = self._read() if self._started else []
        except BaseException:
            self.close()
            raise
        self.keys = {_key(r["key"]) for r in self.rows}

    def _read(self) -> list[dict]:
        self._handle.seek(0)
        data = self._handle.read()
        if not data:
            self._started = False
            return []
        try:
            header, rows, end = parse(data, self.path, self.experiment, self.check_row)
        except ValueError as err:
            raise ValueError(f"{err}; use another --out, or --overwrite to start over") from None
        old, new = filled_settings(header["settings"]), filled_settings(self.settings)
        differ = sorted(k for k in set(old) | set(new)
                        if k != "model" and old.get(k) != new.get(k))
        if differ:
            raise ValueError(f"{self.path}: was made with other settings ({', '.join(differ)} "
                             "differ); use the same settings, another --out, or --overwrite "
                             "to start over")
        self._torn_at = end if end != len(data) else None  # cut at the first write
        return rows

    def _start(self) -> None:
        """Write the header (replacing what the file held) unless it is written, or cut off a
        torn last line."""
        if self.read_only:
            raise ValueError(f"{self.path}: opened read-only, nothing can be written")
        if not self._started:
            self._handle.truncate(0)
            self._write({"experiment": self.experiment, "settings": self.settings})
            self._started = True
        elif self._torn_at is not None:  # the torn last line of an interrupted run
            self._handle.truncate(self._torn_at)
            self._torn_at = None

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
        self._start()
        self._write(row)
        self.rows.append(row)
        self.keys.add(_key(row["key"]))
        return row

    def close(self) -> None:
        """Release the journal; one this run created and never wrote is removed, with the
        folders made for it."""
        if self._handle.closed:
            return
        if self._created and not self._started:
            self.path.unlink(missing_ok=True)
            for folder in self._made:
                try:
                    folder.rmdir()
                except OSError:
                    break
        self._handle.close()  # releases the lock

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None and not self.read_only:  # a finished run records its settings
            self._start()
        self.close()


def _key(key: Any) -> str:
    return json.dumps(_normal(key), sort_keys=True)


def read_rows(path: str | os.PathLike, experiment: str | None = None,
              check_row: CheckRow | None = None) -> tuple[dict, list[dict]]:
    """(header, rows) of a journal, read only (no lock; a torn last line is ignored)."""
    path = Path(path)
    header, rows, _ = parse(path.read_bytes(), path, experiment, check_row)
    return header, rows
