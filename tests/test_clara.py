"""CLaRa inference against a PyTorch + peft reference of the original's math (apple/ml-clara's
modeling_clara, as ../shared/notes/seed-origins.md describes it: left-padded encoder inputs, memory
tokens appended, hidden_states[-1] at the memory positions, decoder prompt embeddings replaced, greedy
generate from inputs_embeds), on a tiny random Mistral with random encoder / query-reasoner / decoder
LoRA adapters written in the released layout (torch files) and converted with convert-clara."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import tokenmill
from tokenmill.errors import InvalidArgumentError, ModelFileError
from tokenmill.rag.clara import PARAPHRASE_INSTRUCTIONS, PARAPHRASE_SYSTEM, QA_SYSTEM, Clara
from tokenmill.tools.convert_clara import convert_clara

TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")
CONFIG = dict(decoder_model_name="mistralai/Mistral-7B-Instruct-v0.2", compr_rate=8, doc_max_length=24,
              generation_top_k=2, lora=True, lora_r=4, sep=True, different_mem_tokens=True, training_stage="stage2",
              pure_inference=True, compr_use_mlp=False)
SPECIAL = [f"<MEM{i}>" for i in range(3)] + ["<AE>", "<ENC>", "<SEP>"]
DOCS = [["the cat sat on the mat near the door", "rain falls in the north hills all winter long and more",
         "a short one"],
        ["bread is baked from flour and water", "the river runs to the sea", "stars shine at night over the hills"]]
QUESTIONS = ["where did the cat sit?", "what is bread made of?"]


def _tokenizer(directory, vocab_size):
    """A byte-level BPE of exactly vocab_size tokens (<unk>, <s>, </s> first) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(d) for d in DOCS] + QUESTIONS + [QA_SYSTEM, PARAPHRASE_SYSTEM] + list(PARAPHRASE_INSTRUCTIONS)
    tok.train_from_iterator(corpus * 4, trainers.BpeTrainer(vocab_size=vocab_size - 8, special_tokens=["<unk>", "<s>", "</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([f"<unused{i}>" for i in range(vocab_size - tok.get_vocab_size())])
    assert tok.get_vocab_size() == vocab_size
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}))


@pytest.fixture(scope="module")
def clara_setup(tiny_models, tmp_path_factory):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import PreTrainedTokenizerFast

    src_dir, _ = tiny_models["mistral"]
    base = tmp_path_factory.mktemp("clara-base")
    for f in src_dir.iterdir():
        shutil.copy(f, base / f.name)
    from conftest import build_tiny
    # the same weights as the session's tiny Mistral (same seed), in a model of its own to resize and wrap
    model = build_tiny("mistral", tmp_path_factory.mktemp("unused"))
    V, E = model.config.vocab_size, model.config.hidden_size
    _tokenizer(base, V)

    torch.manual_seed(7)
    new_embed, new_head = torch.randn(len(SPECIAL), E) * 0.5, torch.randn(len(SPECIAL), E) * 0.05
    model.resize_token_embeddings(V + len(SPECIAL))
    with torch.no_grad():
        model.get_input_embeddings().weight[V:] = new_embed
        model.get_output_embeddings().weight[V:] = new_head
    roles = ("encoder_adapter", "query_reasoner_adapter", "decoder_adapter")
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, lcfg, adapter_name=roles[0])
    for r in roles[1:]:
        peft_model.add_adapter(r, lcfg)
    peft_model.eval()
    released = tmp_path_factory.mktemp("clara-released")
    adapters = {r: {k: v.clone() for k, v in get_peft_model_state_dict(peft_model, adapter_name=r).items()} for r in roles}
    torch.save(adapters, released / "adapters.pth")
    torch.save({"model.embed_tokens.weight": model.get_input_embeddings().weight.detach().clone(),
                "lm_head.weight": model.get_output_embeddings().weight.detach().clone()},
               released / "decoder_first_last_layers.pth")
    (released / "config.json").write_text(json.dumps(CONFIG))
    converted = convert_clara(released, tmp_path_factory.mktemp("clara-converted") / "out")

    tok = PreTrainedTokenizerFast(tokenizer_file=str(base / "tokenizer.json"), bos_token="<s>", eos_token="</s>",
                                  padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL})
    tok.pad_token_id = tok.bos_token_id
    tok.chat_template = TEMPLATE
    assert tok.convert_tokens_to_ids("<MEM0>") == V
    return base, released, converted, peft_model, tok


