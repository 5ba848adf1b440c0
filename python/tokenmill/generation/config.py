"""Generation settings, grouped by what they control (sampling, stopping, context, cache, prefill),
with every seed `GenerateConfig` field name still usable flat:

    GenerateConfig(temperature=0.7, stop=["\\n"], cache_kind="q8", decode_plan="fixed")
    GenerateConfig(sampling=SamplingConfig(temperature=0.7), cache=CacheConfig(kind="q8"))
    cfg.temperature == cfg.sampling.temperature; cfg.cache_kind == cfg.cache.kind

Flat names map onto group fields by prefix: `cache_*` -> CacheConfig, `decode_*` -> PrefillConfig
(`decode_plan` is its `plan`), the rest by name. Every group validates itself when made; a
GenerateConfig is immutable (`replace` returns a changed copy)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ..engine.cache import CACHE_KINDS
from ..errors import InvalidArgumentError, UnknownParameterError

OVERFLOW_MODES = ("error", "truncate", "slide")
DECODE_PLANS = ("auto", "fixed", "none")


def _number(name, value, lo=None, hi=None, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise InvalidArgumentError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise InvalidArgumentError(f"{name} must be <= {hi}, got {value}")


def _integer(name, value, lo, hi=None):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < lo:
        raise InvalidArgumentError(f"{name} must be an integer >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise InvalidArgumentError(f"{name} must be an integer <= {hi}, got {value!r}")


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class SamplingConfig:
    """temperature (0 = greedy), top_k (0 = off), top_p, min_p, typical_p, repetition_penalty (HF
    rule) over the last repeat_last_n tokens (-1 = all, prompt included), presence_penalty,
    frequency_penalty, logit_bias {token: bias} (-inf bans a token), seed (None = fresh entropy),
    logprobs (None, or how many top alternatives to report with each chosen token's log-probability),
    json_schema (a dict or its JSON text) or regex: only tokens that keep the output a valid prefix
    of that JSON / pattern (see tokenmill.generation.constraints)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    logit_bias: Optional[Mapping[int, float]] = None
    seed: Optional[int] = None
    logprobs: Optional[int] = None
    json_schema: Union[Mapping[str, Any], str, None] = None
    regex: Optional[str] = None

    def __post_init__(self):
        _number("temperature", self.temperature, lo=0.0)
        _integer("top_k", self.top_k, 0, 2**31 - 1)
        _number("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _number("min_p", self.min_p, lo=0.0, hi=1.0)
        _number("typical_p", self.typical_p, lo=0.0, hi=1.0, lo_open=True)
        _number("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        _number("presence_penalty", self.presence_penalty)
        _number("frequency_penalty", self.frequency_penalty)
        _integer("repeat_last_n", self.repeat_last_n, -1, 2**31 - 1)
        if self.seed is not None:
            _integer("seed", self.seed, 0, 2**64 - 1)
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0, 2**20)
        if self.json_schema is not None and self.regex is not None:
            raise InvalidArgumentError("give json_schema or regex, not both")
        if self.regex is not None and not isinstance(self.regex, str):
            raise InvalidArgumentError(f"regex must be a string, got {type(self.regex).__name__}")
        if self.json_schema is not None:
            if isinstance(self.json_schema, str):
                try:
                    parsed = json.loads(self.json_schema)
                except ValueError as exc:
                    raise InvalidArgumentError(f"json_schema is not valid JSON: {exc}") from exc
            else:
                parsed = self.json_schema
            if not isinstance(parsed, Mapping):
                raise InvalidArgumentError("json_schema must be a JSON object (a dict, or its JSON text)")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise InvalidArgumentError("logit_bias must be a mapping {token_id: bias}")
            for token, bias in self.logit_bias.items():
                _integer("logit_bias token id", token, 0, 2**31 - 1)
                if isinstance(bias, bool) or not isinstance(bias, (int, float, np.floating, np.integer)) or \
                        math.isnan(bias) or bias == math.inf:
                    raise InvalidArgumentError(f"logit_bias[{token}] must be a finite number or -inf, got {bias!r}")

    def sampler_params(self) -> dict:
        """Keywords for EngineModel.new_sampler (a None seed draws fresh entropy)."""
        return dict(
            temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p),
            min_p=float(self.min_p), typical_p=float(self.typical_p), repetition_penalty=float(self.repetition_penalty),
            presence_penalty=float(self.presence_penalty), frequency_penalty=float(self.frequency_penalty),
            repeat_last_n=int(self.repeat_last_n),
            logit_bias=[(int(k), float(v)) for k, v in (self.logit_bias or {}).items()],
            seed=(secrets.randbits(64) if self.seed is None else int(self.seed)),
        )


@dataclass(frozen=True)
class StoppingConfig:
    """max_new_tokens; eos_token_id (an int or a list; None = the model's; -1 disables), ignore_eos;
    stop strings (matched on text across token boundaries, never emitted)."""

    max_new_tokens: int = 64
    eos_token_id: Union[int, Sequence[int], None] = None
    ignore_eos: bool = False
    stop: Union[str, Sequence[str], None] = None

    def __post_init__(self):
        _integer("max_new_tokens", self.max_new_tokens, 0, 2**31 - 1)
        _flag("ignore_eos", self.ignore_eos)
        self.stop_strings()
        self.eos_ids(None)

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise InvalidArgumentError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in stops):
            raise InvalidArgumentError("stop strings must not be empty")
        return list(stops)

    def eos_ids(self, model_eos: Optional[Sequence[int]]) -> set[int]:
        if self.ignore_eos:
            return set()
        value = self.eos_token_id
        if value is None:
            return set(model_eos or [])
        values = [value] if isinstance(value, (int, np.integer)) else value
        if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or \
                not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            raise InvalidArgumentError(f"eos_token_id must be an int or a list of ints, got {value!r}")
        return {int(v) for v in values if v >= 0}   # -1 disables, as in the CLI


