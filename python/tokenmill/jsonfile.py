"""Reading the small JSON files that sit beside models (config.json, tokenizer_config.json, run configs)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelFormatError


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; ModelFormatError if it cannot be read or is not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} is not a JSON object")
    return data
