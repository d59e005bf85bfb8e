"""Text for training and evaluation: CPython's own documentation, or any ``datasets`` source.

Every source ends as one stream of token ids (documents joined by the tokenizer's EOS token,
no BOS), split into a held-out *tail* for evaluation and fixed-length training blocks cut from
what comes before it, so the two never share a token; evaluation and analysis read the tail
as the last ``n_windows`` windows of ``window`` tokens (:func:`last_windows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .files import local_path

PYTHON_DOCS = "python-docs"
# datasets builder for each file extension a local source may have.
_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


def python_docs_text() -> str:
    """CPython's own language-reference help text, as one English corpus.

    ``pydoc_data.topics.topics`` (shipped with CPython for ``help()``) holds 79 sections of
    the Python language reference, about 465,000 characters (about 113,000 SmolLM2 tokens).
    The sections are joined in sorted key order with a blank line between them, so the
    text, and any perplexity measured on it, is the same on every machine with the same
    Python minor version (the documentation changes between minor versions).
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _local_files(source: str) -> list[Path] | None:
    """The files a local source names, or ``None`` when ``source`` is not a local path."""
    path = local_path(source, file_suffixes=tuple(_BUILDERS))
    if path is None:
        return None  # a Hub dataset name
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS)
        if not files:
            raise FileNotFoundError(f"The data folder {path} holds no {', '.join(sorted(_BUILDERS))} files.")
        return files
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"The data file {source!r} does not exist (current folder: {Path.cwd()}).")


def load_text_dataset(
    source: str = PYTHON_DOCS,
    *,
    text_column: str = "text",
    config_name: str | None = None,
    split: str = "train",
    revision: str | None = None,
) -> Any:
    """A ``datasets.Dataset`` with one document per row in ``text_column``.

    ``source`` is ``"python-docs"`` (:func:`python_docs_text` as one document), a local
    ``.txt``/``.md`` file (one document per file), ``.json``/``.jsonl``/``.csv``/``.parquet``
    file (one document per row), a folder of such files, or a Hub dataset name (read by
    ``datasets.load_dataset(source, config_name, split=split)``). Raises
    ``FileNotFoundError`` for a missing local file and ``ValueError`` for a dataset with no
    text or no ``text_column``.
    """
    import datasets

    if source == PYTHON_DOCS:
        return datasets.Dataset.from_dict({text_column: [python_docs_text()]})
    files = _local_files(source)
    if files is not None:
        kinds = {_BUILDERS[f.suffix.lower()] for f in files}
        if len(kinds) > 1:
            raise ValueError(f"{source!r} mixes file kinds ({', '.join(sorted(kinds))}); use one kind per source.")
        builder = kinds.pop()
        # One document per text file: per-line rows would put an EOS after every line.
        extra: dict[str, Any] = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **extra)
    else:
        ds = datasets.load_dataset(source, config_name, split=split, revision=revision)
    if text_column not in ds.column_names:
        raise ValueError(
            f"The dataset {source!r} has no column {text_column!r}; its columns are {ds.column_names}. "
            "Set text_column to the one holding the text."
        )
    if len(ds) == 0:
        raise ValueError(f"The dataset {source!r} is empty: it has no rows.")
    return ds


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of ids, without BOS/EOS (the reference protocol)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def tokenize_documents(
    dataset: Any, tokenizer: Any, *, text_column: str = "text", num_proc: int | None = None
) -> list[torch.Tensor]:
    """Every non-empty document as its own 1-D tensor of ids, without special tokens."""

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        texts = [t for t in batch[text_column] if isinstance(t, str) and t]
        # A batched map may return fewer rows than it got: empty documents are dropped.
        return {"ids": tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []}

    encoded = dataset.map(
        encode, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="tokenising"
    )
    rows = encoded["ids"] if "ids" in encoded.column_names else []  # no column when every document was empty
    docs = [torch.tensor(row, dtype=torch.long) for row in rows if len(row)]
    if not docs:
        raise ValueError("The dataset holds no text: every document is empty.")
    return docs


