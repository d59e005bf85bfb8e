"""Rotate only what turns: the fast path for patches whose rotating pairs are a prefix (p-RoPE).

transformers applies RoPE as ``q * cos + rotate_half(q) * sin`` over every channel of a
head, so a model whose stopped pairs have ``cos = 1, sin = 0`` (native ``"proportional"``,
or any frequency mask) still pays for the whole head. When the pairs that keep rotating are
the first ``r`` (pair 0 = the highest frequency: every p-RoPE patch), only channels
``[0, r)`` and ``[d/2, d/2 + r)`` need work.

How it is installed, and why this way:

* The cos/sin tensors stay full width and correct. A patched model's rotary module (or the
  layer's :class:`~hf_prope.patching.PositionMaskHook`) *tags* them with ``r``: a Python
  attribute that states a fact about their values (pairs ``r..`` have cos = 1, sin = 0).
  Anything that ignores the tag (a direct call of the rotary module, another library's
  ``apply_rotary_pos_emb``) still gets the right numbers.
* The architecture's module-level ``apply_rotary_pos_emb`` is wrapped once (as
  Liger-Kernel swaps it; the attention ``forward`` looks it up at call time and is never
  copied). Where the ``kernels`` package is installed (newer transformers releases require it),
  that attribute is an ``nn.Module`` made from the function; its instance ``forward`` is
  replaced instead, so the object every attention and pickle refers to stays the same. A tagged call large enough to gain (:data:`MIN_ELEMENTS_TRAINING`,
  :data:`MIN_ELEMENTS_INFERENCE`) goes to :func:`rotate_prefix`; any other call goes to
  transformers' own function, unchanged. Because the tagged values are right at full width,
  either choice gives the same numbers. The per-model part (the tag hooks) is installed
  and removed by ``patch_model`` / ``unpatch_model``; the wrapper alone changes nothing.

A head-mask (one mask per key/value head) rides the same wrapper, for correctness rather than
speed: its layer hook hands on per-KV-head cos/sin, ``(batch, kv heads, tokens, d/2)``, tagged with
:data:`HEAD_TAG`, which transformers' function cannot broadcast; the wrapper sends them to
:func:`rotate_heads`. A patch that needs it refuses to install where the wrapper cannot be.

Which fast path runs: on the CPU the eager :func:`rotate_prefix` above a size threshold; on CUDA
the Triton kernel of :mod:`hf_prope.rotary_kernel` when triton is installed (in place), else
transformers' formula (the eager path loses on a GPU). :func:`apply_rotary` is the same choice
as a public function, and :func:`use_backend` forces one.

The result equals the general path bit for bit in eager mode, fp32 and bf16, forward and
backward: the rotated channels see the same products and sums in the same order, and the
others are passed through, which is what ``x * 1 + y * 0`` gives (a ``-0.0`` input comes
out as ``-0.0`` here and ``+0.0`` there: equal as numbers). Under ``torch.compile`` the
compiler fuses both paths its own way, so they may differ by rounding (tested to 1e-6).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

TAG = "_hf_prope_rotating_pairs"
# On cos/sin of shape (batch, kv heads, tokens, d): one row per key/value head (a head-mask).
HEAD_TAG = "_hf_prope_per_kv_head"

# Below these sizes (elements of q) transformers' full-width formula is as fast or faster:
# the prefix path runs more, smaller operations, and per-operation overhead wins until the
# work is memory-bound. Measured on 2 CPU cores (q of 9 heads x 64, r = 8 or 16 pairs):
# forward + backward 1.0x at 295k elements, 0.78-0.83x at 590k; without autograd 1.15-1.3x
# at 590k, 0.47-0.8x at 1.18M. Read at call time, so they can be tuned (0 = always).
MIN_ELEMENTS_TRAINING = 1 << 19
MIN_ELEMENTS_INFERENCE = 1 << 20

# modeling module name -> what its apply_rotary_pos_emb was (a function, or the nn.Module that
# the kernels package makes of it), while the wrapper is in place
_ORIGINALS: dict[str, Any] = {}
_enabled = True


def prefix_length(rotating: Sequence[bool]) -> int | None:
    """``r`` when exactly the first ``r`` pairs rotate (and not all of them), else ``None``."""
    flags = [bool(x) for x in rotating]
    r = sum(flags)
    if r == len(flags) or flags != [True] * r + [False] * (len(flags) - r):
        return None
    return r


def rotate_prefix(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, r: int, unsqueeze_dim: int = 1
) -> torch.Tensor:
    """RoPE on the first ``r`` pairs of ``x`` (HF layout), the other channels passed through.

    ``cos``/``sin`` are what the rotary module returns (full width, ``(..., T, d)``); only
    their first ``r`` channels are read. Pair ``i`` is channels ``i`` and ``i + d/2``.
    """
    if r == 0:
        return x
    half = x.shape[-1] // 2
    c = cos[..., :r].unsqueeze(unsqueeze_dim)
    s = sin[..., :r].unsqueeze(unsqueeze_dim)
    # transformers' q * cos + rotate_half(q) * sin, restricted to the rotated channels:
    # rotate_half puts -x2 in the first half, and a - b is exactly a + (-b).
    if _needs_grad(x, cos, sin):
        # split + cat: their backward is one cat and one split, where slicing would add up
        # a zero-filled full-size gradient per slice.
        x1, pass1, x2, pass2 = x.split((r, half - r, r, half - r), dim=-1)
        return torch.cat((x1 * c - x2 * s, pass1, x2 * c + x1 * s, pass2), dim=-1)
    # Without autograd: one fast copy in x's own memory layout, then the rotated channels
    # written in place (measured 0.47x transformers' time at p=0.25, against 0.53x for cat).
    x1, x2 = x[..., :r], x[..., half : half + r]
    out = x.clone()
    torch.sub(x1 * c, x2 * s, out=out[..., :r])
    torch.add(x2 * c, x1 * s, out=out[..., half : half + r])
    return out


def _needs_grad(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)


def worth_it(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the eager prefix path is expected to beat the full formula for this call (see MIN_ELEMENTS_*).

    Never on a GPU: measured on one H100 (torch 2.11, fp32, SmolLM2 shape), the eager path's
    extra small launches made the rotary step 1.5x slower than transformers' formula at every p.
    There the Triton kernel (:mod:`hf_prope.rotary_kernel`) is the fast path, or nothing.
    """
    if q.device.type != "cpu":
        return False
    limit = MIN_ELEMENTS_TRAINING if _needs_grad(q, cos, sin) else MIN_ELEMENTS_INFERENCE
    return q.numel() >= limit


