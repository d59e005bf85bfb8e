"""hf-prope's rope types, registered with transformers' own extension points.

A patched model's ``config.rope_parameters`` must say what the model computes, so
that ``save_pretrained`` -> ``from_pretrained`` rebuilds it. Two ways:

* transformers' native ``"proportional"`` type (5.5+), used whenever it expresses
  the patch exactly (a kept prefix of a plain ``"default"`` RoPE), so the saved
  model loads in plain transformers with hf-prope not installed;
* otherwise the ``"hf_prope"`` type registered here in ``ROPE_INIT_FUNCTIONS``:
  the model's own rope type (``hf_prope_base_type``) computes the frequencies,
  scaling included, and the pairs not listed in ``hf_prope_keep`` are set to 0.
  A base type that recomputes at run time ("dynamic") needs "dynamic" in the
  name for transformers to keep calling it, hence ``"hf_prope_dynamic"``.

Loading a checkpoint with an hf_prope type without hf-prope installed fails with
transformers' ``KeyError`` instead of silently giving a plain-RoPE model.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from transformers import modeling_rope_utils as mru

from .spec import rotated_pairs

CUSTOM_TYPE = "hf_prope"
CUSTOM_DYNAMIC_TYPE = "hf_prope_dynamic"
CUSTOM_TYPES = (CUSTOM_TYPE, CUSTOM_DYNAMIC_TYPE)
BASE_KEY = "hf_prope_base_type"
KEEP_KEY = "hf_prope_keep"
NATIVE_TYPE = "proportional"


def has_native_proportional() -> bool:
    """Whether the installed transformers has the native p-RoPE type (5.5+)."""
    return NATIVE_TYPE in mru.ROPE_INIT_FUNCTIONS


LONGROPE_MIN_TRANSFORMERS = "5.22"


def check_longrope_supported() -> None:
    """Masks on longrope need transformers to honour a cached ``long_inv_freq`` (5.22+).

    Earlier releases recompute the long-context frequencies from the config on every
    long input, which would silently drop the mask there; refuse instead.
    """
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(LONGROPE_MIN_TRANSFORMERS):
        raise ValueError(
            f"Masking a 'longrope' model needs transformers >= {LONGROPE_MIN_TRANSFORMERS} (installed: "
            f"{transformers.__version__}); older releases recompute longrope's long-context frequencies "
            "on every long input and would drop the mask there. Upgrade transformers."
        )


def custom_type_for(base_type: str) -> str:
    return CUSTOM_DYNAMIC_TYPE if "dynamic" in base_type else CUSTOM_TYPE


def base_rope_type(params: dict[str, Any]) -> str:
    rope_type = params.get("rope_type", params.get("type", "default"))
    return params.get(BASE_KEY, rope_type) if rope_type in CUSTOM_TYPES else rope_type


def _rope_params(config: Any, layer_type: str | None) -> dict[str, Any]:
    params = config.rope_parameters
    return params[layer_type] if layer_type is not None else params


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _default_frequencies(config: Any, device: Any, layer_type: str | None) -> torch.Tensor:
    # Prefer the model's own default computation; fall back to the textbook formula for
    # configs whose architecture is not registered (the two agree for every registered one).
    from .registry import find_architecture

    arch = find_architecture(getattr(config, "model_type", ""))
    if arch is not None:
        fn = arch.rotary_class.compute_default_rope_parameters
        kwargs: dict[str, Any] = {"device": device}
        if layer_type is not None:
            kwargs["layer_type"] = layer_type
        inv_freq, _ = fn(config, **kwargs)
        return inv_freq.to(device) if device is not None else inv_freq
    theta = _rope_params(config, layer_type)["rope_theta"]
    dim = _head_dim(config)
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))


def compute_hf_prope_parameters(
    config: Any,
    device: Any = None,
    seq_len: int | None = None,
    layer_type: str | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, float]:
    """``ROPE_INIT_FUNCTIONS`` entry: the base type's frequencies with unkept pairs set to 0."""
    params = _rope_params(config, layer_type)
    base = params[BASE_KEY]
    extra = {"layer_type": layer_type} if layer_type is not None else {}
    if base == "default":
        inv_freq, scaling = _default_frequencies(config, device, layer_type), 1.0
    else:
        inv_freq, scaling = mru.ROPE_INIT_FUNCTIONS[base](config, device, seq_len=seq_len, **extra)
    keep = params.get(KEEP_KEY)
    if keep is not None:
        inv_freq = apply_keep(inv_freq, keep)
    elif not _SILENCE_SELECTIVE_WARNING:
        warnings.warn(
            "This model's config records a layer-selective hf-prope patch (only some layers changed), which "
            "a rope type alone cannot express; the model was built with its base RoPE on every layer. Load it "
            "with hf_prope.from_pretrained(...) or call hf_prope.restore_patch(model) to apply the patch.",
            UserWarning,
            stacklevel=2,
        )
    return inv_freq, scaling


