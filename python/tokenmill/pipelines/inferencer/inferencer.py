"""The seed's Inferencer on tokenmill: rows of a test dataset -> [system?, user] through the chat
template -> continuous batching (the Scheduler) -> JSONL in input order, resumable after a kill.

    inf = Inferencer(config_manager=ConfigManager("config.toml"))
    results = inf.run()          # list of output rows (resumed ones included); inf.summary

A model without a chat template gets a plain prompt: the system prompt (if any) and a blank line, then
"Question: {question}\\nAnswer:". Prompts of max_sequence_length tokens or more are not generated:
their row says finish_reason "prompt_too_long" with an empty answer, so every row is still there."""

from __future__ import annotations

import collections
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

from ...errors import ConfigError
from ...generation import GenerateConfig
from ...generation.scheduler import Scheduler, SchedulerConfig
from .config import ConfigManager, InferencerConfig
from .data import load_rows
from .metrics import summarize
from .output import JsonlAppender, check_prefix
from .progress import Progress

PLAIN_FORMAT = "Question: {question}\nAnswer:"
KV_BUDGET_CAP_MB = 2048.0   # the pool never takes more unless one row alone needs more


@dataclass
class PreparedRow:
    """One dataset row ready to generate: its place in the input, id, texts and prompt tokens."""

    index: int
    id: Any
    question: str
    ground_truth: Any
    system_prompt: Optional[str]
    prompt_ids: list[int]


def row_ids(rows: Sequence[dict], id_column: Optional[str], start: int = 0) -> list[Any]:
    """Each row's id: its `id_column` value where every row has one (unique), else its position."""
    if id_column and rows and all(id_column in r for r in rows):
        ids = [r[id_column] for r in rows]
        if any(isinstance(i, (dict, list)) or i is None for i in ids):
            raise ConfigError(f"column {id_column!r} must hold plain ids (strings or numbers)")
        if len(set(map(repr, ids))) != len(ids):
            raise ConfigError(f"column {id_column!r} has repeated ids; set id_column = \"null\" to number the rows")
        return ids
    if id_column and any(id_column in r for r in rows):
        raise ConfigError(f"column {id_column!r} is missing in some rows; set id_column = \"null\" to number the rows")
    return list(range(start, start + len(rows)))


