"""The GGUF file's names and types as hf-prope writes them: metadata keys, the stop factor, dtypes, the error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..extras import require
from ..spec import PatchSpec

STOPPED_FACTOR = 1e30
# Factors at least this large stop their pair (whoever wrote the file; 1e30 is the convention).
STOPPED_ABOVE = 1e20
SPEC_KEY = "hf_prope.patch_spec"
# Set on a model loaded from a GGUF file (hf_prope.gguf.load_gguf): the file, whose exact llama.cpp
# vocabulary an export then copies. An attribute of the Python object only: never saved.
SOURCE_ATTR = "hf_prope_gguf_file"
VERSION_KEY = "hf_prope.version"
GGUFType = Literal["f16", "f32", "bf16"]
GGUF_TYPES: tuple[str, ...] = ("f16", "f32", "bf16")
# Base rope types whose frequencies llama.cpp reproduces from freq_base and per-pair factors alone.
FACTOR_ROPE_TYPES = ("default", "linear", "llama3", "proportional")


class GGUFExportError(ValueError):
    """The model, its patch or its tokenizer cannot be written as a GGUF that llama.cpp runs exactly."""


def check_gguf_type(value: str, *, setting: str = "dtype", unset: str = "") -> None:
    """Raise ``ValueError`` naming ``setting`` unless ``value`` is one of :data:`GGUF_TYPES`."""
    if value not in GGUF_TYPES:
        raise ValueError(f"{setting} must be one of {', '.join(GGUF_TYPES)}{unset}, got {value!r}.")


@dataclass(frozen=True)
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    path: Path
    architecture: str
    dtype: str
    rope_freqs: tuple[float, ...] | None  # None: plain RoPE, no factor tensor written
    spec: PatchSpec | None
    n_tensors: int
    tokenizer_pre: str | None


def require_gguf() -> Any:
    require("gguf", "Writing and reading GGUF files")
    import gguf

    return gguf
