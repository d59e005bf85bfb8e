"""Patch, unpatch and inspect RoPE frequency patches on transformers models.

How a patch is carried (why, in short):

* ``model.config`` is the truth. ``rope_parameters`` is rewritten (native
  ``"proportional"`` where exact, else hf-prope's rope type) and ``config.hf_prope``
  records the spec and the original rope parameters, so a saved model reloads
  patched and ``unpatch_model`` can restore the original even after a reload.
* The rotary module's buffers are then recomputed by transformers' own rotary
  class from that config (a fresh instance, copied in place), never by our own
  formula, so every rope type keeps its scaling and its run-time updates.
* Patches on some layers only (``layers=`` or, where the rotary module is shared
  by all layers, ``layer_types=``) cannot be a frequency change: all layers share
  one cos/sin. A forward pre-hook on each chosen attention module replaces its
  ``position_embeddings`` with masked ones: cos = the rotary's attention scaling,
  sin = 0 on unkept pairs, exactly what frequency 0 would produce.
* Where the pairs that still rotate are a prefix (p-RoPE), the cos/sin are tagged so the
  architecture's ``apply_rotary_pos_emb`` rotates only those channels
  (:mod:`hf_prope.rotation`); the tag hooks are part of the patch, removed with it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import rope_types, rotation
from .registry import Architecture, NoRotaryEmbeddingError, get_architecture
from .spec import PatchSpec, make_spec

CONFIG_KEY = "hf_prope"
_HOOKS_ATTR = "_hf_prope_hook_handles"


# ---------------------------------------------------------------------------------------------
# Finding the parts of a model


@dataclass
class _Parts:
    arch: Architecture
    root: nn.Module  # what the user passed (may be a PeftModel)
    model: nn.Module  # the transformers PreTrainedModel
    config: Any
    rotaries: list[nn.Module]
    attentions: dict[int, nn.Module]


def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # PEFT
    return get_base() if callable(get_base) else model


def _find_parts(model: nn.Module) -> _Parts:
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected a transformers model (torch.nn.Module), got {type(model).__name__}.")
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or model_type is None:
        raise TypeError(f"{type(inner).__name__} has no transformers config; pass a transformers model.")
    has_rotary = any("RotaryEmbedding" in type(m).__name__ for m in inner.modules())
    arch = get_architecture(model_type, has_rotary=has_rotary)
    rotary_cls, attention_cls = arch.rotary_class, arch.attention_class
    rotaries = [m for m in inner.modules() if isinstance(m, rotary_cls)]
    if not rotaries or getattr(config, "rope_parameters", None) is None:
        raise NoRotaryEmbeddingError(
            f"This {model_type} model has no {arch.rotary_class_name} module or no rope_parameters in its "
            "config, so there are no RoPE frequencies to patch."
        )
    attentions = {int(m.layer_idx): m for m in inner.modules() if isinstance(m, attention_cls)}
    return _Parts(arch, model, inner, config, rotaries, attentions)


def _rope_keys(parts: _Parts) -> list[str | None]:
    """``[None]`` for one flat rope_parameters dict, else the layer types it is nested by."""
    if parts.arch.rope_per_layer_type:
        # The rotary module builds frequencies only for layer types the model has (a 2-layer
        # Gemma 3 is all sliding), although rope_parameters names every type.
        present = set(_layer_types(parts) or parts.config.rope_parameters)
        return sorted(k for k, v in parts.config.rope_parameters.items() if v is not None and k in present)
    return [None]


def _layer_types(parts: _Parts) -> list[str] | None:
    lt = getattr(parts.config, "layer_types", None)
    return list(lt) if lt else None


def check_layer_indices(layers: Sequence[int], n_layers: int) -> None:
    """Raise a clear error for decoder-layer indices outside ``0..n_layers-1``."""
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(
            f"layers {bad} out of range: this model has {n_layers} decoder layers (indices 0..{n_layers - 1})."
        )


def _rope_key_of_layer(parts: _Parts, layer: int) -> str | None:
    return _layer_types(parts)[layer] if parts.arch.rope_per_layer_type else None  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# Planning: everything is computed and validated before the model is touched


@dataclass
class _Plan:
    spec: PatchSpec
    original_rope: dict[str, Any]
    rope_parameters: dict[str, Any]
    hook_masks: dict[int, list[bool]] = field(default_factory=dict)  # layer -> kept pairs


def _with_rope(config: Any, rope_parameters: dict[str, Any]) -> Any:
    cfg = copy.deepcopy(config)
    cfg.rope_parameters = copy.deepcopy(rope_parameters)
    if hasattr(cfg, CONFIG_KEY):
        delattr(cfg, CONFIG_KEY)
    return cfg


def _build_rotary(parts: _Parts, config: Any) -> nn.Module:
    # Built on the CPU whatever the ambient default device: it is only a source of values.
    with torch.device("cpu"), rope_types.silence_selective_warning():
        return parts.arch.rotary_class(config)


def _inv_freq(rotary: nn.Module, key: str | None) -> torch.Tensor:
    return getattr(rotary, "inv_freq" if key is None else f"{key}_inv_freq")


def _original_rope(config: Any) -> dict[str, Any]:
    state = getattr(config, CONFIG_KEY, None)
    if isinstance(state, dict) and "original_rope_parameters" in state:
        return copy.deepcopy(state["original_rope_parameters"])
    return copy.deepcopy(config.rope_parameters)


def _plan(parts: _Parts, spec: PatchSpec) -> _Plan:
    original = _original_rope(parts.config)
    base_rotary = _build_rotary(parts, _with_rope(parts.config, original))
    keys = _rope_keys(parts)
    base_freqs = {k: _inv_freq(base_rotary, k).detach().float().cpu().tolist() for k in keys}
    head_dim = 2 * len(next(iter(base_freqs.values())))
    n_layers = int(parts.config.num_hidden_layers)
    layer_types = _layer_types(parts)

    model_wide: dict[str | None, list[bool]] = {}
    hook_masks: dict[int, list[bool]] = {}
    if spec.layers is not None:
        check_layer_indices(spec.layers, n_layers)
        for i in spec.layers:
            hook_masks[i] = spec.keep_mask(base_freqs[_rope_key_of_layer(parts, i)])
    elif spec.layer_types is not None:
        if not layer_types:
            raise ValueError(
                f"This {parts.arch.model_type} model has no layer types (config.layer_types is not set), so "
                "layer_types= cannot select layers; use layers=[...] with layer indices instead."
            )
        known = sorted(set(layer_types))
        unknown = [t for t in spec.layer_types if t not in known]
        if unknown:
            from .spec import closest

            raise ValueError(
                f"Unknown layer type {unknown[0]!r}; this model's layer types are {', '.join(known)}."
                + closest(unknown[0], known)
            )
        if parts.arch.rope_per_layer_type:
            for k in spec.layer_types:
                model_wide[k] = spec.keep_mask(base_freqs[k])
        else:
            for i, t in enumerate(layer_types):
                if t in spec.layer_types:
                    hook_masks[i] = spec.keep_mask(base_freqs[None])
    else:
        for k in keys:
            model_wide[k] = spec.keep_mask(base_freqs[k])

    hook_masks = {i: m for i, m in hook_masks.items() if not all(m)}

    def entry(key: str | None) -> dict[str, Any]:
        return original if key is None else original[key]

    if hook_masks:
        missing = [i for i in hook_masks if i not in parts.attentions]
        if missing:
            raise ValueError(f"No attention module found for layers {missing}; cannot patch them.")

    for k in model_wide:
        if not all(model_wide[k]) and rope_types.base_rope_type(entry(k)) == "longrope":
            rope_types.check_longrope_supported()

    new_rope = copy.deepcopy(original)
    for k in keys:
        if k in model_wide:
            patched = rope_types.patched_rope_parameters(entry(k), model_wide[k], head_dim)
        elif hook_masks:
            patched = rope_types.patched_rope_parameters(entry(k), None, head_dim)
        else:
            continue
        if k is None:
            new_rope = patched
        else:
            new_rope[k] = patched
    return _Plan(spec, original, new_rope, hook_masks)


# ---------------------------------------------------------------------------------------------
# Committing a plan


class PositionMaskHook:
    """Forward pre-hook that stops chosen frequency pairs rotating in one attention layer.

    A picklable class rather than a closure so patched models can be deep-copied,
    pickled for multiprocessing and traced by ``torch.compile``.
    """

    def __init__(self, keep: list[bool], attention_scaling: float) -> None:
        kept = torch.tensor(keep, dtype=torch.bool)
        self.channel_keep = torch.cat([kept, kept])  # HF layout: pair i is channels i and i + d/2
        self.attention_scaling = float(attention_scaling)
        # A stopped pair is passed through only when unscaled; then a prefix can skip the rest.
        self.prefix = rotation.prefix_length(keep) if self.attention_scaling == 1.0 else None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        pe = kwargs.get("position_embeddings")
        if pe is None:
            raise RuntimeError(
                f"hf-prope: {type(module).__name__} was called without position_embeddings=; this transformers "
                "version passes them differently and layer-selective patches cannot apply."
            )
        cos, sin = pe
        keep = self.channel_keep.to(cos.device)
        # What frequency 0 gives in the rotary module: cos(0) * scaling and sin(0) * scaling.
        one = torch.tensor(self.attention_scaling, dtype=torch.float32, device=cos.device).to(cos.dtype)
        kwargs = dict(kwargs)
        masked = (torch.where(keep, cos, one), torch.where(keep, sin, torch.zeros_like(sin)))
        kwargs["position_embeddings"] = masked if self.prefix is None else rotation.tag(*masked, self.prefix)
        return args, kwargs


def _rebind_config(root: nn.Module, old: Any, new: Any) -> None:
    for m in root.modules():
        if m.__dict__.get("config") is old:
            m.config = new


def _copy_rotary_state(target: nn.Module, source: nn.Module) -> None:
    """Make ``target`` compute what ``source`` (freshly built) computes, keeping buffer identity."""
    with torch.no_grad():
        for name, buf in source.named_buffers(recurse=False):
            existing = target._buffers.get(name)
            if existing is not None and existing.shape == buf.shape:
                if existing.device.type != "meta":
                    existing.copy_(buf.to(existing.device))
            else:
                device = existing.device if existing is not None else buf.device
                target.register_buffer(name, buf.to(device), persistent=False)
    for name, value in source.__dict__.items():
        if name.startswith("_") or name in ("config", "training"):
            continue
        if isinstance(value, (int, float, str, dict, list, tuple)) or value is None:
            setattr(target, name, copy.deepcopy(value))
    # longrope caches its long-context frequencies on first use; they belong to the old config.
    for name in [n for n in list(target.__dict__) if n.endswith("long_inv_freq")]:
        delattr(target, name)


def _fix_longrope(rotary: nn.Module, config: Any, keys: list[str | None]) -> None:
    # transformers switches longrope's frequencies only while the module's rope_type is
    # literally "longrope"; keep that name and hand it masked long and short frequencies.
    for key in keys:
        params = config.rope_parameters if key is None else config.rope_parameters[key]
        if params.get("rope_type") not in rope_types.CUSTOM_TYPES or params.get(rope_types.BASE_KEY) != "longrope":
            continue
        extra = {"layer_type": key} if key is not None else {}
        long_freq, _ = rope_types.compute_hf_prope_parameters(
            config, None, seq_len=params["original_max_position_embeddings"] + 1, **extra
        )
        prefix = "" if key is None else f"{key}_"
        setattr(rotary, f"{prefix}long_inv_freq", long_freq.to(_inv_freq(rotary, key).device))
        if key is None:
            rotary.rope_type = "longrope"
        else:
            rotary.rope_type[key] = "longrope"


def _remove_hooks(model: nn.Module) -> None:
    for handle in getattr(model, _HOOKS_ATTR, []):
        handle.remove()
    if _HOOKS_ATTR in model.__dict__:
        delattr(model, _HOOKS_ATTR)


def _attention_scaling(rotary: nn.Module, key: str | None) -> float:
    return float(getattr(rotary, "attention_scaling" if key is None else f"{key}_attention_scaling"))


def _prefixes(rotary: nn.Module, keys: list[str | None]) -> dict[str | None, int]:
    """Rope entries whose rotating pairs are a proper prefix and unscaled: key -> r.

    Read from a freshly built rotary module (on the CPU): the model's own may be on the
    meta device while ``from_pretrained`` builds it.
    """
    out: dict[str | None, int] = {}
    for key in keys:
        r = rotation.prefix_length((_inv_freq(rotary, key) != 0).tolist())
        if r is not None and _attention_scaling(rotary, key) == 1.0:
            out[key] = r
    return out


def _commit(parts: _Parts, new_config: Any, hook_masks: dict[int, list[bool]]) -> None:
    fresh = _build_rotary(parts, new_config)
    keys = _rope_keys(parts)
    _remove_hooks(parts.model)
    for rotary in parts.rotaries:
        _copy_rotary_state(rotary, fresh)
        rotary.config = new_config
        _fix_longrope(rotary, new_config, keys)
    handles = []
    patched = getattr(new_config, CONFIG_KEY, None) is not None
    prefixes = _prefixes(fresh, keys) if patched and rotation.install(parts.arch.modeling_module) else {}
    if hook_masks:
        rotation.install(parts.arch.modeling_module)
    if prefixes:
        tagger = rotation.PrefixTagHook(prefixes)
        handles += [r.register_forward_hook(tagger, with_kwargs=True) for r in parts.rotaries]
    for layer, keep in sorted(hook_masks.items()):
        key = _rope_key_of_layer(parts, layer)
        hook = PositionMaskHook(keep, _attention_scaling(parts.rotaries[0], key))
        handles.append(parts.attentions[layer].register_forward_pre_hook(hook, with_kwargs=True))
    if handles:
        setattr(parts.model, _HOOKS_ATTR, handles)


def _install(parts: _Parts, plan: _Plan | None, *, isolate_config: bool) -> None:
    old = parts.config
    new = copy.deepcopy(old) if isolate_config else old
    if plan is None:
        new.rope_parameters = copy.deepcopy(_original_rope(old))
        if hasattr(new, CONFIG_KEY):
            delattr(new, CONFIG_KEY)
        hook_masks: dict[int, list[bool]] = {}
    else:
        new.rope_parameters = plan.rope_parameters
        setattr(
            new,
            CONFIG_KEY,
            {"spec": plan.spec.to_dict(), "original_rope_parameters": plan.original_rope},
        )
        hook_masks = plan.hook_masks
    if new is not old:
        _rebind_config(parts.root, old, new)
        parts.config = new
    _commit(parts, new, hook_masks)


# ---------------------------------------------------------------------------------------------
# Public API


def patch_model(model: nn.Module, spec: PatchSpec | str = "p-rope", /, **params: Any) -> nn.Module:
    """Patch a loaded model's RoPE in place and return it.

    ``spec`` is a :class:`PatchSpec` or a patch name with its parameters::

        patch_model(model, "p-rope", p=0.25)
        patch_model(model, "p-rope", p=0.25, layer_types=["full_attention"])
        patch_model(model, "freq-mask", keep=[0, 1, 2, 5])
        patch_model(model, "nope", layers=[3, 7, 11])
        patch_model(model, "p-rope", p=0.75, rotate="lowest")   # the paper's control

    Patching a patched model replaces the patch (it is always relative to the
    original RoPE). Everything is validated before the model is touched; on error
    the model is unchanged. The model gets its own copy of its config, so other
    models sharing the config object are not affected. Works on PEFT-wrapped models.
    """
    spec_obj = make_spec(spec, **params)
    parts = _find_parts(model)
    plan = _plan(parts, spec_obj)
    _install(parts, plan, isolate_config=True)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Remove any hf-prope patch: the original rope parameters, frequencies and no hooks."""
    parts = _find_parts(model)
    if getattr(parts.config, CONFIG_KEY, None) is None and not getattr(parts.model, _HOOKS_ATTR, None):
        return model
    _install(parts, None, isolate_config=True)
    return model


