"""`tokenmill perplexity`: windows, scoring of each window's second half, KL and top-1 agreement
against a base model; the perplexity checked against transformers on the same GGUF and windows."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.errors import InvalidArgumentError
from tokenmill.tools.perplexity import _windows, perplexity

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness, it was the spring of hope, it was the winter of despair. ") * 3


def test_perplexity_matches_transformers_and_compares_with_a_base(smollm, hf_smollm):
    report = perplexity(smollm, TEXT, ctx=64, max_windows=3)
    hf, _ = hf_smollm
    nll, n = 0.0, 0
    for ids in _windows(smollm, TEXT, 64, 3):
        assert len(ids) == 64   # SmolLM2 adds no BOS, so none is put first
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()
        nll -= sum(logp[t - 1, ids[t]] for t in range(32, 64))
        n += 32
    assert report.scored_tokens == n == 96
    assert abs(report.perplexity - math.exp(nll / n)) < 2e-3 * report.perplexity

    same = perplexity(smollm, TEXT, ctx=64, base=smollm, max_windows=2)
    assert same.mean_kl < 1e-9 and same.top1_agreement == 1.0 and same.base_perplexity == same.perplexity
    q4 = perplexity(smollm, TEXT, ctx=64, base=smollm, kv_kind="q4", max_windows=2)
    assert 0 < q4.mean_kl < 0.5 and q4.p99_kl >= q4.mean_kl and 0.5 < q4.top1_agreement <= 1.0


def test_perplexity_arguments_are_checked(smollm, tmp_path, capsys):
    with pytest.raises(InvalidArgumentError, match="ctx"):
        perplexity(smollm, TEXT, ctx=4)
    with pytest.raises(InvalidArgumentError, match="fewer than one window"):
        perplexity(smollm, "short", ctx=64)
    from tokenmill.tools.cli import main

    (tmp_path / "t.txt").write_text(TEXT)
    main(["perplexity", str(smollm.path), "--text", str(tmp_path / "t.txt"), "--ctx", "64", "--max-windows", "1"])
    assert "perplexity" in capsys.readouterr().out