def join_documents(docs: Sequence[torch.Tensor], eos: int | None) -> torch.Tensor:
    """Documents as one stream, joined by the EOS token (no BOS)."""
    pieces: list[torch.Tensor] = []
    for doc in docs:
        if pieces and eos is not None:
            pieces.append(torch.tensor([eos], dtype=torch.long))
        pieces.append(doc)
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def tokenize_dataset(
    dataset: Any, tokenizer: Any, *, text_column: str = "text", num_proc: int | None = None
) -> torch.Tensor:
    """All documents as one 1-D tensor of ids, without BOS, joined by the EOS token.

    A single document tokenises exactly as :func:`tokenize_text` does, so
    perplexities on ``python-docs`` are those of the zero-shot protocol.
    """
    docs = tokenize_documents(dataset, tokenizer, text_column=text_column, num_proc=num_proc)
    return join_documents(docs, tokenizer.eos_token_id)


@dataclass(frozen=True)
class TokenSplit:
    """Training blocks and the held-out tail of one token stream (disjoint by construction)."""

    train_blocks: torch.Tensor  # (n_blocks, block_size)
    heldout: torch.Tensor  # 1-D: the last heldout_tokens ids of the stream, or pieces of long documents
    total_tokens: int
    heldout_documents: int | None = None  # how many whole documents were held out (split_long_documents)

    @property
    def train_tokens(self) -> int:
        return int(self.train_blocks.numel())


def split_tail(ids: torch.Tensor, *, block_size: int, heldout_tokens: int, min_blocks: int = 1) -> TokenSplit:
    """Hold out the last ``heldout_tokens`` ids and pack what precedes them into ``block_size`` blocks.

    The tail is where :func:`hf_prope.evaluation.perplexity` takes its windows from, so
    evaluating on ``heldout`` measures text no training block contains. A trailing partial
    block is dropped. Raises ``ValueError`` when fewer than ``min_blocks`` blocks remain.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 tokens, got {block_size}.")
    if heldout_tokens < 2:
        raise ValueError(f"The held-out split needs at least 2 tokens, got {heldout_tokens}.")
    total = int(ids.numel())
    n_blocks = max(0, (total - heldout_tokens) // block_size)
    if n_blocks < min_blocks:
        raise ValueError(
            f"The data has {total} tokens: after holding out the last {heldout_tokens} for evaluation, "
            f"{max(0, total - heldout_tokens)} remain, {n_blocks} training blocks of {block_size} tokens, but at "
            f"least {min_blocks} are needed (one batch on every process). Use more data, a smaller block_size, "
            "or fewer/shorter evaluation windows."
        )
    train = ids[: total - heldout_tokens][: n_blocks * block_size].reshape(n_blocks, block_size)
    return TokenSplit(train_blocks=train.clone(), heldout=ids[total - heldout_tokens :].clone(), total_tokens=total)


def last_windows(input_ids: torch.Tensor, window: int, n_windows: int) -> torch.Tensor:
    """The last ``n_windows * window`` ids of a 1-D stream as ``(n_windows, window)``.

    The *last* tokens, so the windows are the same whatever is prepended to the corpus.
    Raises ``ValueError`` for a stream too short for the windows asked.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be a 1-D tensor of token ids, got shape {tuple(input_ids.shape)}.")
    if window < 2 or n_windows < 1:
        raise ValueError(f"Need window >= 2 and n_windows >= 1, got window={window}, n_windows={n_windows}.")
    needed = window * n_windows
    if input_ids.numel() < needed:
        raise ValueError(
            f"The text has {input_ids.numel()} tokens but {n_windows} windows of {window} tokens need {needed}; "
            "use fewer or shorter windows, or a longer text."
        )
    return input_ids[-needed:].reshape(n_windows, window)


def token_windows(
    tokenizer: Any, texts: str | Sequence[str] | torch.Tensor, *, window: int, n_windows: int
) -> torch.Tensor:
    """The last ``n_windows * window`` tokens of ``texts`` as ``(n_windows, window)`` ids.

    Texts are tokenised without special tokens and joined by the EOS token (as the
    recipes' data is), so ``texts=python_docs_text()`` gives the zero-shot protocol's
    windows. A 1-D tensor is taken as token ids already.
    """
    if isinstance(texts, torch.Tensor):
        if texts.dim() != 1 or texts.numel() == 0:
            raise ValueError(f"Token ids must be a non-empty 1-D tensor, got shape {tuple(texts.shape)}.")
        return last_windows(texts.long(), window, n_windows)
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be a string or a list of strings; got an item of type {bad[0]}.")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("texts is empty (no text, or only whitespace): give the text to measure the model on.")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        if ids and eos is not None:
            ids.append(int(eos))
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return last_windows(torch.tensor(ids, dtype=torch.long), window, n_windows)


