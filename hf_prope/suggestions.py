"""Did-you-mean suggestions for error messages: the one helper every input check uses."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

__all__ = ["closest"]


def closest(word: str, choices: Sequence[str]) -> str:
    """A ' Did you mean ...?' suffix for error messages, or '' when nothing is close."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""