class Reference:
    """The original's inference math on the peft model (batched, left-padded, with attention masks)."""

    def __init__(self, peft_model, tok):
        self.m, self.tok = peft_model, tok
        self.mem_ids = tok.convert_tokens_to_ids(SPECIAL[:3])

    @torch.no_grad()
    def compress(self, texts, role):
        self.m.set_adapter(role)
        enc = self.tok(["<ENC>" + "<s>" + t + "</s>" for t in texts], return_tensors="pt", padding="max_length",
                       max_length=CONFIG["doc_max_length"] + 3, truncation=True, add_special_tokens=False)
        ids = torch.cat([enc["input_ids"], torch.tensor([self.mem_ids] * len(texts))], 1)
        mask = torch.cat([enc["attention_mask"], torch.ones(len(texts), 3, dtype=torch.long)], 1)
        h = self.m(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        sel = torch.isin(ids, torch.tensor(self.mem_ids))
        return h[sel].reshape(len(texts), 3, -1).double().numpy()

    @torch.no_grad()
    def generate(self, questions, vectors, max_new_tokens):
        k = vectors[0].shape[0]
        docs = ("".join(SPECIAL[:3]) + "<SEP>") * k
        prompts = [self.tok.apply_chat_template([{"role": "system", "content": QA_SYSTEM},
                                                 {"role": "user", "content": f"Background:\n{docs}\n\nQuestion:{q}"}],
                                                tokenize=False, add_generation_prompt=True) for q in questions]
        dec = self.tok(prompts, return_tensors="pt", padding="longest", add_special_tokens=False)
        ids = dec["input_ids"]
        emb = self.m.get_input_embeddings()(ids)
        first = torch.argmax((ids == self.mem_ids[0]).int(), dim=1)
        for i, v in enumerate(vectors):
            for j in range(k):
                at = first[i].item() + j * 4
                emb[i, at:at + 3] = torch.tensor(v[j], dtype=emb.dtype)
        self.m.set_adapter("decoder_adapter")
        out = self.m.generate(inputs_embeds=emb, attention_mask=dec["attention_mask"], do_sample=False,
                              max_new_tokens=max_new_tokens, eos_token_id=self.tok.eos_token_id,
                              pad_token_id=self.tok.pad_token_id)
        return [[t for t in row.tolist() if t != self.tok.pad_token_id] for row in out]


@pytest.fixture(scope="module")
def clara(clara_setup, tmp_path_factory):
    base, _, converted, _, _ = clara_setup
    return Clara.load(converted, base=base, cache_dir=tmp_path_factory.mktemp("clara-cache"))


def test_compressed_vectors_match_reference(clara, clara_setup):
    ref = Reference(*clara_setup[3:])
    flat = DOCS[0] + DOCS[1] + ["x" * 200]   # the last one is cut to doc_max_length
    want = ref.compress(flat, "encoder_adapter")
    got = clara.compress(flat)
    assert got.shape == (len(flat), 3, 64)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    again = clara.compress(flat)   # from the disk cache
    assert np.array_equal(again, got)
    q = clara.compress(QUESTIONS, role="query_reasoner_adapter")
    assert np.abs(q - ref.compress(QUESTIONS, "query_reasoner_adapter")).max() < 1e-4 * max(1.0, np.abs(q).max())


def test_generation_and_stage3_ranking_match_reference(clara, clara_setup):
    ref = Reference(*clara_setup[3:])
    vectors = [ref.compress(d, "encoder_adapter") for d in DOCS]
    want = ref.generate(QUESTIONS, vectors, 12)
    got = [clara.answer_ids(q, clara.compress(d), 12) for q, d in zip(QUESTIONS, DOCS)]
    assert got == want
    texts = clara.generate_from_text(QUESTIONS, DOCS, max_new_tokens=12)
    assert texts == [clara.model.detokenize([t for t in w if t < clara.model.n_vocab], skip_special_tokens=True)
                     for w in want]

    q = ref.compress(QUESTIONS, "query_reasoner_adapter").reshape(2, -1)
    want_idx = []
    for qi, docs in zip(q, vectors):
        flat = docs.reshape(len(docs), -1)
        s = torch.nn.functional.normalize(torch.tensor(flat), dim=-1) @ torch.nn.functional.normalize(torch.tensor(qi), dim=-1)
        want_idx.append(torch.topk(s, CONFIG["generation_top_k"]).indices.tolist())
    texts, topk = clara.generate_from_questions(QUESTIONS, DOCS, max_new_tokens=12)
    assert topk.tolist() == want_idx
    chosen = [np.stack([v[i] for i in idx]) for v, idx in zip(vectors, want_idx)]
    assert [clara.answer_ids(q, c, 12) for q, c in zip(QUESTIONS, chosen)] == ref.generate(QUESTIONS, chosen, 12)
    assert len(texts) == 2

    para = clara.generate_from_paraphrase(["", ""], DOCS, max_new_tokens=6, seed=3)
    assert para == clara.generate_from_paraphrase(["", ""], DOCS, max_new_tokens=6, seed=3)


def test_pickles_are_never_loaded_and_bad_input_is_refused(clara, clara_setup, tmp_path):
    base, released, converted, _, _ = clara_setup
    with pytest.raises(ModelFileError, match="convert-clara"):
        Clara.load(released, base=base)
    with pytest.raises(ModelFileError, match="local path"):
        Clara.load(converted)
    with pytest.raises(InvalidArgumentError):
        clara.generate_from_text(QUESTIONS, DOCS[:1])
    with pytest.raises(InvalidArgumentError, match="generation_top_k"):
        clara.generate_from_questions(["q"], [["only one"]])
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "config.json").write_text(json.dumps(CONFIG))
    import pickle
    (tmp_path / "evil" / "adapters.pth").write_bytes(pickle.dumps({"x": object.__new__(object)}))
    (tmp_path / "evil" / "decoder_first_last_layers.pth").write_bytes(b"junk")
    with pytest.raises(tokenmill.errors.ModelFormatError, match="weights-only"):
        convert_clara(tmp_path / "evil", tmp_path / "evil-out")


