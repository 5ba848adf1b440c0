"""Training-run directories, as the seed's `generate` tool reads them:

    checkpoints/NAME/
        NAME_step<N>_config.json     one per saved step
        latest_config.json           the newest (often a symlink)

Each config holds `checkpoint.latest` (the model file: GGUF or HF directory), optionally
`tokenizer.path` (a tokenizer.json, or a GGUF whose vocabulary is used; absent = the model's own) and
`model.max_seq_len`; paths are relative to the run directory."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import ModelFormatError, ModelNotFoundError
from ..jsonfile import read_json_object


@dataclass
class RunCheckpoint:
    config_path: Path
    model_path: Path
    tokenizer_path: Optional[Path]
    max_seq_len: Optional[int]
    step: Optional[int]


def available_steps(run_dir: Path, name: str) -> list[int]:
    pattern = re.compile(re.escape(name) + r"_step(\d+)_config\.json$")
    return sorted(int(m.group(1)) for p in run_dir.iterdir() if (m := pattern.match(p.name)))


def resolve_run(name: str, step: Optional[int] = None, runs_dir: str | Path = "checkpoints") -> RunCheckpoint:
    run_dir = Path(runs_dir) / name
    if not run_dir.is_dir():
        raise ModelNotFoundError(f"no run directory '{run_dir}'")
    steps = available_steps(run_dir, name)
    listing = ", ".join(map(str, steps)) or "none"
    if step is None:
        config_path = run_dir / "latest_config.json"
        if not config_path.exists():
            if not steps:
                raise ModelNotFoundError(f"run '{name}' has no latest_config.json and no step configs")
            config_path = run_dir / f"{name}_step{steps[-1]}_config.json"
    else:
        config_path = run_dir / f"{name}_step{step}_config.json"
        if not config_path.exists():
            raise ModelNotFoundError(f"run '{name}' has no step {step}; available steps: {listing}")
    config = read_json_object(config_path)

    def section(key) -> dict:
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise ModelFormatError(f"'{key}' in {config_path} must be an object")
        return value

    checkpoint = section("checkpoint").get("latest")
    if not isinstance(checkpoint, str) or not checkpoint:
        raise ModelFormatError(f"{config_path} lacks checkpoint.latest (the model file)")
    model_path = run_dir / checkpoint
    if not model_path.exists():
        raise ModelNotFoundError(f"checkpoint '{checkpoint}' named by {config_path.name} does not exist in {run_dir}")
    tok = section("tokenizer").get("path")
    tokenizer_path = run_dir / tok if isinstance(tok, str) and tok else None
    max_seq_len = section("model").get("max_seq_len")
    step_value = section("checkpoint").get("step", step)
    return RunCheckpoint(
        config_path=config_path,
        model_path=model_path,
        tokenizer_path=tokenizer_path,
        max_seq_len=int(max_seq_len) if isinstance(max_seq_len, int) and max_seq_len > 0 else None,
        step=int(step_value) if isinstance(step_value, int) else None,
    )
