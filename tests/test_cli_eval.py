"""Perplexity against transformers' own loss, and the CLI's handling of bad input."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import tiny_model, tokens

from hf_prope.cli import main
from hf_prope.evaluation import perplexity


def test_perplexity_equals_exp_of_transformers_loss() -> None:
    model = tiny_model("llama")
    ids = tokens(batch=1, length=50, seed=7)[0]
    windows = ids[-3 * 8 :].reshape(3, 8)  # the last 3 windows of 8 tokens
    with torch.no_grad():
        # transformers' own causal-LM loss (mean over the 7 predicted tokens of each window)
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    expected = math.exp(sum(losses) / len(losses))
    assert math.isclose(perplexity(model, ids, window=8, n_windows=3), expected, rel_tol=1e-5)
    assert math.isclose(perplexity(model, ids, window=8, n_windows=3, batch_size=2), expected, rel_tol=1e-5)


def test_perplexity_rejects_too_short_text() -> None:
    with pytest.raises(ValueError, match="need 80"):
        perplexity(tiny_model("llama"), tokens(batch=1, length=50)[0], window=8, n_windows=10)


def test_cli_bad_input(capsys) -> None:
    assert main(["zero-shot", "--model", "smollm-135m"]) == 2
    err = capsys.readouterr().err
    assert "hf-prope: error: 'smollm-135m' is neither an embedded model" in err
    assert "Did you mean 'smollm2-135m'?" in err
    with pytest.raises(SystemExit) as exc:
        main(["zero-shot", "--window", "1"])
    assert exc.value.code == 2
    assert "must be at least 2" in capsys.readouterr().err
