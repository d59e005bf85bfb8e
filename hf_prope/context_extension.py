"""Context extension under (or without) p-RoPE: YaRN, dynamic NTK, linear interpolation, attention temperature.

These are the methods users reach for to read past a model's training length. Each one is a
*base* RoPE for the model, written into ``config.rope_parameters`` with transformers' own rope
types (``yarn``, ``dynamic``, ``linear``), so transformers computes the frequencies and their
scaling; a p-RoPE patch then applies on top of them exactly as on any scaled RoPE (the pairs
that stop pass through, the others keep the scaled frequencies). The order does not matter:
:func:`extend_context` lifts the patch, changes the base and puts the same patch back.

* ``yarn:s`` — NTK-by-parts interpolation for ``s`` times the training length, plus YaRN's
  attention temperature ``0.1 ln s + 1`` on queries and keys (transformers' ``attention_factor``).
* ``dynamic:s`` — dynamic NTK: the base grows with the input once it passes the training length.
* ``linear:s`` — position interpolation: every frequency divided by ``s``.
* ``temperature:s`` — YaRN's temperature for factor ``s`` alone, frequencies unchanged
  (transformers' ``yarn`` with ``factor=1`` and that ``attention_factor``); give
  ``attention_factor`` in the dict form for another value.

The training length is ``config.max_position_embeddings`` unless
``original_max_position_embeddings`` says otherwise; it is left unchanged in the config, as
Qwen's and Llama's long-context configs do.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from .suggestions import closest

ExtensionMethod = Literal["yarn", "dynamic", "linear", "temperature"]
METHODS: tuple[str, ...] = get_args(ExtensionMethod)
#: ``config`` attribute recording an extension and the rope parameters it replaced.
CONFIG_KEY = "hf_prope_context_extension"
_NONE_WORDS = ("none", "off", "")


def yarn_temperature(factor: float) -> float:
    """YaRN's attention temperature for a scale factor: ``0.1 ln s + 1`` (1 for ``s <= 1``)."""
    return 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0


@dataclass(frozen=True)
class ContextExtension:
    """One context-extension method for a model's RoPE.

    Args:
        method: ``"yarn"``, ``"dynamic"``, ``"linear"`` or ``"temperature"`` (see the module).
        factor: the scale factor ``s`` (target length / training length), at least 1.
        attention_factor: ``yarn``/``temperature``: the factor queries and keys are each multiplied
            by (attention logits by its square); default YaRN's ``0.1 ln s + 1``.
        original_max_position_embeddings: the training length (default: the config's
            ``max_position_embeddings``).
        layer_types: only the rope entries of these layer types (models with per-layer-type
            RoPE, such as Gemma 3); default every entry.
    """

    method: ExtensionMethod
    factor: float
    attention_factor: float | None = None
    original_max_position_embeddings: int | None = None
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"Unknown context extension {self.method!r}; expected one of {', '.join(METHODS)} "
                "(e.g. 'yarn:2')." + closest(str(self.method), METHODS)
            )
        f = self.factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or math.isnan(f) or f < 1.0:
            raise ValueError(
                f"The {self.method} factor must be a number >= 1 (target length / training length), got {f!r}."
            )
        object.__setattr__(self, "factor", float(f))
        a = self.attention_factor
        if a is not None:
            if self.method not in ("yarn", "temperature"):
                raise ValueError(f"attention_factor applies to yarn and temperature, not {self.method}.")
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0:
                raise ValueError(f"attention_factor must be a positive number, got {a!r}.")
            object.__setattr__(self, "attention_factor", float(a))
        n = self.original_max_position_embeddings
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
            raise ValueError(f"original_max_position_embeddings must be a number of tokens >= 2, got {n!r}.")
        if self.layer_types is not None:
            lt = (self.layer_types,) if isinstance(self.layer_types, str) else tuple(self.layer_types)
            if not lt or not all(isinstance(t, str) for t in lt):
                raise ValueError(f"layer_types must be a non-empty list of layer-type names, got {self.layer_types!r}.")
            object.__setattr__(self, "layer_types", lt)

    @classmethod
    def parse(cls, given: ContextExtension | str | dict[str, Any] | None) -> ContextExtension | None:
        """From ``"yarn:2"`` / ``"temperature:4"`` / a dict of the fields / ``None`` or ``"none"`` (no extension)."""
        if given is None or isinstance(given, cls):
            return given
        if isinstance(given, dict):
            data = dict(given)
            unknown = set(data) - {f for f in cls.__dataclass_fields__}
            if unknown:
                raise ValueError(
                    f"Unknown context-extension keys {sorted(unknown)}; known: {', '.join(cls.__dataclass_fields__)}."
                )
            if "method" not in data or "factor" not in data:
                raise ValueError(
                    f"A context extension needs method and factor, e.g. {{'method': 'yarn', 'factor': 2}}; got {given}."
                )
            return cls(**data)
        if isinstance(given, str):
            text = given.strip()
            if text.lower() in _NONE_WORDS:
                return None
            method, sep, factor = text.partition(":")
            try:
                value = float(factor)
            except ValueError:
                value = None
            if not sep or value is None:
                raise ValueError(
                    f"A context extension is written method:factor (yarn:2, dynamic:4, linear:2, temperature:2) "
                    f"or none; got {given!r}."
                )
            return cls(method.strip().lower(), value)  # type: ignore[arg-type]
        raise TypeError(
            f"A context extension is a string such as 'yarn:2', a dict or None; got {type(given).__name__}."
        )

    @property
    def temperature(self) -> float:
        """The factor queries and keys are multiplied by (1 for dynamic and linear)."""
        if self.method in ("dynamic", "linear"):
            return 1.0
        return self.attention_factor if self.attention_factor is not None else yarn_temperature(self.factor)

    @property
    def label(self) -> str:
        """A short name for tables: ``YaRN x2``, ``dynamic x4``, ``temperature 1.069``."""
        if self.method == "temperature":
            return f"temperature {self.temperature:.3g}"
        name = {"yarn": "YaRN", "dynamic": "dynamic NTK", "linear": "linear PI"}[self.method]
        extra = f", t={self.attention_factor:g}" if self.attention_factor is not None else ""
        return f"{name} x{self.factor:g}{extra}"

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if "layer_types" in out:
            out["layer_types"] = list(out["layer_types"])
        return out

    def rope_entry(self, entry: dict[str, Any], training_length: int) -> dict[str, Any]:
        """The rope parameters of one (flat or per-layer-type) entry under this extension."""
        base = entry.get("rope_type", entry.get("type", "default"))
        if base != "default":
            raise ValueError(
                f"Context extension composes with a model's plain RoPE, but this rope entry is {base!r} (already "
                "scaled or patched); extend the unpatched original, or leave its own scaling as it is."
            )
        out: dict[str, Any] = {"rope_theta": entry["rope_theta"]}
        if "partial_rotary_factor" in entry:
            out["partial_rotary_factor"] = entry["partial_rotary_factor"]
        length = self.original_max_position_embeddings or training_length
        if self.method in ("linear", "dynamic"):
            out.update(rope_type=self.method, factor=self.factor)
        else:
            out.update(
                rope_type="yarn",
                factor=self.factor if self.method == "yarn" else 1.0,
                original_max_position_embeddings=length,
            )
            if self.method == "temperature" or self.attention_factor is not None:
                out["attention_factor"] = self.temperature
        return out


