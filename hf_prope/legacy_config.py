"""The top-level rope keys that readers of the transformers-4 config layout use, on every save of a patched model.

transformers 5 writes only ``rope_parameters``; mlx-lm (and other readers of the older
layout) read ``rope_theta`` and ``rope_scaling`` at the top of ``config.json`` and take
defaults when they are missing: theta 10000 and every pair rotating, silently. So the config of
a model that carries an hf-prope patch (``config.hf_prope``) also serialises, derived from its
``rope_parameters`` whenever it is written (never stored, so never stale):

* ``rope_theta`` and ``rope_scaling`` (the whole ``rope_parameters`` entry). A native
  ``"proportional"`` patch then runs exactly in mlx-lm (its ``ProportionalRoPE``); an hf-prope
  rope type makes mlx-lm raise ``Unsupported RoPE type hf_prope``.
* Gemma 3 (``rope_parameters`` by layer type): ``rope_theta`` and ``rope_scaling`` of the global
  layers, ``rope_local_base_freq`` of the sliding ones, ``sliding_window_pattern`` where the
  layer types repeat with a period. mlx-lm's sliding layers read no rope type, so a patch there
  is refused instead (below).
* Where mlx-lm's model reads no rope type at all (Gemma, Gemma 2: ``Architecture.
  mlx_lm_reads_rope_scaling``) and the patch changes the rope parameters, or for Gemma 3 where
  it changes the sliding layers', the base it reads
  (``rope_theta`` / ``rope_local_base_freq``) is the text :data:`REFUSAL`, not a number, so mlx-lm
  fails (a ``TypeError`` in its rope op) instead of running plain RoPE.

transformers reads all of these back to the same ``rope_parameters``: it takes a top-level
``rope_scaling`` as the rope parameters (Gemma 3: merged into the global layers' entry), and a
top-level ``rope_theta`` / ``rope_local_base_freq`` only where an entry has no ``rope_theta``,
which never happens here. Installed by ``import hf_prope`` (:func:`install`), on
``PreTrainedConfig.to_dict``, which ``save_pretrained``, ``to_json_string`` and the Hub upload
all go through; configs without an hf-prope patch are untouched.
"""

from __future__ import annotations

import copy
from typing import Any

from .registry import find_architecture
from .state import CONFIG_KEY

__all__ = ["REFUSAL", "LEGACY_KEYS", "legacy_rope_keys", "install"]

#: Written where a reader of the old layout would otherwise run plain RoPE without a word.
REFUSAL = "hf-prope patch: this reader cannot run it (it reads no rope type); load with transformers"
LEGACY_KEYS = ("rope_theta", "rope_scaling", "rope_local_base_freq", "sliding_window_pattern")


def _plain(entry: dict[str, Any]) -> bool:
    return entry.get("rope_type", entry.get("type", "default")) == "default"


def _scaling(entry: dict[str, Any]) -> dict[str, Any] | None:
    return None if _plain(entry) else copy.deepcopy(entry)


def _period(layer_types: list[str]) -> int | None:
    """``P`` when layer ``i`` is full attention exactly when ``(i + 1) % P == 0`` (mlx-lm's Gemma 3 rule)."""
    full = [i for i, t in enumerate(layer_types) if t != "sliding_attention"]
    if not full:
        return None
    period = full[0] + 1
    return period if all(((i + 1) % period == 0) == (i in full) for i in range(len(layer_types))) else None


def legacy_rope_keys(config: Any) -> dict[str, Any]:
    """The top-level keys a patched ``config`` also serialises (empty when it carries no hf-prope patch)."""
    record = getattr(config, CONFIG_KEY, None)
    if not isinstance(record, dict):
        return {}
    arch = find_architecture(getattr(config, "model_type", ""))
    params = getattr(config, "rope_parameters", None)
    original = record.get("original_rope_parameters", params)
    if arch is None or not isinstance(params, dict) or not isinstance(original, dict):
        return {}
    if arch.generic:
        # Which of these keys mlx-lm's model for this type reads is not known here: fail it loudly,
        # unless the config class types rope_theta itself (Cohere 2 MoE), which then cannot hold text.
        typed = "rope_theta" in getattr(type(config), "__dataclass_fields__", {})
        return {} if params == original or typed else {"rope_theta": REFUSAL}
    if arch.rope_per_layer_type:
        full, sliding = params.get("full_attention"), params.get("sliding_attention")
        if not isinstance(full, dict) or not isinstance(sliding, dict):
            return {}
        out: dict[str, Any] = {
            "rope_theta": full.get("rope_theta"),
            "rope_local_base_freq": sliding.get("rope_theta")
            if sliding == original.get("sliding_attention")
            else REFUSAL,
            "rope_scaling": _scaling(full),
        }
        period = _period(list(getattr(config, "layer_types", None) or []))
        if period is not None:
            out["sliding_window_pattern"] = period
        return out
    if not arch.mlx_lm_reads_rope_scaling:
        return {"rope_theta": params.get("rope_theta") if params == original else REFUSAL}
    return {"rope_theta": params.get("rope_theta"), "rope_scaling": _scaling(params)}


def install() -> None:
    """Make ``PreTrainedConfig.to_dict`` add :func:`legacy_rope_keys` (idempotent)."""
    from transformers import PretrainedConfig

    original = PretrainedConfig.__dict__["to_dict"]
    if getattr(original, "_hf_prope_wrapped", False):
        return

    def to_dict(self: Any) -> dict[str, Any]:
        out = original(self)
        out.update(legacy_rope_keys(self))
        return out

    to_dict._hf_prope_wrapped = True  # type: ignore[attr-defined]
    to_dict.__wrapped__ = original  # type: ignore[attr-defined]
    to_dict.__doc__ = original.__doc__
    PretrainedConfig.to_dict = to_dict  # type: ignore[method-assign]
