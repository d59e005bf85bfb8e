"""Evaluation text that every Python installation already has."""

from __future__ import annotations


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