def _rope_keys(rope_parameters: dict[str, Any]) -> list[str] | None:
    """Layer types of a per-layer-type ``rope_parameters``, or ``None`` for a flat one."""
    if "rope_type" in rope_parameters or "rope_theta" in rope_parameters:
        return None
    return list(rope_parameters)


def extended_rope_parameters(config: Any, extension: ContextExtension, base: dict[str, Any]) -> dict[str, Any]:
    """``base`` (a model's plain rope parameters) under ``extension``; raises before anything changes."""
    length = getattr(config, "max_position_embeddings", None)
    if length is None and extension.original_max_position_embeddings is None:
        raise ValueError(
            "This config has no max_position_embeddings; give the training length as original_max_position_embeddings."
        )
    keys = _rope_keys(base)
    if keys is None:
        if extension.layer_types is not None:
            raise ValueError(
                f"layer_types={list(extension.layer_types)}: this model has one RoPE for every layer; leave it out."
            )
        return extension.rope_entry(base, length)
    chosen = extension.layer_types or tuple(keys)
    unknown = [k for k in chosen if k not in keys]
    if unknown:
        raise ValueError(f"layer_types {unknown} have no rope entry in this model; its entries are {keys}.")
    out = copy.deepcopy(base)
    for key in chosen:
        out[key] = extension.rope_entry(base[key], length)
    return out


def get_context_extension(model: Any) -> ContextExtension | None:
    """The context extension recorded on a model (by :func:`extend_context`), or ``None``."""
    from .state import model_parts

    record = getattr(model_parts(model).config, CONFIG_KEY, None)
    return ContextExtension.parse(record["extension"]) if isinstance(record, dict) else None


def extend_context(model: Any, extension: ContextExtension | str | dict[str, Any] | None) -> Any:
    """Give a loaded model (patched or not) a context-extension base RoPE, in place; ``None`` removes it.

    ``extend_context(model, "yarn:2")`` then ``patch_model(model, "p-rope", p=0.5)`` and the
    reverse order give the same model. The rope parameters are transformers' own types, so an
    extended, unpatched model saves and reloads in plain transformers; a patched one records
    the extended RoPE as its original, and :func:`~hf_prope.unpatch_model` keeps the extension.
    Everything is checked before the model changes.
    """
    from .patching import patch_model, set_base_rope, unpatch_model
    from .state import get_patch, model_parts, original_rope_parameters

    ext = ContextExtension.parse(extension)
    parts = model_parts(model)
    record = getattr(parts.config, CONFIG_KEY, None)
    if ext is None and record is None:
        return model
    # The plain RoPE under any extension: what the record kept, else the model's own (before any patch).
    plain = copy.deepcopy(record["original_rope_parameters"]) if record else original_rope_parameters(parts.config)
    new_rope = plain if ext is None else extended_rope_parameters(parts.config, ext, plain)  # raises before any change
    spec = get_patch(model)
    if spec is not None:
        unpatch_model(model)
    set_base_rope(
        model,
        new_rope,
        CONFIG_KEY,
        None if ext is None else {"extension": ext.to_dict(), "original_rope_parameters": plain},
    )
    if spec is not None:
        patch_model(model, spec)
    return model