@dataclass(frozen=True)
class ContextConfig:
    """max_seq_len (None = the model's context) and context_overflow: "error" (an input that does not
    fit raises; generation stops when the context is full), "truncate" (drop the oldest tokens so the
    input fits and leaves room for max_new_tokens, up to half the context), "slide" (whenever the
    context is full, keep its last max_seq_len - 1 tokens and recompute their cache, so generation
    never stops for lack of room, as the seed's sliding window does)."""

    max_seq_len: Optional[int] = None
    context_overflow: str = "error"

    def __post_init__(self):
        if self.max_seq_len is not None:
            _integer("max_seq_len", self.max_seq_len, 2, 2**24)
        if self.context_overflow not in OVERFLOW_MODES:
            raise InvalidArgumentError(
                f"context_overflow must be one of {', '.join(OVERFLOW_MODES)}, got {self.context_overflow!r}"
            )


@dataclass(frozen=True)
class CacheConfig:
    """KV cache: kind "fp32" | "fp16" | "bf16" | "q8" | "q4" | "nf4" | "auto" (kind_k / kind_v
    override it per tensor), residual_len newest tokens kept in fp16, fp16_prefix_layers first
    layers in fp16. "auto" picks a kind under budget_mb (MB for max_seq_len tokens) that passes the
    quality gates (quality_*) on a calibration text (quality_text, default: shipped Shakespeare),
    the fastest by a micro-benchmark when auto_benchmark (the smallest of those within 5 % of it);
    the plan persists in plan_path and is re-measured after plan_probe_interval_sec if plan_probe
    (see tokenmill.generation.cache_plan)."""

    kind: str = "fp32"
    kind_k: Optional[str] = None
    kind_v: Optional[str] = None
    budget_mb: Optional[float] = None
    residual_len: int = 0
    fp16_prefix_layers: int = 0
    quality_max_delta_nll: float = 0.05
    quality_max_ppl_ratio: float = 1.05
    quality_max_mean_kl: float = 0.05
    quality_min_top1: float = 0.9
    quality_prompt_len: int = 256
    quality_decode_steps: int = 32
    quality_text: Optional[str] = None
    auto_benchmark: bool = True
    auto_bench_steps: int = 8
    auto_bench_prompt_len: int = 64
    plan_path: Optional[Union[str, os.PathLike]] = None
    plan_probe: bool = True
    plan_probe_interval_sec: float = 3600.0

    def __post_init__(self):
        kinds = CACHE_KINDS + ("auto",)
        for name in ("kind", "kind_k", "kind_v"):
            value = getattr(self, name)
            if (value is not None or name == "kind") and value not in kinds:
                raise InvalidArgumentError(f"cache_{name} must be one of {', '.join(kinds)}, got {value!r}")
        if "auto" in (self.kind_k, self.kind_v):
            raise InvalidArgumentError("'auto' applies to cache_kind as a whole, not to cache_kind_k / cache_kind_v")
        if self.budget_mb is not None:
            _number("cache_budget_mb", self.budget_mb, lo=0.0, lo_open=True)
        _integer("cache_residual_len", self.residual_len, 0, 2**20)
        _integer("cache_fp16_prefix_layers", self.fp16_prefix_layers, 0, 4096)
        for name in ("quality_prompt_len", "quality_decode_steps", "auto_bench_steps", "auto_bench_prompt_len"):
            _integer(f"cache_{name}", getattr(self, name), 1, 2**24)
        _number("cache_quality_max_delta_nll", self.quality_max_delta_nll)
        _number("cache_quality_max_ppl_ratio", self.quality_max_ppl_ratio, lo=1.0)
        _number("cache_quality_max_mean_kl", self.quality_max_mean_kl, lo=0.0)
        _number("cache_quality_min_top1", self.quality_min_top1, lo=0.0, hi=1.0)
        _number("cache_plan_probe_interval_sec", self.plan_probe_interval_sec, lo=0.0)
        _flag("cache_auto_benchmark", self.auto_benchmark)
        _flag("cache_plan_probe", self.plan_probe)
        if self.quality_text is not None and not isinstance(self.quality_text, str):
            raise InvalidArgumentError("cache_quality_text must be a string (the calibration text itself)")
        if self.plan_path is not None:
            if not isinstance(self.plan_path, (str, os.PathLike)):
                raise InvalidArgumentError("cache_plan_path must be a path")
            if os.path.isdir(self.plan_path):
                raise InvalidArgumentError(f"cache_plan_path '{self.plan_path}' is a directory; give a file path")

    @property
    def k_kind(self) -> str:
        return self.kind_k or self.kind

    @property
    def v_kind(self) -> str:
        return self.kind_v or self.kind


