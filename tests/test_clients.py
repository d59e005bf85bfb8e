"""The patch survives the saves and loads of clients hf-prope did not write: TRL, the Trainer, PEFT itself.

Each flow trains a LoRA on a patched tiny Llama (initializer_range 0.3, so plain RoPE is far
away), saves it the client's own way (no hf-prope call), and loads it back every way a user
would; the oracle is the trained model in memory, and every test also checks that the same
weights with plain RoPE are far from it (so the test can fail).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from tiny import HEAD_KEEP, char_tokenizer, logits, tiny_model, tokens
from transformers import AutoModelForCausalLM

import hf_prope
from hf_prope.patch_record import ADAPTER_WEIGHTS_FILE, BASE_CONFIG_FILE, PATCH_FILE, record_from_safetensors

PATCHES = {"p-rope": {"p": 0.5}, "freq-mask": {"keep": [0, 2, 5]}, "head-mask": {"head_keep": HEAD_KEEP}}
FAR = 1.0  # max |logit difference| of the same weights with plain RoPE is several units on this model


def _texts() -> list[str]:
    from pydoc_data.topics import topics

    return [t[:240] for t in list(topics.values())[:16]]


def _tokenized(tok):
    from datasets import Dataset

    return Dataset.from_dict({"text": _texts()}).map(
        lambda b: tok(b["text"], truncation=True, max_length=64), batched=True, remove_columns=["text"]
    )


def _base(folder: Path, name: str) -> torch.nn.Module:
    """A tiny Llama saved to ``folder`` (plain RoPE, with its tokenizer), loaded from there and patched."""
    tiny_model("llama", initializer_range=0.3).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder)
    return hf_prope.patch_model(base, name, **PATCHES[name])


def _lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _assert_carries_record(folder: Path, spec: hf_prope.PatchSpec) -> None:
    assert (folder / PATCH_FILE).is_file() and (folder / BASE_CONFIG_FILE).is_file(), sorted(
        p.name for p in folder.iterdir()
    )
    assert hf_prope.PatchSpec.from_dict(json.loads((folder / PATCH_FILE).read_text())["spec"]) == spec
    assert hf_prope.PatchSpec.from_dict(record_from_safetensors(folder / ADAPTER_WEIGHTS_FILE)["spec"]) == spec


def _assert_every_load_is_exact(folder: Path, base_dir: Path, spec: hf_prope.PatchSpec, expected, ids) -> None:
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder)
    hf_prope.unpatch_model(plain)
    assert (logits(plain.eval(), ids) - expected).abs().max() > FAR  # plain RoPE is far: these checks can fail

    loads = {
        "hf_prope.from_pretrained": lambda: hf_prope.from_pretrained(folder),
        "hf_prope.from_pretrained(base_model=folder)": lambda: hf_prope.from_pretrained(folder, base_model=base_dir),
        "hf_prope.from_pretrained(base_model=model)": lambda: hf_prope.from_pretrained(
            folder, base_model=AutoModelForCausalLM.from_pretrained(base_dir)
        ),
        "AutoPeftModelForCausalLM": lambda: AutoPeftModelForCausalLM.from_pretrained(folder),
        "PeftModel.from_pretrained": lambda: PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir), folder
        ),
        "transformers from_pretrained(adapter)": lambda: AutoModelForCausalLM.from_pretrained(folder),
    }
    for how, load in loads.items():
        model = load().eval()
        assert hf_prope.get_patch(model) == spec, how
        diff = (logits(model, ids) - expected).abs().max().item()
        assert diff < 1e-5, f"{how}: max |logit difference| {diff}"


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_trl_sft_trainer_save_model_and_checkpoints_carry_the_patch(name, tmp_path) -> None:
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    base = _base(tmp_path / "base", name)
    spec = hf_prope.get_patch(base)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        save_steps=2,
        per_device_train_batch_size=2,
        max_length=64,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_steps=1,
    )
    trainer = trl.SFTTrainer(
        model=base,
        args=args,
        train_dataset=Dataset.from_dict({"text": _texts()}),
        processing_class=char_tokenizer(),
        peft_config=_lora(),
    )
    trainer.train()
    assert hf_prope.get_patch(trainer.model) == spec  # TRL trained with the patch in effect
    trainer.save_model(str(tmp_path / "final"))
    ids = tokens()
    expected = logits(trainer.model.eval(), ids)
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-3"):
        _assert_carries_record(folder, spec)
    _assert_every_load_is_exact(tmp_path / "final", tmp_path / "base", spec, expected, ids)
    # checkpoint-2 holds the weights after two steps: it carries the patch too
    _assert_carries_record(tmp_path / "run" / "checkpoint-2", spec)
    mid = hf_prope.from_pretrained(tmp_path / "run" / "checkpoint-2")
    assert hf_prope.get_patch(mid) == spec


def _trained_peft(tmp_path: Path, name: str, **training: object):
    """A LoRA on a patched base, trained a few steps by the plain ``Trainer`` (no hf-prope call): (model, trainer, spec)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    base = _base(tmp_path / "base", name)
    spec = hf_prope.get_patch(base)
    model = get_peft_model(base, _lora())
    tok = char_tokenizer()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, report_to=[], use_cpu=True, **training
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_tokenized(tok),
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
    )
    trainer.train()
    return model, trainer, spec


