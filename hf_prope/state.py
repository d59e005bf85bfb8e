"""What a model is made of and what patch it carries: the read surface every other module uses.

* :func:`model_parts` finds, once, the pieces of a supported model that hf-prope works on:
  its architecture record, the transformers model inside any PEFT wrapper, its config, its
  rotary modules and its attention modules by layer.
* :func:`patch_state` reads what the model carries: the patch spec, the current and the
  original ``rope_parameters``, its layer types and the fingerprint of its base (what an
  adapter must be loaded on). The Hub code, the analysis and the recipes read these instead of
  reaching into the patching engine.
* One rule for each check of a layer selection: :func:`check_layer_indices`,
  :func:`check_layer_types`.

Nothing here changes a model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .registry import Architecture, NoRotaryEmbeddingError, get_architecture
from .spec import PatchSpec
from .suggestions import closest

#: The config attribute (and ``config.json`` key) holding the patch and the original rope parameters.
CONFIG_KEY = "hf_prope"
#: The attribute of the transformers model on which the patching engine notes the spec it applied
#: (with its per-layer hooks), so that a patch recorded in the config but not applied can be told apart.
APPLIED_ATTR = "_hf_prope_applied"


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)  # PEFT
    return get_base() if callable(get_base) else model


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (adapters on a base model)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


@dataclass
class ModelParts:
    """The pieces of a supported model hf-prope patches and reads."""

    arch: Architecture
    root: nn.Module  # what the user passed (may be a PeftModel)
    model: nn.Module  # the transformers PreTrainedModel
    config: Any
    rotaries: list[nn.Module]
    attentions: dict[int, nn.Module]

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def layer_types(self) -> list[str] | None:
        """``config.layer_types`` (e.g. sliding / full attention per layer), or ``None``."""
        lt = getattr(self.config, "layer_types", None)
        return list(lt) if lt else None

    @property
    def n_pairs(self) -> int:
        """Frequency pairs per head (half the rotated head size)."""
        inv_freq = next(b for n, b in self.rotaries[0].named_buffers() if n.endswith("inv_freq"))
        return int(inv_freq.shape[-1])

    def pairs_of_layer(self, layer: int) -> int:
        """Frequency pairs the rotary module gives decoder layer ``layer`` (its rope entry's)."""
        key = self.rope_key_of_layer(layer)
        return int(getattr(self.rotaries[0], "inv_freq" if key is None else f"{key}_inv_freq").shape[-1])

    def rope_keys(self) -> list[str | None]:
        """``[None]`` for one flat ``rope_parameters`` dict, else the layer types it is nested by."""
        if self.arch.rope_per_layer_type:
            # The rotary module builds frequencies only for layer types the model has (a 2-layer
            # Gemma 3 is all sliding), although rope_parameters names every type.
            present = set(self.layer_types or self.config.rope_parameters)
            return sorted(k for k, v in self.config.rope_parameters.items() if v is not None and k in present)
        return [None]

    def rope_key_of_layer(self, layer: int) -> str | None:
        """The ``rope_parameters`` entry that decoder layer ``layer`` uses (``None``: the flat dict)."""
        return self.layer_types[layer] if self.arch.rope_per_layer_type else None  # type: ignore[index]

    def rotates(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` applies RoPE at all (SmolLM3's NoPE layers do not)."""
        if self.arch.no_rope_layers is None:
            return True
        flags = getattr(self.config, self.arch.no_rope_layers, None)
        return bool(flags[layer]) if flags is not None and layer < len(flags) else True

    def attention_span(self, layer: int) -> int | None:
        """How far back decoder layer ``layer`` can attend (its sliding window), or ``None`` for no limit."""
        return self.arch.attention_span(self.config, layer)


def model_parts(model: nn.Module) -> ModelParts:
    """The parts of a supported model (PEFT-wrapped or not).

    Raises ``TypeError`` for something that is not a transformers model,
    :class:`~hf_prope.registry.UnsupportedModelError` for an architecture hf-prope does not
    patch and :class:`~hf_prope.registry.NoRotaryEmbeddingError` for one without RoPE.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected a transformers model (torch.nn.Module), got {type(model).__name__}.")
    inner = unwrap(model)
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or model_type is None:
        raise TypeError(f"{type(inner).__name__} has no transformers config; pass a transformers model.")
    has_rotary = any("RotaryEmbedding" in type(m).__name__ for m in inner.modules())
    arch = get_architecture(model_type, has_rotary=has_rotary)
    rotary_cls = arch.rotary_class
    rotaries = [m for m in inner.modules() if isinstance(m, rotary_cls)]
    if arch.generic:
        copies = [r for r in rotaries if type(getattr(r, "config", None)) is type(config) and r.config is not config]
        if copies:
            # Granite SWA's per-layer rope_theta: rotaries built from edited copies of the config, which
            # a patch of the config's rope_parameters would not reach.
            from .registry import UnsupportedModelError

            raise UnsupportedModelError(
                f"This {model_type} model builds {len(copies)} more {arch.rotary_class_name} module(s) from "
                "edited copies of its config (one per rope_theta), so its frequencies do not all follow "
                "config.rope_parameters and hf-prope cannot patch it."
            )
        # Only rotaries built from this model's own config (a multimodal tower has its own).
        rotaries = [
            r
            for r in rotaries
            if getattr(r, "config", None) is config and any(n.endswith("inv_freq") for n in r._buffers)
        ]
    if not rotaries or getattr(config, "rope_parameters", None) is None:
        raise NoRotaryEmbeddingError(
            f"This {model_type} model has no {arch.rotary_class_name} module built from its config, or no "
            "rope_parameters in its config, so there are no RoPE frequencies to patch."
        )
    if arch.generic:
        from .generic import attention_modules, describe

        arch = describe(arch, inner, rotaries)
        attentions = attention_modules(inner, arch)
    else:
        attention_cls = arch.attention_class
        attentions = {int(m.layer_idx): m for m in inner.modules() if isinstance(m, attention_cls)}
    return ModelParts(arch, model, inner, config, rotaries, attentions)


NATIVE_P_ROPE = "proportional"


def native_p_rope(config: Any) -> tuple[PatchSpec, dict[str, Any]] | None:
    """A config's own p-RoPE (transformers' ``proportional`` type, as Gemma 4 ships) as a patch over full RoPE.

    Returns the spec and the full-RoPE ``rope_parameters`` it is relative to, or ``None`` when the
    config has no such entry, records an hf-prope patch, or mixes several factors.
    """
    params = getattr(config, "rope_parameters", None)
    if getattr(config, CONFIG_KEY, None) or not isinstance(params, dict):
        return None
    nested = "rope_type" not in params and all(isinstance(v, dict) for v in params.values()) and bool(params)
    entries = dict(params) if nested else {None: params}
    native = {k: e for k, e in entries.items() if isinstance(e, dict) and e.get("rope_type") == NATIVE_P_ROPE}
    factors = {float(e.get("partial_rotary_factor", 1.0)) for e in native.values()}
    if not native or len(factors) != 1 or factors == {1.0}:
        return None
    full = {}
    for k, e in native.items():
        full[k] = {n: v for n, v in e.items() if n not in ("partial_rotary_factor",)}
        full[k]["rope_type"] = "default"
    original = full[None] if not nested else {**copy.deepcopy(params), **full}
    present = set(getattr(config, "layer_types", None) or entries)
    chosen = sorted(k for k in native if k is not None)
    layer_types = chosen if nested and set(chosen) != {k for k in entries if k in present} else None
    return PatchSpec("p-rope", p=factors.pop(), layer_types=layer_types), original


def recorded_patch(model: nn.Module) -> PatchSpec | None:
    """The patch a model's config records, whether or not it is in effect (see :func:`get_patch`).

    A config whose own rope parameters are transformers' native p-RoPE (Gemma 4) records that p-RoPE.
    """
    inner = unwrap(model)
    state = getattr(getattr(inner, "config", None), CONFIG_KEY, None)
    if not state:
        native = native_p_rope(getattr(inner, "config", None))
        return native[0] if native is not None else None
    if not isinstance(state, dict) or "spec" not in state:
        raise ValueError(f"config.{CONFIG_KEY} is malformed: expected an object with a 'spec' field, got {state!r}.")
    return PatchSpec.from_dict(state["spec"])


def _needs_hooks(config: Any) -> bool:
    """Whether the config's rope parameters mark a patch that per-layer hooks, not frequencies, apply."""
    from .rope_types import CUSTOM_TYPES, KEEP_KEY

    params = getattr(config, "rope_parameters", None) or {}
    entries = [v for v in params.values() if isinstance(v, dict)] or [params]
    return any(e.get("rope_type") in CUSTOM_TYPES and e.get(KEEP_KEY) is None for e in entries)


def get_patch(model: nn.Module) -> PatchSpec | None:
    """The patch in effect on a model, or ``None``.

    A patch the config records is in effect when the rotary frequencies express it (transformers
    builds them from the config on every load), or, for a patch on some layers only, when its
    per-layer hooks are attached: a plain ``from_pretrained`` of such a save records the patch but
    computes plain RoPE until :func:`hf_prope.restore_patch`; ``get_patch`` then says ``None`` and
    :func:`recorded_patch` (or ``patch_state(model).recorded``) what is waiting.
    """
    spec = recorded_patch(model)
    if spec is None:
        return None
    inner = unwrap(model)
    if _needs_hooks(inner.config):
        # patch_model marks the model it was given; a class-level patch marks the base model it built.
        base = getattr(inner, "base_model", inner)
        if spec not in (inner.__dict__.get(APPLIED_ATTR), getattr(base, "__dict__", {}).get(APPLIED_ATTR)):
            return None
    return spec


def original_rope_parameters(config: Any) -> dict[str, Any]:
    """The model's own ``rope_parameters`` before any hf-prope patch (a copy)."""
    state = getattr(config, CONFIG_KEY, None)
    if isinstance(state, dict) and "original_rope_parameters" in state:
        return copy.deepcopy(state["original_rope_parameters"])
    native = native_p_rope(config)
    if native is not None:
        return copy.deepcopy(native[1])
    return copy.deepcopy(config.rope_parameters)


@dataclass(frozen=True)
class PatchState:
    """A model's patch state, read once: see :func:`patch_state`."""

    model_type: str
    spec: PatchSpec | None  # in effect (get_patch)
    rope_parameters: dict[str, Any]
    original_rope_parameters: dict[str, Any]
    layer_types: tuple[str, ...] | None
    base: dict[str, Any]  # the base model's fingerprint: what an adapter must be loaded on
    parts: ModelParts = field(repr=False, compare=False)
    recorded: PatchSpec | None = None  # what the config records (recorded_patch), in effect or not

    @property
    def patched(self) -> bool:
        return self.spec is not None

    @property
    def pending(self) -> bool:
        """A patch the config records but the model does not compute (call ``hf_prope.restore_patch``)."""
        return self.recorded is not None and self.spec is None

    @property
    def rope_types(self) -> set[str]:
        """Every rope type named in :attr:`rope_parameters` (one per layer type where they are nested)."""

        def types(value: Any) -> list[str]:
            if isinstance(value, dict):
                own = [value["rope_type"]] if isinstance(value.get("rope_type"), str) else []
                return own + [t for v in value.values() for t in types(v)]
            return []

        return set(types(self.rope_parameters))

    @property
    def native(self) -> bool:
        """Whether plain transformers builds these rope parameters (no hf-prope rope type in them)."""
        from .rope_types import CUSTOM_TYPES

        return not self.rope_types & set(CUSTOM_TYPES)


def base_fingerprint(parts: ModelParts) -> dict[str, Any]:
    """What identifies the base a patch or adapter was made for: type, classes, head size, depth, width."""
    config = parts.config
    return {
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or [type(parts.model).__name__]),
        "head_dim": 2 * parts.n_pairs,
        "num_hidden_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
    }


def patch_state(model: nn.Module) -> PatchState:
    """The patch a model carries, its current and original rope parameters, layer types and base fingerprint."""
    parts = model_parts(model)
    layer_types = parts.layer_types
    return PatchState(
        model_type=parts.arch.model_type,
        spec=get_patch(model),
        recorded=recorded_patch(model),
        rope_parameters=copy.deepcopy(parts.config.rope_parameters),
        original_rope_parameters=original_rope_parameters(parts.config),
        layer_types=tuple(layer_types) if layer_types else None,
        base=base_fingerprint(parts),
        parts=parts,
    )


def check_layer_indices(layers: Sequence[int], n_layers: int) -> None:
    """Raise a clear error for decoder-layer indices outside ``0..n_layers-1``."""
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(
            f"layers {bad} out of range: this model has {n_layers} decoder layers (indices 0..{n_layers - 1})."
        )


def check_layer_types(requested: Sequence[str], layer_types: Sequence[str] | None, model_type: str) -> None:
    """Raise a clear error when ``requested`` names a layer type the model does not have (or it has none)."""
    if not layer_types:
        raise ValueError(
            f"This {model_type} model has no layer types (config.layer_types is not set), so "
            "layer_types= cannot select layers; use layers=[...] with layer indices instead."
        )
    known = sorted(set(layer_types))
    unknown = [t for t in requested if t not in known]
    if unknown:
        raise ValueError(
            f"Unknown layer type {unknown[0]!r}; this model's layer types are {', '.join(known)}."
            + closest(unknown[0], known)
        )
