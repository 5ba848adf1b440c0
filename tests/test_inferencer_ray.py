"""The Inferencer on Ray Data: a real local Ray (2 CPUs, 2 actors of one thread each) gives the local
engine's output row for row (greedy), in order, and resumes a partial file like the local engine."""

from __future__ import annotations

import json

import pytest
import ray

from tokenmill.pipelines.inferencer import Inferencer, InferencerConfig

from test_inferencer import ROWS, strip_times, write_jsonl


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_equals_local_row_for_row_and_resumes(tmp_path, default_gguf, local_ray):
    rows = [dict(r, id=f"q{i}") for i, r in enumerate(ROWS)] + [{"id": "no-system", "question": "Say hi."}]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    base = dict(model=str(default_gguf), testing_data_id=str(data), max_new_tokens=12, temperature=0.0, batch_size=3,
                max_sequence_length=512, num_workers=2, threads_per_worker=1)
    local = Inferencer(config=InferencerConfig(**base, output_path=str(tmp_path / "local.jsonl")), progress=False).run()
    ray_cfg = InferencerConfig(**base, engine="ray", output_path=str(tmp_path / "ray.jsonl"))
    on_ray = Inferencer(config=ray_cfg, progress=False).run()
    assert [r["id"] for r in on_ray] == [r["id"] for r in rows]
    assert strip_times(on_ray) == strip_times(local)
    assert [json.loads(x) for x in (tmp_path / "ray.jsonl").read_text().splitlines()] == on_ray
    # resume: keep four rows, the Ray job does the other seven
    out = tmp_path / "ray.jsonl"
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:4]))
    inf = Inferencer(config=ray_cfg, progress=False)
    assert strip_times(inf.run()) == strip_times(local)
    assert inf.summary["new_rows"] == len(rows) - 4
    # sampled rows are seeded by their row number, so Ray's batching changes nothing either
    sampled = dict(base, temperature=0.8, seed=3)
    a = Inferencer(config=InferencerConfig(**sampled, output_path=str(tmp_path / "s_local.jsonl")), progress=False).run()
    b = Inferencer(config=InferencerConfig(**sampled, engine="ray", output_path=str(tmp_path / "s_ray.jsonl")),
                   progress=False).run()
    assert strip_times(a) == strip_times(b)
