"""Save and load patched models locally, merged or adapter-only, logit for logit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_save_load import _plain_transformers
from tiny import MODEL_TYPES, logits, tiny_model, tokens
from transformers import AutoModelForCausalLM

import hf_prope
from hf_prope.hub import BASE_CONFIG_FILE, PATCH_FILE
from hf_prope.rope_types import has_native_proportional

PATCHES = {
    "llama": ("p-rope", {"p": 0.25}),
    "mistral": ("freq-mask", {"keep": [0, 1, 5]}),
    "qwen2": ("nope", {"layers": [1, 3]}),
    "qwen3": ("p-rope", {"p": 0.5, "layer_types": ["full_attention"]}),
    "gemma": ("p-rope", {"p": 0.75, "rotate": "lowest"}),
    "gemma2": ("p-rope", {"p": 0.5}),
    "gemma3_text": ("p-rope", {"p": 0.25, "layer_types": ["full_attention"]}),
}


def lora_model(model_type: str, base_dir: Path, patch: tuple[str, dict] | None = None):
    """A base saved to ``base_dir`` (plain RoPE), reloaded, patched (``patch`` or the type's in PATCHES) and
    wrapped with a non-trivial LoRA."""
    tiny_model(model_type).save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    name, params = patch or PATCHES[model_type]
    hf_prope.patch_model(base, name, **params)
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(base, lora).eval()


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_adapter_round_trip(model_type, tmp_path) -> None:
    model = lora_model(model_type, tmp_path / "base")
    ids = tokens()
    expected = logits(model, ids)
    out = hf_prope.save_pretrained(model, tmp_path / "adapter", save_method="adapter")
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", PATCH_FILE, BASE_CONFIG_FILE, "README.md"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded = hf_prope.from_pretrained(out).eval()
    assert hf_prope.get_patch(loaded) == hf_prope.get_patch(model)
    assert torch.equal(logits(loaded, ids), expected)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_merged_round_trip(model_type, tmp_path) -> None:
    model = lora_model(model_type, tmp_path / "base")
    ids = tokens()
    expected = logits(model, ids)
    out = hf_prope.save_pretrained(model, tmp_path / "merged", save_method="merged")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    loaded = hf_prope.from_pretrained(out).eval()
    assert hf_prope.get_patch(loaded) == hf_prope.get_patch(model)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)  # merging re-rounds weights
    assert isinstance(model, PeftModel)  # the caller's adapter model is left as it was


@pytest.mark.skipif(not has_native_proportional(), reason="transformers < 5.5 has no 'proportional'")
def test_without_hf_prope_merged_and_adapter(tmp_path) -> None:
    """The documented plain transformers (+ PEFT) ways to load, in a process that never imports hf_prope."""
    model = lora_model("llama", tmp_path / "base")
    ids = tokens()
    torch.save({"ids": ids, "logits": logits(model, ids)}, tmp_path / "expected.pt")
    hf_prope.save_pretrained(model, tmp_path / "merged", save_method="merged")
    hf_prope.save_pretrained(model, tmp_path / "adapter", save_method="adapter")
    result = _plain_transformers(
        f"""
        import json, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        exp = torch.load("expected.pt", weights_only=True)
        merged = AutoModelForCausalLM.from_pretrained("merged").eval()
        record = json.load(open("adapter/{PATCH_FILE}"))
        base = AutoModelForCausalLM.from_pretrained("base", rope_parameters=record["rope_parameters"])
        adapter = PeftModel.from_pretrained(base, "adapter").eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(exp["ids"]).logits, exp["logits"], atol=1e-5, rtol=1e-5)
            assert torch.equal(adapter(exp["ids"]).logits, exp["logits"])
        print("OK")
        """,
        tmp_path,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_plain_peft_load_restores_the_recorded_patch(tmp_path) -> None:
    """With hf_prope imported, PEFT's own load puts the adapter's recorded patch on an unpatched base."""
    model = lora_model("llama", tmp_path / "base")
    ids = tokens()
    hf_prope.save_pretrained(model, tmp_path / "adapter", save_method="adapter")
    plain_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    plain = logits(plain_base, ids)
    loaded = PeftModel.from_pretrained(plain_base, tmp_path / "adapter").eval()
    assert hf_prope.get_patch(plain_base) == hf_prope.get_patch(model)  # the base itself, in place
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert (logits(loaded, ids) - plain).abs().max() > 0.1  # the adapter and the patch both count


def test_plain_peft_load_on_a_differently_patched_base_warns_and_keeps_it(tmp_path) -> None:
    model = lora_model("llama", tmp_path / "base")
    hf_prope.save_pretrained(model, tmp_path / "adapter", save_method="adapter")
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    hf_prope.patch_model(other, "p-rope", p=0.75)
    with pytest.warns(UserWarning, match=r"carries p-RoPE, p=0.75.*was kept"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")
    assert hf_prope.get_patch(other) == hf_prope.PatchSpec("p-rope", p=0.75)


def test_adapter_on_mismatched_base_is_refused(tmp_path) -> None:
    model = lora_model("llama", tmp_path / "base")
    hf_prope.save_pretrained(model, tmp_path / "adapter", save_method="adapter")
    other = tiny_model("llama", head_dim=32, hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(hf_prope.PatchMismatchError, match="head_dim=16"):
        hf_prope.from_pretrained(tmp_path / "adapter", base_model=other)
    qwen = tiny_model("qwen2")
    with pytest.raises(hf_prope.PatchMismatchError, match="llama"):
        hf_prope.from_pretrained(tmp_path / "adapter", base_model=qwen)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda r: r["spec"].update(p=2), "field 'spec'"),
        (lambda r: r.pop("rope_parameters"), "'rope_parameters'"),
        (lambda r: r.update(format_version=9), "'format_version'"),
        (lambda r: r["spec"].update(colour="red"), "unknown field 'colour'"),
    ],
)
def test_hand_edited_patch_file_names_the_field(edit, match, tmp_path) -> None:
    model = lora_model("llama", tmp_path / "base")
    out = hf_prope.save_pretrained(model, tmp_path / "adapter", save_method="adapter")
    record = json.loads((out / PATCH_FILE).read_text())
    edit(record)
    (out / PATCH_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=match):
        hf_prope.from_pretrained(out)


class _ExplodingTokenizer:
    """Fails half-way through a save, after the weights were written."""

    def save_pretrained(self, folder) -> None:
        Path(folder, "tokenizer.json").write_text("{")
        raise OSError("disk full (simulated)")


def test_interrupted_local_save_keeps_the_old_folder(tmp_path) -> None:
    model = lora_model("llama", tmp_path / "base")
    target = tmp_path / "adapter"
    hf_prope.save_pretrained(model, target, save_method="adapter")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(OSError, match="disk full"):
        hf_prope.save_pretrained(model, target, save_method="merged", tokenizer=_ExplodingTokenizer())
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no temporary folder left


def test_save_refuses_bad_input_before_writing(tmp_path) -> None:
    plain = tiny_model("llama")
    with pytest.raises(ValueError, match="needs a PEFT model"):
        hf_prope.save_pretrained(plain, tmp_path / "x", save_method="adapter")
    with pytest.raises(ValueError, match="save_method"):
        hf_prope.save_pretrained(plain, tmp_path / "x", save_method="zip")  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()


def test_model_card_metadata_and_text(tmp_path) -> None:
    from huggingface_hub import ModelCard

    model = lora_model("gemma3_text", tmp_path / "base")
    out = hf_prope.save_pretrained(
        model, tmp_path / "adapter", license="apache-2.0", eval_results={"perplexity": 9.57}, repo_id="me/gemma-p25"
    )
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0"
    assert {"p-rope", "hf-prope", "lora"} <= set(card.data.tags)
    assert "only the highest 25%" in card.text and "full_attention" in card.text
    assert 'hf_prope.from_pretrained("me/gemma-p25")' in card.text and "9.57" in card.text
    assert "AutoPeftModelForCausalLM" in card.text  # the trap is named
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", card.text)  # nothing token-shaped