class Inferencer:
    """Batch generation over a dataset (module docstring). `config_manager` reads config.toml (with no
    argument: ./config.toml when it exists, else every default); `config` gives the section directly.
    `overwrite` starts the output over instead of resuming it; `progress` forces the progress display
    on or off (default: a bar on a terminal, plain lines otherwise)."""

    def __init__(self, config_manager: Optional[ConfigManager] = None, *, config: Optional[InferencerConfig] = None,
                 overwrite: bool = False, progress: Optional[bool] = None, log: Optional[TextIO] = None):
        if config is None:
            if config_manager is None:
                config_manager = ConfigManager("config.toml" if Path("config.toml").is_file() else None)
            config = config_manager.inferencer
        if not isinstance(config, InferencerConfig):
            raise ConfigError(f"config must be an InferencerConfig, got {type(config).__name__}")
        self.config = config
        self.overwrite = overwrite
        self.progress = progress
        self.log = log or sys.stderr
        self.model = None
        self.tokenizer = None
        self.summary: Optional[dict] = None

    # ---- the model
    @property
    def model_id(self) -> str:
        cfg = self.config
        if cfg.run_name:
            return f"{cfg.hf_user_id}/{cfg.run_name}" if cfg.hf_user_id else cfg.run_name
        return cfg.model or "SmolLM2-135M-Instruct (default)"

    def load_model_and_tokenizer(self, n_threads: Optional[int] = None):
        """Loads the model (once) and returns (model, tokenizer)."""
        if self.model is None:
            from ...api import load

            cfg = self.config
            path, tokenizer = cfg.model, None
            if cfg.run_name:
                from ...tools.runs import resolve_run

                run = resolve_run(cfg.run_name, None, cfg.runs_dir)
                path, tokenizer = run.model_path, run.tokenizer_path
            self.model = load(path, n_threads=n_threads or cfg.n_threads, n_ctx=cfg.max_sequence_length,
                              tokenizer=tokenizer, weights=cfg.weights, int8_prefill=cfg.int8, int8_decode=cfg.int8)
            self.tokenizer = self.model.tokenizer
            if self.tokenizer is None:
                raise ConfigError(f"{self.model_id} has no tokenizer; give one through a run's tokenizer.path")
        return self.model, self.tokenizer

    # ---- the data
    def load_dataset(self) -> list[dict]:
        return load_rows(self.config.testing_data_id)

    def question_of(self, row: dict, index: int) -> str:
        column = self.config.question_column
        if column not in row or row[column] is None:
            raise ConfigError(f"row {index} has no {column!r} (question_column); its columns: {', '.join(map(str, row))}")
        value = row[column]
        return value if isinstance(value, str) else str(value)

    def system_prompt_of(self, row: dict) -> Optional[str]:
        cfg = self.config
        if cfg.system_prompt_override_text is not None:
            return cfg.system_prompt_override_text
        value = row.get(cfg.system_prompt_column) if cfg.system_prompt_column else None
        return value if isinstance(value, str) and value else None

    def prompt_ids(self, question: str, system_prompt: Optional[str]) -> list[int]:
        model, tok = self.load_model_and_tokenizer()
        if tok.chat_template:
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
                       [{"role": "user", "content": question}]
            return model.chat_prompt(messages, add_generation_prompt=True)
        text = PLAIN_FORMAT.format(question=question)
        return model.tokenize(f"{system_prompt}\n\n{text}" if system_prompt else text)

    def prepare_row(self, row: dict, index: int, row_id: Any) -> PreparedRow:
        """One row -> a PreparedRow (columns mapped, system prompt chosen, prompt rendered, tokenized)."""
        gt = self.config.ground_truth_column
        question = self.question_of(row, index)
        system = self.system_prompt_of(row)
        return PreparedRow(index, row_id, question, row.get(gt) if gt else None, system, self.prompt_ids(question, system))

    def process_dataset(self, dataset: Sequence[dict], start: int = 0) -> list[PreparedRow]:
        """Rows -> PreparedRows; `start` is the position of dataset[0] in the whole input."""
        ids = row_ids(dataset, self.config.id_column, start)
        return [self.prepare_row(row, start + i, ids[i]) for i, row in enumerate(dataset)]

    # ---- generation
    def generation_config(self) -> dict:
        """The settings every row records in metadata (and a resumed run must share)."""
        cfg = self.config
        return dict(max_new_tokens=cfg.max_new_tokens, do_sample=not cfg.greedy, temperature=cfg.temperature,
                    top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty,
                    seed=cfg.seed, max_sequence_length=cfg.max_sequence_length, weights=cfg.weights,
                    cache_kind=cfg.cache_kind, int8=cfg.int8)

    def row_config(self, row: PreparedRow) -> GenerateConfig:
        cfg = self.config
        if cfg.greedy:
            sampling = dict(temperature=0.0)
        else:
            seed = None if cfg.seed is None else (cfg.seed + row.index) % 2**64
            sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p, seed=seed)
        return GenerateConfig(max_new_tokens=cfg.max_new_tokens, repetition_penalty=cfg.repetition_penalty,
                              cache_kind=cfg.cache_kind, **sampling)

    def record(self, row: PreparedRow, text: str, tokens: int, finish_reason: str, seconds: float) -> dict:
        return {"id": row.id, "question": row.question, "predicted_answer": text, "ground_truth": row.ground_truth,
                "system_prompt": row.system_prompt,
                "metadata": {"model_id": self.model_id, "inference_time": round(seconds, 4), "token_count": tokens,
                             "finish_reason": finish_reason, "generation_config": self.generation_config()}}

    def _scheduler(self, rows: Sequence[PreparedRow]) -> Scheduler:
        """A scheduler whose pool holds the batch_size largest rows at once (capped: beyond the cap
        rows take turns)."""
        cfg, model = self.config, self.model
        sched_cfg = SchedulerConfig(max_running=cfg.batch_size, prefix_cache=cfg.use_cache, cache_kind=cfg.cache_kind)
        block = sched_cfg.block_size
        needs = sorted((min(model.n_ctx, len(r.prompt_ids) + cfg.max_new_tokens) + block - 1) // block + 2 for r in rows)
        per_block_mb = model.kv_cache_bytes(block, sched_cfg.spec) / 2**20
        largest = needs[-1] * per_block_mb
        budget = max(largest, min(sum(needs[-cfg.batch_size:]) * per_block_mb, KV_BUDGET_CAP_MB)) * 1.001
        return Scheduler(model, sched_cfg, kv_budget_mb=budget)

    def generate_responses(self, processed: Sequence[PreparedRow],
                           on_row: Optional[Callable[[dict], None]] = None) -> list[dict]:
        """Generates every row through one scheduler (up to batch_size at once) and returns the output
        rows in input order; `on_row` gets each as soon as it and every row before it are done."""
        self.load_model_and_tokenizer()
        cfg = self.config
        records: list[dict] = []
        if not processed:
            return records
        fits = [r for r in processed if len(r.prompt_ids) < cfg.max_sequence_length]
        sched = self._scheduler(fits) if fits else None
        progress = Progress(len(processed), enabled=self.progress, stream=self.log)
        pending: collections.deque = collections.deque()   # [row, request or None, submitted at, seconds]
        todo = iter(processed)
        lookahead = 2 * cfg.batch_size   # rows queued ahead of the oldest unwritten one

        def feed():
            while len(pending) < lookahead:
                row = next(todo, None)
                if row is None:
                    return
                fits_context = len(row.prompt_ids) < cfg.max_sequence_length
                req = sched.submit(row.prompt_ids, self.row_config(row))[0] if fits_context else None
                pending.append([row, req, time.perf_counter(), None])

        try:
            feed()
            while pending:
                head = pending[0]
                while head[1] is not None and not head[1].done:
                    sched.step()
                    now = time.perf_counter()
                    for entry in pending:
                        if entry[3] is None and entry[1] is not None and entry[1].done:
                            entry[3] = now - entry[2]
                pending.popleft()
                row, req, submitted, seconds = head
                if req is None:
                    record = self.record(row, "", 0, "prompt_too_long", 0.0)
                else:
                    result = req.wait()
                    record = self.record(row, result.text, result.completion_tokens, result.finish_reason,
                                         seconds if seconds is not None else time.perf_counter() - submitted)
                if on_row is not None:
                    on_row(record)
                records.append(record)
                progress.update(record["metadata"]["token_count"])
                feed()
        finally:
            progress.close()
            if sched is not None:
                sched.close()
        return records

    # ---- the whole job
    def run(self) -> list[dict]:
        """Loads the data, resumes or starts the output file, generates what is missing (local engine or
        Ray), prints a summary; returns every output row in input order."""
        cfg = self.config
        start = time.perf_counter()
        dataset = self.load_dataset()
        expected = list(zip(row_ids(dataset, cfg.id_column), (self.question_of(r, i) for i, r in enumerate(dataset))))
        with JsonlAppender(cfg.output_path, overwrite=self.overwrite) as out:
            done = out.existing()
            check_prefix(out.path, done, expected, self.model_id, self.generation_config())
            if done:
                print(f"inferencer: resuming {out.path} after {len(done)} of {len(dataset)} rows", file=self.log)
            remaining = dataset[len(done):]
            if not remaining:
                new = []
            elif cfg.engine == "ray":
                from .ray_engine import run_on_ray

                new = run_on_ray(self, remaining, start_row=len(done), on_row=out.append)
            else:
                new = self.generate_responses(self.process_dataset(remaining, start=len(done)), on_row=out.append)
        records = done + new
        self.summary = summarize(records, new, time.perf_counter() - start)
        print("inferencer: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in self.summary.items()), file=self.log)
        return records