def get_patch(model: nn.Module) -> PatchSpec | None:
    """The patch a model carries (read from its config), or ``None``."""
    inner = _unwrap(model)
    state = getattr(getattr(inner, "config", None), CONFIG_KEY, None)
    if not state:
        return None
    if not isinstance(state, dict) or "spec" not in state:
        raise ValueError(f"config.{CONFIG_KEY} is malformed: expected an object with a 'spec' field, got {state!r}.")
    return PatchSpec.from_dict(state["spec"])


def restore_patch(model: nn.Module) -> nn.Module:
    """Re-apply the patch recorded in ``model.config`` (hooks included) after a plain load.

    A plain ``from_pretrained`` rebuilds the frequencies from the config, but cannot
    attach per-layer hooks; this does. A no-op for unpatched models.
    """
    spec = get_patch(model)
    if spec is not None:
        parts = _find_parts(model)
        _install(parts, _plan(parts, spec), isolate_config=False)
    return model


def patch_info(model: nn.Module) -> dict[str, Any]:
    """What the patch does to this model, per rope entry and per hooked layer (for reports and tests)."""
    parts = _find_parts(model)
    keys = _rope_keys(parts)
    info: dict[str, Any] = {"model_type": parts.arch.model_type, "spec": get_patch(model), "frequencies": {}}
    for k in keys:
        info["frequencies"][k or "all"] = _inv_freq(parts.rotaries[0], k).detach().float().cpu()
    taggers = [h for h in parts.rotaries[0]._forward_hooks.values() if isinstance(h, rotation.PrefixTagHook)]
    # Rope entries of which only a prefix of pairs is rotated (hf_prope.rotation): entry -> pairs.
    info["prefix_rotation"] = {k or "all": r for k, r in taggers[0].rotated.items()} if taggers else {}
    info["hooked_layers"] = sorted(
        i for i, att in parts.attentions.items() if any(isinstance(h, PositionMaskHook) for h in att._forward_pre_hooks.values())
    )
    return info


