"""`tokenmill bench --inferencer`: rows/s of the batch Inferencer on real prompts against one-row-at-a-
time loops over tokenmill, llama-cpp-python and transformers' `pipeline`, and Ray mode against local.

The prompts are questions written from the public-domain Julius Caesar excerpt tokenmill ships
(data/calibration_en.txt): for each verse line, alternately "Which character in Julius Caesar says:
"<line>"?" (the speaker is the ground truth) and "In plain words, what does this line from Julius
Caesar mean: "<line>"?". Every engine gets the same chat-formatted prompt tokens and decodes greedily
up to max_new_tokens; the loops over slow peers may run on the first rows only (`peer_rows`)."""

from __future__ import annotations

import json
import re
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Optional

_SPEAKER = re.compile(r"^([A-Z][A-Z ]+)\.$")


def caesar_questions(n: int) -> list[dict]:
    text = resources.files("tokenmill").joinpath("data/calibration_en.txt").read_text(encoding="utf-8")
    lines, speaker = [], None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith(("ACT ", "SCENE ")):
            speaker = None
            continue
        m = _SPEAKER.match(line)
        if m:
            speaker = m.group(1).title()
        elif speaker and len(line) > 20 and not line.startswith("["):
            lines.append((speaker, line))
    rows = []
    for i in range(n):
        speaker, line = lines[i % len(lines)]
        if (i + i // len(lines)) % 2 == 0:
            rows.append({"id": i, "question": f'Which character in Julius Caesar says: "{line}"?', "answer": speaker})
        else:
            rows.append({"id": i, "question": f'In plain words, what does this line from Julius Caesar mean: "{line}"?'})
    return rows


def _rows_per_s(n_rows: int, seconds: float) -> float:
    return n_rows / seconds if seconds > 0 else 0.0


def run(model_path, threads: int, rows: int, new_tokens: int, batch_size: int, peer_rows: Optional[int],
        engines=("tokenmill-loop", "llama.cpp", "transformers", "ray"), int8: bool = False, pairs: int = 1) -> list[dict]:
    """pairs > 1: after everything else, the Inferencer and the tokenmill loop run again, one after the
    other, pairs - 1 more times, each pair with its own ratio (one-sequence decode speed drifts with
    the host's memory traffic between runs; a pair shares the conditions)."""
    from ..pipelines.inferencer import Inferencer, InferencerConfig
    from ..engine.default_model import resolve_default

    path = Path(model_path) if model_path else resolve_default()
    data = caesar_questions(rows)
    peer_rows = min(peer_rows or rows, rows)
    mode = ", int8" if int8 else ""
    out: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "questions.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in data))
        cfg = InferencerConfig(model=str(path), testing_data_id=str(src), output_path=str(Path(tmp) / "local.jsonl"),
                               temperature=0.0, max_new_tokens=new_tokens, batch_size=batch_size, n_threads=threads,
                               max_sequence_length=1024, int8=int8)
        inf = Inferencer(config=cfg, progress=False, overwrite=True)
        t = time.perf_counter()
        local = inf.run()
        local_s = time.perf_counter() - t
        tokens = sum(r["metadata"]["token_count"] for r in local)
        out.append(dict(engine=f"tokenmill Inferencer (batch {batch_size}{mode})", rows=rows, seconds=local_s,
                        rows_per_s=_rows_per_s(rows, local_s), tok_per_s=tokens / local_s, vs_loop="",
                        same_text=""))
        model = inf.model
        prompts = [inf.prompt_ids(r["question"], None) for r in data]
        expected = [r["predicted_answer"] for r in local]

        def loop(name, generate, n, inputs=prompts):   # inputs[i]: row i's prompt as this engine takes it
            t = time.perf_counter()
            texts = [generate(p) for p in inputs[:n]]
            seconds = time.perf_counter() - t
            same = sum(a == b for a, b in zip(texts, expected)) / n
            out.append(dict(engine=name, rows=n, seconds=seconds, rows_per_s=_rows_per_s(n, seconds), tok_per_s=0.0,
                            vs_loop="", same_text=f"{same:.0%}"))

        if "tokenmill-loop" in engines:
            loop(f"tokenmill, one row at a time{mode}", lambda p: model.generate(p, new_tokens, temperature=0), rows)
        if "llama.cpp" in engines:
            import llama_cpp

            llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)

            def llama_generate(p):
                return llm.create_completion(prompt=p, max_tokens=new_tokens, temperature=0.0)["choices"][0]["text"]

            loop("llama-cpp-python, one row at a time", llama_generate, peer_rows)
            del llm
        if "transformers" in engines:
            import torch
            import transformers

            torch.set_num_threads(threads)
            hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                   dtype=torch.float32).eval()
            hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            pipe = transformers.pipeline("text-generation", model=hf, tokenizer=hf_tok, device="cpu")
            def hf_generate(text):
                return pipe(text, max_new_tokens=new_tokens, do_sample=False, return_full_text=False)[0]["generated_text"]

            loop("transformers pipeline, one row at a time", hf_generate, peer_rows,
                 [model.detokenize(p) for p in prompts[:peer_rows]])
        if "ray" in engines:
            ray_cfg = cfg.replace(engine="ray", num_workers=2, threads_per_worker=max(1, threads // 2),
                                  output_path=str(Path(tmp) / "ray.jsonl"))
            t = time.perf_counter()
            ray_rows = Inferencer(config=ray_cfg, progress=False, overwrite=True).run()
            seconds = time.perf_counter() - t
            same = sum(a["predicted_answer"] == b for a, b in zip(ray_rows, expected)) / rows
            out.append(dict(engine=f"tokenmill Inferencer on Ray (2 workers x {ray_cfg.threads_per_worker} thread)",
                            rows=rows, seconds=seconds, rows_per_s=_rows_per_s(rows, seconds),
                            tok_per_s=tokens / seconds, vs_loop="", same_text=f"{same:.0%}"))
        for k in range(2, pairs + 1 if "tokenmill-loop" in engines else 0):
            inf = Inferencer(config=cfg, progress=False, overwrite=True)
            t = time.perf_counter()
            inf.run()
            again = _rows_per_s(rows, time.perf_counter() - t)
            loop(f"tokenmill, one row at a time{mode} (pair {k})", lambda p: model.generate(p, new_tokens, temperature=0),
                 rows)
            loop_again = out[-1]["rows_per_s"]
            out[-1]["vs_loop"] = "1.00x"
            out.insert(len(out) - 1, dict(engine=f"tokenmill Inferencer (batch {batch_size}{mode}, pair {k})", rows=rows,
                                          seconds=rows / again if again else 0.0, rows_per_s=again, tok_per_s=0.0,
                                          vs_loop=f"{again / loop_again:.2f}x" if loop_again else "", same_text=""))
    loop_rate = next((r["rows_per_s"] for r in out if r["engine"].startswith("tokenmill, one row")), None)
    for r in out:
        if r["vs_loop"]:   # a later pair's rows carry their own ratio
            continue
        r["vs_loop"] = f"{r['rows_per_s'] / loop_rate:.2f}x" if loop_rate else ""
        r["tok_per_s"] = round(r["tok_per_s"], 1)
    out[0]["same_text"] = "100%"
    return out
