"""Masks on top of every rope type: scaling kept, run-time updates kept, saved and reloaded."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from packaging.version import Version
from tiny import HEAD_DIM, logits, tiny_model, tokens
from transformers import AutoModelForCausalLM

import hf_prope

N = HEAD_DIM // 2
ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "longrope": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "short_factor": [1.0 + 0.1 * i for i in range(N)],
        "long_factor": [2.0 + 0.5 * i for i in range(N)],
        "original_max_position_embeddings": 64,
    },
}
# Lengths inside the original context, and past max_position_embeddings (256) where dynamic
# and longrope switch to their long-context frequencies.
LENGTHS = [40, 300]


def expected_cos_sin(unpatched, keep: list[bool], length: int):
    """The unpatched model's own cos/sin (its scaling, its run-time update) with unkept pairs at frequency 0."""
    rot = unpatched.model.rotary_emb
    x = torch.zeros(1, length, 64)
    pos = torch.arange(length)[None]
    cos, sin = rot(x, pos)
    ch = torch.tensor(keep + keep)
    scale = torch.tensor(float(rot.attention_scaling), dtype=torch.float32).to(cos.dtype)
    return torch.where(ch, cos, scale), torch.where(ch, sin, torch.zeros_like(sin))


def _native_runtime_is_consistent(make) -> bool:
    """Whether transformers' own (unpatched) run-time update gives a fresh module's result at every length.

    Older 5.x releases key the cached state of dynamic/longrope as f"{layer_type}_..." ("None_...")
    and break on reuse; a mask on top cannot be more correct than the base it sits on.
    """
    used = make().model.rotary_emb
    try:
        for length in LENGTHS + LENGTHS[::-1]:
            x, pos = torch.zeros(1, length, 64), torch.arange(length)[None]
            fresh = make().model.rotary_emb(x, pos)
            got = used(x, pos)
            if not (torch.equal(got[0], fresh[0]) and torch.equal(got[1], fresh[1])):
                return False
    except Exception:  # noqa: BLE001 - the broken releases raise UnboundLocalError
        return False
    return True


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
@pytest.mark.parametrize("patch", [("p-rope", {"p": 0.25}), ("freq-mask", {"keep": [1, 4, 6]})])
def test_mask_on_top_of_rope_type(rope_type: str, patch, tmp_path) -> None:
    name, params = patch
    make = lambda: tiny_model("llama", rope_parameters=copy.deepcopy(ROPE_TYPES[rope_type]))  # noqa: E731
    if rope_type in ("dynamic", "longrope") and not _native_runtime_is_consistent(make):
        pytest.skip(f"this transformers' own {rope_type} run-time update is inconsistent on reuse")
    if rope_type == "longrope" and Version(transformers.__version__) < Version("5.22"):
        with pytest.raises(ValueError, match="transformers >= 5.22"):
            hf_prope.patch_model(make(), name, **params)
        return
    model, unpatched = make(), make()
    hf_prope.patch_model(model, name, **params)
    keep = hf_prope.get_patch(model).keep_mask([1.0] * N)
    rot = model.model.rotary_emb
    for length in LENGTHS + LENGTHS[::-1]:  # grow, then shrink back (dynamic resets)
        want_cos, want_sin = expected_cos_sin(unpatched, keep, length)
        cos, sin = rot(torch.zeros(1, length, 64), torch.arange(length)[None])
        assert torch.equal(cos, want_cos), (rope_type, length)
        assert torch.equal(sin, want_sin), (rope_type, length)

    # Saved and reloaded (hf-prope imported), it computes the same at every length.
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf_prope.get_patch(loaded) == hf_prope.get_patch(model)
    hf_prope.restore_patch(loaded)  # longrope's long/short switch needs the module fixed up
    for length in LENGTHS:
        want_cos, want_sin = expected_cos_sin(unpatched, keep, length)
        cos, sin = loaded.model.rotary_emb(torch.zeros(1, length, 64), torch.arange(length)[None])
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin), (rope_type, length)
    ids = tokens(length=30)
    assert torch.equal(logits(loaded, ids), logits(model, ids))

    hf_prope.unpatch_model(model)
    assert model.config.rope_parameters == unpatched.config.rope_parameters
    assert torch.equal(logits(model, ids), logits(unpatched, ids))


def test_reload_without_restore_keeps_dynamic_masking(tmp_path) -> None:
    """The 'dynamic' trap: the rope type must keep 'dynamic' in its name to stay dynamic after a plain load."""
    model = tiny_model("llama", rope_parameters=copy.deepcopy(ROPE_TYPES["dynamic"]))
    unpatched = copy.deepcopy(model)  # fresh: used only once, at the long length
    hf_prope.patch_model(model, "freq-mask", keep=[0, 2, 3])
    assert model.config.rope_parameters["rope_type"] == "hf_prope_dynamic"
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    keep = [i in (0, 2, 3) for i in range(N)]
    want_cos, _ = expected_cos_sin(unpatched, keep, 300)
    cos, _ = loaded.model.rotary_emb(torch.zeros(1, 300, 64), torch.arange(300)[None])
    assert torch.equal(cos, want_cos)


def test_init_weights_recompute_keeps_the_patch() -> None:
    """transformers recomputes inv_freq from the config at weight init; the config carries the patch."""
    model = tiny_model("llama")
    hf_prope.patch_model(model, "freq-mask", keep=[0, 5])
    before = model.model.rotary_emb.inv_freq.clone()
    model.model.rotary_emb._is_hf_initialized = False
    model._init_weights(model.model.rotary_emb)
    assert torch.equal(model.model.rotary_emb.inv_freq, before)
    assert int((before != 0).sum()) == 2
