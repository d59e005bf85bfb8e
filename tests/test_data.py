"""The data layer: sources through ``datasets``, the token stream, and a held-out tail that never overlaps training."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import char_tokenizer

from hf_prope.data import load_text_dataset, python_docs_text, split_tail, tokenize_dataset
from hf_prope.evaluation import tokenize_text

DOCS = ["def f(x):\n    return x", "The for statement iterates.", "Names are bound by assignment."]


def _expected(tokenizer, docs) -> list[int]:
    """Each document tokenised on its own, EOS between documents (the oracle)."""
    out: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            out.append(tokenizer.eos_token_id)
        out.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
    return out


@pytest.mark.parametrize("kind", ["jsonl", "json", "txt-folder", "csv"])
def test_local_sources_give_one_document_per_row_or_file(kind, tmp_path) -> None:
    tok = char_tokenizer()
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
        ds = load_text_dataset(str(path), text_column="body")
        column = "body"
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps([{"text": d} for d in DOCS]))
        ds, column = load_text_dataset(str(path)), "text"
    elif kind == "csv":
        path = tmp_path / "d.csv"
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([["text"], *[[d] for d in DOCS]])
        ds, column = load_text_dataset(str(path)), "text"
    else:
        for i, d in enumerate(DOCS):
            (tmp_path / f"{i}.txt").write_text(d)
        ds, column = load_text_dataset(str(tmp_path)), "text"
    ids = tokenize_dataset(ds, tok, text_column=column)
    assert ids.tolist() == _expected(tok, DOCS)


def test_python_docs_stream_is_the_zero_shot_protocol() -> None:
    tok = char_tokenizer()
    ids = tokenize_dataset(load_text_dataset("python-docs"), tok)
    assert torch.equal(ids, tokenize_text(tok, python_docs_text()))


@settings(max_examples=60, deadline=None)
@given(total=st.integers(10, 400), block=st.integers(2, 40), heldout=st.integers(2, 100))
def test_split_never_overlaps(total, block, heldout) -> None:
    ids = torch.arange(total)  # every position is its own id, so overlap would show
    if (total - heldout) // block < 1:
        with pytest.raises(ValueError, match="training blocks"):
            split_tail(ids, block_size=block, heldout_tokens=heldout)
        return
    split = split_tail(ids, block_size=block, heldout_tokens=heldout)
    train = split.train_blocks.flatten()
    assert torch.equal(split.heldout, ids[-heldout:])
    assert torch.equal(train, ids[: train.numel()])  # contiguous blocks from the start
    assert not set(train.tolist()) & set(split.heldout.tolist())
    assert split.train_blocks.shape[1] == block and train.numel() > total - heldout - block


def test_bad_sources(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="holds no"):
        load_text_dataset(str(tmp_path))
    (tmp_path / "a.json").write_text(json.dumps([{"content": "x"}]))
    with pytest.raises(ValueError, match="has no column 'text'.*content"):
        load_text_dataset(str(tmp_path / "a.json"))
    (tmp_path / "b.txt").write_text("y")
    with pytest.raises(ValueError, match="mixes file kinds"):
        load_text_dataset(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        tokenize_dataset(load_text_dataset(str(empty)), char_tokenizer())


def test_long_documents_are_held_out_whole_and_never_trained_on() -> None:
    from hf_prope.data import split_long_documents

    eos = 0
    docs = [torch.arange(1, 40) + 100 * i for i in range(6)]  # 39 tokens each, distinct values per document
    docs[1] = torch.arange(1, 90) + 1000  # 89 tokens: two windows of 32
    docs[4] = torch.arange(1, 70) + 2000  # 69 tokens: two windows of 32
    split = split_long_documents(docs, eos, block_size=8, heldout_tokens=96, window=32)
    # From the end: document 5 (39 tokens -> 1 window), document 4 (2 windows): 96 tokens.
    assert split.heldout_documents == 2
    assert torch.equal(split.heldout, torch.cat([docs[4][:64], docs[5][:32]]))
    train = set(split.train_blocks.flatten().tolist())
    assert not train & (set(docs[4].tolist()) | set(docs[5].tolist()))  # held-out documents are not trained on
    assert set(docs[0][:8].tolist()) <= train
    # Every window of the longest context (and of any length dividing it) lies in one document.
    for window in split.heldout.reshape(-1, 32):
        assert len({int(t) // 100 for t in window}) == 1
    with pytest.raises(ValueError, match="Only .* tokens lie in whole windows of 64"):
        split_long_documents(docs, eos, block_size=8, heldout_tokens=192, window=64)
    with pytest.raises(ValueError, match="must be a multiple of the window"):
        split_long_documents(docs, eos, block_size=8, heldout_tokens=100, window=32)
