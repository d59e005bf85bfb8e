"""The one registry of supported architectures (model type -> where its RoPE lives).

Each architecture family in :mod:`hf_prope.patches` registers its entries here;
everything else (patching, class-level patching, the custom rope type) looks
architectures up in :data:`ARCHITECTURES` and nowhere else.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from torch import nn


class UnsupportedModelError(ValueError):
    """The model's type is not one hf-prope knows how to patch."""


class NoRotaryEmbeddingError(ValueError):
    """The model has no rotary position embeddings to patch."""


@dataclass(frozen=True)
class Architecture:
    """Where one model type keeps its rotary embedding, attention and base model classes.

    ``rope_per_layer_type`` is true when the model's config nests ``rope_parameters``
    by layer type and its rotary module keeps one set of frequencies per type
    (Gemma 3); then a ``layer_types`` patch is expressed in the config itself.
    ``query_norm`` / ``key_norm`` name the attention's per-head norm applied to the
    ``q_proj`` / ``k_proj`` output before rotation, where the model has one;
    :mod:`hf_prope.analysis` reads the projections with forward hooks and applies it.
    """

    model_type: str
    family: str
    modeling_module: str
    rotary_class_name: str
    attention_class_name: str
    base_model_class_name: str
    rope_per_layer_type: bool = False
    query_norm: str | None = None
    key_norm: str | None = None

    def _cls(self, name: str) -> Any:
        return getattr(importlib.import_module(self.modeling_module), name)

    @property
    def rotary_class(self) -> type[nn.Module]:
        return self._cls(self.rotary_class_name)

    @property
    def attention_class(self) -> type[nn.Module]:
        return self._cls(self.attention_class_name)

    @property
    def base_model_class(self) -> type[nn.Module]:
        return self._cls(self.base_model_class_name)


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Add an architecture; registering the same model type twice is an error."""
    if arch.model_type in ARCHITECTURES and ARCHITECTURES[arch.model_type] != arch:
        raise ValueError(f"Architecture {arch.model_type!r} is already registered.")
    ARCHITECTURES[arch.model_type] = arch
    return arch


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def get_architecture(model_type: str, *, has_rotary: bool | None = None) -> Architecture:
    """The entry for ``model_type``, or a clear error listing what is supported."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if has_rotary is False:
        raise NoRotaryEmbeddingError(
            f"Model type {model_type!r} has no rotary position embeddings (no *RotaryEmbedding module), "
            "so there are no RoPE frequencies to patch. hf-prope patches RoPE models: "
            f"{', '.join(supported_model_types())}."
        )
    hint = ""
    if model_type == "gemma3":
        hint = " For a multimodal Gemma 3, load its text model (Gemma3ForCausalLM) or patch model.language_model."
    raise UnsupportedModelError(
        f"Model type {model_type!r} is not supported by hf-prope. Supported model types: "
        f"{', '.join(supported_model_types())}.{hint}"
    )