@dataclass(frozen=True)
class PrefillConfig:
    """How prompts are evaluated (the seed's decode_plan): "none" in one pass with full attention;
    "fixed" in chunks of q_chunk tokens, attention restricted to the last local_window positions
    (0 = no limit); "auto" by context length (max_seq_len): up to bucket_short as "none", up to
    bucket_mid chunked, beyond that chunked and windowed. A local window changes results once the
    context outgrows it (as in Mistral's sliding window); chunking does not."""

    plan: str = "auto"
    bucket_short: int = 512
    bucket_mid: int = 2048
    q_chunk: int = 256
    local_window: int = 0

    def __post_init__(self):
        if self.plan not in DECODE_PLANS:
            raise InvalidArgumentError(f"decode_plan must be one of {', '.join(DECODE_PLANS)}, got {self.plan!r}")
        for name in ("bucket_short", "bucket_mid", "q_chunk"):
            _integer(f"decode_{name}", getattr(self, name), 1, 2**24)
        _integer("decode_local_window", self.local_window, 0, 2**24)
        if self.bucket_mid < self.bucket_short:
            raise InvalidArgumentError("decode_bucket_mid must be >= decode_bucket_short")

    def attention_plan(self, context: int) -> tuple[Optional[int], int]:
        """(prompt chunk length or None for one pass, local attention window or 0) for a context."""
        if self.plan == "none" or (self.plan == "auto" and context <= self.bucket_short):
            return None, 0
        if self.plan == "auto" and context <= self.bucket_mid:
            return self.q_chunk, 0
        return self.q_chunk, self.local_window