def test_pipeline_and_cli_with_clara(clara, clara_setup, tmp_path, capsys):
    from tokenmill.rag import Pipeline
    from tokenmill.tools.cli import main

    rag = Pipeline(clara, compression="clara", top_k=2, chunk_tokens=64, progress=False)
    rag.add_documents(DOCS[0] + DOCS[1])
    answer = rag.ask(QUESTIONS[0], max_new_tokens=8)
    texts = [rag.index.text(i) for i, _ in answer.sources]
    assert len(answer.sources) == 2
    assert answer.text == clara.generate_from_text([QUESTIONS[0]], [texts], max_new_tokens=8)[0].strip()
    with pytest.raises(InvalidArgumentError, match="Clara"):
        Pipeline(clara.model, compression="clara")

    base, _, converted, _, _ = clara_setup
    (tmp_path / "docs").mkdir()
    for i, d in enumerate(DOCS[0]):
        (tmp_path / "docs" / f"{i}.txt").write_text(d)
    main(["rag", "--docs", str(tmp_path / "docs"), "--question", QUESTIONS[0], "--model", str(base), "--compression",
          "clara", "--clara", str(converted), "--clara-cache", str(tmp_path / "cache"), "--top-k", "2",
          "--num-tokens", "6"])
    assert capsys.readouterr().out.strip() != "" and any((tmp_path / "cache").rglob("*.npy"))
