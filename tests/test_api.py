"""The Python API and CLI on the default model: arguments, stop rules, seeds, streaming, errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

import tokenmill
from tokenmill.engine import default_model


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"stop": 5}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"seed": -3}, "seed"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_out_of_range_parameters_name_themselves(smollm, kwargs, name):
    with pytest.raises(ValueError, match=name):
        smollm.generate("Hi", **kwargs)
    with pytest.raises(ValueError, match=name):   # eagerly, not on first iteration
        smollm.generate("Hi", stream=True, **kwargs)


def test_unknown_keyword_is_a_type_error(smollm):
    with pytest.raises(TypeError):
        smollm.generate("Hi", temprature=0.5)


def test_prompt_longer_than_context(default_gguf):
    model = tokenmill.load(default_gguf, n_ctx=16)
    long_prompt = "word " * 40
    with pytest.raises(tokenmill.ContextOverflowError, match=r"needs \d+ tokens .* max_seq_len is 16"):
        model.generate(long_prompt)
    with pytest.raises(ValueError):
        model.generate("")
    # a prompt that fits stops at the end of the context
    result = model.generate("Hello there", 100, temperature=0, ignore_eos=True, details=True)
    assert result.finish_reason == "context"
    assert result.completion_tokens == 16 - len(model.tokenize("Hello there"))


def test_same_seed_same_text_and_different_seed_differs(smollm):
    kwargs = dict(max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = smollm.generate("Tell me a story:", seed=123, **kwargs)
    b = smollm.generate("Tell me a story:", seed=123, **kwargs)
    c = smollm.generate("Tell me a story:", seed=124, **kwargs)
    assert a == b and a != c


def test_greedy_is_argmax_of_logits(smollm):
    ids = smollm.tokenize("The capital of Germany is")
    first = tokenmill.generate(smollm, ids, max_new_tokens=1, temperature=0)
    assert first == [int(np.argmax(smollm.logits(ids)[-1]))]


def test_stop_strings_cut_the_text_and_are_not_emitted(smollm):
    full = smollm.generate("Count: 1, 2, 3,", max_new_tokens=20, temperature=0, ignore_eos=True)
    assert ", 6" in full   # the greedy text continues the count
    cut = smollm.generate("Count: 1, 2, 3,", max_new_tokens=20, temperature=0, ignore_eos=True, stop=[", 6"])
    assert cut == full[: full.index(", 6")]
    streamed = "".join(smollm.generate("Count: 1, 2, 3,", max_new_tokens=20, temperature=0, ignore_eos=True,
                                       stop=", 6", stream=True))
    assert streamed == cut


def test_eos_ends_generation(smollm):
    answer = smollm.chat([{"role": "user", "content": "Say hi."}], max_new_tokens=200, temperature=0)
    assert "<|im_end|>" not in answer and len(answer) > 0
    result = smollm.chat([{"role": "user", "content": "Say hi."}], max_new_tokens=200, temperature=0, details=True)
    assert result.finish_reason == "eos" and result.completion_tokens < 200


def test_chat_rejects_malformed_messages(smollm):
    with pytest.raises(ValueError, match="messages"):
        smollm.chat("hello")
    with pytest.raises(ValueError, match="role"):
        smollm.chat([{"content": "hi"}])


def test_cli_generate_streams_the_answer(default_gguf):
    cmd = [sys.executable, "-m", "tokenmill.tools.cli", "generate", "--model", str(default_gguf), "--chat",
           "--prompt", "What is the capital of France?", "--temp", "0", "--num-tokens", "16", "--eos-id", "-1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_cli_reports_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(8))
    out = subprocess.run([sys.executable, "-m", "tokenmill.tools.cli", "generate", "--model", str(bad), "--prompt", "x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "tokenmill: error:" in out.stderr and "Traceback" not in out.stderr


def test_install_from_checks_the_checksum(tmp_path, monkeypatch, default_gguf):
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path / "home"))
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(tokenmill.ModelNotFoundError, match="checksum mismatch"):
        default_model.install_from(bogus, progress=lambda m: None)
    assert not default_model.default_model_path().exists()
    installed = default_model.install_from(default_gguf, progress=lambda m: None)
    assert installed == default_model.default_model_path() and installed.stat().st_size == 98_362_432


def test_missing_network_gives_instructions(tmp_path):
    env = dict(os.environ, TOKENMILL_HOME=str(tmp_path / "empty"), PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_RETRIES="0", PIP_TIMEOUT="2", PIP_NO_INDEX="", PIP_FIND_LINKS="")
    code = "import tokenmill; tokenmill.load()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0
    assert "ModelNotFoundError" in out.stderr and "tokenmill pull --from" in out.stderr


def _write_run(root, default_gguf):
    import json

    run = root / "checkpoints" / "smol"
    run.mkdir(parents=True)
    (run / "model.gguf").symlink_to(default_gguf)
    for step in (100, 200):
        cfg = {"model": {"max_seq_len": 64 + step}, "tokenizer": {"path": "model.gguf"},
               "checkpoint": {"latest": "model.gguf", "step": step}}
        (run / f"smol_step{step}_config.json").write_text(json.dumps(cfg))
    (run / "latest_config.json").symlink_to("smol_step200_config.json")
    return run


def test_cli_run_directory(tmp_path, default_gguf):
    from tokenmill.tools.runs import resolve_run

    _write_run(tmp_path, default_gguf)
    latest = resolve_run("smol", runs_dir=tmp_path / "checkpoints")
    assert latest.step == 200 and latest.max_seq_len == 264 and latest.model_path.name == "model.gguf"
    assert resolve_run("smol", 100, tmp_path / "checkpoints").max_seq_len == 164
    with pytest.raises(tokenmill.ModelNotFoundError, match="no step 300; available steps: 100, 200"):
        resolve_run("smol", 300, tmp_path / "checkpoints")

    base = [sys.executable, "-m", "tokenmill.tools.cli", "generate", "--run-name", "smol", "--prompt", "The capital of France is",
            "--temp", "0", "--num_tokens", "6", "--eos_id", "-1", "--top_k", "-0", "--rep-penalty", "1.0"]
    out = subprocess.run(base + ["--step", "100"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    out = subprocess.run(base + ["--step", "7"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2 and "available steps: 100, 200" in out.stderr


def test_cli_negative_numbers_parse_as_values():
    from tokenmill.tools.cli import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "-5 degrees", "--eos_id", "-1", "--seed", "-0",
                                      "--temp", "-0.5"])
    assert args.eos_id == -1 and args.prompt == "-5 degrees" and args.temp == -0.5


def _package_imports():
    """{module: tokenmill modules it imports (at any depth of its code)} from the package's sources;
    `from pkg import name` counts as importing pkg.name when that is a module."""
    import ast
    from pathlib import Path

    root = Path(tokenmill.__file__).parent
    sources = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        is_init = parts[-1] == "__init__"
        module = ".".join(("tokenmill",) + (parts[:-1] if is_init else parts))
        sources[module] = (path, module if is_init else module.rsplit(".", 1)[0])
    modules = set(sources) | {"tokenmill._core", "tokenmill._testing"}
    graph = {}
    for module, (path, package) in sources.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                target = (base + "." + node.module if node.module else base) if node.level else node.module or ""
                for alias in node.names:
                    deps.add(target + "." + alias.name if target + "." + alias.name in modules else target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[module] = {d for d in deps if d.startswith("tokenmill") and d != module}
    return graph


def test_import_graph_has_no_cycles_and_one_module_talks_to_core():
    graph = _package_imports()
    core_users = sorted(m for m, deps in graph.items() if "tokenmill._core" in deps)
    assert core_users == ["tokenmill.engine.native"], core_users
    assert not any("tokenmill._testing" in deps for deps in graph.values())

    # a package's __init__ re-exporting its own modules is not a cycle among the modules
    def edges(m):
        return {d for d in graph.get(m, ()) if not (m.startswith(d + ".") and d in graph)}

    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in edges(m):
            if state.get(d) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
