"""Structured output: only tokens that keep the text a valid prefix of a regular expression or of the
JSON a schema describes. The token-level automaton is outlines-core's (a regex over the vocabulary's
raw bytes, compiled once per tokenizer and pattern); each step masks every other token's logit to -inf
before the sampler sees it, and EOS is allowed only where the text is complete."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import InvalidArgumentError
from ..text.tokenizer import Tokenizer


def _gpt2_byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the others are shifted
    past 255 (the GPT-2 convention every byte-level tokenizer shares)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer: Tokenizer) -> dict[bytes, list[int]]:
    """The raw bytes each non-special token stands for (byte-level BPE, or SentencePiece-style '▁'
    spaces and <0xNN> byte tokens)."""
    hf = tokenizer.hf
    decoder = (json.loads(hf.to_str()).get("decoder") or {})
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
    special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    byte_level = "ByteLevel" in kinds
    table = _gpt2_byte_decoder()
    out: dict[bytes, list[int]] = {}
    for text, token_id in hf.get_vocab().items():
        if text in special:
            continue
        if byte_level:
            try:
                raw = bytes(table[ch] for ch in text)
            except KeyError:
                continue
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            raw = bytes([int(text[3:5], 16)])
        else:
            raw = text.replace("▁", " ").encode("utf-8")
        out.setdefault(raw, []).append(token_id)
    return out


_lock = threading.Lock()
_vocabularies: dict[int, Any] = {}                 # id(tokenizer) -> outlines Vocabulary
_indexes: "OrderedDict[tuple[int, str], Any]" = OrderedDict()
_MAX_INDEXES = 32


def _index(tokenizer: Tokenizer, eos_id: int, regex: str):
    import outlines_core

    key = (id(tokenizer), regex)
    with _lock:
        if key in _indexes:
            _indexes.move_to_end(key)
            return _indexes[key]
        vocab = _vocabularies.get(id(tokenizer))
        if vocab is None:
            vocab = _vocabularies[id(tokenizer)] = outlines_core.Vocabulary(eos_id, token_bytes(tokenizer))
    try:
        index = outlines_core.Index(regex, vocab)
    except Exception as exc:   # outlines-core reports a pattern it cannot compile as a plain Exception
        raise InvalidArgumentError(f"cannot build a token automaton for the pattern: {exc}") from exc
    with _lock:
        _indexes[key] = index
        while len(_indexes) > _MAX_INDEXES:
            _indexes.popitem(last=False)
    return index


def schema_regex(schema) -> str:
    """The regular expression of the JSON a schema (a dict or its JSON text) allows."""
    import outlines_core

    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        return outlines_core.json_schema.build_regex_from_schema(text)
    except Exception as exc:
        raise InvalidArgumentError(f"json_schema is not a schema tokenmill can enforce: {exc}") from exc


class TokenConstraint:
    """The allowed next tokens of one generation under a regex; advance() after every token."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: Sequence[int], regex: str):
        import outlines_core

        if not eos_ids:
            raise InvalidArgumentError("structured output needs the model's end-of-sequence token")
        self.eos = int(eos_ids[0])
        self.guide = outlines_core.Guide(_index(tokenizer, self.eos, regex))

    def allowed(self) -> np.ndarray:
        """The token ids the pattern allows next (EOS where the text is complete)."""
        return np.asarray(self.guide.get_tokens(), dtype=np.int32)

    def advance(self, token: int) -> None:
        if token != self.eos:
            self.guide.advance(int(token), return_tokens=False)

    def finished(self) -> bool:
        return self.guide.is_finished()


def build_constraint(tokenizer: Optional[Tokenizer], eos_ids: Sequence[int], json_schema=None,
                     regex: Optional[str] = None) -> Optional[TokenConstraint]:
    if json_schema is None and regex is None:
        return None
    if tokenizer is None:
        raise InvalidArgumentError("structured output needs a tokenizer; this model has none")
    return TokenConstraint(tokenizer, eos_ids, schema_regex(json_schema) if json_schema is not None else regex)
