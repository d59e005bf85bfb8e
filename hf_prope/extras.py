"""The optional dependencies (pyproject's extras), checked in one place before any work.

:func:`require` raises :class:`MissingExtraError` (an ``ImportError``) naming what needs the
extra, the missing packages and the ``pip install`` command, so an entry point can check its
extras with its other input before it loads a model or trains for minutes.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "MissingExtraError", "missing", "require"]

#: extra -> (importable module, PyPI package) it must provide; the same lists as pyproject.toml's extras.
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "gguf": (("gguf", "gguf"),),
    "recipes": (
        ("datasets", "datasets"),
        ("accelerate", "accelerate"),
        ("yaml", "pyyaml"),
        ("matplotlib", "matplotlib"),
    ),
    "mlx": (("mlx", "mlx"), ("mlx_lm", "mlx-lm")),
    "gpu": (("triton", "triton"),),
}


class MissingExtraError(ImportError):
    """An optional dependency of hf-prope is not installed."""


def missing(extra: str) -> list[str]:
    """The PyPI packages of ``extra`` that are not importable here."""
    return [package for module, package in EXTRAS[extra] if importlib.util.find_spec(module) is None]


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` unless every package of ``extra`` is installed; ``what`` needs them."""
    absent = missing(extra)
    if absent:
        raise MissingExtraError(
            f"{what} needs {', '.join(absent)} (hf-prope's [{extra}] extra), which "
            f"{'is' if len(absent) == 1 else 'are'} not installed: pip install 'hf-prope[{extra}]'"
        )