def layer_frequencies(model: nn.Module, *, original: bool = False) -> torch.Tensor:
    """Each decoder layer's rotation frequencies (radians per token), shape ``(num_layers, pairs)``.

    Pair 0 is the highest frequency. By default what each layer rotates by now, patch
    included (0 for a pair that does not rotate, whether by its frequency or by a layer
    hook); with ``original=True``, the model's own frequencies before any patch.
    """
    parts = _find_parts(model)
    n_layers = int(parts.config.num_hidden_layers)
    if original:
        rotary = _build_rotary(parts, _with_rope(parts.config, _original_rope(parts.config)))
    else:
        rotary = parts.rotaries[0]
    rows = []
    for layer in range(n_layers):
        freq = _inv_freq(rotary, _rope_key_of_layer(parts, layer)).detach().float().cpu().clone()
        attention = parts.attentions.get(layer)
        if not original and attention is not None:
            for hook in attention._forward_pre_hooks.values():
                if isinstance(hook, PositionMaskHook):
                    freq = freq * hook.channel_keep[: freq.numel()].to(freq.dtype)
        rows.append(freq)
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# Class level: models built afterwards are patched


@dataclass
class ClassPatch:
    """A class-level patch in force; ``revert()`` restores the class (built models keep theirs)."""

    model_type: str
    spec: PatchSpec
    cls: type
    original_init: Callable[..., None]

    def revert(self) -> None:
        if _CLASS_PATCHES.get(self.model_type) is self:
            self.cls.__init__ = self.original_init  # type: ignore[method-assign]
            del _CLASS_PATCHES[self.model_type]


