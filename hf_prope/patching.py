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

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import rope_types, rotation
from .spec import PatchSpec, make_spec
from .state import (
    APPLIED_ATTR,
    CONFIG_KEY,
    ModelParts,
    check_layer_indices,
    check_layer_types,
    get_patch,
    model_parts,
    original_rope_parameters,
    recorded_patch,
)

_HOOKS_ATTR = "_hf_prope_hook_handles"
_ORIGINAL_ATTR = "_hf_prope_original_rotary"  # (config it belongs to, original config, original rotary)


# ---------------------------------------------------------------------------------------------
# Planning: everything is computed and validated before the model is touched


@dataclass
class _Plan:
    spec: PatchSpec
    original_rope: dict[str, Any]
    rope_parameters: dict[str, Any]
    # layer -> kept pairs, or for a head-mask kept pairs per KV head ([kv head][pair])
    hook_masks: dict[int, Any] = field(default_factory=dict)
    # layer -> what must still rotate there once applied (what the generic path's probe checks)
    layer_keep: dict[int, torch.Tensor] = field(default_factory=dict)


def _with_rope(config: Any, rope_parameters: dict[str, Any]) -> Any:
    cfg = copy.deepcopy(config)
    cfg.rope_parameters = copy.deepcopy(rope_parameters)
    if hasattr(cfg, CONFIG_KEY):
        delattr(cfg, CONFIG_KEY)
    return cfg


def _build_rotary(parts: ModelParts, config: Any) -> nn.Module:
    # Built on the CPU whatever the ambient default device: it is only a source of values.
    with torch.device("cpu"), rope_types.silence_selective_warning():
        return parts.arch.rotary_class(config)


def _inv_freq(rotary: nn.Module, key: str | None) -> torch.Tensor:
    return getattr(rotary, "inv_freq" if key is None else f"{key}_inv_freq")


def _kv_heads(parts: ModelParts, layer: int) -> int:
    attention = parts.attentions.get(layer)
    config = getattr(attention, "config", None) or parts.config
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    if not heads:
        raise ValueError(
            f"Cannot tell how many key/value heads layer {layer} has (no num_key_value_heads in its config)."
        )
    return int(heads)


