"""CLaRa inference (apple/ml-clara), natively: documents compressed into a few memory-token vectors by
the decoder itself under an encoder LoRA adapter, and answers generated from those vectors under a
decoder adapter (stage 1 paraphrase, stage 2 QA), with stage 3 choosing documents by the cosine of a
query compressed under a query-reasoner adapter.

A checkpoint is read in its converted form (`tokenmill convert-clara DIR OUT`, which unpickles the
released `adapters.pth` / `decoder_first_last_layers.pth` with torch's weights_only loader once):
config.json, `adapters/<role>/` PEFT directories, and `special_embeddings.safetensors` with the
embedding and lm_head rows of the tokens CLaRa adds (`<MEM0>`.., `<AE>`, `<ENC>`, `<SEP>`). The base
decoder is a local GGUF or HF directory. Those tokens never pass through the base vocabulary: their rows
are fed as input embeddings, and their logits are the final hidden state against their lm_head rows.

The same math as the original, with these choices (documented in the README): every adapter present is
loaded (the original's evaluation path, pure_inference; with pure_inference false a stage1_2 model would
get a fresh identity decoder adapter — a missing decoder adapter means the base here too); sequences are
not padded (RoPE attention depends on position differences only, so the original's left padding with
masked pads gives the same values); the paraphrase instruction is drawn from a seeded generator;
similarities are computed in float64; a chat template that refuses a system message gets it folded into
the user message (the original does so only for one error text)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import InvalidArgumentError, ModelFileError, ModelFormatError
from ..text.chat import ChatTemplateError

PathLike = Union[str, os.PathLike]
SPECIAL_FILE = "special_embeddings.safetensors"
ROLES = ("encoder_adapter", "query_reasoner_adapter", "decoder_adapter")
QA_SYSTEM = ("You are a helpful assistant. Your task is to extract relevant information from provided documents and to "
             "answer to questions as briefly as possible.")
PARAPHRASE_SYSTEM = "You are a helpful assistant. Your task is follow the instructions to paraphrase the background information."
# the prompts the released models were trained with (data, as the original has them)
PARAPHRASE_INSTRUCTIONS = (
    "Background: {docs} means the same as",
    "Background: {docs} Can you put the above sentences in your own terms?",
    "Background: {docs} Please provide a reinterpretation of the preceding background text.",
    "These two expressions are equivalent in essence:\n(1) {docs}\n(2)",
    "Background: {docs} is a paraphrase of what?",
    "Background: {docs} Could you give me a different version of the background sentences above?",
    "In other words, background: {docs} is just another way of saying:",
    "You're getting across the same point whether you say background: {docs} or",
    "Background: {docs} After unpacking the ideas in the background information above, we got:",
    "Background: {docs} Please offer a restatement of the background sentences I've just read.",
    "Background: {docs}, which also means:",
    "Strip away the mystery, and you'll find background: {docs} is simply another rendition of:",
    "The essence of background: {docs} is captured again in the following statement:",
)


@dataclass
class ClaraConfig:
    compr_rate: int
    doc_max_length: int = 256
    generation_top_k: int = 1
    sep: bool = True
    different_mem_tokens: bool = True
    training_stage: str = "stage1_2"
    pure_inference: bool = False
    decoder_model_name: str = ""
    lora_r: int = 16

    @property
    def n_mem(self) -> int:
        return self.doc_max_length // self.compr_rate

    @property
    def mem_tokens(self) -> list:
        """The memory token of each of the n_mem positions of a document."""
        return [f"<MEM{i}>" for i in range(self.n_mem)] if self.different_mem_tokens else ["<MEM>"] * self.n_mem

    @property
    def special_tokens(self) -> list:
        """The tokens CLaRa adds to the tokenizer, in the order it adds them."""
        distinct = [f"<MEM{i}>" for i in range(self.n_mem)] if self.different_mem_tokens else ["<MEM>"]
        return distinct + ["<AE>", "<ENC>", "<SEP>"]

    @classmethod
    def from_json(cls, data: dict) -> "ClaraConfig":
        def num(key, default):
            v = data.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ModelFormatError(f"CLaRa config: {key} must be a positive integer, got {v!r}")
            return v
        cfg = cls(compr_rate=num("compr_rate", None) if "compr_rate" in data else num("compr_rate", 0),
                  doc_max_length=num("doc_max_length", 256), generation_top_k=num("generation_top_k", 1),
                  sep=bool(data.get("sep", True)), different_mem_tokens=bool(data.get("different_mem_tokens", True)),
                  training_stage=str(data.get("training_stage", "stage1_2")),
                  pure_inference=bool(data.get("pure_inference", False)),
                  decoder_model_name=str(data.get("decoder_model_name") or ""), lora_r=num("lora_r", 16))
        if cfg.n_mem < 1:
            raise ModelFormatError(f"CLaRa config: doc_max_length {cfg.doc_max_length} // compr_rate {cfg.compr_rate} is 0")
        if data.get("compr_use_mlp") or data.get("compr_model_name"):
            raise ModelFormatError("CLaRa config: a separate compressor model (compr_model_name / compr_use_mlp) is not "
                                   "supported; the decoder is the compressor")
        return cfg


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Clara:
    """A CLaRa model over a tokenmill decoder (module docstring). `cache_dir` keeps compressed vectors
    on disk keyed by the base model, the adapter, the compression settings and the document text."""

    def __init__(self, model, config: ClaraConfig, embed_rows: np.ndarray, head_rows: Optional[np.ndarray],
                 adapters: dict, cache_dir: Optional[PathLike] = None):
        self.model, self.config = model, config
        names = config.special_tokens
        if embed_rows.shape != (len(names), model.n_embd):
            raise ModelFormatError(f"CLaRa special embeddings are {list(embed_rows.shape)}, expected [{len(names)}, "
                                   f"{model.n_embd}] for {', '.join(names)}")
        self.rows = {name: embed_rows[i].astype(np.float32) for i, name in enumerate(names)}
        self.head = None if head_rows is None else np.asarray(head_rows, np.float64)
        self.added_names = names
        self.adapters = adapters              # role -> (adapter name in the model, digest)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        st = os.stat(model.path)
        self._model_key = f"{os.path.abspath(model.path)}:{st.st_size}:{st.st_mtime_ns}"
        self._special = re.compile("|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True)))

    @classmethod
    def load(cls, directory: PathLike, base: Optional[PathLike] = None, *, n_threads: Optional[int] = None,
             cache_dir: Optional[PathLike] = None, weights: Optional[str] = None) -> "Clara":
        """A converted CLaRa folder over the base decoder `base` (a local GGUF or HF directory; default
        the config's decoder_model_name when that is a local path)."""
        from ..api import load
        from ..engine import native

        d = Path(directory)
        if (d / "adapters.pth").exists() and not (d / SPECIAL_FILE).exists():
            raise ModelFileError(f"'{d}' holds torch pickles (adapters.pth), which tokenmill never loads: convert it "
                                 "once with `tokenmill convert-clara DIR OUT` and load OUT")
        if not (d / "config.json").is_file() or not (d / SPECIAL_FILE).is_file():
            raise ModelFileError(f"'{d}' is not a converted CLaRa folder (config.json + {SPECIAL_FILE} + adapters/)")
        try:
            config = ClaraConfig.from_json(json.loads((d / "config.json").read_text(encoding="utf-8")))
        except ValueError as e:
            raise ModelFormatError(f"'{d / 'config.json'}': {e}") from None
        base = base or config.decoder_model_name
        if not base or not Path(base).exists():
            raise ModelFileError(f"the base decoder {base!r} is not a local path: pass base=PATH (GGUF or HF directory)")
        model = load(base, n_threads=n_threads, weights=weights)
        if model.tokenizer is None:
            raise ModelFileError(f"the base decoder '{base}' has no tokenizer")
        special = native.open_safetensors(str(d / SPECIAL_FILE))
        listing = special.tensors()
        if "embed" not in listing:
            raise ModelFormatError(f"'{d / SPECIAL_FILE}' has no 'embed' tensor")
        embed = special.read("embed")
        head = special.read("lm_head") if "lm_head" in listing else None
        adapters = {}
        for role in ROLES:
            path = d / "adapters" / role
            if path.is_dir():
                model.load_adapter(path, name=role)
                adapters[role] = (role, _file_digest(path / "adapter_model.safetensors"))
        if "encoder_adapter" not in adapters:
            raise ModelFormatError(f"'{d}' has no adapters/encoder_adapter (the compressor)")
        return cls(model, config, embed, head, adapters, cache_dir)

    # ---- compression
    def _adapter(self, role: str):
        if role == "query_reasoner_adapter" and role not in self.adapters:
            role = "encoder_adapter"   # a stage-2 model without one reasons with its compressor, as the original
        return self.adapters.get(role, (None, "base"))

    def _encoder_ids(self, text: str) -> list:
        """`<s>text</s>` as ids, cut on the right so that with `<ENC>` it is at most doc_max_length + 3."""
        tok = self.model.tokenizer
        bos = tok.token_text(tok.bos_id) if tok.bos_id is not None else ""
        eos = tok.token_text(tok.eos_ids[0]) if tok.eos_ids else ""
        return self.model.tokenize(bos + text + eos, add_special_tokens=False)[: self.config.doc_max_length + 2]

    def _compress_uncached(self, texts: Sequence[str], adapter: Optional[str], batch: int = 16) -> np.ndarray:
        """Per document `<ENC>`, the text, then the n_mem memory tokens: three batched passes."""
        m, n_mem = self.model, self.config.n_mem
        out = np.empty((len(texts), n_mem, m.n_embd), np.float32)
        slot = m.adapter_slot(adapter)
        enc = self.rows["<ENC>"][None]
        mem = np.stack([self.rows[name] for name in self.config.mem_tokens])
        for start in range(0, len(texts), batch):
            ids = [self._encoder_ids(t) for t in texts[start:start + batch]]
            n = len(ids)
            caches = [m.new_cache(len(i) + 1 + n_mem) for i in ids]
            m.eval_batch(caches, [enc] * n, logits=None, adapters=[slot] * n)
            texted = [i for i in range(n) if ids[i]]
            if texted:
                m.eval_batch([caches[i] for i in texted], [ids[i] for i in texted], logits=None, adapters=[slot] * len(texted))
            res = m.eval_batch(caches, [mem] * n, logits=None, hidden="all", adapters=[slot] * n)
            out[start:start + n] = res.hidden.reshape(n, n_mem, -1)
        return out

    def compress(self, documents: Sequence[str], role: str = "encoder_adapter") -> np.ndarray:
        """The documents' memory vectors [n_docs, n_mem, hidden] under the `role` adapter (the last
        layer's normed hidden states at the memory positions)."""
        if isinstance(documents, str) or not isinstance(documents, Sequence):
            raise InvalidArgumentError("documents must be a list of strings")
        adapter, digest = self._adapter(role)
        if self.cache_dir is None:
            return self._compress_uncached(list(documents), adapter)
        keys = [hashlib.sha256(json.dumps([self._model_key, digest, self.config.doc_max_length, self.config.compr_rate,
                                           self.config.different_mem_tokens, doc]).encode()).hexdigest()
                for doc in documents]
        paths = [self.cache_dir / k[:2] / f"{k}.npy" for k in keys]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        if missing:
            fresh = self._compress_uncached([documents[i] for i in missing], adapter)
            for i, vec in zip(missing, fresh):
                paths[i].parent.mkdir(parents=True, exist_ok=True)
                tmp = paths[i].with_suffix(".tmp.npy")
                np.save(tmp, vec, allow_pickle=False)
                tmp.replace(paths[i])
        return np.stack([np.load(p, allow_pickle=False) for p in paths]).astype(np.float32)

    # ---- decoding
    def _render(self, system: str, user: str) -> str:
        try:
            return self.model.chat_text([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                        enable_thinking=False)
        except ChatTemplateError:   # templates without a system role (Mistral v0.2): fold it into the user turn
            return self.model.chat_text([{"role": "user", "content": system + "\n" + user}], enable_thinking=False)

    def _decoder_inputs(self, prompt: str, vectors: np.ndarray) -> list:
        """The prompt's passes: text as token ids, added tokens as their rows, the k-th memory token of
        document j as vectors[j, k]."""
        parts, at, mem = [], 0, 0
        pending: list = []

        def flush():
            if pending:
                parts.append(np.stack(pending))
                pending.clear()
        for m in self._special.finditer(prompt):
            if m.start() > at:
                flush()
                parts.append(self.model.tokenize(prompt[at:m.start()], add_special_tokens=False))
            name = m.group(0)
            if name.startswith("<MEM"):
                j, k = divmod(mem, self.config.n_mem)
                if j >= len(vectors):
                    raise InvalidArgumentError("the prompt has more memory slots than documents")
                pending.append(vectors[j, k])
                mem += 1
            else:
                pending.append(self.rows[name])
            at = m.end()
        flush()
        if at < len(prompt):
            parts.append(self.model.tokenize(prompt[at:], add_special_tokens=False))
        return [p for p in parts if len(p)]

    def _greedy(self, parts: list, max_new_tokens: int) -> list:
        """Greedy token ids after the prompt passes under the decoder adapter; an added token may be
        chosen (its lm_head row; ids from n_vocab on) and is fed back as its embedding row, as the
        original would; stops at EOS."""
        m = self.model
        adapter = self._adapter("decoder_adapter")[0]
        n = sum(len(p) for p in parts)
        cache = m.new_cache(min(m.n_ctx, n + max_new_tokens + 1))
        if n + 1 > cache.capacity:
            raise InvalidArgumentError(f"the CLaRa prompt takes {n} tokens; the context holds {m.n_ctx}")
        for p in parts[:-1]:
            m.eval(cache, p, logits=None, adapter=adapter)
        res = m.eval(cache, parts[-1], logits="last", hidden="last" if self.head is not None else None, adapter=adapter)
        eos, out = set(m.eos_ids), []
        for _ in range(max_new_tokens):
            logits = res.logits[-1].astype(np.float64)
            best = int(np.argmax(logits))
            if self.head is not None:
                extra = self.head @ res.hidden[-1].astype(np.float64)
                if extra.max() > logits[best]:
                    best = m.n_vocab + int(np.argmax(extra))
            if best in eos:
                break
            out.append(best)
            if len(out) == max_new_tokens or cache.n_past + 1 > cache.capacity:
                break
            step = [best] if best < m.n_vocab else self.rows[self.added_names[best - m.n_vocab]][None]
            res = m.eval(cache, step, logits="last", hidden="last" if self.head is not None else None, adapter=adapter)
        return out

    def answer_ids(self, question: str, vectors: np.ndarray, max_new_tokens: int = 128) -> list:
        """The greedy answer's token ids for one question from compressed documents [n_docs, n_mem, hidden]."""
        prompt = self._render(QA_SYSTEM, f"Background:\n{self._docs_string(len(vectors))}\n\nQuestion:{question}")
        return self._greedy(self._decoder_inputs(prompt, np.asarray(vectors, np.float32)), max_new_tokens)

    def _text(self, ids: list) -> str:
        return self.model.detokenize([t for t in ids if t < self.model.n_vocab], skip_special_tokens=True)

    def _docs_string(self, n_docs: int) -> str:
        return ("".join(self.config.mem_tokens) + ("<SEP>" if self.config.sep else "")) * n_docs

    @staticmethod
    def _check(questions, documents) -> None:
        if isinstance(questions, str) or not isinstance(questions, Sequence):
            raise InvalidArgumentError("questions must be a list of strings")
        if not isinstance(documents, Sequence) or len(documents) != len(questions):
            raise InvalidArgumentError("documents must hold one list of documents per question")
        if any(isinstance(d, str) or not isinstance(d, Sequence) or not d for d in documents):
            raise InvalidArgumentError("each question needs a non-empty list of documents")

    def generate_from_compressed(self, questions: Sequence[str], compressed: Sequence[np.ndarray],
                                 max_new_tokens: int = 128) -> list:
        """Stage 2 answers from already compressed documents: compressed[i] is [n_docs_i, n_mem, hidden]."""
        if len(compressed) != len(questions):
            raise InvalidArgumentError("compressed must hold one array of documents per question")
        return [self._text(self.answer_ids(q, v, max_new_tokens)) for q, v in zip(questions, compressed)]

    def generate_from_text(self, questions: Sequence[str], documents: Sequence[Sequence[str]],
                           max_new_tokens: int = 128) -> list:
        """Stage 2: each question answered from its documents, compressed (the lists may differ in length)."""
        self._check(questions, documents)
        vectors = [self.compress(list(docs)) for docs in documents]
        return self.generate_from_compressed(questions, vectors, max_new_tokens)

    def generate_from_paraphrase(self, questions: Sequence[str], documents: Sequence[Sequence[str]],
                                 max_new_tokens: int = 128, seed: int = 0) -> list:
        """Stage 1: a paraphrase of each question's documents from their vectors; the instruction is
        drawn from the training set of instructions by a generator seeded with `seed`."""
        self._check(questions, documents)
        rng = random.Random(seed)
        out = []
        for docs in documents:
            instruction = rng.choice(PARAPHRASE_INSTRUCTIONS).format(docs=self._docs_string(len(docs)))
            prompt = self._render(PARAPHRASE_SYSTEM, instruction)
            out.append(self._text(self._greedy(self._decoder_inputs(prompt, self.compress(list(docs))), max_new_tokens)))
        return out

    def rank(self, questions: Sequence[str], documents: Sequence[Sequence[str]], top_k: Optional[int] = None):
        """Stage 3 retrieval: (top-k indices [n_questions, k] by cosine of the flattened query vector,
        compressed under the query-reasoner adapter, against each document's, best first; scores)."""
        self._check(questions, documents)
        k = top_k or self.config.generation_top_k
        queries = self.compress(list(questions), role="query_reasoner_adapter").reshape(len(questions), -1)
        indices, scores, vectors = [], [], []
        for q, docs in zip(queries, documents):
            if len(docs) < k:
                raise InvalidArgumentError(f"generation_top_k is {k} but a question has {len(docs)} documents")
            d = self.compress(list(docs))
            flat = d.reshape(len(docs), -1).astype(np.float64)
            s = flat @ q.astype(np.float64) / np.maximum(np.linalg.norm(flat, axis=1) * np.linalg.norm(q), 1e-12)
            top = np.argsort(-s, kind="stable")[:k]
            indices.append(top)
            scores.append(s)
            vectors.append(d[top])
        return np.array(indices), scores, vectors

    def generate_from_questions(self, questions: Sequence[str], documents: Sequence[Sequence[str]],
                                max_new_tokens: int = 128):
        """Stage 3: (answers, top-k indices [n_questions, generation_top_k]); the chosen documents are
        given to the decoder in rank order."""
        topk, _, vectors = self.rank(questions, documents)
        return self.generate_from_compressed(questions, vectors, max_new_tokens), topk
