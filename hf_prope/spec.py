"""The one description of a patch: what to do to the RoPE frequencies, and where.

A :class:`PatchSpec` is model-independent: it names frequency pairs by index
(0 = the highest frequency, as in the paper), never by channel position, so the
same spec means the same thing in Hugging Face's split-halves layout and in the
adjacent-pairs layout of other codebases. It is resolved against a concrete
model (its head size, its own frequencies) only when applied.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

from .suggestions import closest

#: The patch names: the one list (CLI choices, help texts and checks are derived from it).
PatchName = Literal["p-rope", "freq-mask", "nope", "rope"]
PATCH_NAMES: tuple[str, ...] = get_args(PatchName)
SPEC_FORMAT_VERSION = 1

# Which optional fields each patch accepts (in PATCH_NAMES' order); anything else set is a conflict.
_ALLOWED_PARAMS: dict[str, frozenset[str]] = dict(
    zip(
        PATCH_NAMES,
        (frozenset({"p", "rotate"}), frozenset({"keep", "mask", "max_wavelength"}), frozenset(), frozenset()),
    )
)
_PARAM_FIELDS = ("p", "rotate", "keep", "mask", "max_wavelength")


@dataclass(frozen=True)
class PatchSpec:
    """A RoPE frequency patch and the layers it applies to.

    Args:
        name: ``"p-rope"`` (rotate only a fraction ``p`` of the frequency pairs),
            ``"freq-mask"`` (rotate an explicit set of pairs), ``"nope"`` (rotate
            nothing) or ``"rope"`` (rotate everything; the model's own RoPE).
        p: for ``"p-rope"``, the fraction of pairs that keep rotating, in [0, 1].
            With head size ``d``, ``int(p * d // 2)`` pairs rotate (the paper's rule).
        rotate: for ``"p-rope"``, which end of the spectrum keeps rotating:
            ``"highest"`` (the paper's p-RoPE) or ``"lowest"`` (the paper's control,
            which truncates the highest frequencies instead).
        keep: for ``"freq-mask"``, indices of the pairs that keep rotating.
        mask: for ``"freq-mask"``, one boolean per pair, ``True`` = keeps rotating.
        max_wavelength: for ``"freq-mask"``, keep only pairs whose wavelength
            ``2*pi/theta_i`` (in tokens, from the model's own frequencies) is at most
            this many tokens; longer ones stop rotating (FoPE's rule).
        layers: apply only to these decoder-layer indices.
        layer_types: apply only to layers of these types (``config.layer_types``,
            e.g. ``"full_attention"``). Default (neither): every layer.

    Frequencies that stop rotating get frequency 0: their channels pass through
    unrotated. Frequencies that keep rotating keep their original values, scaling
    of the model's own RoPE type included.
    """

    name: PatchName
    p: float | None = None
    rotate: Literal["highest", "lowest"] | None = None
    keep: tuple[int, ...] | None = None
    mask: tuple[bool, ...] | None = None
    max_wavelength: float | None = None
    layers: tuple[int, ...] | None = None
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in PATCH_NAMES:
            raise ValueError(
                f"Unknown patch name {self.name!r}; expected one of {', '.join(PATCH_NAMES)}."
                + closest(self.name, PATCH_NAMES)
            )
        given = {f for f in _PARAM_FIELDS if getattr(self, f) is not None}
        extra = given - _ALLOWED_PARAMS[self.name]
        if extra:
            allowed = sorted(_ALLOWED_PARAMS[self.name]) or ["no parameters"]
            raise ValueError(
                f"Patch {self.name!r} does not take {', '.join(sorted(extra))}; it takes {', '.join(allowed)}."
            )
        if self.name == "p-rope":
            self._check_p()
            if self.rotate is None:
                object.__setattr__(self, "rotate", "highest")
            if self.rotate not in ("highest", "lowest"):
                raise ValueError(
                    f"rotate must be 'highest' (p-RoPE) or 'lowest' (truncate the highest "
                    f"frequencies instead), got {self.rotate!r}."
                )
        if self.name == "freq-mask":
            self._check_mask_params(given)
        self._check_targets()

    def _check_p(self) -> None:
        p = self.p
        if p is None:
            raise ValueError("Patch 'p-rope' needs p, the fraction of frequency pairs that rotate, e.g. p=0.25.")
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"p must be a number in [0, 1], got {type(p).__name__} {p!r}.")
        if math.isnan(p) or not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1] (0 = NoPE, 1 = RoPE), got {p!r}.")
        object.__setattr__(self, "p", float(p))

    def _check_mask_params(self, given: set[str]) -> None:
        chosen = given & {"keep", "mask", "max_wavelength"}
        if len(chosen) != 1:
            raise ValueError(
                "Patch 'freq-mask' needs exactly one of keep= (indices of pairs that rotate), "
                "mask= (one boolean per pair) or max_wavelength= (tokens); "
                + (f"got {', '.join(sorted(chosen))}." if chosen else "got none.")
            )
        if self.keep is not None:
            object.__setattr__(self, "keep", _int_tuple("keep", self.keep, unique=True))
        if self.mask is not None:
            if isinstance(self.mask, (str, bytes)) or not isinstance(self.mask, Sequence):
                raise TypeError(f"mask must be a list of booleans, got {type(self.mask).__name__}.")
            bad = [m for m in self.mask if not isinstance(m, bool)]
            if bad:
                raise TypeError(f"mask must hold only True/False (one per frequency pair), got {bad[0]!r}.")
            if not self.mask:
                raise ValueError("mask must not be empty: give one boolean per frequency pair.")
            object.__setattr__(self, "mask", tuple(self.mask))
        if self.max_wavelength is not None:
            w = self.max_wavelength
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise TypeError(f"max_wavelength must be a number of tokens, got {w!r}.")
            if math.isnan(w) or w <= 0:
                raise ValueError(f"max_wavelength must be a positive number of tokens, got {w!r}.")
            object.__setattr__(self, "max_wavelength", float(w))

    def _check_targets(self) -> None:
        if self.layers is not None and self.layer_types is not None:
            raise ValueError("Give layers= (indices) or layer_types= (names), not both.")
        if self.layers is not None:
            object.__setattr__(self, "layers", _int_tuple("layers", self.layers, unique=True))
            if not self.layers:
                raise ValueError("layers must not be empty; leave it out to patch every layer.")
        if self.layer_types is not None:
            lt = self.layer_types
            if isinstance(lt, str):
                lt = (lt,)
            if not isinstance(lt, Sequence) or not all(isinstance(t, str) for t in lt):
                raise TypeError(f"layer_types must be a list of layer-type names, got {self.layer_types!r}.")
            if not lt:
                raise ValueError("layer_types must not be empty; leave it out to patch every layer.")
            object.__setattr__(self, "layer_types", tuple(dict.fromkeys(lt)))

    # -- resolution -------------------------------------------------------------------------

    def keep_mask(self, inv_freq: Sequence[float]) -> list[bool]:
        """Which of a model's frequency pairs keep rotating under this spec.

        ``inv_freq`` is the model's own (unpatched) frequency per pair, pair 0 the
        highest. Raises ``ValueError`` when the spec does not fit (index out of range,
        mask of the wrong length).
        """
        freqs = [float(f) for f in inv_freq]
        n = len(freqs)
        if self.name == "rope":
            return [True] * n
        if self.name == "nope":
            return [False] * n
        if self.name == "p-rope":
            assert self.p is not None
            r = rotated_pairs(self.p, 2 * n)
            return [i < r for i in range(n)] if self.rotate == "highest" else [i >= n - r for i in range(n)]
        if self.keep is not None:
            out_of_range = [i for i in self.keep if i >= n]
            if out_of_range:
                raise ValueError(
                    f"keep holds pair indices {out_of_range} but this model has {n} frequency pairs "
                    f"per head (indices 0..{n - 1}, 0 = highest frequency)."
                )
            kept = set(self.keep)
            return [i in kept for i in range(n)]
        if self.mask is not None:
            if len(self.mask) != n:
                raise ValueError(
                    f"mask has {len(self.mask)} entries but this model has {n} frequency pairs per head; "
                    f"give exactly {n} booleans (entry 0 = highest frequency)."
                )
            return list(self.mask)
        assert self.max_wavelength is not None
        return [f > 0 and 2 * math.pi / f <= self.max_wavelength for f in freqs]

    @property
    def is_layer_selective(self) -> bool:
        return self.layers is not None or self.layer_types is not None

    # -- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict holding only the fields that are set."""
        out: dict[str, Any] = {"format_version": SPEC_FORMAT_VERSION}
        for key, value in asdict(self).items():
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchSpec:
        """Rebuild (and re-validate) a spec from :meth:`to_dict` output."""
        if not isinstance(data, dict):
            raise TypeError(f"A patch spec must be a JSON object, got {type(data).__name__}.")
        data = dict(data)
        version = data.pop("format_version", SPEC_FORMAT_VERSION)
        if version != SPEC_FORMAT_VERSION:
            raise ValueError(
                f"Patch spec field 'format_version' is {version!r}; this hf-prope reads version "
                f"{SPEC_FORMAT_VERSION}. Upgrade hf-prope to read it."
            )
        known = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ValueError(
                f"Patch spec has unknown field {unknown[0]!r}; known fields: {', '.join(known)}."
                + closest(unknown[0], known)
            )
        if "name" not in data:
            raise ValueError("Patch spec is missing the field 'name'.")
        for key in ("keep", "mask", "layers", "layer_types"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PatchSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"Patch spec is not valid JSON: {err}") from err
        return cls.from_dict(data)

    @property
    def label(self) -> str:
        """A short name for tables and plots: ``RoPE``, ``NoPE``, ``p=0.25``, ``highest 25% dropped``, ``mask 3/8``..."""
        if self.name == "rope":
            return "RoPE"
        if self.name == "nope":
            return "NoPE"
        if self.name == "p-rope":
            return f"p={self.p:g}" if self.rotate == "highest" else f"highest {1 - self.p:.0%} dropped"
        if self.keep is not None:
            return f"pairs {list(self.keep)}"
        if self.mask is not None:
            return f"mask {sum(self.mask)}/{len(self.mask)}"
        return f"wavelength <= {self.max_wavelength:g}"

    def describe(self) -> str:
        """One line in words, for logs and model cards."""
        if self.name == "p-rope":
            what = (
                f"p-RoPE, p={self.p:g}: only the highest {self.p:.0%} of RoPE frequencies rotate"
                if self.rotate == "highest"
                else f"the paper's control, the highest {1 - self.p:.0%} of RoPE frequencies dropped: only the "
                f"lowest {self.p:.0%} rotate"
            )
        elif self.name == "freq-mask":
            if self.keep is not None:
                what = f"frequency mask: pairs {list(self.keep)} rotate"
            elif self.mask is not None:
                what = f"frequency mask: {sum(self.mask)} of {len(self.mask)} pairs rotate"
            else:
                what = f"frequency mask: pairs with wavelength above {self.max_wavelength:g} tokens do not rotate"
        elif self.name == "nope":
            what = "NoPE: no positional rotation"
        else:
            what = "RoPE, unchanged"
        if self.layers is not None:
            where = f"on layers {list(self.layers)}"
        elif self.layer_types is not None:
            where = f"on {', '.join(self.layer_types)} layers"
        else:
            where = "on every layer"
        return f"{what}, {where}"


def label_of(spec: PatchSpec | None) -> str:
    """:attr:`PatchSpec.label`, and ``RoPE`` for no patch (``None``) or p=1 (the model's own RoPE)."""
    if spec is None or (spec.name == "p-rope" and spec.p == 1.0 and spec.rotate == "highest"):
        return "RoPE"
    return spec.label


def rotated_pairs(p: float, head_dim: int) -> int:
    """Number of frequency pairs that rotate under p-RoPE: ``int(p * d // 2)`` (the paper's rule)."""
    return int(p * head_dim // 2)


def _int_tuple(field: str, values: Any, *, unique: bool) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, set, frozenset)):
        raise TypeError(f"{field} must be a list of non-negative integers, got {values!r}.")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) and not (hasattr(v, "__index__")):
            raise TypeError(f"{field} must hold integers, got {v!r}.")
        v = int(v)
        if v < 0:
            raise ValueError(f"{field} must hold non-negative indices, got {v}.")
        out.append(v)
    if unique and len(set(out)) != len(out):
        dup = sorted({v for v in out if out.count(v) > 1})
        raise ValueError(f"{field} lists {dup} more than once.")
    return tuple(sorted(out))


def make_spec(spec: PatchSpec | str, **params: Any) -> PatchSpec:
    """A spec from either a :class:`PatchSpec` or a name plus keyword parameters."""
    if isinstance(spec, PatchSpec):
        if params:
            raise TypeError(
                f"Got a PatchSpec and keyword parameters {sorted(params)}; put them in the spec, or pass "
                "the patch name instead of a spec."
            )
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"A patch is a name such as 'p-rope' or a PatchSpec, got {type(spec).__name__}.")
    known = {f.name for f in fields(PatchSpec)} - {"name"}
    unknown = [k for k in params if k not in known]
    if unknown:
        raise TypeError(
            f"Unknown patch parameter {unknown[0]!r}; known: {', '.join(sorted(known))}."
            + closest(unknown[0], sorted(known))
        )
    for key in ("keep", "mask", "layers"):
        if isinstance(params.get(key), (list, range)):
            params[key] = tuple(params[key])
    if isinstance(params.get("layer_types"), list):
        params["layer_types"] = tuple(params["layer_types"])
    return PatchSpec(name=spec, **params)  # type: ignore[arg-type]
