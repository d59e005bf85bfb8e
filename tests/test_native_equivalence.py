"""Patched models against independent oracles: transformers' native path and hand-edited frequencies."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import HEAD_DIM, MODEL_TYPES, clone_with_config, logits, tiny_model, tokens

import hf_prope
from hf_prope.patching import patch_info
from hf_prope.rope_types import has_native_proportional

PS = [0.0, 0.25, 0.5, 0.75, 1.0]
needs_native = pytest.mark.skipif(not has_native_proportional(), reason="transformers < 5.5 has no 'proportional'")


def native_config(model: torch.nn.Module, p: float, layer_types: list[str] | None = None):
    """The config a user would write by hand for native p-RoPE (transformers' own 'proportional')."""
    cfg = copy.deepcopy(model.config)
    params = copy.deepcopy(cfg.rope_parameters)
    if "rope_type" in params:
        params = {"rope_type": "proportional", "rope_theta": params["rope_theta"], "partial_rotary_factor": p}
    else:
        for lt, sub in params.items():
            if layer_types is None or lt in layer_types:
                params[lt] = {"rope_type": "proportional", "rope_theta": sub["rope_theta"], "partial_rotary_factor": p}
    cfg.rope_parameters = params
    return cfg


@needs_native
@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("p", PS)
def test_logits_equal_native_proportional(model_type: str, p: float) -> None:
    model = tiny_model(model_type)
    native = clone_with_config(model, native_config(model, p))
    hf_prope.patch_model(model, "p-rope", p=p)
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(native, ids))


@needs_native
@pytest.mark.parametrize("p", [0.0, 0.25, 0.75])
def test_gemma3_layer_types_equal_native_nested(p: float) -> None:
    model = tiny_model("gemma3_text")
    native = clone_with_config(model, native_config(model, p, ["full_attention"]))
    hf_prope.patch_model(model, "p-rope", p=p, layer_types=["full_attention"])
    assert model.config.rope_parameters["sliding_attention"]["rope_type"] == "default"
    assert model.config.rope_parameters["full_attention"]["rope_type"] == "proportional"
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(native, ids))


def _zeroed_reference(model: torch.nn.Module, keep: list[bool]) -> torch.nn.Module:
    """An unpatched copy whose frequency buffers are zeroed by hand (no hf-prope code involved)."""
    ref = copy.deepcopy(model)
    rot = ref.model.rotary_emb
    mask = torch.tensor(keep)
    for name, buf in list(rot.named_buffers()):
        if name.endswith("inv_freq"):
            buf.copy_(torch.where(mask, buf, torch.zeros_like(buf)))
    return ref


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_freq_mask_matches_hand_zeroed_frequencies(model_type: str) -> None:
    model = tiny_model(model_type)
    keep_idx = [0, 1, 2, 5]
    keep = [i in keep_idx for i in range(HEAD_DIM // 2)]
    ref = _zeroed_reference(model, keep)
    hf_prope.patch_model(model, "freq-mask", keep=keep_idx)
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(ref, ids))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_p1_and_unpatch_are_bit_identical(model_type: str) -> None:
    model = tiny_model(model_type)
    ids = tokens()
    original = logits(model, ids)
    original_config = copy.deepcopy(model.config.to_dict())
    hf_prope.patch_model(model, "p-rope", p=1.0)
    assert torch.equal(logits(model, ids), original)
    hf_prope.patch_model(model, "nope", layers=[1, 4])
    assert not torch.equal(logits(model, ids), original)
    hf_prope.unpatch_model(model)
    assert torch.equal(logits(model, ids), original)
    assert model.config.to_dict() == original_config
    assert hf_prope.get_patch(model) is None


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_repatching_replaces_never_compounds(model_type: str) -> None:
    ids = tokens()
    direct = tiny_model(model_type)
    hf_prope.patch_model(direct, "p-rope", p=0.75, rotate="lowest")
    model = tiny_model(model_type)
    hf_prope.patch_model(model, "p-rope", p=0.25)
    hf_prope.patch_model(model, "nope", layers=[0])
    hf_prope.patch_model(model, "p-rope", p=0.75, rotate="lowest")
    assert torch.equal(logits(model, ids), logits(direct, ids))
    assert hf_prope.get_patch(model) == hf_prope.PatchSpec("p-rope", p=0.75, rotate="lowest")
    assert patch_info(model)["hooked_layers"] == []


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2", "gemma3_text"])
def test_layer_selective_patch_matches_hand_built_mixture(model_type: str) -> None:
    """Layers 1 and 4 NoPE, the rest RoPE: compare layer by layer with a hand-zeroed NoPE model."""
    model = tiny_model(model_type)
    nope = _zeroed_reference(model, [False] * (HEAD_DIM // 2))
    hf_prope.patch_model(model, "nope", layers=[1, 4])
    ids = tokens()
    # The hand-built oracle: run the unpatched decoder, swapping in NoPE cos/sin for layers 1 and 4.
    with torch.no_grad():
        cos_sin_nope = {}

        def grab(mod, args, kwargs):
            cos_sin_nope[mod.layer_idx] = kwargs["position_embeddings"]

        handles = [nope.model.layers[i].self_attn.register_forward_pre_hook(grab, with_kwargs=True) for i in (1, 4)]
        nope(ids)
        for h in handles:
            h.remove()

        def swap(mod, args, kwargs):
            kwargs = dict(kwargs)
            kwargs["position_embeddings"] = cos_sin_nope[mod.layer_idx]
            return args, kwargs

        ref = copy.deepcopy(model)
        hf_prope.unpatch_model(ref)
        for i in (1, 4):
            ref.model.layers[i].self_attn.register_forward_pre_hook(swap, with_kwargs=True)
        expected = ref(ids).logits
    assert torch.equal(logits(model, ids), expected)
    assert patch_info(model)["hooked_layers"] == [1, 4]


@pytest.mark.parametrize("model_type", ["qwen3", "gemma2"])
def test_layer_types_on_shared_rotary_models_hook_matching_layers(model_type: str) -> None:
    model = tiny_model(model_type)
    hf_prope.patch_model(model, "p-rope", p=0.25, layer_types=["full_attention"])
    expected = [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]
    assert patch_info(model)["hooked_layers"] == expected
    by_index = tiny_model(model_type)
    hf_prope.patch_model(by_index, "p-rope", p=0.25, layers=expected)
    ids = tokens()
    assert torch.equal(logits(model, ids), logits(by_index, ids))
