"""Patched models with everything around them: KV cache, attention backends, checkpointing,
padding, dtypes, torch.compile and PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import MODEL_TYPES, logits, tiny_model, tokens

import hf_prope

PATCHES = [("p-rope", {"p": 0.25}), ("nope", {"layers": [1, 4]}), ("freq-mask", {"keep": [0, 2, 7]})]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("patch", PATCHES)
def test_kv_cache_generation_equals_full_recomputation(model_type, patch) -> None:
    name, params = patch
    model = tiny_model(model_type)
    hf_prope.patch_model(model, name, **params)
    ids = tokens(batch=1, length=10)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
        full = model(out.sequences).logits
    steps = torch.stack(out.logits, dim=1)[0]
    recomputed = full[0, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(steps, recomputed, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.sequences[0, ids.shape[1] :], recomputed.argmax(-1))


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_eager_and_sdpa_agree(model_type) -> None:
    eager = tiny_model(model_type, attn="eager")
    sdpa = tiny_model(model_type, attn="sdpa")
    for m in (eager, sdpa):
        hf_prope.patch_model(m, "p-rope", p=0.5, layers=[0, 2])
    ids = tokens()
    torch.testing.assert_close(logits(eager, ids), logits(sdpa, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("patch", PATCHES)
def test_gradient_checkpointing_gives_the_same_gradients(patch) -> None:
    name, params = patch
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        hf_prope.patch_model(model, name, **params)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = tokens()
        model(ids, labels=ids).loss.backward()
        grads.append(model.model.layers[1].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_left_padded_batch_matches_unpadded(model_type) -> None:
    model = tiny_model(model_type)
    if model_type == "qwen2":
        hf_prope.patch_model(model, "nope", layers=[1])  # the hook path
    else:
        hf_prope.patch_model(model, "p-rope", p=0.25)
    short = tokens(batch=1, length=12, seed=3)
    pad = 5
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(short)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    a = logits(model, short)
    b = logits(model, padded, attention_mask=mask, position_ids=position_ids)[:, pad:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_bf16_patched_equals_bf16_reference(model_type) -> None:
    model = tiny_model(model_type).to(torch.bfloat16)
    ref = copy.deepcopy(model)
    hf_prope.patch_model(model, "nope", layers=[1])
    hf_prope.patch_model(ref, "nope", layers=[1])
    ids = tokens()
    out = logits(model, ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # Bit for bit with the model unpatched and re-patched in bf16 (no fp32 leak, no drift).
    hf_prope.unpatch_model(ref)
    hf_prope.patch_model(ref, "nope", layers=[1])
    assert torch.equal(out, logits(ref, ids))
    hf_prope.unpatch_model(model)
    assert torch.equal(logits(model, ids), logits(tiny_model(model_type).to(torch.bfloat16), ids))


def test_torch_compile_smoke() -> None:
    model = tiny_model("llama")
    hf_prope.patch_model(model, "nope", layers=[1])
    ids = tokens(batch=1, length=16)
    eager_out = logits(model, ids)
    compiled = torch.compile(model)
    with torch.no_grad():
        out = compiled(ids).logits
    torch.testing.assert_close(out, eager_out)


@pytest.mark.parametrize("order", ["patch-then-peft", "peft-then-patch"])
def test_peft_wrapped_models(order) -> None:
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    reference = tiny_model("llama")
    model = tiny_model("llama")
    torch.manual_seed(5)
    if order == "patch-then-peft":
        hf_prope.patch_model(model, "nope", layers=[1])
        model = get_peft_model(model, lora)
    else:
        model = get_peft_model(model, lora)
        hf_prope.patch_model(model, "nope", layers=[1])
    assert hf_prope.get_patch(model) == hf_prope.PatchSpec("nope", layers=(1,))
    # Oracle: same LoRA weights merged into a plain model patched directly.
    merged = copy.deepcopy(model).merge_and_unload()
    hf_prope.patch_model(reference, "nope", layers=[1])
    reference.load_state_dict(merged.state_dict())
    ids = tokens()
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=1e-5)
    # training through the adapter works with the patch
    model.train()
    model(ids, labels=ids).loss.backward()
    hf_prope.unpatch_model(model)
    assert hf_prope.get_patch(model) is None