BACKENDS = ("auto", "torch", "triton")
_backend = "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within this block patched models rotate with ``name``: ``auto`` (the default: the Triton kernel
    on CUDA when triton is installed, the eager prefix path on the CPU above its size threshold),
    ``torch`` (the eager prefix path whatever the size) or ``triton`` (the kernel wherever it runs,
    e.g. on CPU tensors under ``TRITON_INTERPRET=1``)."""
    global _backend
    _check_backend(name)
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        from .suggestions import closest

        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}." + closest(str(name), BACKENDS))


def _kernel_ok(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> bool:
    from . import rotary_kernel

    return rotary_kernel.supports(q, k, cos, sin, unsqueeze_dim)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rotating_pairs: int | None = None,
    *,
    backend: str = "auto",
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q and k (transformers' layout), rotating only their first ``rotating_pairs`` pairs.

    ``q``/``k`` are ``(batch, heads, tokens, d)`` (grouped-query attention: fewer k heads);
    ``cos``/``sin`` are what a transformers rotary module returns, ``(batch, tokens, d)`` or
    ``(tokens, d)``; pairs ``rotating_pairs..`` are passed through (as cos = 1, sin = 0 would
    give), ``None`` rotates every pair. ``backend``:

    * ``"torch"``: :func:`rotate_prefix`; returns new tensors, q and k untouched.
    * ``"triton"``: the kernel of :mod:`hf_prope.rotary_kernel`; works **in place** (q and k are
      modified and returned; the unrotated channels are never read or written). Needs triton and a
      CUDA tensor (or ``TRITON_INTERPRET=1``); raises ``ValueError`` otherwise.
    * ``"auto"``: ``triton`` where it can run (CUDA, triton installed, a supported layout), else ``torch``.

    Attention scaling (YaRN) is the caller's: cos/sin carry it, and a scaled model whose stopped
    pairs have cos != 1 is not a prefix case (patched models route it to transformers' formula).
    """
    _check_backend(backend)
    half = q.shape[-1] // 2
    r = half if rotating_pairs is None else int(rotating_pairs)
    if not 0 <= r <= half:
        raise ValueError(f"rotating_pairs must be in 0..{half} (head size {q.shape[-1]}), got {rotating_pairs!r}.")
    use_kernel = backend != "torch" and _kernel_ok(q, k, cos, sin, unsqueeze_dim)
    if backend == "triton" and not use_kernel:
        raise ValueError(
            "backend='triton' cannot run this call: it needs triton installed, CUDA tensors (or TRITON_INTERPRET=1), "
            "float32/16 or bfloat16 q and k of shape (batch, heads, tokens, d) with contiguous last dimensions, "
            "and cos/sin of shape (batch or 1, tokens, d). Use backend='torch'."
        )
    if use_kernel:
        from .rotary_kernel import rotate_prefix_inplace

        return rotate_prefix_inplace(q, k, cos, sin, r)
    return rotate_prefix(q, cos, sin, r, unsqueeze_dim), rotate_prefix(k, cos, sin, r, unsqueeze_dim)


