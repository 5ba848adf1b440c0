"""Tokenizers rebuilt from GGUF metadata against transformers' own GGUF tokenizer, for each
pre-tokenizer kind; tokenizer.json directories; chat templates from tokenizer_config.json."""

import json

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


def test_sentencepiece_gguf_is_a_clear_error(tmp_path, default_gguf):
    path = tmp_path / "spm.gguf"
    _copy_tokenizer_gguf(default_gguf, path, "llama", {"tokenizer.ggml.model": "llama"})
    with pytest.raises(tokenmill.UnsupportedModelError, match="'llama' is not supported.*tokenizer.json"):
        tokenmill.load_tokenizer(path)


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
