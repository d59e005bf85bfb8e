"""The one registry of supported architectures (model type -> where its RoPE lives).

Each architecture family in :mod:`hf_prope.patches` registers its entries here, and with
them every fact hf-prope needs about the architecture (class names, how its rotary
module is laid out, its per-head norms, its sliding window, a hint for look-alike model
types). Everything else (patching, analysis, the recipes, the tests' tiny models) looks
architectures up in :data:`ARCHITECTURES` and nowhere else.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
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
    ``sliding_window_on_every_layer`` is true when, without ``config.layer_types``, the
    config's ``sliding_window`` limits every layer (Mistral); with layer types, only the
    ``sliding_attention`` layers are limited.
    ``llama_cpp_graph`` names the llama.cpp graph (GGUF ``general.architecture``) that runs
    this model type *and* reads per-pair frequency factors (``rope_freqs``), so a patch can be
    exported to GGUF (:mod:`hf_prope.gguf`); ``None`` where llama.cpp's graph for the
    type ignores them (a GGUF would silently run plain RoPE).
    ``mlx_lm_reads_rope_scaling`` is false where mlx-lm's model for this type reads no rope
    type from ``config.json`` (only ``rope_theta``), so it cannot run any patch; a patched save
    then makes it fail instead of running plain RoPE (:mod:`hf_prope.legacy_config`).
    """

    model_type: str
    family: str
    modeling_module: str
    rotary_class_name: str
    attention_class_name: str
    base_model_class_name: str
    config_class_name: str
    causal_lm_class_name: str
    rope_per_layer_type: bool = False
    query_norm: str | None = None
    key_norm: str | None = None
    sliding_window_on_every_layer: bool = False
    llama_cpp_graph: str | None = None
    mlx_lm_reads_rope_scaling: bool = True
    #: Found from transformers' own classes (:mod:`hf_prope.generic`), not written by hand; its
    #: patches are checked by a probe when applied.
    generic: bool = False
    #: The config list that marks NoPE layers with 0 (SmolLM3's ``no_rope_layers``): those layers
    #: rotate nothing, patch or not.
    no_rope_layers: str | None = None

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

    @property
    def causal_lm_class(self) -> type[nn.Module]:
        return self._cls(self.causal_lm_class_name)

    @property
    def config_class(self) -> type:
        configuration = self.modeling_module.replace(".modeling_", ".configuration_")
        return getattr(importlib.import_module(configuration), self.config_class_name)

    def attention_span(self, config: Any, layer: int) -> int | None:
        """How far back decoder layer ``layer`` of a model with ``config`` can attend, or ``None`` for no limit."""
        window = getattr(config, "sliding_window", None)
        if not window:
            return None
        types = getattr(config, "layer_types", None)
        if types:
            return int(window) if types[layer] == "sliding_attention" else None
        return int(window) if self.sliding_window_on_every_layer else None


ARCHITECTURES: dict[str, Architecture] = {}
# Model types hf-prope does not patch but users reach for, with what to do instead.
HINTS: dict[str, str] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Add an architecture; registering the same model type twice is an error."""
    if arch.model_type in ARCHITECTURES and ARCHITECTURES[arch.model_type] != arch:
        raise ValueError(f"Architecture {arch.model_type!r} is already registered.")
    ARCHITECTURES[arch.model_type] = arch
    return arch


def register_hint(model_type: str, hint: str) -> None:
    """What to tell a user who passes a ``model_type`` model that is close to a supported one."""
    HINTS[model_type] = hint


def supported_model_types() -> list[str]:
    """Model types with a hand-written record and those of the generic path checked on tiny models in CI."""
    return sorted(set(ARCHITECTURES) | set(GENERIC_CHECKED))


#: Model types that follow transformers' standard rotary contract and are patched by the generic path
#: (:mod:`hf_prope.generic`), each checked on a tiny model in ``tests/test_generic.py``. Any other type
#: of that contract is tried too (and refused if the probe fails); these are the ones known to pass.
GENERIC_CHECKED: tuple[str, ...] = (
    "afmoe",
    "apertus",
    "apertus1p5_text",
    "arcee",
    "aria_text",
    "bitnet",
    "cohere",
    "cohere2",
    "cohere2_moe",
    "cwm",
    "deepseek_v2",
    "diffllama",
    "doge",
    "dots1",
    "ernie4_5",
    "ernie4_5_moe",
    "exaone4",
    "exaone_moe",
    "falcon_h1",
    "flex_olmo",
    "flint",
    "gemma3n_text",
    "gemma4_text",
    "glm",
    "glm4",
    "glm4_moe",
    "gpt_neox",
    "gpt_oss",
    "granite",
    "granitemoe",
    "granitemoeshared",
    "helium",
    "hunyuan_v1_dense",
    "hunyuan_v1_moe",
    "hy_v3",
    "hyperclovax",
    "jais2",
    "jetmoe",
    "kolibri1",
    "laguna",
    "lara_mini",
    "lfm2",
    "llama4_text",
    "mellum",
    "mimo_v2_flash",
    "minicpm3",
    "minicpm5_moe",
    "minimax_m2",
    "minimax_m3_vl_text",
    "ministral",
    "ministral3",
    "mixtral",
    "modernbert-decoder",
    "nanochat",
    "nemotron",
    "olmo",
    "olmo2",
    "olmo3",
    "olmo_hybrid",
    "olmoe",
    "persimmon",
    "phi",
    "phi3",
    "qwen2_moe",
    "qwen3_5_moe_text",
    "qwen3_5_text",
    "qwen3_moe",
    "qwen3_next",
    "seed_oss",
    "smollm3",
    "solar_open",
    "stablelm",
    "starcoder2",
    "vaultgemma",
)


# The generic path (hf_prope.generic) sets this: model type -> a record read from transformers' classes.
_FALLBACK: Callable[[str], Architecture | None] | None = None


def set_fallback(resolve: Callable[[str], Architecture | None]) -> None:
    """Where :func:`get_architecture` looks for a model type without a hand-written record."""
    global _FALLBACK
    _FALLBACK = resolve


def find_architecture(model_type: str) -> Architecture | None:
    """The record for ``model_type``, hand-written or generic, or ``None`` (no error)."""
    try:
        return get_architecture(model_type)
    except (UnsupportedModelError, ImportError):
        return None


def get_architecture(model_type: str, *, has_rotary: bool | None = None) -> Architecture:
    """The entry for ``model_type``, or a clear error listing what is supported."""
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if has_rotary is not False and model_type not in HINTS and _FALLBACK is not None:
        generic = _FALLBACK(model_type)
        if generic is not None:
            return generic
    if has_rotary is False:
        raise NoRotaryEmbeddingError(
            f"Model type {model_type!r} has no rotary position embeddings (no *RotaryEmbedding module), "
            "so there are no RoPE frequencies to patch. hf-prope patches RoPE models: "
            f"{', '.join(supported_model_types())}."
        )
    hint = f" {HINTS[model_type]}" if model_type in HINTS else ""
    raise UnsupportedModelError(
        f"Model type {model_type!r} is not supported by hf-prope. Supported model types: "
        f"{', '.join(supported_model_types())}.{hint}"
    )