def tag(cos: torch.Tensor, sin: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark ``cos``/``sin`` as rotating only their first ``r`` pairs (the caller vouches for it)."""
    if _enabled:
        setattr(cos, TAG, r)
        setattr(sin, TAG, r)
    return cos, sin


def tag_heads(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark ``cos``/``sin`` of shape ``(batch, kv heads, tokens, d/2)`` as one row per key/value head.

    One value per pair (the two channels of a pair share it). Unlike :func:`tag` this is not an
    optimisation: transformers' function cannot read such tensors (it fails on their shape rather
    than rotating wrongly), so :func:`install`'s wrapper must route them (:func:`rotate_heads`).
    """
    setattr(cos, HEAD_TAG, True)
    setattr(sin, HEAD_TAG, True)
    return cos, sin


def _rotate_halves(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, sign: int) -> torch.Tensor:
    """``x`` rotated by per-pair ``c``/``s`` (``sign=-1``: the transpose, for gradients), no autograd.

    transformers' ``x * cos + rotate_half(x) * sin`` per half: ``x1 c - x2 s`` and ``x2 c + x1 s``
    (``a - b`` is exactly ``a + (-b)``), the same products and sums, written into one output in x's
    own layout: fewer passes over memory than rotate_half's negation and concatenation.
    """
    half = x.shape[-1] // 2
    dtype = torch.promote_types(x.dtype, c.dtype)  # as x * cos would be
    # The layouts autograd's path gives: x's own forward, a contiguous gradient backward (it sums
    # zero-filled slices). A norm's weight gradient downstream sums in layout order, so it matters.
    out = torch.empty_like(x, dtype=dtype) if sign > 0 else torch.empty(x.shape, dtype=dtype, device=x.device)
    x1, x2 = x[..., :half], x[..., half:]
    o1, o2 = out[..., :half], out[..., half:]
    torch.mul(x.unflatten(-1, (2, half)), c.unsqueeze(-2), out=out.unflatten(-1, (2, half)))
    t = x2 * s
    (o1.sub_ if sign > 0 else o1.add_)(t)
    torch.mul(x1, s, out=t)
    (o2.add_ if sign > 0 else o2.sub_)(t)
    return out


class _HeadRotation(torch.autograd.Function):
    """q and k rotated per pair; the backward pass is the transposed rotation of the gradients.

    Bit for bit what autograd gives through transformers' formula: there the gradient of a channel
    is ``g * cos`` plus the other half's ``g * sin`` (negated for the second half), one sum of two
    terms, and that is what the transposed rotation computes.
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> Any:
        ctx.save_for_backward(c, s)
        return _rotate_halves(q, c, s, 1), _rotate_halves(k, c, s, 1)

    @staticmethod
    def backward(ctx: Any, grad_q: torch.Tensor, grad_k: torch.Tensor) -> Any:
        c, s = ctx.saved_tensors
        return _rotate_halves(grad_q, c, s, -1), _rotate_halves(grad_k, c, s, -1), None, None


def rotate_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    original: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE with one cos/sin per key/value head: query head ``h`` uses KV head ``h // (heads / kv heads)``.

    ``q``/``k`` are ``(batch, heads, tokens, d)``, ``cos``/``sin`` ``(batch or 1, kv heads, tokens,
    d/2)``: one value per pair, as :class:`~hf_prope.patching.PositionMaskHook` builds them. q is
    viewed as ``(batch, kv heads, group, tokens, d)`` with cos/sin broadcast over the group:
    ``repeat_kv``'s grouping (KV head ``j`` serves query heads ``j*g .. j*g + g - 1``). The products
    and sums are transformers' formula's, so a head-mask equal for every head gives the same bits,
    forward and backward; it costs less than that formula on the unpatched cos/sin (see ``hf-prope
    bench --only head_mask``), which pays for building the per-head cos/sin in each layer. Where the
    model rotates only part of each head (cos/sin narrower than half of q), ``original`` (its own
    ``apply_rotary_pos_emb``) is called on full-width cos/sin instead.
    """
    kv = k.shape[1]
    partial = 2 * cos.shape[-1] < q.shape[-1] and original is not None
    if cos.dim() != 4 or cos.shape[1] != kv or q.shape[1] % kv or (2 * cos.shape[-1] != q.shape[-1] and not partial):
        raise ValueError(
            f"per-KV-head cos/sin of shape {tuple(cos.shape)} do not fit k of {kv} heads and q of {q.shape[1]} heads "
            f"of {q.shape[-1]} channels (they need shape (batch, {kv}, tokens, {q.shape[-1] // 2}))."
        )
    qg, kg = q.unflatten(1, (kv, q.shape[1] // kv)), k.unsqueeze(2)
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    if partial:
        # The model's function rotates only part of each head (partial_rotary_factor, GPT-NeoX style):
        # its own code knows which part, so it gets full-width cos/sin broadcast over the group.
        q_out, k_out = original(qg, kg, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1), 2)  # type: ignore[misc]
        return q_out.flatten(1, 2), k_out.squeeze(2)
    if torch.is_grad_enabled() and (c.requires_grad or s.requires_grad):
        # Someone differentiates through the frequencies: the prefix path's plain operations with every
        # pair rotating (cos/sin hold exactly one value per pair), the same numbers.
        half = cos.shape[-1]
        q_out, k_out = rotate_prefix(qg, cos, sin, half, 2), rotate_prefix(kg, cos, sin, half, 2)
    else:
        q_out, k_out = _HeadRotation.apply(qg, kg, c.detach(), s.detach())
    return q_out.flatten(1, 2), k_out.squeeze(2)


def tagged_prefix(cos: torch.Tensor) -> int | None:
    """The ``r`` a tensor was tagged with, or ``None``."""
    return getattr(cos, TAG, None)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block nothing is tagged, so every model takes the general path (for comparisons)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def _own_function(current: Any) -> Callable[..., Any] | None:
    """transformers' own ``apply_rotary_pos_emb`` behind a module attribute, as a plain callable.

    Without the ``kernels`` package the attribute is the function. With it, transformers'
    ``use_kernel_forward_from_hub`` turns the function into an ``nn.Module`` instance whose
    class ``forward`` is the function (and dispatches to a Hub kernel once a model is
    kernelized); calling that class ``forward`` on the instance keeps that dispatch.
    """
    if isinstance(current, nn.Module):
        return functools.partial(type(current).forward, current)
    return current if callable(current) else None


def _parameters(fn: Callable[..., Any]) -> list[str]:
    if isinstance(fn, functools.partial):
        return list(inspect.signature(fn.func).parameters)[1:]  # self, then the function's own
    return list(inspect.signature(fn).parameters)


def _computes_hf_formula(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is ``x * cos + rotate_half(x) * sin`` over the whole head (pair i = channels i, i + d/2)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 1, 3, 8, generator=g)
    cos, sin = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)

    def formula(x: torch.Tensor) -> torch.Tensor:
        half = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)
        return x * cos[:, None] + half * sin[:, None]

    try:
        with torch.no_grad():
            qe, ke = fn(q, k, cos, sin, 1)
    except Exception:
        return False
    return bool(torch.allclose(qe, formula(q), atol=1e-6) and torch.allclose(ke, formula(k), atol=1e-6))


