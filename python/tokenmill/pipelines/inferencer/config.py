"""`config.toml` for the Inferencer: the seed's `[inferencer]` keys, typed and checked.

Values are TOML; the string "null" means None and `${VAR}` anywhere in a string takes the environment
variable VAR (a missing one is an error naming it). A placeholder that fills a whole number or boolean
field is parsed as one (`max_new_tokens = "${MAX_TOKENS}"`). Unknown keys and wrong types raise
ConfigError naming the key. `--set key=value` overrides come in as TOML values too (a bare word is a
string)."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from ...engine.cache import CACHE_KINDS
from ...errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:   # pragma: no cover - Python 3.9 / 3.10
    import tomli as tomllib

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
ENGINES = ("local", "ray")
DTYPES = {"float32": "f32", "fp32": "f32", "f32": "f32", "float16": "f16", "fp16": "f16", "f16": "f16",
          "half": "f16", "bfloat16": "bf16", "bf16": "bf16", "auto": None}


@dataclass(frozen=True)
class InferencerConfig:
    """The `[inferencer]` section. Model: `model` (a GGUF file or HF directory) or `run_name` in
    `runs_dir` (as `tokenmill generate --run-name`), neither = the default model; `dtype` converts the
    weights on load (float16 / bfloat16 / float32; auto keeps the file's), `load_in_4bit` /
    `load_in_8bit` quantize them to q4_0 / q8_0. Data: `testing_data_id` with the three column names;
    `system_prompt_override_text` replaces every row's system prompt. Sampling as in `generate`
    (temperature 0 or do_sample = false is greedy); `seed` + row index seeds each row, so a row's output
    does not depend on batching or on resuming. `batch_size`: rows generated together (continuous
    batching); `cache_kind` how their KV pool stores keys and values (fp32 is exact; a tokenmill key);
    `use_cache = false` turns off prefix sharing between rows (each row's own KV cache is always used:
    recomputing it would change nothing but the time); `n_threads`: CPU threads (local engine); `int8`
    multiplies 4-bit weights by activations rounded to int8, as llama.cpp does (tokenmill's
    int8_prefill + int8_decode: faster, not exact); `id_column` names the row ids (absent: row numbers).
    `engine = "ray"` runs the same job on Ray Data (`ray_address`, `num_workers`, `threads_per_worker`)."""

    testing_data_id: Optional[str] = None
    model: Optional[str] = None
    run_name: Optional[str] = None
    runs_dir: str = "checkpoints"
    hf_user_id: Optional[str] = None
    max_sequence_length: int = 2048
    dtype: Optional[str] = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    question_column: str = "question"
    ground_truth_column: Optional[str] = "answer"
    system_prompt_column: Optional[str] = "system"
    system_prompt_override_text: Optional[str] = None
    id_column: Optional[str] = "id"
    max_new_tokens: int = 512
    use_cache: bool = True
    do_sample: bool = True
    temperature: float = 0.7
    min_p: float = 0.1
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = 0
    output_path: str = "inferencer_output.jsonl"
    batch_size: int = 32
    n_threads: Optional[int] = None
    cache_kind: str = "fp32"
    int8: bool = False
    engine: str = "local"
    ray_address: Optional[str] = None
    num_workers: int = 2
    threads_per_worker: int = 1

    def __post_init__(self):
        hints = get_type_hints(type(self))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        for name in ("max_sequence_length", "max_new_tokens", "batch_size", "num_workers", "threads_per_worker"):
            if getattr(self, name) < 1:
                raise ConfigError(f"inferencer.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_threads is not None and self.n_threads < 1:
            raise ConfigError(f"inferencer.n_threads must be >= 1, got {self.n_threads}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or not 0 <= self.min_p <= 1 \
                or self.repetition_penalty <= 0:
            raise ConfigError("inferencer sampling values out of range: temperature >= 0, top_k >= 0, "
                              "0 < top_p <= 1, 0 <= min_p <= 1, repetition_penalty > 0")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("inferencer: load_in_4bit and load_in_8bit exclude each other")
        if self.dtype is not None and self.dtype.lower() not in DTYPES:
            raise ConfigError(f"inferencer.dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.cache_kind not in CACHE_KINDS:
            raise ConfigError(f"inferencer.cache_kind must be one of {', '.join(CACHE_KINDS)}, got {self.cache_kind!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"inferencer.engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.model and self.run_name:
            raise ConfigError("inferencer: give model or run_name, not both")
        if not self.question_column:
            raise ConfigError("inferencer.question_column must name a column")

    @property
    def weights(self) -> Optional[str]:
        """The weight type to convert to on load (None: the file's own)."""
        if self.load_in_4bit:
            return "q4_0"
        if self.load_in_8bit:
            return "q8_0"
        return DTYPES[self.dtype.lower()] if self.dtype else None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or not self.do_sample

    def replace(self, **changes: Any) -> "InferencerConfig":
        return from_mapping({**self.as_dict(), **changes})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(name: str, value: Any, hint: Any) -> None:
    allowed = get_args(hint) if get_origin(hint) is Union else (hint,)
    if value is None:
        if type(None) not in allowed:
            raise ConfigError(f"inferencer.{name} may not be null")
        return
    for t in allowed:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if t in (str, bool) and isinstance(value, t):
            return
    kinds = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"inferencer.{name} must be {kinds}, got {type(value).__name__} {value!r}")


def _substitute(name: str, value: Any, env: Mapping[str, str]) -> Any:
    if not isinstance(value, str):
        return value
    if value == "null":
        return None

    def lookup(m: re.Match) -> str:
        if m.group(1) not in env:
            raise ConfigError(f"inferencer.{name} needs the environment variable {m.group(1)}, which is not set")
        return env[m.group(1)]

    out = _PLACEHOLDER.sub(lookup, value)
    return None if out == "null" else out


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """A placeholder's text into the field's type (only strings that came from `${VAR}` get here)."""
    allowed = get_args(hint) if get_origin(hint) is Union else (hint,)
    if str in allowed or not isinstance(value, str):
        return value
    if bool in allowed and value.lower() in ("true", "false"):
        return value.lower() == "true"
    for t in (int, float):
        if t in allowed:
            try:
                return t(value)
            except ValueError:
                pass
    return value   # _check_type reports it


def from_mapping(section: Mapping[str, Any], env: Optional[Mapping[str, str]] = None) -> InferencerConfig:
    """An InferencerConfig from the `[inferencer]` table (placeholders and "null" resolved)."""
    env = os.environ if env is None else env
    hints = get_type_hints(InferencerConfig)
    unknown = sorted(set(section) - set(hints))
    if unknown:
        raise ConfigError(f"unknown inferencer key{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(hints))})")
    values = {}
    for key, raw in section.items():
        value = _substitute(key, raw, env)
        values[key] = _coerce(key, value, hints[key]) if value is not raw else value
    return InferencerConfig(**values)


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` (value a TOML value; a bare word is a string) -> (key, value)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: give key=value")
    try:
        return key, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return key, text


class ConfigManager:
    """Reads a TOML configuration file (the seed's `ConfigManager("config.toml")`); `inferencer` is its
    checked `[inferencer]` section, with `overrides` (a mapping, or `key=value` strings) applied on top.
    With no path, the section is empty (every default) before the overrides."""

    def __init__(self, path: Union[str, os.PathLike, None] = None,
                 overrides: Union[Mapping[str, Any], Sequence[str], None] = None,
                 env: Optional[Mapping[str, str]] = None):
        self.path = Path(path) if path is not None else None
        self.data: dict = {}
        if self.path is not None:
            try:
                with open(self.path, "rb") as f:
                    self.data = tomllib.load(f)
            except FileNotFoundError:
                raise ConfigError(f"no configuration file {self.path}") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{self.path} is not valid TOML: {exc}") from None
        section = self.data.get("inferencer", {})
        if not isinstance(section, dict):
            raise ConfigError(f"[inferencer] in {self.path} must be a table")
        if isinstance(overrides, Mapping):
            section = {**section, **overrides}
        elif overrides:
            section = {**section, **dict(parse_override(o) for o in overrides)}
        self.inferencer = from_mapping(section, env)

    def get_section(self, name: str) -> dict:
        """A raw section of the file (an empty dict when absent)."""
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] in {self.path} must be a table")
        return value
