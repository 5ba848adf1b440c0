"""The batch Inferencer: config parsing, every input format, column mapping, output schema and order,
batching equal to one row at a time, and resume after a real SIGKILL (no row lost, duplicated or torn)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenmill.errors import ConfigError
from tokenmill.pipelines.inferencer import ConfigManager, Inferencer, InferencerConfig
from tokenmill.pipelines.inferencer.config import from_mapping, parse_override
from tokenmill.pipelines.inferencer.data import load_rows
from tokenmill.pipelines.inferencer.metrics import exact_match, token_f1

QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("How many legs does a spider have?", "eight"),
    ("What color is the sky on a clear day?", "blue"),
    ("Who wrote Hamlet?", "William Shakespeare"),
    ("What is 2 + 2?", "4"),
    ("Name a fruit that is yellow.", "banana"),
    ("What do bees make?", "honey"),
    ("What is the largest ocean?", "the Pacific Ocean"),
    ("Which planet is known as the red planet?", "Mars"),
    ("What is frozen water called?", "ice"),
]
ROWS = [{"question": q, "answer": a, "system": "Answer in one short sentence." if i % 3 == 0 else ""}
        for i, (q, a) in enumerate(QUESTIONS)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def strip_times(records):
    out = []
    for r in records:
        r = json.loads(json.dumps(r))
        r["metadata"].pop("inference_time")
        out.append(r)
    return out


def config(tmp_path, data, **kw) -> InferencerConfig:
    base = dict(testing_data_id=str(data), output_path=str(tmp_path / "out.jsonl"), max_new_tokens=12,
                temperature=0.0, batch_size=4, max_sequence_length=512)
    return InferencerConfig(**{**base, **kw})


# ---- configuration
def test_config_null_env_and_overrides(tmp_path):
    toml = tmp_path / "config.toml"
    toml.write_text('[inferencer]\ntesting_data_id = "${DATA_DIR}/q.jsonl"\nrun_name = "null"\n'
                    'max_new_tokens = "${MAX_TOKENS}"\nload_in_8bit = true\nsystem_prompt_column = "null"\n'
                    '[other]\nx = 1\n')
    cm = ConfigManager(toml, ["temperature=0", "output_path=res/out.jsonl", "do_sample=false"],
                       env={"DATA_DIR": "/data", "MAX_TOKENS": "77"})
    cfg = cm.inferencer
    assert cfg.testing_data_id == "/data/q.jsonl" and cfg.run_name is None and cfg.system_prompt_column is None
    assert cfg.max_new_tokens == 77 and cfg.weights == "q8_0" and cfg.greedy
    assert cfg.temperature == 0 and cfg.output_path == "res/out.jsonl"
    assert cm.get_section("other") == {"x": 1}
    assert InferencerConfig(load_in_4bit=True).weights == "q4_0"
    assert InferencerConfig(dtype="bfloat16").weights == "bf16" and InferencerConfig(dtype="auto").weights is None
    assert parse_override("top_p=0.9") == ("top_p", 0.9) and parse_override("model=a/b.gguf") == ("model", "a/b.gguf")


@pytest.mark.parametrize("section, message", [
    ({"max_new_token": 3}, "unknown inferencer key: max_new_token"),
    ({"max_new_tokens": "many"}, "inferencer.max_new_tokens must be int"),
    ({"max_new_tokens": True}, "inferencer.max_new_tokens must be int"),
    ({"temperature": "hot"}, "inferencer.temperature must be float"),
    ({"question_column": "null"}, "inferencer.question_column may not be null"),
    ({"testing_data_id": "${NOT_SET_ANYWHERE}"}, "environment variable NOT_SET_ANYWHERE"),
    ({"load_in_4bit": True, "load_in_8bit": True}, "exclude each other"),
    ({"dtype": "float8"}, "inferencer.dtype"),
    ({"engine": "spark"}, "inferencer.engine"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"top_p": 0.0}, "sampling values out of range"),
    ({"cache_kind": "auto"}, "cache_kind"),
    ({"model": "a.gguf", "run_name": "r"}, "not both"),
])
def test_config_errors_name_the_key(section, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        from_mapping(section, env={})


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no configuration file"):
        ConfigManager(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[inferencer\nx=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        ConfigManager(bad)
    with pytest.raises(ConfigError, match="give key=value"):
        ConfigManager(None, ["no_equals_sign"])


# ---- data
def test_every_input_format_reads_the_same_rows(tmp_path):
    rows = [{"id": f"r{i}", "question": q, "answer": a} for i, (q, a) in enumerate(QUESTIONS[:4])]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "cols.json").write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[:2])
    write_jsonl(folder / "b.jsonl", rows[2:])
    (folder / "notes.txt").write_text("ignored")
    for source in ("d.jsonl", "d.json", "cols.json", "d.csv", "d.parquet", "parts"):
        assert load_rows(str(tmp_path / source)) == rows, source


def test_bad_data_is_a_clear_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "a"}\n{not json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not a JSON line"):
        load_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="row 0 is a int"):
        load_rows(str(tmp_path / "list.json"))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ConfigError, match="unknown data format"):
        load_rows(str(tmp_path / "x.xml"))
    with pytest.raises(FileNotFoundError, match="no-such-dataset"):
        load_rows(str(tmp_path / "no-such-dataset.jsonl"))


# ---- the job on the real default model
@pytest.fixture(scope="module")
def shared_model(default_gguf):
    import tokenmill

    return tokenmill.load(default_gguf, n_ctx=512)


def inferencer(cfg, model, **kw) -> Inferencer:
    inf = Inferencer(config=cfg, progress=False, **kw)
    inf.model, inf.tokenizer = model, model.tokenizer
    return inf


def test_output_schema_order_columns_and_system_prompts(tmp_path, shared_model):
    data = write_jsonl(tmp_path / "q.jsonl", ROWS)
    inf = inferencer(config(tmp_path, data), shared_model)
    records = inf.run()
    assert [r["question"] for r in records] == [q for q, _ in QUESTIONS]
    assert [r["id"] for r in records] == list(range(len(ROWS)))
    for r, row in zip(records, ROWS):
        assert set(r) == {"id", "question", "predicted_answer", "ground_truth", "system_prompt", "metadata"}
        assert set(r["metadata"]) == {"model_id", "inference_time", "token_count", "finish_reason", "generation_config"}
        assert r["ground_truth"] == row["answer"] and r["system_prompt"] == (row["system"] or None)
        assert r["metadata"]["finish_reason"] in ("eos", "length") and 0 < r["metadata"]["token_count"] <= 12
        assert r["predicted_answer"] == shared_model.generate(inf.prompt_ids(row["question"], row["system"] or None),
                                                              12, temperature=0)
    assert "Paris" in records[0]["predicted_answer"]
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == records
    assert inf.summary["rows"] == len(ROWS) and inf.summary["new_tokens"] == sum(r["metadata"]["token_count"] for r in records)
    assert inf.summary["exact_match"] == sum(exact_match(r["predicted_answer"], r["ground_truth"]) for r in records) / len(ROWS)
    # the chat template carries the system prompt; an override replaces every row's
    assert "one short sentence" in shared_model.detokenize(inf.prepare_row(ROWS[0], 0, 0).prompt_ids)
    over = inferencer(config(tmp_path, data, system_prompt_override_text="Be brief.", id_column="null"), shared_model)
    prepared = over.process_dataset(ROWS[:2])
    assert all(p.system_prompt == "Be brief." for p in prepared)
    assert "Be brief." in shared_model.detokenize(prepared[1].prompt_ids)


def test_column_mapping_ids_and_plain_format(tmp_path, shared_model):
    rows = [{"uid": f"q{i}", "input": q, "output": a} for i, (q, a) in enumerate(QUESTIONS[:3])]
    data = write_jsonl(tmp_path / "m.jsonl", rows)
    cfg = config(tmp_path, data, question_column="input", ground_truth_column="output", id_column="uid",
                 system_prompt_column="null")
    records = inferencer(cfg, shared_model).run()
    assert [r["id"] for r in records] == ["q0", "q1", "q2"] and [r["ground_truth"] for r in records] == ["Paris", "eight", "blue"]
    with pytest.raises(ConfigError, match="row 0 has no 'question'"):
        inferencer(config(tmp_path, data, output_path=str(tmp_path / "o2.jsonl")), shared_model).run()
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "question": "a"}, {"id": 1, "question": "b"}])
    with pytest.raises(ConfigError, match="repeated ids"):
        inferencer(config(tmp_path, dup, output_path=str(tmp_path / "o3.jsonl")), shared_model).run()
    # no chat template: the documented plain format
    plain = inferencer(config(tmp_path, data), shared_model)
    template, shared_model.tokenizer.chat_template = shared_model.tokenizer.chat_template, None
    try:
        text = shared_model.detokenize(plain.prompt_ids("Why?", "Be kind."))
    finally:
        shared_model.tokenizer.chat_template = template
    assert text.endswith("Be kind.\n\nQuestion: Why?\nAnswer:")


def test_batching_equals_one_row_at_a_time_and_long_prompts(tmp_path, shared_model):
    long_row = {"question": "word " * 600, "answer": "x"}
    data = write_jsonl(tmp_path / "q.jsonl", ROWS[:6] + [long_row] + ROWS[6:])
    batched = inferencer(config(tmp_path, data, batch_size=5), shared_model).run()
    single = inferencer(config(tmp_path, data, batch_size=1, output_path=str(tmp_path / "one.jsonl")), shared_model).run()
    assert strip_times(batched) == strip_times(single)
    assert batched[6]["metadata"]["finish_reason"] == "prompt_too_long" and batched[6]["predicted_answer"] == ""
    # sampled rows are seeded per row: the same with any batch size
    s1 = inferencer(config(tmp_path, data, temperature=0.9, seed=7, output_path=str(tmp_path / "s1.jsonl")), shared_model).run()
    s2 = inferencer(config(tmp_path, data, temperature=0.9, seed=7, batch_size=2, output_path=str(tmp_path / "s2.jsonl")),
                    shared_model).run()
    assert strip_times(s1) == strip_times(s2)


def test_resume_checks_and_repairs_the_file(tmp_path, shared_model):
    data = write_jsonl(tmp_path / "q.jsonl", ROWS[:5])
    cfg = config(tmp_path, data)
    full = inferencer(cfg, shared_model).run()
    out = tmp_path / "out.jsonl"
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:25])   # two rows and a torn third
    resumed = inferencer(cfg, shared_model).run()
    assert strip_times(resumed) == strip_times(full)
    assert [json.loads(x) for x in out.read_text().splitlines()] == resumed
    # a file of another job is refused, not mixed
    other = config(tmp_path, data, max_new_tokens=5)
    with pytest.raises(ConfigError, match="other generation settings"):
        inferencer(other, shared_model).run()
    assert len(inferencer(other, shared_model, overwrite=True).run()) == 5
    out.write_text('{"id": 0}\nnot json\n')
    with pytest.raises(ConfigError, match="out.jsonl:2 is not a JSON row"):
        inferencer(cfg, shared_model).run()


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "tokenmill", "infer", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_at_several_points_loses_and_duplicates_nothing(tmp_path, default_gguf):
    data = write_jsonl(tmp_path / "q.jsonl", ROWS)
    toml = tmp_path / "config.toml"
    toml.write_text(f'[inferencer]\nmodel = "{default_gguf}"\ntesting_data_id = "{data}"\n'
                    f'output_path = "{tmp_path / "out.jsonl"}"\nmax_new_tokens = 16\ntemperature = 0\n'
                    'batch_size = 2\nmax_sequence_length = 512\n')
    reference = _run_cli(["--config", str(toml), "--quiet", "--set", f"output_path='{tmp_path / 'ref.jsonl'}'"])
    assert reference.wait(120) == 0, reference.stderr.read()
    out = tmp_path / "out.jsonl"
    killed_at = []
    for kill_after in (0, 2, 5, 8):   # rows already in the file when SIGKILL arrives
        proc = _run_cli(["--config", str(toml), "--quiet"])
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (out.read_bytes().count(b"\n") if out.exists() else 0) >= kill_after:
                break
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
            killed_at.append(out.read_bytes().count(b"\n") if out.exists() else 0)
    assert len(killed_at) == 4 and killed_at == sorted(killed_at) and killed_at[-1] < len(ROWS), killed_at
    finish = _run_cli(["--config", str(toml), "--quiet"])
    _, err = finish.communicate(timeout=120)
    assert finish.returncode == 0, err
    ref = [json.loads(x) for x in (tmp_path / "ref.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert out.read_bytes().endswith(b"\n")
    assert strip_times(got) == strip_times(ref) and len(got) == len(ROWS)
    assert "rows 10" in err


def test_cli_reports_config_errors(tmp_path):
    proc = _run_cli(["--set", "max_new_tokens=-3"])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "max_new_tokens must be >= 1" in err


def test_answer_metrics():
    assert exact_match("The Paris.", "paris") == 1.0 and exact_match("Paris, France", "Paris") == 0.0
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
