"""Test datasets for the Inferencer: a local JSONL / JSON / CSV / Parquet file, a folder of them (files
in name order), or a `datasets` name when that package is installed and has the data cached (offline)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ...errors import ConfigError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def data_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: unknown data format (expected {', '.join(FORMATS)})")
    return fmt


def data_files(source: str) -> list[Path]:
    """The files a local testing_data_id names (a file, or the data files of a folder in name order)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
        if not files:
            raise ConfigError(f"folder {path} holds no {', '.join(FORMATS)} file")
        return files
    if path.is_file():
        data_format(path)
        return [path]
    raise FileNotFoundError(f"no such file or folder: {path}")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
    return rows


def _read_json(path: Path) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict):   # columns {name: [values]}, or {"data": [rows]}
        if isinstance(data.get("data"), list) and len(data) == 1:
            return data["data"]
        columns = list(data.values())
        if columns and all(isinstance(c, list) and len(c) == len(columns[0]) for c in columns):
            return [dict(zip(data, values)) for values in zip(*columns)]
        raise ConfigError(f"{path}: a JSON object must map column names to lists of equal length")
    if not isinstance(data, list):
        raise ConfigError(f"{path}: expected a list of rows")
    return data


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:   # pyarrow's errors have no common base beyond ArrowException/OSError
        raise ConfigError(f"{path}: not a readable Parquet file ({exc})") from None


READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}


def _from_datasets(name: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(f"testing_data_id {name!r} is no local file or folder (and the datasets "
                                "package, which could find it in its cache, is not installed)") from None
    try:
        data = datasets.load_dataset(name, download_mode="reuse_cache_if_exists")
    except Exception as exc:   # datasets raises many kinds; offline misses are the usual one
        raise FileNotFoundError(f"testing_data_id {name!r}: not a local file, and datasets could not load it "
                                f"from its cache ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        split = "test" if "test" in data else next(iter(data))
        data = data[split]
    return list(data)


def load_rows(source: str) -> list[dict[str, Any]]:
    """Every row of the dataset, in order; each row a dict of column -> value."""
    if not isinstance(source, str) or not source:
        raise ConfigError("inferencer.testing_data_id must name the test data (a file, a folder or a datasets name)")
    if not Path(source).exists():
        return _check_rows(source, _from_datasets(source))
    rows: list = []
    for f in data_files(source):
        rows.extend(_check_rows(str(f), READERS[data_format(f)](f)))
    return rows


def _check_rows(where: str, rows: list) -> list[dict]:
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: row {i} is a {type(row).__name__}, not an object of columns")
    return rows