def apply_keep(inv_freq: torch.Tensor, keep: list[int]) -> torch.Tensor:
    mask = torch.zeros(inv_freq.shape[-1], dtype=torch.bool, device=inv_freq.device)
    if keep:
        mask[torch.tensor(keep, dtype=torch.long, device=inv_freq.device)] = True
    return torch.where(mask, inv_freq, torch.zeros((), dtype=inv_freq.dtype, device=inv_freq.device))


_SILENCE_SELECTIVE_WARNING = False


class silence_selective_warning:
    """While hf-prope itself builds rotary modules, the per-layer part is applied by hooks."""

    def __enter__(self) -> None:
        global _SILENCE_SELECTIVE_WARNING
        self._prev = _SILENCE_SELECTIVE_WARNING
        _SILENCE_SELECTIVE_WARNING = True

    def __exit__(self, *exc: Any) -> None:
        global _SILENCE_SELECTIVE_WARNING
        _SILENCE_SELECTIVE_WARNING = self._prev


def _validate_hf_prope_rope_parameters(self: Any, rope_parameters: dict[str, Any], ignore_keys: Any = None) -> None:
    base = rope_parameters.get(BASE_KEY)
    if base is None:
        raise KeyError(f"rope_parameters of type {rope_parameters.get('rope_type')!r} need {BASE_KEY!r}.")
    if base != "default" and base not in mru.ROPE_INIT_FUNCTIONS or base in CUSTOM_TYPES:
        raise ValueError(f"{BASE_KEY}={base!r} is not a rope type this transformers knows.")
    keep = rope_parameters.get(KEEP_KEY)
    if keep is not None and not (isinstance(keep, list) and all(isinstance(i, int) and i >= 0 for i in keep)):
        raise ValueError(f"{KEEP_KEY} must be a list of non-negative pair indices, got {keep!r}.")
    inner = {k: v for k, v in rope_parameters.items() if k not in (BASE_KEY, KEEP_KEY)}
    inner["rope_type"] = base
    validator = getattr(self, f"_validate_{base}_rope_parameters", None)
    if validator is not None:
        validator(inner, ignore_keys=ignore_keys)


def register_rope_types() -> None:
    """Idempotently add hf-prope's rope types and their validators to transformers."""
    for name in CUSTOM_TYPES:
        mru.ROPE_INIT_FUNCTIONS.setdefault(name, compute_hf_prope_parameters)
        setattr(mru.RotaryEmbeddingConfigMixin, f"_validate_{name}_rope_parameters", _validate_hf_prope_rope_parameters)


# A factor that float32 turns into inf: longrope's 1 / (factor * theta^(2i/d)) is then exactly 0.
STOPPED_FACTOR = 1e300


def longrope_encoding(original: dict[str, Any], keep: list[bool], max_positions: int) -> dict[str, Any] | None:
    """A frequency mask written as transformers' own ``longrope`` type, or ``None`` where it cannot be.

    For configs whose class accepts no other rope type (Phi-3's: ``default`` and ``longrope``
    only): a stopped pair gets the factor :data:`STOPPED_FACTOR` (frequency exactly 0), a kept one
    1.0 (the ``default`` frequency, bit for bit) or its own longrope factor, with no
    attention scaling added. Plain transformers builds it, with or without hf-prope.
    """
    base = base_rope_type(original)
    if base == "default":
        out = {k: v for k, v in original.items() if k not in ("type", "rope_type")}
        short = long = [1.0] * len(keep)
        out.update({"original_max_position_embeddings": int(max_positions), "factor": 1.0, "attention_factor": 1.0})
    elif base == "longrope" and "rope_type" in original:
        out = copy.deepcopy(original)
        short, long = list(original["short_factor"]), list(original["long_factor"])
        if len(short) != len(keep) or len(long) != len(keep):
            return None
    else:
        return None
    out["rope_type"] = "longrope"
    out["short_factor"] = [float(f) if k else STOPPED_FACTOR for f, k in zip(short, keep, strict=True)]
    out["long_factor"] = [float(f) if k else STOPPED_FACTOR for f, k in zip(long, keep, strict=True)]
    return out


def patched_rope_parameters(
    original: dict[str, Any], keep: list[bool] | None, head_dim: int, *, allow_native: bool = True
) -> dict[str, Any]:
    """The rope parameters for one (flat or per-layer-type) entry under a frequency mask.

    ``keep=None`` marks a layer-selective patch: the frequencies stay the base ones
    (hooks mask chosen layers) but the type still names hf-prope, so the checkpoint
    cannot silently load as plain RoPE.
    """
    original = copy.deepcopy(original)
    base = base_rope_type(original)
    if keep is not None and all(keep):
        return original
    if keep is not None and allow_native and base == "default" and has_native_proportional():
        r = sum(keep)
        if keep == [i < r for i in range(len(keep))]:
            p = 2 * r / head_dim
            if rotated_pairs(p, head_dim) == r:
                out = {"rope_type": NATIVE_TYPE, "rope_theta": original["rope_theta"], "partial_rotary_factor": p}
                return out
    out = {k: v for k, v in original.items() if k not in ("type",)}
    out["rope_type"] = custom_type_for(base)
    out[BASE_KEY] = base
    out[KEEP_KEY] = None if keep is None else [i for i, k in enumerate(keep) if k]
    return out
