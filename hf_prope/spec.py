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
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from .suggestions import closest

#: The patch names: the one list (CLI choices, help texts and checks are derived from it).
PatchName = Literal["p-rope", "freq-mask", "head-mask", "nope", "rope"]
PATCH_NAMES: tuple[str, ...] = get_args(PatchName)
SPEC_FORMAT_VERSION = 1

# Which optional fields each patch accepts (in PATCH_NAMES' order); anything else set is a conflict.
_ALLOWED_PARAMS: dict[str, frozenset[str]] = dict(
    zip(
        PATCH_NAMES,
        (
            frozenset({"p", "rotate"}),
            frozenset({"keep", "mask", "max_wavelength"}),
            frozenset({"p", "pairs", "select", "head_keep"}),
            frozenset(),
            frozenset(),
        ),
    )
)
_PARAM_FIELDS = ("p", "rotate", "keep", "mask", "max_wavelength", "pairs", "select", "head_keep")
#: How a ``head-mask`` chose its pairs: ``highest`` (every head keeps the highest ones: p-RoPE),
#: ``2-norm`` (per KV head, the pairs of largest query-key norm product, MHA2MLA's rule; measured by
#: :func:`hf_prope.analysis.head_mask`) or ``explicit`` (given).
HEAD_SELECTIONS = ("highest", "2-norm", "2-norm-drift", "explicit")


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
        pairs: for ``"head-mask"``, the budget as a number of pairs per head (instead of ``p``).
        select: for ``"head-mask"``, how the pairs were chosen: ``"highest"`` (every head
            keeps the highest ``p`` / ``pairs``; the same as p-RoPE), ``"2-norm"`` (each KV head
            keeps the pairs of largest query-key norm product on a calibration text, MHA2MLA's
            rule: :func:`hf_prope.analysis.head_mask` measures it and returns the spec with
            ``head_keep``), ``"2-norm-drift"`` (that product times how far the pair turns over the
            context, so a slow pair that barely moves is stopped first) or ``"explicit"`` (the
            default when ``head_keep`` is given).
        head_keep: for ``"head-mask"``, per decoder layer, per key/value head, the indices of the
            pairs that keep rotating. Under grouped-query attention every query head uses the
            mask of its KV head.
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
    pairs: int | None = None
    select: Literal["highest", "2-norm", "2-norm-drift", "explicit"] | None = None
    head_keep: tuple[tuple[tuple[int, ...], ...], ...] | None = None
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
        if self.name == "head-mask":
            self._check_head_params()
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

    def _check_head_params(self) -> None:
        if self.layers is not None or self.layer_types is not None:
            raise ValueError(
                "Patch 'head-mask' names every layer in head_keep; it takes no layers= or layer_types= "
                "(give a layer all of its pairs to leave it rotating)."
            )
        if self.p is not None and self.pairs is not None:
            raise ValueError("Give the head-mask budget as p= (a fraction) or pairs= (a count per head), not both.")
        if self.p is not None:
            self._check_p()
        if self.pairs is not None:
            if isinstance(self.pairs, bool) or not isinstance(self.pairs, int) or self.pairs < 0:
                raise ValueError(f"pairs must be a non-negative number of pairs per head, got {self.pairs!r}.")
        select = self.select if self.select is not None else ("explicit" if self.head_keep is not None else "highest")
        if select not in HEAD_SELECTIONS:
            raise ValueError(
                f"select must be one of {', '.join(HEAD_SELECTIONS)}, got {select!r}."
                + closest(str(select), HEAD_SELECTIONS)
            )
        object.__setattr__(self, "select", select)
        if self.head_keep is None:
            if select in ("2-norm", "2-norm-drift"):
                raise ValueError(
                    "select='2-norm' chooses each head's pairs from the model's own query/key statistics, which a "
                    "spec cannot hold until they are measured: spec = hf_prope.analysis.head_mask(hf_prope.analysis."
                    "frequency_usage(model, tokenizer, texts), p=...); or in the recipes patch=head-mask select=2-norm "
                    "(chosen on the training text), or `hf-prope analyze ... head_mask_p=...` (writes a patch file)."
                )
            if select == "explicit":
                raise ValueError("select='explicit' needs head_keep: per layer, per KV head, the pairs that rotate.")
            if self.p is None and self.pairs is None:
                raise ValueError("Patch 'head-mask' needs a budget (p= or pairs=) or an explicit head_keep.")
            return
        if isinstance(self.head_keep, (str, bytes)) or not isinstance(self.head_keep, Sequence) or not self.head_keep:
            raise TypeError(
                "head_keep must be a list (one entry per decoder layer) of lists (one per KV head) of pairs."
            )
        layers = []
        for i, heads in enumerate(self.head_keep):
            if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence) or not heads:
                raise TypeError(f"head_keep[{i}] must be a non-empty list with one list of pair indices per KV head.")
            layers.append(tuple(_int_tuple(f"head_keep[{i}][{h}]", keep, unique=True) for h, keep in enumerate(heads)))
        object.__setattr__(self, "head_keep", tuple(layers))
        if self.pairs is not None:
            wrong = [
                (i, h) for i, heads in enumerate(layers) for h, keep in enumerate(heads) if len(keep) != self.pairs
            ]
            if wrong:
                raise ValueError(
                    f"head_keep gives layer {wrong[0][0]}, KV head {wrong[0][1]} {len(layers[wrong[0][0]][wrong[0][1]])} "
                    f"pairs, but the budget is pairs={self.pairs} per head."
                )

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
        if self.name == "head-mask":
            raise ValueError("A head-mask has one mask per KV head, not one per layer: use head_masks().")
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

    def head_masks(self, kv_heads: Sequence[int], n_pairs: int) -> list[list[list[bool]]]:
        """Which pairs keep rotating in each KV head of each layer: ``[layer][kv head][pair]``.

        ``kv_heads`` is the number of key/value heads of each decoder layer and ``n_pairs`` the
        pairs per head. Raises ``ValueError`` when the spec does not fit the model.
        """
        if self.name != "head-mask":
            raise ValueError(f"Patch {self.name!r} has one mask per layer; head_masks() is for 'head-mask'.")
        if self.head_keep is None:
            r = self.pairs if self.pairs is not None else rotated_pairs(float(self.p or 0.0), 2 * n_pairs)
            if r > n_pairs:
                raise ValueError(f"pairs={r} but this model has {n_pairs} frequency pairs per head.")
            return [[[i < r for i in range(n_pairs)] for _ in range(h)] for h in kv_heads]
        if len(self.head_keep) != len(kv_heads):
            raise ValueError(
                f"head_keep has {len(self.head_keep)} layers but this model has {len(kv_heads)} decoder layers; "
                "give one entry per layer."
            )
        out = []
        for i, (heads, n_heads) in enumerate(zip(self.head_keep, kv_heads)):
            if len(heads) != n_heads:
                raise ValueError(
                    f"head_keep[{i}] has {len(heads)} KV heads but layer {i} of this model has {n_heads} "
                    "key/value heads (under grouped-query attention a mask is per KV head, not per query head)."
                )
            for h, keep in enumerate(heads):
                bad = [j for j in keep if j >= n_pairs]
                if bad:
                    raise ValueError(
                        f"head_keep[{i}][{h}] holds pair indices {bad} but this model has {n_pairs} frequency pairs "
                        f"per head (indices 0..{n_pairs - 1}, 0 = highest frequency)."
                    )
            out.append([[j in set(keep) for j in range(n_pairs)] for keep in heads])
        if self.p is not None:
            r = rotated_pairs(self.p, 2 * n_pairs)
            wrong = [(i, h) for i, heads in enumerate(out) for h, m in enumerate(heads) if sum(m) != r]
            if wrong:
                raise ValueError(
                    f"head_keep gives layer {wrong[0][0]}, KV head {wrong[0][1]} {sum(out[wrong[0][0]][wrong[0][1]])} "
                    f"pairs, but the budget p={self.p:g} is {r} of this model's {n_pairs} pairs per head."
                )
        return out

    @property
    def is_layer_selective(self) -> bool:
        return self.layers is not None or self.layer_types is not None

    @property
    def is_per_head(self) -> bool:
        """Whether the heads of a layer may differ (``head-mask``): applied by per-layer hooks, as a selective patch is."""
        return self.name == "head-mask"

    # -- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict holding only the fields that are set."""
        out: dict[str, Any] = {"format_version": SPEC_FORMAT_VERSION}
        for key, value in asdict(self).items():
            if value is not None:
                out[key] = _lists(value)
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
        if isinstance(data.get("head_keep"), list):
            data["head_keep"] = tuple(
                tuple(tuple(k) if isinstance(k, list) else k for k in heads) if isinstance(heads, list) else heads
                for heads in data["head_keep"]
            )
        return cls(**data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this spec as a patch file (JSON), atomically: what ``patch_model``, the CLI and recipes take."""
        from .files import write_atomic

        write_atomic(path, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PatchSpec:
        """Read a patch file written by :meth:`save` (or by ``hf-prope run analyze``)."""
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(
                f"No patch file at {str(file)!r}: expected a JSON file written by PatchSpec.save()."
            )
        try:
            return cls.from_json(file.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"Patch file {str(file)!r}: {err}") from err

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
        if self.name == "head-mask":
            budget = f"p={self.p:g}" if self.p is not None else f"{self.pairs} pairs" if self.pairs is not None else ""
            return f"per-head {self.select}" + (f" {budget}" if budget else "")
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
        elif self.name == "head-mask":
            if self.head_keep is None:
                budget = f"{self.p:.0%} of pairs" if self.p is not None else f"{self.pairs} pairs"
                what = f"per-head frequency mask: every head keeps its highest {budget} rotating"
            else:
                counts = [len(k) for heads in self.head_keep for k in heads]
                what = (
                    f"per-head frequency mask ({self.select}): each KV head keeps its own "
                    + (f"{counts[0]} pairs" if len(set(counts)) == 1 else f"{min(counts)}-{max(counts)} pairs")
                    + " rotating"
                )
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


def patch_parameters(name: str) -> frozenset[str]:
    """The optional fields patch ``name`` takes (e.g. ``{"p", "rotate"}`` for ``"p-rope"``)."""
    return _ALLOWED_PARAMS.get(name, frozenset())


def label_of(spec: PatchSpec | None) -> str:
    """:attr:`PatchSpec.label`, and ``RoPE`` for no patch (``None``) or p=1 (the model's own RoPE)."""
    if spec is None or (spec.name == "p-rope" and spec.p == 1.0 and spec.rotate == "highest"):
        return "RoPE"
    return spec.label


def _lists(value: Any) -> Any:
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


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
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec not in PATCH_NAMES and spec.endswith(".json")):
        if params:
            raise TypeError(f"Got a patch file and keyword parameters {sorted(params)}; put them in the file.")
        return PatchSpec.load(spec)
    if not isinstance(spec, str):
        raise TypeError(
            f"A patch is a name such as 'p-rope', a PatchSpec or a patch file (.json), got {type(spec).__name__}."
        )
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
    if isinstance(params.get("head_keep"), list):
        params["head_keep"] = tuple(tuple(tuple(k) for k in heads) for heads in params["head_keep"])
    return PatchSpec(name=spec, **params)  # type: ignore[arg-type]