def install(modeling_module: str) -> bool:
    """Wrap ``apply_rotary_pos_emb`` of one transformers modeling module (once); False if it has none."""
    if modeling_module in _ORIGINALS:
        return True
    module = importlib.import_module(modeling_module)
    current = getattr(module, "apply_rotary_pos_emb", None)
    original = _own_function(current)
    # Only the signature this wrapper understands; anything else keeps transformers' own function.
    if original is None or _parameters(original) != ["q", "k", "cos", "sin", "unsqueeze_dim"]:
        return False
    if isinstance(current, nn.Module) and "forward" in current.__dict__:
        return False  # its forward was replaced already (a Hub kernel, another library): leave it
    if not _computes_hf_formula(original):
        return False  # another pair layout (interleaved, partial inside): the prefix paths would be wrong

    @functools.wraps(original.func if isinstance(original, functools.partial) else original)
    def apply_rotary_pos_emb(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(cos, HEAD_TAG, False):
            if unsqueeze_dim != 1:
                raise ValueError(
                    f"hf-prope's head-mask expects q/k as (batch, heads, tokens, d), got unsqueeze_dim={unsqueeze_dim}."
                )
            return rotate_heads(q, k, cos, sin, original)
        r = getattr(cos, TAG, None)
        if r is None or cos.shape[-1] != q.shape[-1]:
            return original(q, k, cos, sin, unsqueeze_dim)
        if _backend != "torch" and (_backend == "triton" or q.is_cuda) and _kernel_ok(q, k, cos, sin, unsqueeze_dim):
            from .rotary_kernel import rotate_prefix_inplace

            return rotate_prefix_inplace(q, k, cos, sin, r)
        if _backend == "torch" or worth_it(q, cos, sin):
            return rotate_prefix(q, cos, sin, r, unsqueeze_dim), rotate_prefix(k, cos, sin, r, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.__hf_prope_original__ = original  # type: ignore[attr-defined]
    if isinstance(current, nn.Module):
        # The instance stays the module attribute, so everything that holds it (each attention's
        # copies of it, pickles that name it, other modules that imported it) stays valid; only
        # its forward is ours. nn.Module.__call__ looks forward up on the instance first.
        current.forward = apply_rotary_pos_emb
    else:
        # Some transformers versions keep the function on every attention module (``rotary_fn``),
        # and pickle finds a function by its module and name, which now hold the wrapper. Give
        # the original a name pickle can resolve here, in this process or a fresh one (module
        # __getattr__).
        original.__hf_prope_name__ = (original.__module__, original.__qualname__)  # type: ignore[attr-defined]
        original.__module__ = __name__
        original.__qualname__ = _PICKLE_PREFIX + modeling_module.replace(".", "__")
        module.apply_rotary_pos_emb = apply_rotary_pos_emb  # type: ignore[attr-defined]
    _ORIGINALS[modeling_module] = current
    return True


_PICKLE_PREFIX = "original_apply_rotary_pos_emb__"


def __getattr__(name: str) -> Any:
    """transformers' own ``apply_rotary_pos_emb`` of a modeling module, by the name install() gave it."""
    if name.startswith(_PICKLE_PREFIX):
        module = importlib.import_module(name[len(_PICKLE_PREFIX) :].replace("__", "."))
        fn = module.apply_rotary_pos_emb
        return getattr(fn, "__hf_prope_original__", fn)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def transformers_apply(modeling_module: str) -> Callable[..., Any]:
    """transformers' own ``apply_rotary_pos_emb`` of a modeling module, as a callable, wrapped or not.

    The oracle for the fast path: it always computes the full-width formula (or a Hub kernel,
    where a model was kernelized), whatever :func:`install` did.
    """
    current = importlib.import_module(modeling_module).apply_rotary_pos_emb
    if isinstance(current, nn.Module):
        return _own_function(current)  # type: ignore[return-value]
    return getattr(current, "__hf_prope_original__", current)


def uninstall(modeling_module: str | None = None) -> None:
    """Put transformers' own ``apply_rotary_pos_emb`` back (one module, or all).

    Always safe: tagged tensors are correct at full width, so patched models keep their
    results and only lose the shortcut until they are patched again.
    """
    for name in [modeling_module] if modeling_module else list(_ORIGINALS):
        original = _ORIGINALS.pop(name, None)
        if isinstance(original, nn.Module):
            ours = original.__dict__.get("forward")
            if ours is not None and hasattr(ours, "__hf_prope_original__"):
                del original.forward
        elif original is not None:
            original.__module__, original.__qualname__ = original.__hf_prope_name__  # type: ignore[attr-defined]
            importlib.import_module(name).apply_rotary_pos_emb = original  # type: ignore[attr-defined]


def is_installed(modeling_module: str) -> bool:
    """Whether :func:`install` wrapped this modeling module's ``apply_rotary_pos_emb`` (and it still is)."""
    return modeling_module in _ORIGINALS


def installed() -> list[str]:
    """Modeling modules whose ``apply_rotary_pos_emb`` is wrapped now."""
    return sorted(_ORIGINALS)


class PrefixTagHook:
    """Forward hook on a rotary module: tag its cos/sin with the rotating prefix ``r``.

    ``rotated`` maps a layer type (``None`` for a model with one set of frequencies) to
    ``r``; outputs for a type not in it are left untagged. A picklable class rather than a
    closure, like PositionMaskHook, so patched models deep-copy, pickle and compile.
    """

    def __init__(self, rotated: dict[str | None, int]) -> None:
        self.rotated = dict(rotated)
        self.active = True  # off while hf_prope.patching.original_rope() runs the unpatched model

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if not getattr(self, "active", True):
            return output
        key = None
        if None not in self.rotated:
            key = kwargs.get("layer_type", args[2] if len(args) > 2 else None)
        r = self.rotated.get(key)
        if r is None:
            return output
        cos, sin = output
        return tag(cos, sin, r)
