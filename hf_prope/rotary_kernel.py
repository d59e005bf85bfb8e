"""A Triton kernel that rotates only what turns: RoPE on the first ``r`` pairs of q and k, in place.

For a p-RoPE patch the pairs ``r..`` of every head have cos = 1, sin = 0: transformers' formula
reads and writes them for nothing. This kernel, in one launch for q and k together (one each
under autograd), reads
and writes only channels ``[0, r)`` and ``[d/2, d/2 + r)`` of each head (transformers' layout:
pair ``i`` is channels ``i`` and ``i + d/2``), computing in fp32 and storing in the tensors'
own dtype; the other channels are never touched. Its backward pass is the same kernel with
the opposite sine (a rotation's transpose), applied in place to the incoming gradients (as
Liger-Kernel's rope backward does), saving only cos and sin.

Optional: it needs ``triton`` (``pip install hf-prope[gpu]``), used automatically on CUDA by
:func:`hf_prope.rotation.apply_rotary` and by patched models. With ``TRITON_INTERPRET=1`` set
before this module is imported, triton runs it on the CPU by interpretation (slow, exact in
fp32): that is how the tests check it without a GPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:  # optional: without triton, hf-prope rotates with torch
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - absent, or broken for this platform
    triton = None


# Triton runs kernels by interpretation, on CPU tensors too, when this is set as it decorates them (at import).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"


def available() -> bool:
    """Whether triton can be imported here."""
    return triton is not None


if triton is not None:
    # Module level: triton resolves a kernel's callees among the module's globals. Decorated at
    # import, which is when triton reads TRITON_INTERPRET.

    @triton.jit
    def _rotate_heads(ptr, offset, stride_h, n_heads, i, in_r, c, s, half, BLOCK_H: tl.constexpr):
        """Rotate pairs ``i < r`` of every head of one token, in place: channels i and i + half."""
        h = tl.arange(0, BLOCK_H)[:, None]
        mask = (h < n_heads) & in_r[None, :]
        row = ptr + offset + h * stride_h + i[None, :]
        x1 = tl.load(row, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(row + half, mask=mask, other=0.0).to(tl.float32)
        dtype = ptr.dtype.element_ty
        tl.store(row, (x1 * c[None, :] - x2 * s[None, :]).to(dtype), mask=mask)
        tl.store(row + half, (x2 * c[None, :] + x1 * s[None, :]).to(dtype), mask=mask)

    @triton.jit
    def _prefix_rope(
        q_ptr,
        k_ptr,
        cos_ptr,
        sin_ptr,
        q_sb,
        q_sh,
        q_st,
        k_sb,
        k_sh,
        k_st,
        c_sb,
        c_st,
        seq_len,
        n_qh,
        n_kh,
        half,
        r,
        sign,
        BLOCK_QH: tl.constexpr,
        BLOCK_KH: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // seq_len
        t = pid % seq_len
        i = tl.arange(0, BLOCK_R)
        in_r = i < r
        c = tl.load(cos_ptr + b * c_sb + t * c_st + i, mask=in_r, other=1.0).to(tl.float32)
        s = tl.load(sin_ptr + b * c_sb + t * c_st + i, mask=in_r, other=0.0).to(tl.float32) * sign
        _rotate_heads(q_ptr, b * q_sb + t * q_st, q_sh, n_qh, i, in_r, c, s, half, BLOCK_QH)
        _rotate_heads(k_ptr, b * k_sb + t * k_st, k_sh, n_kh, i, in_r, c, s, half, BLOCK_KH)  # GQA: fewer heads


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cos_sin_3d(cos: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """cos/sin as ``(batch or 1, tokens, d)``: the rotary module's output, with or without a batch dimension."""
    if cos.dim() == 2:
        return cos[None]
    if cos.dim() == 3:
        return cos
    # Already broadcast to the attention's layout: (batch, 1, tokens, d) or (batch, tokens, 1, d).
    return cos.squeeze(unsqueeze_dim)


def supports(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> bool:
    """Whether the kernel handles this call (device, layout, dtype); otherwise use the torch path."""
    if not (q.is_cuda or INTERPRETED):
        return False
    if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or not available():
        return False
    if q.device != k.device or q.device != cos.device or q.dtype != k.dtype:
        return False
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        return False
    if cos.requires_grad or sin.requires_grad or cos.shape != sin.shape or cos.stride() != sin.stride():
        return False
    c = _cos_sin_3d(cos, unsqueeze_dim)
    return c.dim() == 3 and c.shape[-2] == q.shape[-2] and c.shape[0] in (1, q.shape[0]) and c.shape[-1] == q.shape[-1]


def _launch(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, r: int, sign: float) -> None:
    """One launch: every head of ``q`` and of ``k`` (``None``: q alone), one program per (batch, token)."""
    batch, n_qh, seq_len, head_dim = q.shape
    other = q if k is None else k
    n_kh = 0 if k is None else k.shape[1]
    c = _cos_sin_3d(cos, 1)
    s = _cos_sin_3d(sin, 1)
    c_sb = c.stride(0) if c.shape[0] > 1 else 0
    _prefix_rope[(batch * seq_len,)](
        q,
        other,
        c,
        s,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        other.stride(0),
        other.stride(1),
        other.stride(2),
        c_sb,
        c.stride(1),
        seq_len,
        n_qh,
        n_kh,
        head_dim // 2,
        r,
        sign,
        BLOCK_QH=_next_pow2(n_qh),
        BLOCK_KH=_next_pow2(max(1, n_kh)),
        BLOCK_R=_next_pow2(r),
    )


class PrefixRotary(torch.autograd.Function):
    """RoPE on the first ``r`` pairs of one tensor, in place; backward: the same kernel with the opposite sine.

    One tensor per Function: autograd lets a Function modify a view in place only when it
    returns a single tensor (q and k are views of the projections' outputs).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, r: int) -> torch.Tensor:
        _launch(x, None, cos, sin, r, 1.0)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.r = r
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        cos, sin = ctx.saved_tensors
        grad = grad.contiguous() if grad.stride(-1) != 1 else grad
        _launch(grad, None, cos, sin, ctx.r, -1.0)
        return grad, None, None, None


def rotate_prefix_inplace(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``r`` pairs of ``q`` and ``k`` (``(batch, heads, tokens, d)``) in place; returns them.

    Without autograd, q and k go in one launch; under autograd, one launch each (see
    :class:`PrefixRotary`).
    """
    if r == 0:
        return q, k
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return PrefixRotary.apply(q, cos, sin, r), PrefixRotary.apply(k, cos, sin, r)
    with torch.no_grad():
        _launch(q, k, cos, sin, r, 1.0)
    return q, k