@dataclass(frozen=True)
class SpeculativeOptions:
    """Speculative decoding (SpeculativeConfig; see tokenmill.generation.speculative): spec_k tokens
    drafted per step; spec_k_adaptive chooses k within [spec_k_min, spec_k_max] each step for the
    most tokens per second by the measured acceptance and costs, decoding plainly when no k pays
    (see KPolicy); spec_method "reject_sampling"
    (accept a draft x with probability min(1, p(x)/q(x)), on rejection draw from max(0, p - q)
    renormalised: the output distribution is the target's own); spec_extra_token draws one more
    token from the target when all drafts are accepted; below spec_disable_below_accept measured
    acceptance (over the last 64 proposals, from 16 on) it decodes plainly for spec_probe_interval
    tokens, then tries again (None: 32 with prompt lookup, 128 with a draft model, whose probe first
    prefills the tokens decoded meanwhile). Prompt lookup matches the latest lookup_ngram_max ..
    lookup_ngram_min tokens (longest first) against the context; with a draft model and
    spec_lookup_first, lookup is tried first and the model drafts where it finds nothing."""

    k: int = 4
    k_adaptive: bool = False
    k_min: int = 1
    k_max: int = 16
    method: str = "reject_sampling"
    extra_token: bool = True
    disable_below_accept: float = 0.0
    probe_interval: Optional[int] = None
    lookup_ngram_min: int = 2
    lookup_ngram_max: int = 4
    lookup_first: bool = False

    def __post_init__(self):
        _integer("spec_k_min", self.k_min, 1, 64)
        _integer("spec_k_max", self.k_max, self.k_min, 64)
        _integer("spec_k", self.k, self.k_min, self.k_max)
        _flag("spec_k_adaptive", self.k_adaptive)
        _flag("spec_extra_token", self.extra_token)
        if self.method not in SPEC_METHODS:
            raise InvalidArgumentError(f"spec_method must be one of {', '.join(SPEC_METHODS)}, got {self.method!r}")
        _number("spec_disable_below_accept", self.disable_below_accept, lo=0.0, hi=1.0)
        if self.probe_interval is not None:
            _integer("spec_probe_interval", self.probe_interval, 1, 2**20)
        _integer("lookup_ngram_min", self.lookup_ngram_min, 1, 64)
        _integer("lookup_ngram_max", self.lookup_ngram_max, self.lookup_ngram_min, 64)
        _flag("spec_lookup_first", self.lookup_first)


SPEC_METHODS = ("reject_sampling",)


@dataclass(frozen=True)
class ModelOptions:
    """adapter: the LoRA adapter(s) the model computes with (Model.load_adapter): a loaded adapter's
    name, a {name: scale} mix, or None (the base model)."""

    adapter: Union[str, Mapping[str, float], None] = None

    def __post_init__(self):
        a = self.adapter
        if a is None or (isinstance(a, str) and a):
            return
        if not isinstance(a, Mapping) or not a:
            raise InvalidArgumentError(f"adapter must be a name, a non-empty {{name: scale}} mapping or None, got {a!r}")
        for name, scale in a.items():
            if not isinstance(name, str) or not name:
                raise InvalidArgumentError(f"adapter names must be non-empty strings, got {name!r}")
            _number(f"the scale of adapter {name!r}", scale)
        object.__setattr__(self, "adapter", dict(a))

GROUPS = {
    "sampling": SamplingConfig,
    "stopping": StoppingConfig,
    "context": ContextConfig,
    "cache": CacheConfig,
    "prefill": PrefillConfig,
    "model": ModelOptions,
}
_PREFIX = {"cache": "cache_", "prefill": "decode_", "speculative": "spec_"}


def _flat_name(group: str, field: str) -> str:
    if group == "prefill" and field == "plan":
        return "decode_plan"
    if field.startswith("lookup_ngram"):
        return field
    return _PREFIX.get(group, "") + field


