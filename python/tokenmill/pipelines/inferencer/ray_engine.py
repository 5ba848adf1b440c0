"""The Inferencer's job on Ray Data: the rows still to do, numbered, become a Ray Dataset, and
`map_batches` sends them through actors that each hold one tokenmill model (`concurrency=num_workers`,
`num_cpus=threads_per_worker`), each batch generated with continuous batching. Ray keeps the order
(`preserve_order`), so the driver appends the rows to the same resumable JSONL as the local engine.

The driver reads the data itself (every format the local engine reads) rather than with Ray's
`read_json` / `read_parquet`: it needs the rows anyway to check a resumed file against them, and
Ray's readers give no row numbers (its `Dataset.zip` with a range, the only way to add them, is
deprecated in Ray 2.60 for not guaranteeing order); a row's number seeds its sampling and is its id
when the data has no id column, so it must be exact.

On a real cluster: start it (`ray start --head` on one machine, `ray start --address=HEAD:6379` on the
others), put the model and the data where every node sees them at the same path (a shared file
system; Ray's readers also take s3:// and gs:// URIs for the data), and set `ray_address = "auto"` (on
a node of the cluster) or `"ray://HEAD:10001"` (Ray Client). With no ray_address a local Ray is
started with num_workers x threads_per_worker CPUs for the actors plus one for reading."""

from __future__ import annotations

import json
from typing import Callable, Optional

from ...errors import ConfigError
from .config import InferencerConfig
from .progress import Progress

ROW = "__tokenmill_row"   # the row-number column added to the dataset


def _import_ray():
    try:
        import ray
        import ray.data   # noqa: F401 - needs ray[data] (pyarrow, pandas)
    except ImportError as exc:
        raise ConfigError(f"engine = \"ray\" needs Ray Data: pip install \"tokenmill[ray]\" ({exc})") from None
    return ray


class RowGenerator:
    """A Ray Data actor: one tokenmill model; each batch of rows -> their output rows (as JSON).
    `inferencer_cls` is the driver's Inferencer class, so a subclass's prompt formatting runs on
    the workers too."""

    def __init__(self, config: dict, inferencer_cls: type):
        cfg = InferencerConfig(**config)
        self.inferencer = inferencer_cls(config=cfg, progress=False)
        self.inferencer.load_model_and_tokenizer(n_threads=cfg.threads_per_worker)

    def __call__(self, table):
        id_column = self.inferencer.config.id_column
        prepared = []
        for item in table.to_pylist():   # rows travel as JSON: columns may differ from row to row
            index, row = item[ROW], json.loads(item["row"])
            row_id = row[id_column] if id_column and id_column in row else index
            prepared.append(self.inferencer.prepare_row(row, index, row_id))
        records = self.inferencer.generate_responses(prepared)
        return {ROW: [r.index for r in prepared], "record": [json.dumps(r, ensure_ascii=False) for r in records]}


def run_on_ray(inferencer, rows: list, start_row: int,
               on_row: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Generates `rows` (rows start_row.. of the dataset) on Ray Data; returns their output rows in
    order (and hands each to on_row as it arrives)."""
    ray = _import_ray()
    cfg = inferencer.config
    started_here = not ray.is_initialized()
    if started_here:
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=cfg.num_workers * cfg.threads_per_worker + 1, include_dashboard=False,
                     log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([{ROW: start_row + i, "row": json.dumps(r, ensure_ascii=False)}
                                  for i, r in enumerate(rows)])
        actor_args = {"config": cfg.as_dict(), "inferencer_cls": type(inferencer)}
        ds = ds.map_batches(RowGenerator, fn_constructor_kwargs=actor_args, batch_size=cfg.batch_size,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
                            num_cpus=cfg.threads_per_worker)
        progress = Progress(len(rows), enabled=inferencer.progress, stream=inferencer.log)
        records = []
        try:
            for item in ds.iter_rows():
                record = json.loads(item["record"])
                if on_row is not None:
                    on_row(record)
                records.append(record)
                progress.update(record["metadata"]["token_count"])
        finally:
            progress.close()
        if len(records) != len(rows):
            raise ConfigError(f"Ray returned {len(records)} rows for {len(rows)}")
        return records
    finally:
        if started_here:
            ray.shutdown()

