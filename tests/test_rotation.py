"""Prefix-only rotation (hf_prope.rotation) against the general path: same numbers, less work."""

from __future__ import annotations

import importlib
import pickle

import pytest
import torch
from tiny import HEAD_DIM, MODEL_TYPES, clone_with_config, tiny_model, tokens

import hf_prope
from hf_prope import rotation
from hf_prope.patching import patch_info
from hf_prope.registry import get_architecture


def _native_apply(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' formula, written out: q * cos + rotate_half(q) * sin (full width)."""
    half = q.shape[-1] // 2
    rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
    return q * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def _cos_sin(r: int, d: int, t: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freq = 10_000.0 ** (-torch.arange(d // 2) * 2 / d)
    freq[r:] = 0  # what p-RoPE's frequencies are
    angles = torch.arange(t)[:, None].float() * freq
    emb = torch.cat((angles, angles), dim=-1)[None].expand(2, -1, -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [0, 1, 8, 16, 24])
def test_rotate_prefix_equals_the_full_formula_with_stopped_pairs(r: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(r)
    d = 64
    q = torch.randn(2, 3, 40, d, generator=g).to(dtype)
    cos, sin = _cos_sin(r, d, 40, dtype)
    expected = _native_apply(q, cos, sin)
    got = rotation.rotate_prefix(q, cos, sin, r)
    assert got.dtype == dtype and torch.equal(got, expected)
    # The channels of stopped pairs are the input's, bit for bit.
    assert torch.equal(got[..., r : d // 2], q[..., r : d // 2]) and torch.equal(
        got[..., d // 2 + r :], q[..., d // 2 + r :]
    )
    if r:
        assert not torch.equal(got[..., :r], q[..., :r])


def test_rotate_prefix_backward_equals_the_full_formula() -> None:
    d, r = 64, 8
    q = torch.randn(2, 3, 40, d, requires_grad=True)
    cos, sin = _cos_sin(r, d, 40, torch.float32)
    upstream = torch.randn(2, 3, 40, d)
    (grad_fast,) = torch.autograd.grad(rotation.rotate_prefix(q, cos, sin, r), q, upstream)
    (grad_full,) = torch.autograd.grad(_native_apply(q, cos, sin), q, upstream)
    assert torch.equal(grad_fast, grad_full)


def test_prefix_length() -> None:
    assert rotation.prefix_length([True, True, False, False]) == 2
    assert rotation.prefix_length([False, False]) == 0
    assert rotation.prefix_length([True, True]) is None  # nothing stopped: transformers' own path
    assert rotation.prefix_length([True, False, True, False]) is None  # not a prefix: general path
    assert rotation.prefix_length([False, True]) is None


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """Counts calls of the fast path (the wrapper looks rotate_prefix up at call time).

    Tiny models are far below the sizes where the fast path pays, so it is forced on.
    """
    monkeypatch.setattr(rotation, "MIN_ELEMENTS_TRAINING", 0)
    monkeypatch.setattr(rotation, "MIN_ELEMENTS_INFERENCE", 0)
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


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("p", [0.0, 0.25, 0.75])
def test_fast_path_equals_general_path_forward_and_backward(model_type: str, p: float, calls) -> None:
    ids = tokens()
    for where in _placements(model_type):
        model = tiny_model(model_type).train()
        hf_prope.patch_model(model, "p-rope", p=p, **where)
        calls["n"] = 0
        logits, grads = _loss_and_grads(model, ids)
        n_fast = calls["n"]
        assert n_fast > 0, f"the fast path did not run for {where}"
        assert n_fast % 2 == 0  # q and k of every patched layer
        calls["n"] = 0
        with rotation.disabled():  # the same model, every layer through transformers' own function
            ref_logits, ref_grads = _loss_and_grads(model, ids)
        assert calls["n"] == 0
        assert torch.equal(logits, ref_logits), where
        assert grads.keys() == ref_grads.keys()
        differ = [k for k in grads if not torch.equal(grads[k], ref_grads[k])]
        # Bit-identical, except that NoPE on models with per-head q/k norms may sum the norm
        # weights' gradients in another order (the tensors reach it with another layout).
        assert all(p == 0.0 and k.endswith(("q_norm.weight", "k_norm.weight")) for k in differ), (where, differ)
        for k in differ:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=1e-9)


def test_fast_path_equals_a_model_built_from_the_patched_config(calls) -> None:
    # An independent reference: the patched config loaded by transformers alone, no hf-prope hook.
    model = tiny_model("llama")
    hf_prope.patch_model(model, "p-rope", p=0.25)
    reference = clone_with_config(model, model.config)
    assert not reference.model.rotary_emb._forward_hooks
    with torch.no_grad():
        got = model(tokens()).logits
        assert calls["n"] == 2 * model.config.num_hidden_layers
        assert torch.equal(got, reference(tokens()).logits)


def test_fast_path_in_bf16(calls) -> None:
    model = tiny_model("qwen3").to(torch.bfloat16).train()
    hf_prope.patch_model(model, "p-rope", p=0.25)
    logits, grads = _loss_and_grads(model, tokens())
    assert calls["n"] == 12
    with rotation.disabled():
        ref_logits, ref_grads = _loss_and_grads(model, tokens())
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, ref_logits)
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)


def test_other_masks_and_scaled_rope_take_the_general_path(calls) -> None:
    ids = tokens()
    # Not a prefix: pairs 0 and 2 rotate.
    model = tiny_model("llama")
    hf_prope.patch_model(model, "freq-mask", keep=[0, 2])
    assert patch_info(model)["prefix_rotation"] == {}
    with torch.no_grad():
        model(ids)
    assert calls["n"] == 0
    # The paper's control rotates the *lowest* pairs: a suffix, general path.
    hf_prope.patch_model(model, "p-rope", p=0.75, rotate="lowest")
    with torch.no_grad():
        model(ids)
    assert calls["n"] == 0
    # YaRN scales every channel (attention_scaling != 1), rotated or not: general path.
    yarn = tiny_model(
        "llama",
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10_000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
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


def test_small_calls_keep_transformers_formula_and_large_ones_take_the_prefix(calls, monkeypatch) -> None:
    monkeypatch.setattr(rotation, "MIN_ELEMENTS_TRAINING", 1 << 19)  # the defaults (the fixture zeroes them)
    monkeypatch.setattr(rotation, "MIN_ELEMENTS_INFERENCE", 1 << 20)
    model = tiny_model("llama")
    hf_prope.patch_model(model, "p-rope", p=0.25)
    modeling = importlib.import_module(get_architecture("llama").modeling_module)
    d = HEAD_DIM
    cos, sin = _cos_sin(2, d, 1024, torch.float32)
    cos, sin = rotation.tag(cos.contiguous(), sin.contiguous(), 2)
    small = torch.randn(2, 4, 8, d)
    large = torch.randn(2, 32, 1024, d)  # 1,048,576 elements
    with torch.no_grad():
        modeling.apply_rotary_pos_emb(small, small, *rotation.tag(cos[:, :8], sin[:, :8], 2))
        assert calls["n"] == 0
        out_q, _ = modeling.apply_rotary_pos_emb(large, large, cos, sin)
        assert calls["n"] == 2
    assert torch.equal(out_q, _native_apply(large, cos, sin))
    # With autograd the prefix pays from half that size.
    half = torch.randn(2, 16, 1024, d, requires_grad=True)  # 524,288 elements
    modeling.apply_rotary_pos_emb(half, half, cos, sin)
    assert calls["n"] == 4
    with torch.no_grad():
        modeling.apply_rotary_pos_emb(half, half, cos, sin)
    assert calls["n"] == 4


def test_direct_rotary_callers_and_foreign_apply_functions_still_get_full_width_cos_sin(calls) -> None:
    # The tag is a fact about correct full-width values: code that ignores it stays right.
    model = tiny_model("llama")
    hf_prope.patch_model(model, "p-rope", p=0.25)
    rotary = model.model.rotary_emb
    x = torch.randn(1, 10, 64)
    position_ids = torch.arange(10)[None]
    cos, sin = rotary(x, position_ids)
    assert cos.shape == (1, 10, HEAD_DIM) and rotation.tagged_prefix(cos) == 2
    assert torch.equal(cos[..., 2 : HEAD_DIM // 2], torch.ones(1, 10, HEAD_DIM // 2 - 2))
    assert not sin[..., 2 : HEAD_DIM // 2].any()
    # Another library swapping the module's apply_rotary_pos_emb (as Liger-Kernel does) after us:
    # its own full-width formula, which reads no tag.
    modeling = importlib.import_module(get_architecture("llama").modeling_module)
    ours = modeling.apply_rotary_pos_emb

    def foreign_apply(q, k, cos, sin, unsqueeze_dim=1):
        assert unsqueeze_dim == 1
        return _native_apply(q, cos, sin), _native_apply(k, cos, sin)

    try:
        modeling.apply_rotary_pos_emb = foreign_apply
        with torch.no_grad():
            foreign = model(tokens()).logits
        assert calls["n"] == 0
    finally:
        modeling.apply_rotary_pos_emb = ours
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()).logits, foreign, rtol=1e-6, atol=1e-6)
    assert calls["n"] > 0


def test_unpatch_removes_the_tags_and_uninstall_restores_transformers(calls) -> None:
    arch = get_architecture("llama")
    modeling = importlib.import_module(arch.modeling_module)
    model = tiny_model("llama")
    ids = tokens()
    with torch.no_grad():
        before = model(ids).logits
    hf_prope.patch_model(model, "p-rope", p=0.25)
    assert arch.modeling_module in rotation.installed()
    assert patch_info(model)["prefix_rotation"] == {"all": 2}
    hf_prope.unpatch_model(model)
    assert not model.model.rotary_emb._forward_hooks
    assert patch_info(model)["prefix_rotation"] == {}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert calls["n"] == 0
    held = modeling.apply_rotary_pos_emb
    rotation.uninstall(arch.modeling_module)
    assert arch.modeling_module not in rotation.installed()
    assert not hasattr(modeling.apply_rotary_pos_emb, "__hf_prope_original__")
    assert not hasattr(modeling.apply_rotary_pos_emb.__dict__.get("forward"), "__hf_prope_original__")
    hf_prope.patch_model(model, "p-rope", p=0.25)
    with torch.no_grad():
        model(ids)
    assert calls["n"] > 0  # re-installed by patch_model
    rotation.uninstall(arch.modeling_module)
    calls["n"] = 0
    with torch.no_grad():
        model(ids)
    assert calls["n"] == 0  # uninstalled: transformers' own function only
    if isinstance(held, torch.nn.Module):
        # kernels' form: the same object stays the module attribute throughout
        assert modeling.apply_rotary_pos_emb is held
    rotation.install(arch.modeling_module)
    # Uninstalling under a patched model keeps its results (the tags are simply not read).
    with torch.no_grad():
        fast = model(ids).logits
        rotation.uninstall(arch.modeling_module)
        assert torch.equal(model(ids).logits, fast)
    rotation.install(arch.modeling_module)


def test_class_level_patch_and_reload_get_the_fast_path(tmp_path, calls) -> None:
    handle = hf_prope.apply_patch_to_class("qwen2", "p-rope", p=0.5)
    try:
        model = tiny_model("qwen2")
    finally:
        handle.revert()
    assert patch_info(model)["prefix_rotation"] == {"all": 4}
    model.save_pretrained(tmp_path)
    reloaded = hf_prope.from_pretrained(tmp_path)
    assert patch_info(reloaded)["prefix_rotation"] == {"all": 4}
    with torch.no_grad():
        assert torch.equal(reloaded(tokens()).logits, model(tokens()).logits)
    assert calls["n"] > 0


def test_patched_models_with_tag_hooks_pickle() -> None:
    model = tiny_model("gemma3_text")
    hf_prope.patch_model(model, "p-rope", p=0.25, layer_types=["full_attention"])
    clone = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(clone(tokens()).logits, model(tokens()).logits)
    assert patch_info(clone)["prefix_rotation"] == {"full_attention": 2}


def test_fast_path_under_torch_compile(calls) -> None:
    torch._dynamo.reset()
    model = tiny_model("llama").train()
    hf_prope.patch_model(model, "p-rope", p=0.25)
    reference = clone_with_config(model, model.config).train()  # no tags: transformers' own path
    ids = tokens()
    compiled = torch.compile(model, backend="inductor")
    logits, grads = _loss_and_grads(compiled, ids)
    assert calls["n"] > 0  # traced through the fast path
    ref_logits, ref_grads = _loss_and_grads(reference, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)


def test_fast_path_under_gradient_checkpointing(calls) -> None:
    # Recomputed layers get the same tagged position embeddings and take the fast path again.
    model = tiny_model("llama").train()
    hf_prope.patch_model(model, "p-rope", p=0.25)
    # transformers 5.24 renamed it; 5.0 has only the old name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    logits, grads = _loss_and_grads(model, tokens())
    assert calls["n"] == 2 * 2 * model.config.num_hidden_layers  # forward and recomputation, q and k
    with rotation.disabled():
        ref_logits, ref_grads = _loss_and_grads(model, tokens())
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_path_keeps_the_input_layout_and_values(dtype: torch.dtype) -> None:
    # q as the attention makes it: a (batch, tokens, heads, dim) projection seen as (batch, heads, tokens, dim).
    d, r = 64, 8
    q = torch.randn(2, 40, 3, d).to(dtype).transpose(1, 2)
    cos, sin = _cos_sin(r, d, 40, dtype)
    q_before = q.clone()
    with torch.no_grad():
        got = rotation.rotate_prefix(q, cos, sin, r)
    assert torch.equal(got, _native_apply(q, cos, sin))
    assert got.stride() == q.stride()  # no layout change for the attention that follows
    assert torch.equal(q, q_before)  # the input is not written to


def test_fast_path_in_inference_under_torch_compile(calls) -> None:
    torch._dynamo.reset()
    model = tiny_model("qwen3").eval()
    hf_prope.patch_model(model, "p-rope", p=0.5)
    with torch.no_grad():
        expected = clone_with_config(model, model.config)(tokens()).logits
        got = torch.compile(model, backend="inductor")(tokens()).logits
    assert calls["n"] > 0
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_models_holding_transformers_function_still_pickle_while_it_is_wrapped(tmp_path) -> None:
    # Some transformers versions store apply_rotary_pos_emb on each attention module (rotary_fn).
    import subprocess
    import sys

    arch = get_architecture("gemma3_text")
    rotation.install(arch.modeling_module)
    plain = tiny_model("gemma3_text")  # unpatched, built while the wrapper is installed
    modeling = importlib.import_module(arch.modeling_module)
    # What such a version stores: transformers' own object (the module attribute where kernels makes
    # it a module, whose forward is ours now; else the function the wrapper replaced).
    held = modeling.apply_rotary_pos_emb
    original = held if isinstance(held, torch.nn.Module) else held.__hf_prope_original__
    for module in plain.modules():
        if isinstance(module, arch.attention_class):
            module.rotary_fn = original  # what those versions do in __init__
    data = pickle.dumps(plain)
    assert pickle.loads(data).model.layers[0].self_attn.rotary_fn is original
    # A fresh process, where nothing is wrapped, loads it back with transformers' own function.
    path = tmp_path / "model.pkl"
    path.write_bytes(data)
    code = (
        "import pickle, sys, importlib; m = pickle.loads(open(sys.argv[1], 'rb').read()); "
        f"mod = importlib.import_module({arch.modeling_module!r}); "
        "assert m.model.layers[0].self_attn.rotary_fn is mod.apply_rotary_pos_emb; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
