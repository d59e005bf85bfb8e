"""The Triton prefix-rotation kernel, run on the CPU by triton's interpreter.

The main test run (no ``TRITON_INTERPRET``) has one test here: it runs this file again in a
fresh interpreter with ``TRITON_INTERPRET=1`` (triton reads it when a kernel is first built),
where every other test runs. Oracles: transformers' own ``apply_rotary_pos_emb`` with cos = 1,
sin = 0 beyond the prefix, and autograd through it; the input itself for the channels that
must not be touched; native ``"proportional"`` for a whole patched model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _has_triton() -> bool:
    from hf_prope import rotary_kernel

    return rotary_kernel.available()


def test_kernel_suite_under_the_triton_interpreter() -> None:
    if INTERPRETING:
        pytest.skip("this is the interpreted run itself")
    if not _has_triton():
        pytest.skip("triton is not installed (pip install hf-prope[gpu] or triton)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" in out.stdout  # the driver skips itself there


interpreted = pytest.mark.skipif(not INTERPRETING, reason="runs under TRITON_INTERPRET=1 (see the driver test)")


def _case(
    batch: int,
    heads: int,
    kv_heads: int,
    tokens: int,
    head_dim: int,
    r: int,
    *,
    batched_cos: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    g = torch.Generator().manual_seed(seed)
    # As the attention makes them: (batch, tokens, heads, d) projections viewed as (batch, heads, tokens, d).
    q = torch.randn(batch, tokens, heads, head_dim, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(batch, tokens, kv_heads, head_dim, generator=g).to(dtype).transpose(1, 2)
    freq = 1e4 ** (-torch.arange(head_dim // 2, dtype=torch.float32) * 2 / head_dim)
    freq[r:] = 0  # cos = 1, sin = 0 beyond the prefix: what a patched rotary module returns
    angles = (torch.arange(tokens, dtype=torch.float32) + 7)[:, None] * freq
    emb = torch.cat((angles, angles), dim=-1)
    emb = emb[None].repeat(batch, 1, 1) if batched_cos else emb
    return q, k, emb.cos().to(dtype), emb.sin().to(dtype)


def _reference(q, k, cos, sin):
    from hf_prope import rotation

    original = rotation.transformers_apply("transformers.models.llama.modeling_llama")
    return original(q, k, cos if cos.dim() == 3 else cos[None], sin if sin.dim() == 3 else sin[None])


SHAPES = [
    # batch, heads, kv heads, tokens, head_dim, r
    (2, 4, 2, 5, 16, 2),  # GQA, p=0.25
    (1, 3, 3, 7, 16, 6),  # p=0.75
    (2, 4, 1, 1, 32, 4),  # one-token decoding, multi-query
    (1, 2, 2, 3, 16, 8),  # every pair: plain RoPE
    (1, 5, 5, 4, 64, 11),  # r not a power of two
]


@interpreted
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batched_cos", [True, False])
def test_forward_equals_transformers_formula_in_fp32_and_leaves_the_rest_alone(shape, batched_cos) -> None:
    from hf_prope.rotation import apply_rotary

    q, k, cos, sin = _case(*shape, batched_cos=batched_cos)
    r, half = shape[-1], shape[-2] // 2
    want_q, want_k = _reference(q, k, cos, sin)
    before_q, before_k = q.clone(), k.clone()
    got_q, got_k = apply_rotary(q, k, cos, sin, r, backend="triton")
    assert got_q is q and got_k is k  # in place
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    for x, before in ((got_q, before_q), (got_k, before_k)):
        untouched = torch.cat((x[..., r:half], x[..., half + r :]), dim=-1)
        assert torch.equal(untouched, torch.cat((before[..., r:half], before[..., half + r :]), dim=-1))


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_one_rounding(dtype) -> None:
    from hf_prope.rotation import apply_rotary

    q, k, cos, sin = _case(2, 4, 2, 6, 32, 5, dtype=dtype)
    q32, k32, cos32, sin32 = (t.float() for t in (q, k, cos, sin))
    want_q, want_k = _reference(q32, k32, cos32, sin32)  # the exact result, rounded once below
    before = q.clone()
    got_q, got_k = apply_rotary(q, k, cos, sin, 5, backend="triton")
    assert got_q.dtype == dtype
    # The kernel computes in fp32 and rounds once; cos/sin themselves were rounded to dtype first.
    tol = {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got_q.float(), want_q, **tol)
    torch.testing.assert_close(got_k.float(), want_k, **tol)
    assert torch.equal(got_q[..., 5:16], before[..., 5:16])  # untouched channels: bit-identical


@interpreted
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
def test_backward_equals_autograd_of_the_general_path(shape) -> None:
    from hf_prope.rotation import apply_rotary

    q0, k0, cos, sin = _case(*shape)
    r = shape[-1]
    g = torch.Generator().manual_seed(5)
    grad_q, grad_k = torch.randn(q0.shape, generator=g), torch.randn(k0.shape, generator=g)
    grads = []
    for use_kernel in (True, False):
        qa = q0.transpose(1, 2).contiguous().requires_grad_()
        ka = k0.transpose(1, 2).contiguous().requires_grad_()
        q, k = (qa * 1).transpose(1, 2), (ka * 1).transpose(1, 2)  # non-leaf views, as a projection's output
        out = apply_rotary(q, k, cos, sin, r, backend="triton") if use_kernel else _reference(q, k, cos, sin)
        ((out[0] * grad_q).sum() + (out[1] * grad_k).sum()).backward()
        grads.append((qa.grad, ka.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@interpreted
def test_patched_model_with_the_kernel_equals_native_and_trains() -> None:
    from tiny import logits, tiny_model, tokens

    import hf_prope
    from hf_prope import rotation
    from hf_prope.rope_types import has_native_proportional

    model = hf_prope.patch_model(tiny_model("llama"), "p-rope", p=0.25)
    ids = tokens()
    general = logits(model, ids)
    with rotation.disabled():
        untagged = logits(model, ids)
    with rotation.use_backend("triton"):
        kernel = logits(model, ids)
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with rotation.disabled():
        model(ids, labels=ids).loss.backward()
    assert torch.equal(kernel, general) and torch.equal(kernel, untagged)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-6, atol=1e-7)
    if has_native_proportional():
        native = tiny_model(
            "llama",
            rope_parameters={"rope_type": "proportional", "rope_theta": 10_000.0, "partial_rotary_factor": 0.25},
        )
        torch.testing.assert_close(kernel, logits(native, ids), rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.parametrize("order", ["liger-after-patch", "liger-before-patch"])
def test_composes_with_liger_kernels_rope_in_either_order(order) -> None:
    """Liger-Kernel's fused RoPE replaces the module's apply_rotary_pos_emb; the patch must survive it."""
    liger_ops = pytest.importorskip("liger_kernel.ops.rope")
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from tiny import logits, tiny_model, tokens
    from transformers.models.llama import modeling_llama

    import hf_prope

    ids = tokens()
    reference = logits(hf_prope.patch_model(tiny_model("llama", initializer_range=0.1), "p-rope", p=0.25), ids)
    saved, forward, calls = modeling_llama.apply_rotary_pos_emb, liger_ops.LigerRopeFunction.forward, []

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    only_rope = dict(rope=True, rms_norm=False, swiglu=False, cross_entropy=False, fused_linear_cross_entropy=False)
    try:
        liger_ops.LigerRopeFunction.forward = staticmethod(counted)
        model = tiny_model("llama", initializer_range=0.1)
        plain = logits(model, ids)
        if order == "liger-before-patch":
            apply_liger_kernel_to_llama(model=model, **only_rope)
        hf_prope.patch_model(model, "p-rope", p=0.25)
        if order == "liger-after-patch":
            apply_liger_kernel_to_llama(model=model, **only_rope)
        got = logits(model, ids)
    finally:
        modeling_llama.apply_rotary_pos_emb = saved
        liger_ops.LigerRopeFunction.forward = forward
    assert len(calls) == model.config.num_hidden_layers  # Liger's kernel did the rotating
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    assert (plain - reference).abs().max() > 1e-2  # the patch changes these logits: the check can fail


@interpreted
def test_bad_backend_and_unsupported_calls() -> None:
    from hf_prope.rotation import apply_rotary

    q, k, cos, sin = _case(1, 2, 2, 3, 16, 2)
    with pytest.raises(ValueError, match="Did you mean 'triton'"):
        apply_rotary(q, k, cos, sin, 2, backend="trition")
    with pytest.raises(ValueError, match="rotating_pairs must be in 0..8"):
        apply_rotary(q, k, cos, sin, 9)
    with pytest.raises(ValueError, match="backend='triton' cannot run this call"):
        apply_rotary(q.to(torch.float64), k.to(torch.float64), cos.double(), sin.double(), 2, backend="triton")


@pytest.mark.skipif(INTERPRETING, reason="the plain (not interpreted) run")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torch_backend_and_auto_on_the_cpu(shape) -> None:
    from hf_prope.rotation import apply_rotary

    q, k, cos, sin = _case(*shape)
    before_q, before_k = q.clone(), k.clone()
    want = _reference(q, k, cos, sin)
    for backend in ("torch", "auto"):  # auto on CPU tensors: the torch path, out of place
        got = apply_rotary(q, k, cos, sin, shape[-1], backend=backend)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(q, before_q) and torch.equal(k, before_k)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='triton' cannot run this call"):
            apply_rotary(q, k, cos, sin, shape[-1], backend="triton")


# ------------------------------------------------------------------------------------------------
# On a GPU (skipped without one): the kernel compiled for the device, and a patched model in bf16

on_gpu = pytest.mark.skipif(
    INTERPRETING or not torch.cuda.is_available() or not _has_triton(), reason="needs a CUDA GPU and triton"
)


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_on_the_gpu_against_the_general_path(shape, dtype) -> None:
    from hf_prope.rotation import apply_rotary

    q, k, cos, sin = (t.cuda() for t in _case(*shape, dtype=dtype))
    r, half = shape[-1], shape[-2] // 2
    want = _reference(*(t.float() for t in (q, k, cos, sin)))
    before = q.clone()
    got = apply_rotary(q, k, cos, sin, r)  # auto: the kernel on CUDA
    assert got[0] is q  # it ran in place, so it was the kernel
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got[0].float(), want[0], **tol)
    torch.testing.assert_close(got[1].float(), want[1], **tol)
    assert torch.equal(got[0][..., r:half], before[..., r:half])


@on_gpu
def test_patched_model_on_the_gpu_in_bf16_equals_native_proportional() -> None:
    from tiny import tiny_model, tokens

    import hf_prope
    from hf_prope.rope_types import has_native_proportional

    if not has_native_proportional():
        pytest.skip("transformers < 5.5 has no native proportional rope type")
    model = hf_prope.patch_model(tiny_model("llama"), "p-rope", p=0.25).cuda().to(torch.bfloat16)
    native = (
        tiny_model(
            "llama",
            rope_parameters={"rope_type": "proportional", "rope_theta": 10_000.0, "partial_rotary_factor": 0.25},
        )
        .cuda()
        .to(torch.bfloat16)
    )
    ids = tokens().cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), native(ids).logits.float(), atol=5e-2, rtol=5e-2)
