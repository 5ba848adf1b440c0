"""Tokenizers: HF `tokenizer.json` files, or the vocabulary embedded in a GGUF file rebuilt as an
equivalent `tokenizers.Tokenizer`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from ..errors import InvalidArgumentError, ModelFormatError, UnsupportedModelError
from ..jsonfile import read_json_object

# Pre-tokenizer split rules named by `tokenizer.ggml.pre` (the regexes are the published ones of
# each model family's tokenizer).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3"], LLAMA3_SPLIT),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen"], QWEN2_SPLIT),
}
# Families whose pre-tokenizer is several rules applied one after another (each splits the pieces the
# previous ones left), as llama.cpp runs them.
_DEEPSEEK_LETTERS = (   # the cased letters; code points that NFC would change are escaped
    "A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅ"
    "ὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ"
    "-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃"
)
_CJK = "[一-龥ࠀ-一가-퟿]+"
_GPT2_RULE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_PRE_SEQUENCES = {
    "deepseek-llm": ["[\r\n]", f"\\s?[{_DEEPSEEK_LETTERS}]+", "\\s?[!-/:-~！-／：-～‘-‟　-。]+", "\\s+$", _CJK, "\\p{N}+"],
    "deepseek-coder": ["[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", _CJK, "\\p{N}"],
    "falcon": ["[\\p{P}\\$\\+<=>\\^~\\|`]+", _GPT2_RULE, "[0-9][0-9][0-9]"],
}
# Families whose tokenizer isolates every digit before the GPT-2 byte-level rule (StarCoder-style,
# as SmolLM2's own tokenizer.json does).
_PRE_DIGITS = {"smollm", "starcoder", "refact", "codeshell"}
_PRE_GPT2 = {"gpt2", "gpt-2", "default"}

# Gemma's turn format, for Gemma GGUF files that carry no template (a system message opens the first
# user turn, as Gemma's own template does)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.system = m['content'] ~ '\n\n' %}{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ (ns.system ~ m['content']) | trim }}<end_of_turn>\n{% set ns.system = '' %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def _byte_level_pre_tokenizer(pre: str):
    if pre in _PRE_SEQUENCES:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _PRE_SEQUENCES[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    if pre in _PRE_SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _PRE_DIGITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre not in _PRE_GPT2:
        warnings.warn(f"unknown GGUF pre-tokenizer '{pre}': using the GPT-2 rule", stacklevel=3)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _text(value) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _first_ids(tokens: list) -> dict:
    """token -> the id of its first occurrence (a vocabulary may list a string twice)."""
    ids = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    return ids


def _token_id(meta: dict, key: str, n_tokens: int):
    """The token id a metadata key names, or None where it is absent or out of range."""
    value = meta.get(key)
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_tokens
    return int(value) if ok else None


def _spm_merges(tokens: list, rank: dict) -> list:
    """The merges a SentencePiece BPE vocabulary implies: every split of a token into two tokens, best
    merged token first (rank: lower is better), a longer left piece first within one token."""
    vocab = set(tokens)
    pairs = []
    for token in tokens:
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                pairs.append((rank[token], left, right))
    pairs.sort(key=lambda p: p[0])
    return [(left, right) for _, left, right in pairs]


def _sentencepiece_model(meta: dict, tokens: list, gemma: bool):
    """llama.cpp's `llama` vocabulary (SentencePiece BPE: byte fallback, pieces merged best score
    first) as a tokenizers BPE. Gemma files store tokens of several spaces as spaces (looked up as
    "▁"s) and their scores do not follow the merge order, the file order does (as transformers reads
    them); the others rank merges by score."""
    if gemma:
        tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
        rank = _first_ids(tokens)
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise ModelFormatError("the GGUF SentencePiece vocabulary lacks tokenizer.ggml.scores")
        rank = {}
        for i in sorted(range(len(tokens)), key=lambda i: -float(scores[i])):
            rank.setdefault(tokens[i], len(rank))
    unk = _token_id(meta, "tokenizer.ggml.unknown_token_id", len(tokens))
    return models.BPE(vocab=_first_ids(tokens), merges=_spm_merges(tokens, rank), fuse_unk=True, byte_fallback=True,
                      unk_token=tokens[unk] if unk is not None else None), tokens


def _sentencepiece_text(tok: HFTokenizer, meta: dict, gemma: bool) -> None:
    """Spaces as "▁"; add_space_prefix vocabularies (Llama 2, Mistral, Phi-3) also put one "▁" before
    the text and after every special token, as llama.cpp does (so "  hi" is "▁▁▁hi")."""
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", not gemma))
    replace = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix else replace
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))


def _wordpiece(tok_list: list, meta: dict):
    """llama.cpp's `bert` vocabulary back as WordPiece: its converter writes word-initial pieces with a
    leading "▁" and continuation pieces bare ("##" dropped); [BRACKETED] tokens stay as they are. Text
    is normalised as BERT's own tokenizer does (lower case, accents stripped, CJK characters split)."""
    pieces = []
    for t in tok_list:
        if t.startswith("\u2581"):
            pieces.append(t[1:])
        elif t.startswith("[") and t.endswith("]"):
            pieces.append(t)
        else:
            pieces.append("##" + t)
    unk = _token_id(meta, "tokenizer.ggml.unknown_token_id", len(pieces))
    tok = HFTokenizer(models.WordPiece(vocab=_first_ids(pieces), unk_token=pieces[unk] if unk is not None else "[UNK]",
                                       max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok, pieces


def tokenizer_from_gguf_metadata(meta: dict) -> "Tokenizer":
    """Builds the tokenizer described by GGUF `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`),
    SentencePiece BPE (`llama`: Llama 2, Mistral, Gemma, Phi-3) or WordPiece (`bert`)."""
    kind = _text(meta.get("tokenizer.ggml.model", b""))
    if not kind:
        raise ModelFormatError("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
    if kind not in ("gpt2", "llama", "bert"):
        raise UnsupportedModelError(
            f"GGUF tokenizer model '{kind}' is not supported (byte-level BPE 'gpt2', SentencePiece 'llama' and "
            "WordPiece 'bert' are); "
            "pass a tokenizer.json with tokenizer=..."
        )
    tokens = [_text(t) for t in meta.get("tokenizer.ggml.tokens", [])]
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or (kind == "gpt2" and not isinstance(merges, list)):
        raise ModelFormatError("the GGUF tokenizer lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not isinstance(types, list) or len(types) != len(tokens):
        raise ModelFormatError("tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    arch = _text(meta.get("general.architecture", b""))

    try:
        if kind == "bert":
            tok, tokens = _wordpiece(tokens, meta)
        elif kind == "llama":
            model, tokens = _sentencepiece_model(meta, tokens, gemma=arch.startswith("gemma"))
            tok = HFTokenizer(model)
            _sentencepiece_text(tok, meta, gemma=arch.startswith("gemma"))
        else:
            pairs = []
            for m in merges:
                parts = _text(m).split(" ", 1)
                if len(parts) != 2:
                    raise ModelFormatError(f"malformed BPE merge {m!r} in the GGUF tokenizer")
                pairs.append((parts[0], parts[1]))
            tok = HFTokenizer(models.BPE(vocab=_first_ids(tokens), merges=pairs, fuse_unk=False, byte_fallback=False))
            tok.pre_tokenizer = _byte_level_pre_tokenizer(_text(meta.get("tokenizer.ggml.pre", b"default")))
            tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _TOKEN_CONTROL]
        )
        tok.add_tokens(
            [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _TOKEN_USER_DEFINED]
        )
    except ModelFormatError:
        raise
    except Exception as exc:  # the tokenizers library raises plain Exceptions for a vocabulary it rejects
        raise ModelFormatError(f"the GGUF tokenizer is malformed: {exc}") from exc

    bos = _token_id(meta, "tokenizer.ggml.bos_token_id", len(tokens))
    eos = _token_id(meta, "tokenizer.ggml.eos_token_id", len(tokens))
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    try:
        _set_post_processor(tok, tokens[bos] if add_bos else None, bos, tokens[eos] if add_eos else None, eos)
    except Exception as exc:
        raise ModelFormatError(f"the GGUF tokenizer's special tokens are malformed: {exc}") from exc
    template = meta.get("tokenizer.chat_template")
    if template is None and arch.startswith("gemma"):
        template = GEMMA_TEMPLATE
    eos_ids = [eos] if eos is not None else []
    if arch.startswith("gemma") and "<end_of_turn>" in tokens:   # a chat turn ends there
        eos_ids.append(tokens.index("<end_of_turn>"))
    return Tokenizer(
        tok,
        bos_id=bos,
        eos_ids=eos_ids,
        chat_template=_text(template) if template is not None else None,
    )


def _set_post_processor(tok: HFTokenizer, bos: Optional[str], bos_id, eos: Optional[str], eos_id) -> None:
    if bos is None and eos is None:
        return
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    special = ([(bos, bos_id)] if bos else []) + ([(eos, eos_id)] if eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)


def tokenizer_from_hf_dir(directory: Path) -> Optional["Tokenizer"]:
    """Loads tokenizer.json (+ tokenizer_config.json, generation_config.json) if present."""
    path = directory / "tokenizer.json"
    if not path.exists():
        return None
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exceptions
        raise ModelFormatError(f"cannot read {path}: {exc}") from exc
    config = _read_json(directory / "tokenizer_config.json")
    generation = _read_json(directory / "generation_config.json")

    def special_id(value):
        if isinstance(value, dict):
            value = value.get("content")
        return tok.token_to_id(value) if isinstance(value, str) else None

    bos = special_id(config.get("bos_token"))
    eos_ids = []
    gen_eos = generation.get("eos_token_id")
    for value in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
        if isinstance(value, int):
            eos_ids.append(value)
    cfg_eos = special_id(config.get("eos_token"))
    if cfg_eos is not None and cfg_eos not in eos_ids:
        eos_ids.append(cfg_eos)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    chat_file = directory / "chat_template.jinja"
    if template is None and chat_file.exists():
        template = chat_file.read_text(encoding="utf-8")
    return Tokenizer(tok, bos_id=bos, eos_ids=eos_ids, chat_template=template)


def _read_json(path: Path) -> dict:
    return read_json_object(path) if path.exists() else {}


class Tokenizer:
    """Text <-> token ids, with the model's special tokens and chat template."""

    def __init__(self, tok: HFTokenizer, bos_id=None, eos_ids: Sequence[int] = (), chat_template=None):
        # a tokenizer.json may carry padding and truncation for training batches: ids here are the whole
        # text, unpadded (embed() truncates as sentence-transformers does, on a copy of its own)
        tok.no_padding()
        tok.no_truncation()
        self.hf = tok
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids)
        self.chat_template = chat_template
        self._vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: Path) -> "Tokenizer":
        """A bare tokenizer.json (no special-token configuration beside it)."""
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            raise ModelFormatError(f"cannot read {path}: {exc}") from exc

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text must be a str, got {type(text).__name__}")
        return self.hf.encode(text, add_special_tokens=bool(add_special_tokens)).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of token ids; an id outside the vocabulary is an InvalidArgumentError (the
        tokenizers library would silently drop it)."""
        if isinstance(ids, (str, bytes)):
            raise InvalidArgumentError(f"ids must be a sequence of token ids, got {type(ids).__name__}")
        values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        for i, t in enumerate(values):
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
                raise InvalidArgumentError(f"ids[{i}] must be an integer token id, got {type(t).__name__}")
            if not 0 <= t < self._vocab_size:
                raise InvalidArgumentError(f"ids[{i}] = {t} is outside the tokenizer's vocabulary [0, {self._vocab_size})")
        return self.hf.decode([int(t) for t in values], skip_special_tokens=skip_special_tokens)

    def decode_unchecked(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """decode() for ids the engine produced itself (already in range): no per-id check."""
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> Optional[str]:
        return self.hf.id_to_token(token_id)