_CLASS_PATCHES: dict[str, ClassPatch] = {}


def apply_patch_to_class(model_type: str, spec: PatchSpec | str, /, **params: Any) -> ClassPatch:
    """Patch every ``model_type`` model built from now on (e.g. by ``from_pretrained``).

    Replaces any earlier class-level patch of that type. Undo with ``.revert()`` or
    :func:`revert_class_patches`.
    """
    spec_obj = make_spec(spec, **params)
    arch = get_architecture(model_type)
    cls = arch.base_model_class
    previous = _CLASS_PATCHES.get(model_type)
    if previous is not None:
        previous.revert()
    original_init = cls.__init__

    def __init__(self: nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, config, *args, **kwargs)
        parts = _find_parts(self)
        # The config is the one being built with (shared with the enclosing model): patch it in place.
        _install(parts, _plan(parts, spec_obj), isolate_config=False)

    __init__.__wrapped__ = original_init  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]
    patch = ClassPatch(model_type, spec_obj, cls, original_init)
    _CLASS_PATCHES[model_type] = patch
    return patch


def revert_class_patches(model_type: str | None = None) -> None:
    """Undo class-level patches (all, or one model type's)."""
    for mt in [model_type] if model_type else list(_CLASS_PATCHES):
        if mt in _CLASS_PATCHES:
            _CLASS_PATCHES[mt].revert()