def _plan(parts: ModelParts, spec: PatchSpec) -> _Plan:
    original = original_rope_parameters(parts.config)
    base_rotary = _build_rotary(parts, _with_rope(parts.config, original))
    keys = parts.rope_keys()
    base_freqs = {k: _inv_freq(base_rotary, k).detach().float().cpu().tolist() for k in keys}
    # Rotated head size per rope entry (Gemma 4's global layers have wider heads than its sliding ones).
    head_dims = {k: 2 * len(v) for k, v in base_freqs.items()}
    head_dim = next(iter(head_dims.values()))
    n_layers = parts.num_layers
    layer_types = parts.layer_types

    model_wide: dict[str | None, list[bool]] = {}
    hook_masks: dict[int, Any] = {}
    if spec.is_per_head:
        if len(set(head_dims.values())) > 1:
            raise ValueError(
                f"This {parts.arch.model_type} model's layer types rotate different numbers of pairs "
                f"({ {k: d // 2 for k, d in head_dims.items()} }), which a head-mask (one pair count for every "
                "head) cannot describe; use p-rope or freq-mask with layer_types= instead."
            )
        kv_heads = [_kv_heads(parts, i) for i in range(n_layers)]
        for i, heads in enumerate(spec.head_masks(kv_heads, head_dim // 2)):
            if i in parts.attentions and not all(all(m) for m in heads):
                hook_masks[i] = heads
        if hook_masks and not rotation.install(parts.arch.modeling_module):
            raise ValueError(
                f"A head-mask needs hf-prope's rotary function in {parts.arch.modeling_module}, but its "
                "apply_rotary_pos_emb has another signature or was replaced (a Hub kernel, another library); "
                "use a per-layer patch (p-rope, freq-mask) instead."
            )
    elif spec.layers is not None:
        check_layer_indices(spec.layers, n_layers)
        for i in spec.layers:
            hook_masks[i] = spec.keep_mask(base_freqs[parts.rope_key_of_layer(i)])
    elif spec.layer_types is not None:
        check_layer_types(spec.layer_types, layer_types, parts.arch.model_type)
        assert layer_types is not None
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

    if not spec.is_per_head:
        hook_masks = {i: m for i, m in hook_masks.items() if not all(m)}

    def entry(key: str | None) -> dict[str, Any]:
        return original if key is None else original[key]

    if hook_masks:
        missing = [i for i in hook_masks if i not in parts.attentions]
        if missing:
            raise ValueError(
                f"Layers {missing} have no rotary attention module (in a hybrid model: linear-attention or "
                f"recurrent layers); the layers with one are {sorted(parts.attentions)}."
            )

    for k in model_wide:
        if not all(model_wide[k]) and rope_types.base_rope_type(entry(k)) == "longrope":
            rope_types.check_longrope_supported()

    if hook_masks and parts.arch.generic:
        _check_hook_layout(parts, base_rotary)

    new_rope = _new_rope(parts, original, model_wide, bool(hook_masks), head_dims, base_freqs)
    layer_keep: dict[int, torch.Tensor] = {}
    for i in range(n_layers):
        key = parts.rope_key_of_layer(i)
        if i in hook_masks:
            layer_keep[i] = torch.tensor(hook_masks[i], dtype=torch.bool, device="cpu")
        else:
            keep = model_wide.get(key, [True] * (head_dims[key] // 2))
            layer_keep[i] = torch.tensor(keep, dtype=torch.bool, device="cpu")
    return _Plan(spec, original, new_rope, hook_masks, layer_keep)


def _new_rope(
    parts: ModelParts,
    original: dict[str, Any],
    model_wide: dict[str | None, list[bool]],
    hooked: bool,
    head_dims: dict[str | None, int],
    base_freqs: dict[str | None, list[float]],
) -> dict[str, Any]:
    """The patched ``rope_parameters``: native ``proportional`` where it builds exactly the masked frequencies."""

    def entry(key: str | None) -> dict[str, Any]:
        return original if key is None else original[key]

    def build(allow_native: bool) -> dict[str, Any]:
        new_rope = copy.deepcopy(original)
        for k in parts.rope_keys():
            if k in model_wide:
                patched = rope_types.patched_rope_parameters(
                    entry(k), model_wide[k], head_dims[k], allow_native=allow_native
                )
            elif hooked:
                patched = rope_types.patched_rope_parameters(entry(k), None, head_dims[k])
            else:
                continue
            if k is None:
                new_rope = patched
            else:
                new_rope[k] = patched
        return new_rope

    new_rope = _accepted(parts, original, model_wide, hooked, build(True))
    native = [
        k for k in model_wide if (new_rope if k is None else new_rope[k]).get("rope_type") == rope_types.NATIVE_TYPE
    ]
    if native:
        # "proportional" reads the head size from the config: a partial-rotary model (Phi-3, GPT-NeoX...)
        # would get other frequencies. Keep it only where it builds exactly the masked ones.
        built = _build_rotary(parts, _with_rope(parts.config, new_rope))
        for k in native:
            want = torch.tensor(base_freqs[k], device="cpu") * torch.tensor(
                model_wide[k], dtype=torch.float32, device="cpu"
            )
            got = _inv_freq(built, k).detach().float().cpu()
            if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-6, atol=0):
                return _accepted(parts, original, model_wide, hooked, build(False))
    return new_rope


def _rejection(config: Any, rope_parameters: dict[str, Any]) -> str | None:
    """Why the config's class refuses these rope parameters (its own ``validate_rope``), or ``None``."""
    validate = getattr(config, "validate_rope", None)
    if validate is None:
        return None

    def why(params: Any) -> str | None:
        try:
            with rope_types.silence_selective_warning():
                _with_rope(config, params).validate_rope()
        except (ValueError, KeyError, TypeError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    refused = why(rope_parameters)
    # A validator that refuses the model's own parameters too (transformers 5.0 on a YaRN-extended Gemma 3)
    # says nothing about the patch.
    return None if refused is None or why(config.rope_parameters) is not None else refused


def _accepted(
    parts: ModelParts,
    original: dict[str, Any],
    model_wide: dict[str | None, list[bool]],
    hooked: bool,
    new_rope: dict[str, Any],
) -> dict[str, Any]:
    """``new_rope``, or the same masks in transformers' ``longrope`` where the config class takes no other type."""
    why = _rejection(parts.config, new_rope)
    if why is None:
        return new_rope
    encoded = None if hooked else copy.deepcopy(original)
    max_positions = getattr(parts.config, "max_position_embeddings", None)
    for k, keep in model_wide.items():
        if encoded is None or not max_positions:
            encoded = None
            break
        entry = rope_types.longrope_encoding(original if k is None else original[k], keep, max_positions)
        if entry is None:
            encoded = None
        elif k is None:
            encoded = entry
        else:
            encoded[k] = entry
    # Older releases recompute longrope's frequencies from the config on long inputs: the mask is in it.
    if encoded is not None and _rejection(parts.config, encoded) is None:
        return encoded
    raise ValueError(
        f"{type(parts.config).__name__} refuses the patched rope parameters ({why}), and the patch cannot be "
        "written as its 'longrope' type either (only a mask on every layer over 'default' or 'longrope' RoPE "
        "can). Patch every layer with a frequency patch (no layers= / layer_types= / head masks)."
    )


def _check_hook_layout(parts: ModelParts, rotary: nn.Module) -> None:
    from .generic import rotary_layout

    for key in parts.rope_keys():
        layout = rotary_layout(rotary, key)
        n = int(_inv_freq(rotary, key).shape[-1])
        if layout is None or not torch.equal(layout, torch.arange(2 * n) % n):
            raise ValueError(
                f"{parts.arch.rotary_class_name} does not return cos/sin with pair i in channels i and i + d/2, "
                "so a patch on some layers or heads only cannot be applied by masking them; patch every layer "
                "(a frequency patch without layers= / layer_types=)."
            )


# ---------------------------------------------------------------------------------------------
# Committing a plan


class PositionMaskHook:
    """Forward pre-hook that stops chosen frequency pairs rotating in one attention layer.

    ``keep`` is one flag per pair (the whole layer), or one list of flags per key/value head
    (a head-mask): then the cos/sin handed on are per KV head and per pair, ``(batch, kv heads,
    tokens, d/2)``, tagged for :mod:`hf_prope.rotation`'s per-head path, which gives each query
    head its group's.
    A picklable class rather than a closure so patched models can be deep-copied,
    pickled for multiprocessing and traced by ``torch.compile``.
    """

    def __init__(
        self, keep: list[bool] | list[list[bool]], attention_scaling: float, modeling_module: str = ""
    ) -> None:
        kept = torch.tensor(keep, dtype=torch.bool)
        self.channel_keep = torch.cat([kept, kept], dim=-1)  # HF layout: pair i is channels i and i + d/2
        self.per_head = kept.dim() == 2
        self.modeling_module = modeling_module
        self.attention_scaling = float(attention_scaling)
        # A stopped pair is passed through only when unscaled; then a prefix can skip the rest.
        self.prefix = (
            rotation.prefix_length(keep) if self.attention_scaling == 1.0 and not self.per_head else None  # type: ignore[arg-type]
        )
        self.active = True  # off while original_rope() runs the unpatched model

    def layer_keep(self) -> torch.Tensor:
        """Per pair: whether it rotates in this layer (for a head-mask: in any of its heads)."""
        n = self.channel_keep.shape[-1] // 2
        keep = self.channel_keep[..., :n]
        return keep.any(dim=0) if self.per_head else keep

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        if not getattr(self, "active", True):
            return None
        if "position_embeddings" in kwargs and kwargs["position_embeddings"] is None:
            return None  # a NoPE call of a hybrid model (Lara mini's full-attention layers): nothing rotates
        pe = kwargs.get("position_embeddings")
        if pe is None:
            raise RuntimeError(
                f"hf-prope: {type(module).__name__} was called without position_embeddings=; this transformers "
                "version passes them differently and layer-selective patches cannot apply."
            )
        cos, sin = pe
        # What frequency 0 gives in the rotary module: cos(0) * scaling and sin(0) * scaling.
        one = torch.tensor(self.attention_scaling, dtype=torch.float32, device=cos.device).to(cos.dtype)
        zero = torch.zeros((), dtype=sin.dtype, device=sin.device)
        kwargs = dict(kwargs)
        if self.per_head:
            if not rotation.is_installed(self.modeling_module):
                raise RuntimeError(
                    "hf-prope: this layer's head-mask needs hf-prope's rotary function, which was uninstalled "
                    "(hf_prope.rotation.uninstall); patch the model again to put it back."
                )
            if cos.dim() == 2:
                cos, sin = cos[None], sin[None]
            # One value per pair (both channels of a pair hold it): half the work of full width.
            half = cos.shape[-1] // 2
            # (kv heads, 1, d/2) against (batch, 1, tokens, d/2)
            keep = self.channel_keep[:, None, :half].to(cos.device)
            cos, sin = cos[..., :half].unsqueeze(-3), sin[..., :half].unsqueeze(-3)
            kwargs["position_embeddings"] = rotation.tag_heads(
                torch.where(keep, cos, one), torch.where(keep, sin, zero)
            )
            return args, kwargs
        keep = self.channel_keep.to(cos.device)
        masked = torch.where(keep, cos, one), torch.where(keep, sin, zero)
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


def _commit(parts: ModelParts, new_config: Any, hook_masks: dict[int, Any]) -> None:
    fresh = _build_rotary(parts, new_config)
    keys = parts.rope_keys()
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
        key = parts.rope_key_of_layer(layer)
        hook = PositionMaskHook(keep, _attention_scaling(parts.rotaries[0], key), parts.arch.modeling_module)
        handles.append(parts.attentions[layer].register_forward_pre_hook(hook, with_kwargs=True))
    if handles:
        setattr(parts.model, _HOOKS_ATTR, handles)
    record = getattr(new_config, CONFIG_KEY, None)
    if record is not None:
        parts.model.__dict__[APPLIED_ATTR] = PatchSpec.from_dict(record["spec"])
    else:
        parts.model.__dict__.pop(APPLIED_ATTR, None)


def _install(parts: ModelParts, plan: _Plan | None, *, isolate_config: bool) -> None:
    if plan is not None and parts.arch.generic:
        _install_checked(parts, plan, isolate_config=isolate_config)
        return
    _install_unchecked(parts, plan, isolate_config=isolate_config)


def _on_meta(module: nn.Module) -> bool:
    return any(b.device.type == "meta" for b in module.buffers())


def _install_checked(parts: ModelParts, plan: _Plan, *, isolate_config: bool) -> None:
    """Apply ``plan`` on a generic model type, probe it, and put the previous state back if the probe fails."""
    from .generic import RotationCheckError, check_rotation

    old_config = parts.config
    previous = (
        recorded_patch(parts.model) if getattr(parts.model, _HOOKS_ATTR, None) or get_patch(parts.model) else None
    )
    if isolate_config:
        _install_unchecked(parts, plan, isolate_config=True)
    else:
        snapshot = copy.deepcopy(old_config)
        _install_unchecked(parts, plan, isolate_config=False)
    original = _build_rotary(parts, _with_rope(parts.config, plan.original_rope))
    current = _build_rotary(parts, parts.config) if _on_meta(parts.rotaries[0]) else None
    try:
        check_rotation(parts, original, plan.layer_keep, current_rotary=current)
    except Exception as error:
        if isolate_config:
            _rebind_config(parts.root, parts.config, old_config)
            parts.config = old_config
        else:
            for name, value in vars(snapshot).items():
                setattr(old_config, name, value)
            if not hasattr(snapshot, CONFIG_KEY) and hasattr(old_config, CONFIG_KEY):
                delattr(old_config, CONFIG_KEY)
        _commit(parts, parts.config, _plan(parts, previous).hook_masks if previous is not None else {})
        reason = str(error) if isinstance(error, RotationCheckError) else f"{type(error).__name__}: {error}"
        raise RotationCheckError(
            f"hf-prope patches {parts.arch.model_type} through transformers' standard rotary contract (no "
            f"hand-written record), and its check of the patched rotation failed: {reason}. The model was left "
            "as it was. Please report this model type."
        ) from error


def _install_unchecked(parts: ModelParts, plan: _Plan | None, *, isolate_config: bool) -> None:
    old = parts.config
    new = copy.deepcopy(old) if isolate_config else old
    if plan is None:
        new.rope_parameters = copy.deepcopy(original_rope_parameters(old))
        if hasattr(new, CONFIG_KEY):
            delattr(new, CONFIG_KEY)
        hook_masks: dict[int, Any] = {}
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
    parts = model_parts(model)
    plan = _plan(parts, spec_obj)
    _install(parts, plan, isolate_config=True)
    return model


def check_patch(model: nn.Module, spec: PatchSpec | str = "p-rope", /, **params: Any) -> PatchSpec:
    """Validate a patch against a model without applying it; returns the spec.

    Raises exactly what :func:`patch_model` would (layers out of range, an unknown layer
    type, a head too small for ``p``...), so an entry point can check all of its input before
    any work. The model is not touched.
    """
    spec_obj = make_spec(spec, **params)
    _plan(model_parts(model), spec_obj)
    return spec_obj


def check_model(model: nn.Module) -> None:
    """Check, on copies of its attention layers, that the model's queries and keys rotate exactly as its patch says.

    The probe the generic path (:mod:`hf_prope.generic`) runs whenever it patches a model type
    that has no hand-written record; it works on any supported model, patched or not (then every
    pair must rotate as the original's). Raises :class:`~hf_prope.generic.RotationCheckError`
    naming the layer, head and channels that differ. The model is not changed.
    """
    from .generic import check_rotation

    parts = model_parts(model)
    plan = _plan(parts, get_patch(model) or PatchSpec("rope"))
    original = _build_rotary(parts, _with_rope(parts.config, plan.original_rope))
    current = _build_rotary(parts, parts.config) if _on_meta(parts.rotaries[0]) else None
    check_rotation(parts, original, plan.layer_keep, current_rotary=current)


def unpatch_model(model: nn.Module) -> nn.Module:
    """Remove any hf-prope patch: the original rope parameters, frequencies and no hooks."""
    parts = model_parts(model)
    if recorded_patch(parts.model) is None and not getattr(parts.model, _HOOKS_ATTR, None):
        return model
    _install(parts, None, isolate_config=True)
    return model


def patch_while_building(model: nn.Module, spec: PatchSpec) -> nn.Module:
    """Patch a model from inside its own construction, writing into the config it is being built with.

    :func:`patch_model` gives the model its own copy of its config; a model still being built
    (class-level patching, :mod:`hf_prope.class_patching`) shares its config with the
    enclosing model, which must see the patch too.
    """
    parts = model_parts(model)
    _install(parts, _plan(parts, spec), isolate_config=False)
    return model


def restore_patch(model: nn.Module) -> nn.Module:
    """Re-apply the patch recorded in ``model.config`` (hooks included) after a plain load.

    A plain ``from_pretrained`` rebuilds the frequencies from the config, but cannot
    attach per-layer hooks; this does. A no-op for unpatched models.
    """
    spec = recorded_patch(model)
    if spec is not None:
        parts = model_parts(model)
        _install(parts, _plan(parts, spec), isolate_config=False)
    return model


def _snapshot(rotary: nn.Module) -> dict[str, Any]:
    """Everything of a rotary module that a patch sets: buffers, plain attributes, cached tensors, config."""
    return {
        "buffers": {name: buf.detach().clone() for name, buf in rotary.named_buffers(recurse=False)},
        "attrs": {
            k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
            for k, v in rotary.__dict__.items()
            if not k.startswith("_")
            and k not in ("training",)
            and (isinstance(v, (int, float, str, dict, list, tuple, torch.Tensor)) or v is None)
        },
        "config": rotary.config,
    }


def _restore(rotary: nn.Module, snap: dict[str, Any]) -> None:
    with torch.no_grad():
        for name, buf in snap["buffers"].items():
            current = rotary._buffers.get(name)
            if current is not None and current.shape == buf.shape:
                current.copy_(buf)
            else:
                rotary.register_buffer(name, buf, persistent=False)
    for name in [k for k, v in rotary.__dict__.items() if isinstance(v, torch.Tensor) and k not in snap["attrs"]]:
        delattr(rotary, name)  # caches the original RoPE created (longrope's long frequencies)
    for name, value in snap["attrs"].items():
        setattr(rotary, name, value)
    rotary.config = snap["config"]


@contextlib.contextmanager
def original_rope(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with its original RoPE inside the block; its patch is back, bit for bit, after it.

    No copy of the model is made: the rotary modules' frequencies (and the config they read)
    are swapped for the original ones and the patch's layer hooks and prefix tags are switched
    off, then everything is put back, even on error. This is how a patched model serves as
    its own unpatched teacher (self-distillation); with PEFT, combine it with
    ``peft_model.disable_adapter()`` for the base model itself. A no-op on an unpatched model.
    """
    parts = model_parts(model)
    if get_patch(model) is None:
        yield model
        return
    # Built once per patch (the config object changes with every patch) and kept on the rotary's
    # device, so a training loop that enters this every step does no CPU work and no transfer.
    cached = parts.model.__dict__.get(_ORIGINAL_ATTR)
    if cached is not None and cached[0] is parts.config:
        _, original_config, reference = cached
    else:
        original_config = _with_rope(parts.config, original_rope_parameters(parts.config))
        reference = _build_rotary(parts, original_config)
        device = next(iter(parts.rotaries[0].buffers())).device
        if device.type != "meta":
            reference.to(device)
        parts.model.__dict__[_ORIGINAL_ATTR] = (parts.config, original_config, reference)
    hooks = [h for r in parts.rotaries for h in r._forward_hooks.values() if isinstance(h, rotation.PrefixTagHook)]
    hooks += [
        h for a in parts.attentions.values() for h in a._forward_pre_hooks.values() if isinstance(h, PositionMaskHook)
    ]
    snapshots = [_snapshot(r) for r in parts.rotaries]
    try:
        for rotary in parts.rotaries:
            _copy_rotary_state(rotary, reference)
            rotary.config = original_config
        for hook in hooks:
            hook.active = False
        yield model
    finally:
        for hook in hooks:
            hook.active = True
        for rotary, snap in zip(parts.rotaries, snapshots):
            _restore(rotary, snap)


def patch_info(model: nn.Module) -> dict[str, Any]:
    """What the patch does to this model, per rope entry and per hooked layer (for reports and tests)."""
    parts = model_parts(model)
    keys = parts.rope_keys()
    info: dict[str, Any] = {"model_type": parts.arch.model_type, "spec": get_patch(model), "frequencies": {}}
    for k in keys:
        info["frequencies"][k or "all"] = _inv_freq(parts.rotaries[0], k).detach().float().cpu()
    taggers = [h for h in parts.rotaries[0]._forward_hooks.values() if isinstance(h, rotation.PrefixTagHook)]
    # Rope entries of which only a prefix of pairs is rotated (hf_prope.rotation): entry -> pairs.
    info["prefix_rotation"] = {k or "all": r for k, r in taggers[0].rotated.items()} if taggers else {}
    info["hooked_layers"] = sorted(
        i
        for i, att in parts.attentions.items()
        if any(isinstance(h, PositionMaskHook) for h in att._forward_pre_hooks.values())
    )
    return info


def layer_frequencies(model: nn.Module, *, original: bool = False) -> torch.Tensor:
    """Each decoder layer's rotation frequencies (radians per token), shape ``(num_layers, pairs)``.

    Pair 0 is the highest frequency; a layer with fewer pairs (Gemma 4's sliding layers) is
    padded with 0. By default what each layer rotates by now, patch
    included (0 for a pair that does not rotate, whether by its frequency or by a layer
    hook); with ``original=True``, the model's own frequencies before any patch.
    """
    parts = model_parts(model)
    n_layers = parts.num_layers
    if original:
        rotary = _build_rotary(parts, _with_rope(parts.config, original_rope_parameters(parts.config)))
    else:
        rotary = parts.rotaries[0]
    rows = []
    for layer in range(n_layers):
        freq = _inv_freq(rotary, parts.rope_key_of_layer(layer)).detach().float().cpu().clone()
        attention = parts.attentions.get(layer)
        if not original and attention is not None:
            for hook in attention._forward_pre_hooks.values():
                if isinstance(hook, PositionMaskHook):
                    freq = freq * hook.layer_keep().to(freq.dtype)
        if not parts.rotates(layer):
            freq = torch.zeros_like(freq)
        rows.append(freq)
    return _padded(rows)


def _padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """Rows stacked, the shorter padded with 0 (Gemma 4's sliding layers rotate fewer pairs than its global ones)."""
    width = max(r.shape[-1] for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows])


def head_frequencies(model: nn.Module) -> torch.Tensor:
    """What each KV head of each decoder layer rotates pair ``i`` by now, shape ``(layers, kv heads, pairs)``.

    Equal across the heads of a layer except under a head-mask (0 where a head's pair is stopped).
    """
    parts = model_parts(model)
    current = layer_frequencies(model)
    rows = []
    for layer in range(parts.num_layers):
        freq = current[layer].expand(_kv_heads(parts, layer), -1).clone()
        attention = parts.attentions.get(layer)
        for hook in attention._forward_pre_hooks.values() if attention is not None else ():
            if isinstance(hook, PositionMaskHook) and hook.per_head:
                rotary = _inv_freq(parts.rotaries[0], parts.rope_key_of_layer(layer)).detach().float().cpu()
                freq = rotary * hook.channel_keep[:, : rotary.numel()].to(freq.dtype)
        rows.append(freq)
    return torch.stack(rows)


def set_base_rope(model: nn.Module, rope_parameters: dict[str, Any], key: str, record: dict[str, Any] | None) -> None:
    """Give an unpatched model other rope parameters (its own copy of the config), with ``record`` under ``key``.

    The rotary modules are rebuilt from the new config by transformers' own rotary class, as a
    patch's are. :mod:`hf_prope.context_extension` uses this for its base RoPE types.
    """
    parts = model_parts(model)
    if getattr(parts.config, CONFIG_KEY, None) is not None:
        raise RuntimeError("set_base_rope needs an unpatched model; unpatch it first.")
    old = parts.config
    new = copy.deepcopy(old)
    new.rope_parameters = copy.deepcopy(rope_parameters)
    if record is None:
        if hasattr(new, key):
            delattr(new, key)
    else:
        setattr(new, key, copy.deepcopy(record))
    _rebind_config(parts.root, old, new)
    parts.config = new
    _commit(parts, new, {})
