"""Prefix-only rotation (hf_prope.rotation) against the general path: same numbers, less work."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import HEAD_DIM, MODEL_TYPES, clone_with_config, tiny_model, tokens

import hf_prope
from hf_prope import rotation

N_PAIRS = HEAD_DIM // 2


def _native_apply(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' formula, written out: q * cos + rotate_half(q) * sin (full width)."""
    half = q.shape[-1] // 2
    rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    return q * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [0, 1, 8, 16, 24])
def test_rotate_prefix_equals_the_full_formula_with_stopped_pairs(r: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(r)
    d = 64
    q = torch.randn(2, 3, 40, d, generator=g).to(dtype)
    freq = 10_000.0 ** (-torch.arange(d // 2) * 2 / d)
    freq[r:] = 0  # what p-RoPE's frequencies are
    angles = torch.arange(40)[:, None].float() * freq
    emb = torch.cat((angles, angles), dim=-1)[None].expand(2, -1, -1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    expected = _native_apply(q, cos, sin)
    got = rotation.rotate_prefix(q, cos[..., :r], sin[..., :r])
    assert got.dtype == dtype and torch.equal(got, expected)
    if r:
        untouched = torch.cat((q[..., r : d // 2], q[..., d // 2 + r :]), dim=-1)
        assert torch.equal(torch.cat((got[..., r : d // 2], got[..., d // 2 + r :]), dim=-1), untouched)


def test_prefix_length() -> None:
    assert rotation.prefix_length([True, True, False, False]) == 2
    assert rotation.prefix_length([False, False]) == 0
    assert rotation.prefix_length([True, True]) is None  # nothing stopped: transformers' own path
    assert rotation.prefix_length([True, False, True, False]) is None  # not a prefix: general path
    assert rotation.prefix_length([False, True]) is None


def _calls(monkeypatch) -> dict[str, int]:
    count = {"n": 0}
    original = rotation.rotate_prefix

    def counting(*args, **kwargs):
        count["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(rotation, "rotate_prefix", counting)
    return count


def _placements(model_type: str) -> list[dict]:
    out = [{}, {"layers": [1, 4]}]
    if model_type in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
        out.append({"layer_types": ["full_attention"]})
    return out


def _general_path(model: torch.nn.Module, where: dict) -> torch.nn.Module:
    """The same patch computed by the general path: full-width cos/sin with cos=1, sin=0 on stopped pairs."""
    if not where.get("layers") and not (where.get("layer_types") and model.config.model_type != "gemma3_text"):
        return clone_with_config(model, model.config)  # built from the patched config: no hf-prope hook
    other = copy.deepcopy(model)
    for module in other.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, hf_prope.PositionMaskHook):
                hook.prefix = None
    return other


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("p", [0.0, 0.25, 0.75])
def test_fast_path_equals_general_path_forward_and_backward(model_type: str, p: float, monkeypatch) -> None:
    calls = _calls(monkeypatch)
    ids = tokens()
    for where in _placements(model_type):
        model = tiny_model(model_type).train()
        hf_prope.patch_model(model, "p-rope", p=p, **where)
        reference = _general_path(model, where).train()
        calls["n"] = 0
        logits, grads = _loss_and_grads(model, ids)
        assert calls["n"] > 0, f"the fast path did not run for {where}"
        n_fast = calls["n"]
        calls["n"] = 0
        ref_logits, ref_grads = _loss_and_grads(reference, ids)
        assert calls["n"] == 0
        assert torch.equal(logits, ref_logits), where
        assert grads.keys() == ref_grads.keys()
        differ = [k for k in grads if not torch.equal(grads[k], ref_grads[k])]
        # Bit-identical, except that NoPE on models with per-head q/k norms sums the norm
        # weights' gradients in another order (the tensors reach it with another layout).
        assert all(p == 0.0 and k.endswith(("q_norm.weight", "k_norm.weight")) for k in differ), (where, differ)
        for k in differ:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=1e-9)
        assert n_fast % 2 == 0  # q and k of every patched layer


def test_fast_path_in_bf16(monkeypatch) -> None:
    calls = _calls(monkeypatch)
    model = tiny_model("qwen3").to(torch.bfloat16).train()
    hf_prope.patch_model(model, "p-rope", p=0.25)
    reference = clone_with_config(model, model.config).to(torch.bfloat16).train()
    logits, grads = _loss_and_grads(model, tokens())
    assert calls["n"] == 12
    ref_logits, ref_grads = _loss_and_grads(reference, tokens())
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, ref_logits)
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)


def test_other_masks_and_scaled_rope_take_the_general_path(monkeypatch) -> None:
    calls = _calls(monkeypatch)
    ids = tokens()
    # Not a prefix: pairs 0 and 2 rotate.
    model = tiny_model("llama")
    hf_prope.patch_model(model, "freq-mask", keep=[0, 2])
    with torch.no_grad():
        model(ids)
    assert calls["n"] == 0
    # The paper's control rotates the *lowest* pairs: a suffix, general path.
    hf_prope.patch_model(model, "p-rope", p=0.75, rotate="lowest")
    with torch.no_grad():
        model(ids)
    assert calls["n"] == 0
    # YaRN scales every channel (attention_scaling != 1), rotated or not: general path.
    yarn = tiny_model("llama", rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
                                                 "original_max_position_embeddings": 64})
    hf_prope.patch_model(yarn, "p-rope", p=0.25)
    assert yarn.model.rotary_emb.attention_scaling != 1.0
    reference = clone_with_config(yarn, yarn.config)
    with torch.no_grad():
        assert torch.equal(yarn(ids).logits, reference(ids).logits)
    assert calls["n"] == 0
    # RoPE itself (p=1) and unpatched models: transformers' own function, untouched results.
    plain = tiny_model("llama")
    with torch.no_grad():
        before = plain(ids).logits
        hf_prope.patch_model(plain, "p-rope", p=1.0)
        assert torch.equal(plain(ids).logits, before)
    assert calls["n"] == 0


def test_unpatch_removes_the_hook_and_uninstall_restores_transformers(monkeypatch) -> None:
    import transformers.models.llama.modeling_llama as modeling

    calls = _calls(monkeypatch)
    model = tiny_model("llama")
    ids = tokens()
    with torch.no_grad():
        before = model(ids).logits
    hf_prope.patch_model(model, "p-rope", p=0.25)
    assert "transformers.models.llama.modeling_llama" in rotation.installed()
    assert hf_prope.patch_info(model)["prefix_rotation"] == {"all": 2}
    hf_prope.unpatch_model(model)
    assert not model.model.rotary_emb._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert calls["n"] == 0
    wrapped = modeling.apply_rotary_pos_emb
    rotation.uninstall("transformers.models.llama.modeling_llama")
    assert modeling.apply_rotary_pos_emb is wrapped.__hf_prope_original__
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    hf_prope.patch_model(model, "p-rope", p=0.25)  # re-installs
    assert modeling.apply_rotary_pos_emb is not wrapped.__hf_prope_original__
    with torch.no_grad():
        model(ids)
    assert calls["n"] > 0


def test_fast_path_under_torch_compile() -> None:
    torch._dynamo.reset()
    model = tiny_model("llama").train()
    hf_prope.patch_model(model, "p-rope", p=0.25)
    reference = clone_with_config(model, model.config).train()
    ids = tokens()
    compiled = torch.compile(model, backend="inductor")
    logits, grads = _loss_and_grads(compiled, ids)
    ref_logits, ref_grads = _loss_and_grads(reference, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)