def _flat_fields(groups: dict) -> dict[str, tuple[str, str]]:
    """flat seed name -> (group, field), in the seed's order"""
    return {_flat_name(g, f.name): (g, f.name) for g, cls in groups.items() for f in dataclasses.fields(cls)}


FLAT_FIELDS = _flat_fields(GROUPS)


def unknown_parameter(name: str, known) -> UnknownParameterError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UnknownParameterError(f"unknown generation parameter {name!r}{hint}")


class GenerateConfig:
    """Generation settings (names follow the seed `GenerateConfig`): the groups `sampling`,
    `stopping`, `context`, `cache`, `prefill` and `model` (the adapter), each field also readable and settable (through
    `replace` or the constructor) by its flat seed name."""

    GROUPS = GROUPS
    FLAT_FIELDS = FLAT_FIELDS
    __slots__ = tuple(GROUPS)

    def __init__(self, **given: Any):
        groups = type(self).GROUPS
        flat_fields = type(self).FLAT_FIELDS
        changes: dict[str, dict[str, Any]] = {g: {} for g in groups}
        for name, value in list(given.items()):
            if name in groups:
                continue
            if name not in flat_fields:
                raise unknown_parameter(name, flat_fields)
            group, field = flat_fields[name]
            changes[group][field] = value
        for group, cls in groups.items():
            base = given.get(group)
            if base is not None and not isinstance(base, cls):
                raise InvalidArgumentError(f"{group} must be a {cls.__name__}, got {type(base).__name__}")
            value = dataclasses.replace(base, **changes[group]) if base is not None else cls(**changes[group])
            object.__setattr__(self, group, value)

    def __getattr__(self, name: str):
        entry = type(self).FLAT_FIELDS.get(name)
        if entry is None:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        return getattr(object.__getattribute__(self, entry[0]), entry[1])

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable; use replace(**changes)")

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and all(getattr(self, g) == getattr(other, g) for g in self.GROUPS)

    def __hash__(self):
        return None   # mutable mappings (logit_bias) may sit inside

    def __repr__(self) -> str:
        default = type(self)()
        changed = [f"{k}={v!r}" for k, v in self.to_dict().items() if v != getattr(default, k)]
        return f"{type(self).__name__}({', '.join(changed)})"

    def replace(self, **changes: Any) -> "GenerateConfig":
        """A copy with some fields changed (flat seed names, or whole groups)."""
        groups = {g: changes.pop(g) for g in list(changes) if g in self.GROUPS}
        return type(self)(**{g: groups.get(g, getattr(self, g)) for g in self.GROUPS}, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field under its flat seed name."""
        return {name: getattr(getattr(self, g), f) for name, (g, f) in self.FLAT_FIELDS.items()}

    @classmethod
    def field_names(cls) -> list[str]:
        return list(cls.FLAT_FIELDS)

    # conveniences the generation layer uses
    def stop_strings(self) -> list[str]:
        return self.stopping.stop_strings()

    def eos_ids(self, model_eos: Optional[Sequence[int]]) -> set[int]:
        return self.stopping.eos_ids(model_eos)


class SpeculativeConfig(GenerateConfig):
    """A GenerateConfig plus the group `speculative` (SpeculativeOptions): spec_k, spec_k_adaptive,
    spec_k_min, spec_k_max, spec_method, spec_extra_token, spec_disable_below_accept,
    spec_probe_interval, lookup_ngram_min, lookup_ngram_max."""

    GROUPS = {**GROUPS, "speculative": SpeculativeOptions}
    FLAT_FIELDS = _flat_fields(GROUPS)
    __slots__ = ("speculative",)

    def generation_config(self) -> GenerateConfig:
        """The same settings without the speculative group (what plain decoding uses)."""
        return GenerateConfig(**{g: getattr(self, g) for g in GenerateConfig.GROUPS})


SPECULATIVE_FIELDS = tuple(n for n, (g, _) in SpeculativeConfig.FLAT_FIELDS.items() if g == "speculative")
