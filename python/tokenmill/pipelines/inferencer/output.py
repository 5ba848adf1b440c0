"""The Inferencer's JSONL output, written so that a job killed at any moment (SIGKILL included) can be
resumed: rows are appended in input order, one `write` per complete line, flushed and fsynced before
the next; so the file is always a prefix of the final output, plus at most one torn last line, which a
restart cuts off. `check_prefix` is the consistency check: the rows already there must be the first
rows of this dataset (same ids and questions) produced by the same model and generation settings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from ...errors import ConfigError


class JsonlAppender:
    """Appends rows to a JSONL file durably. `existing()` reads the complete rows already there (cutting
    a torn last line off the file); `overwrite=True` empties the file first."""

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not self.path.is_file():
            raise ConfigError(f"output_path {self.path} is not a regular file")
        self._rows = [] if overwrite else self._read_and_repair()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if overwrite else 0)
        self._fd: Optional[int] = os.open(self.path, flags, 0o644)

    def _read_and_repair(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        rows, good_end = [], 0
        lines = data.split(b"\n")
        for number, line in enumerate(lines[:-1], 1):   # the piece after the last newline is torn or empty
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConfigError(f"{self.path}:{number} is not a JSON row; it was not written by an interrupted "
                                  "run (use --overwrite or another output_path)") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{self.path}:{number} is not a JSON object")
            rows.append(row)
            good_end += len(line) + 1
        if good_end != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return rows

    def existing(self) -> list[dict]:
        return list(self._rows)

    def append(self, row: dict[str, Any]) -> None:
        if self._fd is None:
            raise ConfigError(f"{self.path} is closed")
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:   # a regular file takes it in one write; loop anyway, os.write may be partial
            view = view[os.write(self._fd, view):]
        if self.fsync:
            os.fsync(self._fd)
        self._rows.append(row)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_prefix(path: Path, done: Sequence[dict], expected: Sequence[tuple[Any, str]], model_id: str,
                 generation_config: dict) -> None:
    """Raises ConfigError unless `done` are the first len(done) rows of `expected` ((id, question) in
    input order), made by model_id with generation_config."""
    if len(done) > len(expected):
        raise ConfigError(f"{path} holds {len(done)} rows but the dataset has {len(expected)}: it belongs to "
                          "another job (use --overwrite or another output_path)")
    for i, (row, (row_id, question)) in enumerate(zip(done, expected)):
        meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        why = None
        if row.get("id") != row_id or row.get("question") != question:
            why = f"row {i} is id {row.get('id')!r}, the dataset's row {i} is id {row_id!r}"
        elif meta.get("model_id") != model_id:
            why = f"row {i} was made by {meta.get('model_id')!r}, this job uses {model_id!r}"
        elif meta.get("generation_config") != generation_config:
            why = f"row {i} was made with other generation settings ({meta.get('generation_config')})"
        if why:
            raise ConfigError(f"{path} cannot be resumed: {why} (use --overwrite or another output_path)")