def class_patches() -> dict[str, PatchSpec]:
    """Model types with a class-level patch in force, and their specs."""
    return {mt: cp.spec for mt, cp in _CLASS_PATCHES.items()}


def make_arch_functions(model_type: str, name: str | None = None) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``apply_patch_to_<name>`` and ``apply_p_rope_to_<name>`` for one architecture (Liger-style)."""
    name = name or model_type

    def apply_patch(spec: PatchSpec | str = "p-rope", /, *, model: nn.Module | None = None, **params: Any) -> Any:
        if model is not None:
            mt = getattr(getattr(_unwrap(model), "config", None), "model_type", None)
            if mt != model_type:
                raise ValueError(f"This function patches {model_type} models; the model given is {mt!r}.")
            return patch_model(model, spec, **params)
        return apply_patch_to_class(model_type, spec, **params)

    def apply_p_rope(
        p: float,
        *,
        rotate: str = "highest",
        layers: list[int] | None = None,
        layer_types: list[str] | None = None,
        model: nn.Module | None = None,
    ) -> Any:
        extra: dict[str, Any] = {"p": p, "rotate": rotate}
        if layers is not None:
            extra["layers"] = layers
        if layer_types is not None:
            extra["layer_types"] = layer_types
        return apply_patch("p-rope", model=model, **extra)

    apply_patch.__name__ = f"apply_patch_to_{name}"
    apply_patch.__doc__ = (
        f"Patch {model_type} models. With ``model=``, patch that already-built model (see ``patch_model``); "
        f"without, patch the class so {model_type} models built afterwards are patched; returns a ClassPatch "
        "whose ``revert()`` undoes it."
    )
    apply_p_rope.__name__ = f"apply_p_rope_to_{name}"
    apply_p_rope.__doc__ = (
        f"p-RoPE for {model_type}: rotate only the highest fraction ``p`` of frequencies (``rotate='lowest'`` "
        "for the paper's control). With ``model=``, patch that model; without, patch the class."
    )
    return apply_patch, apply_p_rope
