"""Gemma 3: a tiny random model saved by transformers (sandwich norms with 1 + w, GeGLU, qk-norm,
scaled embeddings, local sliding-window layers with their own RoPE base, query_pre_attn_scalar) against
transformers; and the real Gemma 3 270M Q4_K_M GGUF (its SentencePiece vocabulary and K-quant weights)
against transformers loading the same file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import tokenmill
from tokenmill.errors import ModelNotFoundError

IDS = [5, 17, 99, 3, 250, 42, 8, 77, 19, 140, 64, 2, 31, 300, 12, 9, 33, 44, 55, 66, 101, 7]


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, max_position_embeddings=256, query_pre_attn_scalar=24,
        initializer_range=0.08)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:   # (1 + w): non-zero w, so the offset matters
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path_factory.mktemp("tiny-gemma3")
    model.save_pretrained(d, safe_serialization=True)
    return d, model


def test_tiny_gemma3_logits_and_greedy_match_transformers(tiny_gemma3):
    d, hf = tiny_gemma3
    m = tokenmill.load(d)
    hp = m.hparams
    assert hp.local_layers == [1, 1, 1, 1, 1, 0] and hp.rope_theta_local == 10000.0 and hp.norm_offset == 1.0
    with torch.no_grad():
        want = hf(torch.tensor([IDS])).logits[0].double().numpy()
    got = m.eval(m.new_cache(), IDS, logits="all").logits   # 22 tokens: past the local layers' window of 8
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    cache = m.new_cache()   # token by token: the window and both RoPE bases in decode
    steps = np.concatenate([m.eval(cache, [t]).logits for t in IDS])
    assert np.abs(steps - want).max() < 1e-4 * np.abs(want).max()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([IDS[:6]]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, 6:].tolist()
    out = tokenmill.Generator(m, tokenmill.GenerateConfig(temperature=0, max_new_tokens=32, ignore_eos=True)).generate(IDS[:6])
    assert list(out) == ref


def test_unsupported_gemma3_settings_are_named(tiny_gemma3, tmp_path):
    import json
    import shutil

    d, _ = tiny_gemma3
    for key, value in (("final_logit_softcapping", 30.0), ("hidden_activation", "relu")):
        broken = tmp_path / key
        shutil.copytree(d, broken)
        cfg = json.loads((broken / "config.json").read_text())
        cfg[key] = value
        (broken / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(tokenmill.UnsupportedModelError, match=str(value)):
            tokenmill.load(broken)
    with pytest.raises(tokenmill.UnsupportedModelError, match="not gemma3"):
        tokenmill.export_to_gguf(d, tmp_path / "out.gguf")


@pytest.fixture(scope="module")
def gemma3_gguf():
    from tokenmill.engine.default_model import gemma3_270m

    try:
        return gemma3_270m()
    except ModelNotFoundError as e:
        pytest.skip(f"Gemma 3 270M could not be fetched: {e}")


SAMPLES = ["Hello world!", "  leading spaces and   three", "Größe, naïve café — déjà vu", "東京は日本の首都です。",
           "Привет, как дела?", "مرحبا بالعالم", "🙂 emoji 🚀🚀", "code:\n\tdef f(x):\n\t\treturn x**2  # square",
           "<start_of_turn>user\nHi<end_of_turn>\n", "1234567890 3.14159", "नमस्ते दुनिया", "\u200bzero width"]


def test_real_gemma3_tokenizer_logits_and_answers(gemma3_gguf):
    hf_tok = transformers.AutoTokenizer.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name)
    m = tokenmill.load(gemma3_gguf, weights="f32")   # every K-quant / q5_0 matrix dequantized exactly
    for s in SAMPLES:
        ids = m.tokenize(s)
        assert ids == hf_tok.encode(s), s
        assert m.detokenize(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name,
                                                           dtype=torch.float32).eval()
    prompt = m.tokenize("Question: What is the capital of France?\nAnswer:")
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0].numpy()
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    got = m.eval(m.new_cache(), prompt, logits="all").logits
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    greedy = tokenmill.Generator(m, tokenmill.GenerateConfig(temperature=0, max_new_tokens=12)).generate(prompt)
    assert list(greedy) == ref[:len(greedy)]
    assert "Paris" in m.detokenize(greedy)
    # the default load keeps K-quants as f16 copies: the same answer
    assert "Paris" in tokenmill.load(gemma3_gguf).generate("Question: What is the capital of France?\nAnswer:",
                                                           max_new_tokens=6, temperature=0)
