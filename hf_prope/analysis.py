"""Which RoPE frequencies a model uses, which heads attend by position, and which p to try.

The measurements of section 5 of the paper, for any supported model::

    usage = hf_prope.analysis.frequency_usage(model, tokenizer, texts)   # layer x head x pair norms
    heads = hf_prope.analysis.positional_heads(model, tokenizer, texts)  # diagonal / previous-token heads
    suggestion = hf_prope.analysis.suggest_p(usage)                      # largest safe cut, with evidence
    spec = hf_prope.analysis.head_mask(usage, p=0.25)                    # per KV head: the pairs it uses most
    hf_prope.analysis.check_suggestion(model, tokenizer, texts, suggestion)  # perplexity around it

Queries and keys are read with forward hooks on the attention's own projections (and
passed through its per-head norm where the model has one: the registry says which), so
they are exactly what the model rotates, on every architecture, with grouped-query
attention, LoRA adapters and patches. Pair ``i`` is channels ``i`` and ``i + r/2`` of
the ``r`` rotated channels of a head (transformers' layout); pair 0 is the highest
frequency, as in the paper. Attention weights come from the eager attention path, which
returns them; the model's own attention implementation is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import token_windows
from .evaluation import zero_shot_table
from .patching import layer_frequencies, patch_model, unpatch_model
from .spec import PatchSpec, rotated_pairs
from .state import ModelParts, check_layer_indices, check_layer_types, get_patch, model_parts
from .suggestions import closest

Which = Literal["query", "key"]

DEFAULT_WINDOW = 512
DEFAULT_WINDOWS = 8
# More than half of a head's attention, on average, on one relative position.
DEFAULT_THRESHOLD = 0.5
# Eighths: fine enough to find the cut, coarse enough that neighbours differ in perplexity.
DEFAULT_GRID: tuple[float, ...] = tuple(i / 8 for i in range(9))
# Calibrated on SmolLM2-135M and Gemma 3 270M at 512 tokens (docs/analysis.md): every cut
# scoring under it cost at most 1.1% zero-shot perplexity; SmolLM2's next cut (7.6%) cost 5.8%.
DEFAULT_TOLERANCE = 0.05
# The paper's intervention: remove the highest quarter of the frequencies.
DEFAULT_INTERVENTION = PatchSpec("p-rope", p=0.75, rotate="lowest")


# ---------------------------------------------------------------------------------------------
# Input


def _check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    chosen = [int(i) for i in layers]
    check_layer_indices(chosen, n_layers)
    if not chosen:
        raise ValueError("layers is empty; leave it out to measure every layer.")
    return sorted(set(chosen))


def _run(model: nn.Module, windows: torch.Tensor, desc: str, progress: bool) -> None:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for row in tqdm(windows, desc=desc, unit="window", disable=not progress):
                model(input_ids=row[None].to(device), use_cache=False)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# Frequency usage


class _PairNorms:
    """Forward hook on a query/key projection: adds up the L2 norm of every head's 2-D chunks.

    ``norm`` is the attention's per-head norm that the model applies to the projection
    before rotating it (Qwen 3, Gemma 3), applied here the same way: it acts on each
    head's vector alone, so the result is exactly what the model rotates.
    """

    def __init__(self, head_dim: int, n_pairs: int, norm: nn.Module | None) -> None:
        self.head_dim, self.n_pairs, self.norm = head_dim, n_pairs, norm
        self.total: torch.Tensor | None = None
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = output.detach()
        x = x.reshape(*x.shape[:-1], -1, self.head_dim)  # (batch, tokens, heads, head_dim)
        if self.norm is not None:
            x = self.norm(x)
        x = x.float()
        n = self.n_pairs
        norms = torch.sqrt(x[..., :n] ** 2 + x[..., n : 2 * n] ** 2)  # (batch, tokens, heads, pairs)
        total = norms.sum(dim=(0, 1)).double()
        self.total = total if self.total is None else self.total + total
        self.count += norms.shape[0] * norms.shape[1]

    def mean(self) -> torch.Tensor:
        assert self.total is not None and self.count
        return (self.total / self.count).float().cpu()


@dataclass
class FrequencyUsage:
    """Mean norm of each pre-rotation query/key 2-D chunk, per layer, head and frequency pair.

    ``query[l, h, i]`` is the mean over every token of ``||(q_i, q_{i+r/2})||`` for
    query head ``h`` of layer ``l`` (``layers[l]`` is its decoder-layer index); ``key``
    likewise per key/value head (fewer heads with grouped-query attention).
    ``frequencies`` are what each layer rotates pair ``i`` by now (0 where a patch stops
    it); ``original_frequencies`` the model's own. ``attention_span`` is each layer's
    sliding window (``None``: the whole context).
    """

    model_type: str
    layers: list[int]
    layer_types: list[str] | None
    query: torch.Tensor  # (layers, heads, pairs)
    key: torch.Tensor  # (layers, kv heads, pairs)
    frequencies: torch.Tensor  # (layers, pairs), rad/token
    original_frequencies: torch.Tensor  # (layers, pairs)
    attention_span: list[int | None]
    tokens: int
    window: int
    patch: dict[str, Any] | None = None
    num_layers: int | None = None  # the model's decoder layers (``layers`` may be some of them)

    @property
    def n_pairs(self) -> int:
        return int(self.query.shape[-1])

    def _norms(self, which: Which) -> torch.Tensor:
        if which not in ("query", "key"):
            raise ValueError(f"which must be 'query' or 'key', got {which!r}.")
        return self.query if which == "query" else self.key

    def layer_share(self, which: Which = "query") -> torch.Tensor:
        """``(layers, pairs)``: each pair's share of the layer's norm (heads averaged; rows sum to 1)."""
        per_layer = self._norms(which).mean(dim=1)
        return per_layer / per_layer.sum(dim=-1, keepdim=True).clamp_min(1e-30)

    def head_share(self, layer: int, which: Which = "query") -> torch.Tensor:
        """``(heads, pairs)`` for decoder layer ``layer``: each pair's share of each head's norm."""
        row = self._row(layer)
        norms = self._norms(which)[row]
        return norms / norms.sum(dim=-1, keepdim=True).clamp_min(1e-30)

    def model_share(self, which: Which = "query") -> torch.Tensor:
        """``(pairs,)``: each pair's share of the whole model's norm (layers weighted equally)."""
        return self.layer_share(which).mean(dim=0)

    def top_pairs(self, k: int = 5, which: Which = "query") -> list[dict[str, Any]]:
        """The ``k`` pairs carrying most of the model's norm: pair, share, and its wavelengths.

        ``wavelengths`` (tokens per turn, from the model's own frequencies) has one value
        per distinct frequency the pair has across layers (two on Gemma 3: sliding, global).
        """
        share = self.model_share(which)
        order = torch.argsort(share, descending=True)[:k]
        return [
            {
                "pair": int(i),
                "share": float(share[i]),
                "wavelengths": sorted({round(_wavelength(float(f)), 1) for f in self.original_frequencies[:, i]}),
            }
            for i in order
        ]

    def band_shares(self, bands: int = 4, which: Which = "query") -> list[float]:
        """The model's norm share in ``bands`` equal bands of pairs, highest frequencies first."""
        share = self.model_share(which)
        return [float(chunk.sum()) for chunk in torch.tensor_split(share, bands)]

    def _row(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"Layer {layer} was not measured: this report holds layers {_ranges(self.layers)}.")
        return self.layers.index(layer)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tensors as nested lists)."""
        return {
            "model_type": self.model_type,
            "layers": self.layers,
            "layer_types": self.layer_types,
            "tokens": self.tokens,
            "window": self.window,
            "patch": self.patch,
            "num_layers": self.num_layers,
            "attention_span": self.attention_span,
            "query": self.query.tolist(),
            "key": self.key.tolist(),
            "frequencies": self.frequencies.tolist(),
            "original_frequencies": self.original_frequencies.tolist(),
            "summary": {
                "query_band_shares_highest_first": self.band_shares(4, "query"),
                "key_band_shares_highest_first": self.band_shares(4, "key"),
                "query_top_pairs": self.top_pairs(5, "query"),
                "key_top_pairs": self.top_pairs(5, "key"),
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrequencyUsage:
        return cls(
            model_type=data["model_type"],
            layers=list(data["layers"]),
            layer_types=data.get("layer_types"),
            query=torch.tensor(data["query"]),
            key=torch.tensor(data["key"]),
            frequencies=torch.tensor(data["frequencies"]),
            original_frequencies=torch.tensor(data["original_frequencies"]),
            attention_span=list(data["attention_span"]),
            tokens=int(data["tokens"]),
            window=int(data["window"]),
            patch=data.get("patch"),
            num_layers=data.get("num_layers"),
        )


def _wavelength(freq: float) -> float:
    return 2 * math.pi / freq if freq > 0 else math.inf


def _ranges(values: Sequence[int]) -> str:
    return f"{values[0]}..{values[-1]}" if list(values) == list(range(values[0], values[-1] + 1)) else str(list(values))


def _padded_means(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    # Layers with fewer pairs than the widest (Gemma 4's sliding layers) hold 0 beyond their own.
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows])


def frequency_usage(
    model: nn.Module,
    tokenizer: Any,
    texts: str | Sequence[str] | torch.Tensor,
    *,
    window: int = DEFAULT_WINDOW,
    n_windows: int = DEFAULT_WINDOWS,
    layers: Sequence[int] | None = None,
    progress: bool = False,
) -> FrequencyUsage:
    """Measure how much of the query and key norm sits in each frequency pair, over real text.

    Runs the model on the last ``n_windows`` windows of ``window`` tokens of ``texts``
    and averages, for every layer in ``layers`` (default: all), every head and every
    pair, the norm of the pair's 2-D chunk before rotation. The model is not changed.
    Raises ``ValueError`` for empty or too-short texts and out-of-range layers (before
    running anything) and ``UnsupportedModelError`` for a model hf-prope does not support.
    """
    parts = model_parts(model)
    chosen = _check_layers(layers, parts.num_layers)
    windows = token_windows(tokenizer, texts, window=window, n_windows=n_windows)
    current = layer_frequencies(model)
    original = layer_frequencies(model, original=True)
    width = int(current.shape[1])
    arch = parts.arch
    recorders: dict[int, tuple[_PairNorms, _PairNorms]] = {}
    handles = []
    try:
        for layer in chosen:
            attention = parts.attentions[layer]
            head_dim = int(attention.head_dim)
            n_pairs = parts.pairs_of_layer(layer)
            q_norm = getattr(attention, arch.query_norm) if arch.query_norm else None
            k_norm = getattr(attention, arch.key_norm) if arch.key_norm else None
            q_rec, k_rec = _PairNorms(head_dim, n_pairs, q_norm), _PairNorms(head_dim, n_pairs, k_norm)
            handles.append(attention.q_proj.register_forward_hook(q_rec))
            handles.append(attention.k_proj.register_forward_hook(k_rec))
            recorders[layer] = (q_rec, k_rec)
        _run(parts.root, windows, "frequency usage", progress)
    finally:
        for handle in handles:
            handle.remove()
    spec = get_patch(model)
    types = parts.layer_types
    return FrequencyUsage(
        model_type=arch.model_type,
        layers=chosen,
        layer_types=[types[i] for i in chosen] if types else None,
        query=_padded_means([recorders[i][0].mean() for i in chosen], width),
        key=_padded_means([recorders[i][1].mean() for i in chosen], width),
        frequencies=current[chosen],
        original_frequencies=original[chosen],
        attention_span=[parts.attention_span(i) for i in chosen],
        tokens=int(windows.numel()),
        window=int(window),
        patch=spec.to_dict() if spec is not None else None,
        num_layers=parts.num_layers,
    )


# ---------------------------------------------------------------------------------------------
# Positional heads


class _PositionShares:
    """Forward hook on an attention module: adds up attention on the same and on the previous token."""

    def __init__(self) -> None:
        self.diagonal: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None
        self.count = 0

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError(
                f"{type(module).__name__} returned no attention weights although eager attention was set; this "
                "transformers version computes attention differently, so positional heads cannot be measured."
            )
        weights = weights.detach().float()  # (batch, heads, queries, keys)
        t = torch.arange(1, weights.shape[-1], device=weights.device)
        # Query 0 can only attend to itself; from query 1 on every head has a choice.
        diagonal = weights[..., t, t].sum(dim=(0, 2)).double()
        previous = weights[..., t, t - 1].sum(dim=(0, 2)).double()
        self.diagonal = diagonal if self.diagonal is None else self.diagonal + diagonal
        self.previous = previous if self.previous is None else self.previous + previous
        self.count += weights.shape[0] * int(t.numel())


@dataclass
class PositionalHeads:
    """Per layer and head: the mean attention on the same token and on the previous token.

    ``diagonal[l, h]`` is the attention head ``h`` of layer ``layers[l]`` puts on the
    query's own position, averaged over every query position but the first;
    ``previous[l, h]`` the same for the position before it. ``heads`` lists those above
    ``threshold``. With an intervention, ``diagonal_after`` / ``previous_after`` are the
    same measurements on the model patched with ``intervention`` (by default the
    highest quarter of the frequencies removed, as in the paper).
    """

    model_type: str
    layers: list[int]
    diagonal: torch.Tensor  # (layers, heads)
    previous: torch.Tensor
    threshold: float
    tokens: int
    window: int
    intervention: dict[str, Any] | None = None
    diagonal_after: torch.Tensor | None = None
    previous_after: torch.Tensor | None = None
    heads: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.heads:
            self.heads = self._list()

    def _list(self) -> list[dict[str, Any]]:
        found = []
        for kind, scores, after in (
            ("diagonal", self.diagonal, self.diagonal_after),
            ("previous-token", self.previous, self.previous_after),
        ):
            for row, col in (scores > self.threshold).nonzero().tolist():
                entry = {"layer": self.layers[row], "head": col, "kind": kind, "share": float(scores[row, col])}
                if after is not None:
                    entry["share_after"] = float(after[row, col])
                found.append(entry)
        return sorted(found, key=lambda e: (e["layer"], e["head"], e["kind"]))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_type": self.model_type,
            "layers": self.layers,
            "threshold": self.threshold,
            "tokens": self.tokens,
            "window": self.window,
            "heads": self.heads,
            "diagonal": self.diagonal.tolist(),
            "previous": self.previous.tolist(),
            "intervention": self.intervention,
        }
        if self.diagonal_after is not None and self.previous_after is not None:
            out["diagonal_after"] = self.diagonal_after.tolist()
            out["previous_after"] = self.previous_after.tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PositionalHeads:
        after = "diagonal_after" in data
        return cls(
            model_type=data["model_type"],
            layers=list(data["layers"]),
            diagonal=torch.tensor(data["diagonal"]),
            previous=torch.tensor(data["previous"]),
            threshold=float(data["threshold"]),
            tokens=int(data["tokens"]),
            window=int(data["window"]),
            intervention=data.get("intervention"),
            diagonal_after=torch.tensor(data["diagonal_after"]) if after else None,
            previous_after=torch.tensor(data["previous_after"]) if after else None,
            heads=list(data.get("heads") or []),
        )


def _attention_shares(
    parts: ModelParts, windows: torch.Tensor, layers: list[int], progress: bool, desc: str
) -> tuple[torch.Tensor, torch.Tensor]:
    recorders = {i: _PositionShares() for i in layers}
    handles = [parts.attentions[i].register_forward_hook(recorders[i]) for i in layers]
    try:
        _run(parts.root, windows, desc, progress)
    finally:
        for handle in handles:
            handle.remove()
    diagonal = torch.stack([(recorders[i].diagonal / recorders[i].count).float().cpu() for i in layers])  # type: ignore[operator]
    previous = torch.stack([(recorders[i].previous / recorders[i].count).float().cpu() for i in layers])  # type: ignore[operator]
    return diagonal, previous


def positional_heads(
    model: nn.Module,
    tokenizer: Any,
    texts: str | Sequence[str] | torch.Tensor,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    window: int = DEFAULT_WINDOW,
    n_windows: int = DEFAULT_WINDOWS,
    layers: Sequence[int] | None = None,
    intervention: PatchSpec | dict[str, Any] | None = DEFAULT_INTERVENTION,
    progress: bool = False,
) -> PositionalHeads:
    """Find the heads that attend by position: to the same token (diagonal) or to the previous one.

    A head is listed when its mean attention on that position exceeds ``threshold``
    (0.5: more than half of its attention, on average, on one relative position).
    ``intervention`` (default: the highest quarter of the frequencies removed, the
    paper's experiment; ``None`` to skip) measures the same heads again on the model
    patched with it, then restores the model's own patch state. Attention runs through
    transformers' eager path while measuring; the model's attention implementation is
    restored afterwards.
    """
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"threshold must be between 0 and 1 (a share of attention), got {threshold!r}.")
    parts = model_parts(model)
    chosen = _check_layers(layers, parts.num_layers)
    if intervention is not None and not isinstance(intervention, (PatchSpec, dict)):
        raise TypeError(f"intervention must be a PatchSpec, a spec dict or None, got {type(intervention).__name__}.")
    spec = PatchSpec.from_dict(intervention) if isinstance(intervention, dict) else intervention
    windows = token_windows(tokenizer, texts, window=window, n_windows=n_windows)
    inner = parts.model
    previous_impl = getattr(inner.config, "_attn_implementation", None) or "eager"
    own_patch = get_patch(model)
    inner.set_attn_implementation("eager")
    after: tuple[torch.Tensor, torch.Tensor] | None = None
    try:
        before = _attention_shares(parts, windows, chosen, progress, "positional heads")
        if spec is not None:
            patch_model(model, spec)
            after = _attention_shares(model_parts(model), windows, chosen, progress, "after intervention")
    finally:
        if spec is not None:
            if own_patch is None:
                unpatch_model(model)
            else:
                patch_model(model, own_patch)
        inner.set_attn_implementation(previous_impl)
    return PositionalHeads(
        model_type=parts.arch.model_type,
        layers=chosen,
        diagonal=before[0],
        previous=before[1],
        threshold=float(threshold),
        tokens=int(windows.numel()),
        window=int(window),
        intervention=spec.to_dict() if spec is not None else None,
        diagonal_after=after[0] if after else None,
        previous_after=after[1] if after else None,
    )


# ---------------------------------------------------------------------------------------------
# Suggesting p


def drift(frequencies: torch.Tensor, context: int) -> torch.Tensor:
    """Mean ``|e^{i d g} - 1|`` over distances ``d = 0 .. context-1``, per frequency ``g``.

    How much a query-key pair's contribution to an attention logit can move when the
    pair stops rotating, relative to its size, averaged over the distances a context
    of ``context`` tokens holds: 0 for a pair that never turns, up to 4/pi for one that
    turns many times.
    """
    d = torch.arange(context, dtype=torch.float64)
    angles = frequencies.double()[..., None] * d
    return (2 * torch.sin(angles / 2).abs()).mean(dim=-1).float()


@dataclass
class Suggestion:
    """The smallest p whose cut stays within ``tolerance``, with the evidence for it.

    ``candidates`` holds, for every p tried, the *score* (the mean over measured layers
    and heads of the share of the attention-logit scale the unrotated pairs could move,
    see :func:`suggest_p`), the worst layer and its score, and the share of the query
    and key norm that stops rotating. ``check`` is filled by :func:`check_suggestion`.
    """

    p: float
    spec: PatchSpec
    rotated_pairs: int
    n_pairs: int
    context_length: int
    tolerance: float
    layer_types: tuple[str, ...] | None
    candidates: list[dict[str, Any]]
    evidence: list[str]
    check: list[dict[str, Any]] | None = None

    def neighbours(self) -> tuple[float | None, float | None]:
        """The candidate p just below and just above the suggestion (None at either end)."""
        ps = [c["p"] for c in self.candidates]
        i = ps.index(self.p)
        return (ps[i - 1] if i > 0 else None, ps[i + 1] if i + 1 < len(ps) else None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "p": self.p,
            "spec": self.spec.to_dict(),
            "rotated_pairs": self.rotated_pairs,
            "n_pairs": self.n_pairs,
            "context_length": self.context_length,
            "tolerance": self.tolerance,
            "layer_types": list(self.layer_types) if self.layer_types else None,
            "candidates": self.candidates,
            "evidence": self.evidence,
            "check": self.check,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Suggestion:
        return cls(
            p=float(data["p"]),
            spec=PatchSpec.from_dict(data["spec"]),
            rotated_pairs=int(data["rotated_pairs"]),
            n_pairs=int(data["n_pairs"]),
            context_length=int(data["context_length"]),
            tolerance=float(data["tolerance"]),
            layer_types=tuple(data["layer_types"]) if data.get("layer_types") else None,
            candidates=list(data["candidates"]),
            evidence=list(data["evidence"]),
            check=data.get("check"),
        )


def _pair_weights(usage: FrequencyUsage) -> torch.Tensor:
    """``(layers, heads, pairs)``: mean |q_i| x mean |k_i| of each query head's key/value head."""
    heads, kv_heads = usage.query.shape[1], usage.key.shape[1]
    key = usage.key.repeat_interleave(heads // kv_heads, dim=1)
    return usage.query * key


HeadSelect = Literal["2-norm", "2-norm-drift", "2-norm-shared", "highest"]
HEAD_SELECT: tuple[str, ...] = ("2-norm", "2-norm-drift", "2-norm-shared", "highest")


def head_scores(usage: FrequencyUsage) -> torch.Tensor:
    """``(layers, kv heads, pairs)``: MHA2MLA's 2-norm score of each pair of each key/value head.

    ``mean|k_i|`` of the KV head times the sum of ``mean|q_i|`` over the query heads that share it:
    the bound on what pair ``i`` adds to that group's attention logits.
    """
    heads, kv_heads = usage.query.shape[1], usage.key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not split into groups of {kv_heads} key/value heads.")
    grouped = usage.query.unflatten(1, (kv_heads, heads // kv_heads)).sum(dim=2)
    return grouped * usage.key


def head_mask(
    usage: FrequencyUsage,
    *,
    p: float | None = None,
    pairs: int | None = None,
    select: HeadSelect = "2-norm",
    context_length: int | None = None,
    max_wavelength: float | None = None,
) -> PatchSpec:
    """A patch that keeps, per key/value head, the pairs the model uses most (MHA2MLA's 2-norm rule).

    ``usage`` comes from :func:`frequency_usage` on the original model and must cover every
    layer. The budget is ``p`` (the fraction of pairs that rotate, the paper's rule for the
    count) or ``pairs`` per head. ``select``:

    * ``"2-norm"``: each KV head of each layer keeps its own ``r`` pairs of largest
      :func:`head_scores` (a ``head-mask``; every query head uses its KV head's mask);
    * ``"2-norm-drift"``: the same score times :func:`drift` of the pair's own frequency over
      ``context_length`` tokens (default: the measured window; a sliding layer's window when
      shorter): what stopping the pair could move, the measure :func:`suggest_p` uses. A pair of
      large norm that barely turns over the context costs little to stop, so the budget goes to
      pairs that do turn;
    * ``"2-norm-shared"``: one set of ``r`` pairs for every head of every layer, those of
      largest score share summed over layers and heads (a ``freq-mask``: the comparison the
      per-head rule is measured against);
    * ``"highest"``: every head keeps the highest ``r`` (a ``head-mask`` equal to p-RoPE).

    ``max_wavelength`` (tokens) leaves out of every choice the pairs whose wavelength ``2 pi / f``
    is longer: give the training length and every kept pair completes a turn within it, so none
    meets angles past the training length it never saw (the paper's argument for cutting the
    lowest frequencies). With ``"highest"`` it has no effect: the highest pairs turn fastest.

    Ties go to the higher frequency. Write the result with ``spec.save("mask.json")``;
    ``patch_model`` and the recipes take that file.
    """
    if select not in HEAD_SELECT:
        raise ValueError(
            f"select must be one of {', '.join(HEAD_SELECT)}, got {select!r}." + closest(str(select), HEAD_SELECT)
        )
    if (p is None) == (pairs is None):
        raise ValueError("Give the budget as p= (a fraction of the pairs) or pairs= (a count per head), exactly one.")
    n_pairs = usage.n_pairs
    budget = PatchSpec("head-mask", p=p, pairs=pairs, select="highest")  # validates p / pairs
    r = pairs if pairs is not None else rotated_pairs(float(p), 2 * n_pairs)  # type: ignore[arg-type]
    if r > n_pairs:
        raise ValueError(f"pairs={r} but this model has {n_pairs} frequency pairs per head.")
    if max_wavelength is not None:
        check_max_wavelength(max_wavelength)
    if select == "highest":
        return budget
    if usage.layers != list(range(usage.num_layers if usage.num_layers is not None else len(usage.layers))):
        raise ValueError(
            f"A head mask covers every layer; this usage holds layers {_ranges(usage.layers)}. Measure with layers=None."
        )
    scores = head_scores(usage).double()
    if select == "2-norm-drift":
        context = int(context_length or usage.window)
        if context < 2:
            raise ValueError(f"context_length must be at least 2 tokens, got {context_length!r}.")
        moved = torch.stack(
            [
                drift(usage.original_frequencies[i], min(context, span) if span else context)
                for i, span in enumerate(usage.attention_span)
            ]
        ).double()  # (layers, pairs)
        scores = scores * moved[:, None, :]
    if max_wavelength is not None:
        allowed = allowed_pairs(usage.original_frequencies, max_wavelength, r, shared=select == "2-norm-shared")
        scores = scores * allowed[:, None, :]
    # Stable, descending: among equal scores the lower index (the higher frequency) wins.
    order = lambda row: sorted(range(n_pairs), key=lambda i: (-float(row[i]), i))  # noqa: E731
    if select == "2-norm-shared":
        share = (scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-300)).sum(dim=(0, 1))
        if max_wavelength is not None:
            share = torch.where(allowed.all(dim=0), share, -1.0)
        kept = sorted(order(share)[:r])
        return PatchSpec("freq-mask", mask=tuple(i in kept for i in range(n_pairs)))
    if max_wavelength is not None:
        scores = torch.where(allowed[:, None, :], scores, -1.0)  # below every allowed pair, zeros included
    head_keep = tuple(tuple(tuple(sorted(order(head)[:r])) for head in layer) for layer in scores)
    return PatchSpec("head-mask", p=p, pairs=pairs, select=select, head_keep=head_keep)


def check_max_wavelength(value: Any) -> float:
    """``value`` as a wavelength limit in tokens; ``ValueError`` unless it is a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"max_wavelength must be a positive number of tokens, got {value!r}.")
    return float(value)


def allowed_pairs(frequencies: torch.Tensor, max_wavelength: float, r: int, *, shared: bool = False) -> torch.Tensor:
    """Per layer and pair (``frequencies`` is ``(layers, pairs)``): whether its wavelength is at most ``max_wavelength``.

    Raises ``ValueError`` where a layer (``shared``: all layers together) leaves fewer than ``r`` pairs to choose.
    """
    check_max_wavelength(max_wavelength)
    # Per layer: a model's layers may differ (Gemma's local and global layers); 0 (padding) never turns.
    allowed = 2 * math.pi / frequencies.double().clamp_min(1e-300) <= float(max_wavelength)
    counts = [int(allowed.all(dim=0).sum())] if shared else [int(row.sum()) for row in allowed]
    for i, count in enumerate(counts):
        if count < r:
            where = "every layer" if shared else f"layer {i}"
            raise ValueError(
                f"max_wavelength={max_wavelength:g} leaves {count} pairs to choose from in {where}, fewer than the "
                f"{r} per head the budget asks; give a longer max_wavelength (or none) or a smaller p / pairs."
            )
    return allowed


def suggest_p(
    usage: FrequencyUsage,
    *,
    context_length: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    layer_types: Sequence[str] | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    heads: PositionalHeads | None = None,
) -> Suggestion:
    """The smallest p (largest cut of low frequencies) the measurements say is safe.

    For each query head and pair the measured ``mean|q_i| * mean|k_i|`` bounds how much
    the pair adds to an attention logit; :func:`drift` says how much of that could move
    if the pair stopped rotating, over ``context_length`` tokens (a sliding layer's
    window when shorter). A candidate p's *score* is, averaged over layers and heads,
    the moved part of the unrotated pairs relative to the sum over all pairs. The
    suggestion is the smallest p in ``grid`` scoring at most ``tolerance``. Low
    frequencies carrying a large share of the norm cost little to stop if they barely
    turn over the context: the paper's argument, made per model and per context.

    ``layer_types`` restricts the cut (and the score) to those layers, e.g.
    ``["full_attention"]`` for Gemma 4's layout. ``heads`` (from
    :func:`positional_heads`) adds to the evidence how much of the positional heads'
    norm the cut leaves rotating. ``context_length`` defaults to the measured window.
    """
    context = int(context_length or usage.window)
    if context < 2:
        raise ValueError(f"context_length must be at least 2 tokens, got {context_length!r}.")
    if not 0 < tolerance:
        raise ValueError(f"tolerance must be positive (a share of the logit scale, e.g. 0.05), got {tolerance!r}.")
    ps = sorted({float(p) for p in grid})
    if not ps or ps[0] < 0 or ps[-1] > 1:
        raise ValueError(f"grid must hold values of p in [0, 1], got {list(grid)!r}.")
    if 1.0 not in ps:
        ps.append(1.0)
    rows = _select_layers(usage, layer_types)
    n_pairs = usage.n_pairs
    head_dim = 2 * n_pairs
    weights = _pair_weights(usage)[rows]  # (layers, heads, pairs)
    spans = [usage.attention_span[r] for r in rows]
    moved = torch.stack(
        [drift(usage.frequencies[r], min(context, span) if span else context) for r, span in zip(rows, spans)]
    )  # (layers, pairs)
    total = weights.sum(dim=-1).clamp_min(1e-30)  # (layers, heads)
    q_share = usage.layer_share("query")[rows].mean(dim=0)
    k_share = usage.layer_share("key")[rows].mean(dim=0)
    candidates = []
    for p in ps:
        r = rotated_pairs(p, head_dim)
        cut = torch.arange(n_pairs) >= r
        per_head = (weights * moved[:, None, :] * cut).sum(dim=-1) / total
        per_layer = per_head.mean(dim=1)
        worst = int(per_layer.argmax())
        candidates.append(
            {
                "p": p,
                "rotated_pairs": r,
                "score": float(per_head.mean()),
                "worst_layer": usage.layers[rows[worst]],
                "worst_layer_score": float(per_layer[worst]),
                "query_norm_share_unrotated": float(q_share[cut].sum()),
                "key_norm_share_unrotated": float(k_share[cut].sum()),
            }
        )
    safe = [c for c in candidates if c["score"] <= tolerance]
    best = min(safe, key=lambda c: c["p"])  # p = 1 cuts nothing and always scores 0
    where: dict[str, Any] = {"layer_types": tuple(layer_types)} if layer_types else {}
    spec = PatchSpec("rope") if best["p"] == 1.0 else PatchSpec("p-rope", p=best["p"], **where)
    evidence = _evidence(usage, best, candidates, context, tolerance, layer_types, heads)
    return Suggestion(
        p=best["p"],
        spec=spec,
        rotated_pairs=best["rotated_pairs"],
        n_pairs=n_pairs,
        context_length=context,
        tolerance=float(tolerance),
        layer_types=tuple(layer_types) if layer_types else None,
        candidates=candidates,
        evidence=evidence,
    )


def _select_layers(usage: FrequencyUsage, layer_types: Sequence[str] | None) -> list[int]:
    if layer_types is None:
        return list(range(len(usage.layers)))
    check_layer_types(layer_types, usage.layer_types, usage.model_type)
    assert usage.layer_types is not None
    return [i for i, t in enumerate(usage.layer_types) if t in layer_types]


def _evidence(
    usage: FrequencyUsage,
    best: dict[str, Any],
    candidates: list[dict[str, Any]],
    context: int,
    tolerance: float,
    layer_types: Sequence[str] | None,
    heads: PositionalHeads | None,
) -> list[str]:
    n = usage.n_pairs
    where = f"{', '.join(layer_types)} layers" if layer_types else "every layer"
    lines = [
        f"p={best['p']:g} keeps pairs 0..{best['rotated_pairs'] - 1} of {n} rotating on {where} "
        f"and stops the lowest {n - best['rotated_pairs']}.",
        f"The stopped pairs hold {best['query_norm_share_unrotated']:.1%} of the query norm and "
        f"{best['key_norm_share_unrotated']:.1%} of the key norm; over {context} tokens they could move "
        f"{best['score']:.2%} of the attention-logit scale on average (tolerance {tolerance:.2%}; worst layer "
        f"{best['worst_layer']}: {best['worst_layer_score']:.2%}).",
    ]
    lower = [c for c in candidates if c["p"] < best["p"]]
    if lower:
        nxt = max(lower, key=lambda c: c["p"])
        lines.append(
            f"The next cut, p={nxt['p']:g}, scores {nxt['score']:.2%} (worst layer {nxt['worst_layer']}: "
            f"{nxt['worst_layer_score']:.2%}), over the tolerance."
        )
    if heads is not None and heads.heads:
        weights = _pair_weights(usage)
        kept = torch.arange(n) < best["rotated_pairs"]
        shares = []
        for h in heads.heads:
            if h["layer"] in usage.layers:
                w = weights[usage.layers.index(h["layer"]), h["head"]]
                shares.append(float(w[kept].sum() / w.sum().clamp_min(1e-30)))
        if shares:
            lines.append(
                f"The {len(heads.heads)} positional heads keep {min(shares):.0%} to {max(shares):.0%} of their "
                "query-key norm rotating."
            )
    return lines


def perplexity_by_p(
    model: nn.Module,
    tokenizer: Any,
    texts: str | Sequence[str] | torch.Tensor,
    ps: Sequence[float],
    *,
    layer_types: Sequence[str] | None = None,
    window: int = DEFAULT_WINDOW,
    n_windows: int = DEFAULT_WINDOWS,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Zero-shot perplexity of the model under p-RoPE for each p (1 = unchanged), sorted by p.

    The rows of :func:`hf_prope.evaluation.zero_shot_table` (``perplexity``,
    ``ratio_to_rope``...) with ``p`` added; the model is left unpatched afterwards.
    """
    values = sorted({float(p) for p in ps} | {1.0})
    bad = [p for p in values if not 0.0 <= p <= 1.0]
    if bad:
        raise ValueError(f"p must be in [0, 1], got {bad[0]!r}.")
    ids = token_windows(tokenizer, texts, window=window, n_windows=n_windows).flatten()
    where: dict[str, Any] = {"layer_types": tuple(layer_types)} if layer_types else {}
    variants: list[tuple[str, Any]] = [
        ("RoPE" if p == 1.0 else f"p={p:g}", None if p == 1.0 else PatchSpec("p-rope", p=p, **where)) for p in values
    ]
    rows = zero_shot_table(
        model, tokenizer, variants, window=window, n_windows=n_windows, input_ids=ids, progress=progress
    )
    for row, p in zip(rows, values):
        row["p"] = p
    return rows


def check_suggestion(
    model: nn.Module,
    tokenizer: Any,
    texts: str | Sequence[str] | torch.Tensor,
    suggestion: Suggestion,
    *,
    window: int | None = None,
    n_windows: int = DEFAULT_WINDOWS,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Zero-shot perplexity at RoPE, the suggested p and its neighbours, stored in ``suggestion.check``.

    Windows are ``suggestion.context_length`` tokens by default, on the suggestion's
    layer types. Returns the rows of :func:`perplexity_by_p`, each marked ``suggested``.
    """
    below, above = suggestion.neighbours()
    ps = [p for p in (below, suggestion.p, above) if p is not None]
    rows = perplexity_by_p(
        model,
        tokenizer,
        texts,
        ps,
        layer_types=suggestion.layer_types,
        progress=progress,
        window=int(window or suggestion.context_length),
        n_windows=n_windows,
    )
    suggestion.check = mark_suggestion(rows, suggestion)
    return suggestion.check


def mark_suggestion(rows: list[dict[str, Any]], suggestion: Suggestion) -> list[dict[str, Any]]:
    """RoPE, the suggestion and its neighbours out of a :func:`perplexity_by_p` table, marked."""
    below, above = suggestion.neighbours()
    wanted = {p for p in (below, suggestion.p, above, 1.0) if p is not None}
    picked = [dict(row, suggested=row["p"] == suggestion.p) for row in rows if row["p"] in wanted]
    missing = wanted - {row["p"] for row in picked}
    if missing:
        raise ValueError(f"The perplexity table has no row for p={sorted(missing)}; measure those p first.")
    return picked