def test_trainer_with_get_peft_model_and_peft_save(tmp_path) -> None:
    model, trainer, spec = _trained_peft(tmp_path, "p-rope", max_steps=2, save_steps=2, learning_rate=1e-3)
    ids = tokens()
    expected = logits(model.eval(), ids)
    model.save_pretrained(tmp_path / "peft_save")  # PEFT's own save
    trainer.save_model(str(tmp_path / "trainer_save"))
    for folder in (tmp_path / "peft_save", tmp_path / "trainer_save", tmp_path / "run" / "checkpoint-2"):
        _assert_carries_record(folder, spec)
    _assert_every_load_is_exact(tmp_path / "peft_save", tmp_path / "base", spec, expected, ids)


def test_peft_save_of_several_adapters_and_non_main_process(tmp_path) -> None:
    base = _base(tmp_path / "base", "p-rope")
    spec = hf_prope.get_patch(base)
    model = get_peft_model(base, _lora())
    model.add_adapter("second", _lora())
    model.save_pretrained(tmp_path / "both")
    _assert_carries_record(tmp_path / "both", spec)
    _assert_carries_record(tmp_path / "both" / "second", spec)
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)  # other ranks write nothing of hf-prope's
    assert not (tmp_path / "rank1" / PATCH_FILE).exists()


def test_peft_save_of_an_unpatched_base_is_left_as_peft_wrote_it(tmp_path) -> None:
    model = get_peft_model(tiny_model("llama"), _lora())
    model.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "README.md",
        "adapter_config.json",
        ADAPTER_WEIGHTS_FILE,
    ]
    assert record_from_safetensors(tmp_path / "a" / ADAPTER_WEIGHTS_FILE) is None


def test_from_pretrained_refuses_base_model_for_a_full_model(tmp_path) -> None:
    model = tiny_model("llama")
    hf_prope.patch_model(model, "p-rope", p=0.5)
    model.save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match="base_model= is for adapter folders"):
        hf_prope.from_pretrained(tmp_path / "full", base_model=tiny_model("llama"))


def _run(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize("mode", ["warn", "0"])
def test_peft_modes_warn_and_off(mode, tmp_path) -> None:
    """``HF_PROPE_PEFT_CHECK=warn``: record on save, warn on load; ``0``: PEFT untouched."""
    base = _base(tmp_path / "base", "p-rope")
    get_peft_model(base, _lora()).save_pretrained(tmp_path / "with_record")
    result = _run(
        f"""
        import warnings, hf_prope
        from peft import PeftModel, get_peft_model, LoraConfig
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained("base")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            PeftModel.from_pretrained(base, "with_record")
        print("PATCHED", hf_prope.get_patch(base) is not None)
        print("WARNED", any("does not carry that patch" in str(w.message) for w in caught))
        patched = hf_prope.patch_model(AutoModelForCausalLM.from_pretrained("base"), "p-rope", p=0.5)
        get_peft_model(patched, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained("new")
        import os
        print("RECORDED", os.path.exists("new/{PATCH_FILE}"))
        """,
        {"HF_PROPE_PEFT_CHECK": mode},
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "PATCHED False" in out
    assert ("WARNED True" in out) == (mode == "warn")
    assert ("RECORDED True" in out) == (mode == "warn")


def test_trainer_push_to_hub_uploads_the_record(tmp_path, monkeypatch) -> None:
    """``Trainer.push_to_hub`` (what TRL users call) through the real client to the local Hub, then PEFT's load."""
    from hub_server import local_hub_fixture

    for _hub in local_hub_fixture(monkeypatch, tmp_path / "hf-home"):
        monkeypatch.setenv("HF_TOKEN", "hf_good")
        model, trainer, spec = _trained_peft(
            tmp_path, "freq-mask", max_steps=1, push_to_hub=True, hub_model_id="user/trained", save_strategy="no"
        )
        trainer.push_to_hub()
        ids = tokens()
        expected = logits(model.eval(), ids)
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), "user/trained")
        assert hf_prope.get_patch(loaded) == spec
        assert (logits(loaded.eval(), ids) - expected).abs().max() < 1e-5
        again = hf_prope.from_pretrained("user/trained").eval()
        assert (logits(again, ids) - expected).abs().max() < 1e-5