def split_long_documents(
    docs: Sequence[torch.Tensor],
    eos: int | None,
    *,
    block_size: int,
    heldout_tokens: int,
    window: int,
    min_blocks: int = 1,
) -> TokenSplit:
    """Hold out whole documents at least ``window`` tokens long, and train on all the others.

    From the end of the data backwards, each document of ``window`` tokens or more gives its
    first ``k * window`` tokens to the held-out split until ``heldout_tokens`` (a multiple of
    ``window``) are reached, and is then left out of training entirely. So every evaluation
    window of ``window`` tokens, or of any length dividing it, lies inside one document, and no
    held-out document is trained on. The other documents are joined by EOS and cut into blocks.
    Raises ``ValueError`` when the long documents are too few, or too little remains to train on.
    """
    if window < 2 or heldout_tokens % window:
        raise ValueError(f"The held-out tokens ({heldout_tokens}) must be a multiple of the window ({window}).")
    held: list[torch.Tensor] = []
    used: set[int] = set()
    remaining = heldout_tokens
    for i in range(len(docs) - 1, -1, -1):
        if remaining == 0:
            break
        k = min(len(docs[i]) // window, remaining // window)
        if k:
            held.append(docs[i][: k * window])
            used.add(i)
            remaining -= k * window
    if remaining:
        long_tokens = sum(len(d) // window * window for d in docs)
        raise ValueError(
            f"Only {long_tokens} tokens lie in whole windows of {window} inside documents at least that long, but "
            f"{heldout_tokens} are to be held out; use a corpus with more long documents, fewer evaluation windows, "
            "or heldout_documents=tail."
        )
    train = join_documents([d for i, d in enumerate(docs) if i not in used], eos)
    n_blocks = train.numel() // block_size
    if n_blocks < min_blocks:
        raise ValueError(
            f"After holding out {len(used)} long documents, {train.numel()} tokens remain for training: {n_blocks} "
            f"blocks of {block_size}, but at least {min_blocks} are needed. Use more data or a smaller block_size."
        )
    heldout = torch.cat(held[::-1])
    return TokenSplit(
        train_blocks=train[: n_blocks * block_size].reshape(n_blocks, block_size).clone(),
        heldout=heldout.clone(),
        total_tokens=int(sum(len(d) for d in docs)),
        heldout_documents=len(used),
    )


def long_documents(
    docs: Sequence[torch.Tensor], tokens: int, *, max_documents: int | None = None
) -> list[torch.Tensor]:
    """The first ``tokens`` ids of every document at least that long (up to ``max_documents``, in order).

    Raises ``ValueError`` naming the longest document when none is long enough.
    """
    if tokens < 2:
        raise ValueError(f"tokens per document must be at least 2, got {tokens}.")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents must be at least 1 (or unset for all), got {max_documents}.")
    chosen = [d[:tokens] for d in docs if len(d) >= tokens][:max_documents]
    if not chosen:
        longest = max((len(d) for d in docs), default=0)
        raise ValueError(
            f"No document has {tokens} tokens (the longest has {longest}); use longer documents or fewer tokens "
            "per document."
        )
    return chosen


def document_windows(docs: Sequence[torch.Tensor], window: int) -> torch.Tensor:
    """Every document cut into whole windows of ``window`` ids, ``(n, window)``: no window spans two documents.

    A document's tail shorter than a window is left out. Raises ``ValueError`` when no document
    holds a whole window.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}.")
    pieces = [d[: len(d) // window * window].reshape(-1, window) for d in docs if len(d) >= window]
    if not pieces:
        longest = max((len(d) for d in docs), default=0)
        raise ValueError(f"No document holds a window of {window} tokens (the longest has {longest}).")
    return torch.cat(pieces)
