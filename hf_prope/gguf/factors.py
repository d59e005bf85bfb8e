"""The per-pair frequency factors (``rope_freqs``) that carry a patch, and what llama.cpp can express."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..patching import layer_frequencies
from ..rope_types import base_rope_type
from ..spec import PatchSpec
from ..state import PatchState, patch_state
from .format import FACTOR_ROPE_TYPES, STOPPED_FACTOR, GGUFExportError
from .vocabulary import vocab_from_gguf, vocab_from_tokenizer

# -- what llama.cpp would compute --------------------------------------------------------------


def _llama_cpp_base_frequencies(theta: float, head_dim: int) -> torch.Tensor:
    # llama.cpp's rotary: pair i turns at theta^(-2i/n_rot) before any factor. Computed in
    # float32 the way transformers computes its default frequencies, so an untouched pair's
    # factor comes out exactly 1.
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _check_rope(state: PatchState, spec: PatchSpec | None) -> None:
    """What a factor tensor cannot carry: a per-head or layer-selective ``spec``, the model's own rope type, attention scaling."""
    parts = state.parts
    if spec is not None and spec.is_per_head:
        raise GGUFExportError(
            f"The patch gives each key/value head its own frequencies ({spec.describe()}), but llama.cpp's "
            "rope_freqs tensor holds one factor per pair for every head of every layer, so a GGUF cannot carry it. "
            "Use a patch that is the same for every head (p-rope, freq-mask) to export, or serve the model with "
            "transformers (hf_prope.from_pretrained)."
        )
    if spec is not None and spec.is_layer_selective:
        raise GGUFExportError(
            f"The patch applies only to some layers ({spec.describe()}), but llama.cpp shares one "
            "rope_freqs tensor across all layers, so a GGUF cannot carry it. Patch every layer to export, or "
            "serve the model with transformers (hf_prope.from_pretrained)."
        )
    original = state.original_rope_parameters
    rope_type = base_rope_type(original)
    if rope_type not in FACTOR_ROPE_TYPES:
        raise GGUFExportError(
            f"This model's own rope type is {rope_type!r}, which a GGUF's per-pair frequency factors cannot "
            f"express (it {'scales attention' if rope_type == 'yarn' else 'depends on more than the pair'}); "
            f"exportable rope types: {', '.join(FACTOR_ROPE_TYPES)}."
        )
    for rotary in parts.rotaries:
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        if scaling != 1.0:
            raise GGUFExportError(
                f"This model scales attention by {scaling:g} in its rotary embedding, which a GGUF's rope_freqs "
                "cannot carry."
            )
    head_dim = 2 * parts.n_pairs
    config_head_dim = (
        getattr(parts.config, "head_dim", None) or parts.config.hidden_size // parts.config.num_attention_heads
    )
    if head_dim != config_head_dim:
        raise GGUFExportError(
            f"This model rotates {head_dim} of its {config_head_dim} head channels (partial rotary); the exporter "
            "writes full-width rotation only."
        )


def check_exportable(model: nn.Module, spec: PatchSpec | None = None, *, tokenizer: Any = None) -> None:
    """Raise :class:`GGUFExportError` if :func:`export_gguf` would refuse ``model`` patched with ``spec``.

    ``spec`` defaults to the model's own patch; ``tokenizer`` (as :func:`export_gguf` takes it)
    is checked too when given. Cheap and writes nothing: for checks before a long job.
    """
    state = patch_state(model)
    check_config(state)
    _check_rope(state, spec if spec is not None else state.spec)
    if tokenizer is None:
        return
    vocab_size = int(state.parts.config.vocab_size)
    if isinstance(tokenizer, (str, os.PathLike)):
        vocab_from_gguf(Path(tokenizer).expanduser(), vocab_size)
    else:
        vocab_from_tokenizer(tokenizer, vocab_size, None)


def rope_factors(state: PatchState) -> list[float]:
    """The per-pair ``rope_freqs`` factors that make llama.cpp rotate as ``state``'s model does.

    Raises :class:`GGUFExportError` when no factor tensor can express it (a layer-selective
    patch, attention scaling, a length-dependent rope type).
    """
    _check_rope(state, state.spec)
    parts = state.parts
    head_dim = 2 * parts.n_pairs
    rows = layer_frequencies(parts.root)
    if not bool((rows == rows[0]).all()):
        differing = [i for i in range(rows.shape[0]) if not torch.equal(rows[i], rows[0])]
        raise GGUFExportError(
            f"Decoder layers {differing} rotate by other frequencies than layer 0, but llama.cpp shares one "
            "rope_freqs tensor across all layers, so a GGUF cannot carry this model's RoPE."
        )
    base = _llama_cpp_base_frequencies(float(state.original_rope_parameters["rope_theta"]), head_dim).double()
    now = rows[0].double()
    factors = []
    for b, f in zip(base.tolist(), now.tolist()):
        if f == 0.0:
            factors.append(STOPPED_FACTOR)
        else:
            ratio = b / f
            factors.append(1.0 if abs(ratio - 1.0) < 1e-6 else ratio)
    return factors


def check_config(state: PatchState) -> tuple[str, Any]:
    parts = state.parts
    graph = parts.arch.llama_cpp_graph
    if graph is None:
        raise GGUFExportError(
            f"llama.cpp's {parts.arch.model_type} graph passes no frequency factors to its rotary op, so a GGUF of "
            f"this model would run plain RoPE and silently drop the patch. GGUF export supports "
            f"{', '.join(exportable_model_types())}; serve {parts.arch.model_type} p-RoPE models with transformers "
            "(hf_prope.from_pretrained) or, for a native 'proportional' save, vLLM."
        )
    config = parts.config
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise GGUFExportError(f"config.{flag} is set; the exporter writes bias-free Llama/Mistral models only.")
    return graph, config


def exportable_model_types() -> list[str]:
    """Model types whose llama.cpp graph reads per-pair frequency factors (so :func:`export_gguf` takes them)."""
    from ..registry import ARCHITECTURES

    return sorted(t for t, a in ARCHITECTURES.items() if a.llama_cpp_graph is not None)
