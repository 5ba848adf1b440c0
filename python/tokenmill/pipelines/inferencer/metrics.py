"""Answer scores for the summary: exact match and token-F1 after SQuAD's normalisation (lower case,
punctuation and the articles a / an / the dropped, whitespace collapsed)."""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def token_f1(prediction: str, truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def summarize(records: list[dict], new_records: list[dict], seconds: float) -> dict:
    """rows, tokens, seconds, rows/s and tok/s of this run's new rows; exact match and token-F1 over
    every row (resumed ones included) that has a ground truth."""
    new_tokens = sum(r["metadata"]["token_count"] for r in new_records)
    new_rows = len(new_records)
    scored = [r for r in records if r.get("ground_truth") is not None]
    out = {
        "rows": len(records),
        "new_rows": new_rows,
        "new_tokens": new_tokens,
        "seconds": round(seconds, 3),
        "rows_per_second": round(new_rows / seconds, 3) if seconds > 0 else 0.0,
        "tokens_per_second": round(new_tokens / seconds, 1) if seconds > 0 else 0.0,
    }
    if scored:
        out["scored_rows"] = len(scored)
        out["exact_match"] = sum(exact_match(r["predicted_answer"], str(r["ground_truth"])) for r in scored) / len(scored)
        out["token_f1"] = sum(token_f1(r["predicted_answer"], str(r["ground_truth"])) for r in scored) / len(scored)
    return out
