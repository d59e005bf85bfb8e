"""Rotate only what turns: the fast path for patches whose rotating pairs are a prefix (p-RoPE).

transformers applies RoPE as ``q * cos + rotate_half(q) * sin`` over every channel of a
head, so a model whose stopped pairs have ``cos = 1, sin = 0`` (native ``"proportional"``,
or any frequency mask) still pays for the whole head. When the pairs that keep rotating are
the first ``r`` (pair 0 = the highest frequency, so every p-RoPE patch), hf-prope hands the
attention layers cos/sin for those ``r`` pairs only: a forward hook on the model's rotary
module (or the layer's :class:`~hf_prope.patching.PositionMaskHook`) keeps their first
``r`` channels. The architecture's module-level ``apply_rotary_pos_emb`` is wrapped once
(as Liger-Kernel swaps it): narrow cos/sin go to :func:`rotate_prefix`, which rotates
channels ``[0, r)`` and ``[d/2, d/2 + r)`` and passes the others through untouched;
full-width cos/sin (every unpatched model, every non-prefix mask) go to transformers' own
function, unchanged. The attention ``forward`` is never copied.

The result equals the general path bit for bit in eager mode (same operations in the same
order on the rotated channels; ``x * 1 + y * 0 == x`` on the others), in fp32 and bf16,
forward and backward. Under ``torch.compile`` both paths are fused by the compiler and may
differ by rounding (within 1e-6 relative in fp32, tested).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Sequence

import torch
from torch import nn

# modeling module name -> transformers' own apply_rotary_pos_emb, while the wrapper is in place
_ORIGINALS: dict[str, Callable[..., Any]] = {}


def prefix_length(rotating: Sequence[bool]) -> int | None:
    """``r`` when exactly the first ``r`` pairs rotate (and not all of them), else ``None``."""
    flags = [bool(x) for x in rotating]
    r = sum(flags)
    if r == len(flags) or flags != [True] * r + [False] * (len(flags) - r):
        return None
    return r


def rotate_prefix(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> torch.Tensor:
    """Rotate the first ``r = cos.shape[-1]`` pairs of ``x`` (HF layout) and pass the rest through.

    ``cos``/``sin`` hold the first ``r`` channels of what the rotary module computes
    (``cos`` of pairs 0..r-1). Pair ``i`` is channels ``i`` and ``i + d/2``.
    """
    r = cos.shape[-1]
    if r == 0:
        return x
    half = x.shape[-1] // 2
    c = cos.unsqueeze(unsqueeze_dim)
    s = sin.unsqueeze(unsqueeze_dim)
    x1 = x[..., :r]
    x2 = x[..., half : half + r]
    # The same products and sums, in the same order, as transformers' q * cos + rotate_half(q) * sin.
    return torch.cat((x1 * c - x2 * s, x[..., r:half], x2 * c + x1 * s, x[..., half + r :]), dim=-1)


def install(modeling_module: str) -> bool:
    """Wrap ``apply_rotary_pos_emb`` of one transformers modeling module (once); False if it has none."""
    if modeling_module in _ORIGINALS:
        return True
    module = importlib.import_module(modeling_module)
    original = getattr(module, "apply_rotary_pos_emb", None)
    if not callable(original):
        return False

    @functools.wraps(original)
    def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if cos.shape[-1] == q.shape[-1]:
            return original(q, k, cos, sin, *args, **kwargs)
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[-1] if args else 1)
        return rotate_prefix(q, cos, sin, unsqueeze_dim), rotate_prefix(k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.__hf_prope_original__ = original  # type: ignore[attr-defined]
    module.apply_rotary_pos_emb = apply_rotary_pos_emb  # type: ignore[attr-defined]
    _ORIGINALS[modeling_module] = original
    return True


def uninstall(modeling_module: str | None = None) -> None:
    """Put transformers' own ``apply_rotary_pos_emb`` back (one module, or all).

    Models patched afterwards still compute correctly only if they are re-patched: their
    hooks hand out narrow cos/sin, which the original function cannot take.
    """
    for name in [modeling_module] if modeling_module else list(_ORIGINALS):
        original = _ORIGINALS.pop(name, None)
        if original is not None:
            importlib.import_module(name).apply_rotary_pos_emb = original  # type: ignore[attr-defined]


def installed() -> list[str]:
    """Modeling modules whose ``apply_rotary_pos_emb`` is wrapped now."""
    return sorted(_ORIGINALS)


class NarrowRotaryHook:
    """Forward hook on a rotary module: keep only the channels of the rotating prefix.

    ``rotated`` maps a layer type (``None`` for a model with one set of frequencies) to
    ``r``; a type not in it keeps full-width cos/sin. Picklable, like PositionMaskHook.
    """

    def __init__(self, rotated: dict[str | None, int]) -> None:
        self.rotated = dict(rotated)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        key = None
        if None not in self.rotated:
            key = kwargs.get("layer_type", args[2] if len(args) > 2 else None)
        r = self.rotated.get(key)
        if r is None:
            return output
        cos, sin = output
        return cos[..., :r], sin[..., :r]
