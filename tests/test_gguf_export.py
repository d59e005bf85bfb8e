"""GGUF export for llama.cpp: the file's structure, round trips, refusals, and llama.cpp's own logits.

The llama.cpp tests run the exported file in llama.cpp itself (llama-cpp-python, built from
its sdist) and compare with transformers' logits of the patched model; a plain-RoPE file of
the same weights (what llama.cpp's own converter writes) must differ, so the comparison can
fail. They skip where llama-cpp-python is not installed, unless ``HF_PROPE_REQUIRE_LLAMA_CPP=1``
(set by CI in the environment that builds it), where a missing build is a failure.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from tiny import HEAD_KEEP, bpe_tokenizer, tiny_model

import hf_prope
from hf_prope.gguf import STOPPED_FACTOR, GGUFExportError, export_gguf, llama_cpp_logits, read_rope_factors

gguf = pytest.importorskip("gguf")

VOCAB = 320  # byte-level BPE needs the 256 bytes; tiny models get a slightly larger embedding
INIT = 0.1  # larger weights than the default, so patching changes tiny models' logits clearly (mean |d| ~0.2)
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAS_LLAMA_CPP and os.environ.get("HF_PROPE_REQUIRE_LLAMA_CPP") != "1",
    reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36 builds it, ~5 min)",
)


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(VOCAB)


def _tiny(model_type: str = "llama", **overrides):
    return tiny_model(model_type, **{"vocab_size": VOCAB, "initializer_range": INIT, **overrides})


def _reader(path):
    return gguf.GGUFReader(path)


def _field(reader, key):
    return reader.fields[key].contents()


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


# -- structure ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,params,expected",
    [
        ("p-rope", {"p": 0.25}, [1, 1] + [STOPPED_FACTOR] * 6),
        ("p-rope", {"p": 0.75}, [1] * 6 + [STOPPED_FACTOR] * 2),
        (
            "freq-mask",
            {"keep": [0, 3, 5]},
            [1, STOPPED_FACTOR, STOPPED_FACTOR, 1, STOPPED_FACTOR, 1, STOPPED_FACTOR, STOPPED_FACTOR],
        ),
        ("nope", {}, [STOPPED_FACTOR] * 8),
    ],
)
def test_rope_freqs_holds_the_patch(name, params, expected, tokenizer, tmp_path) -> None:
    model = _tiny()
    hf_prope.patch_model(model, name, **params)
    result = export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, dtype="f32")
    reader = _reader(tmp_path / "m.gguf")
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.rope.dimension_count") == 16
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(model.config.rope_parameters["rope_theta"])
    assert _field(reader, "llama.block_count") == 6
    assert _field(reader, "llama.attention.head_count_kv") == 2
    factors = read_rope_factors(tmp_path / "m.gguf")
    assert factors == pytest.approx([float(np.float32(e)) for e in expected])
    assert result.rope_freqs is not None and len(result.rope_freqs) == 8
    assert [t.tensor_type.name for t in reader.tensors if t.name == "rope_freqs.weight"] == ["F32"]
    # token_embd, 9 per layer, output_norm, output (untied), rope_freqs
    assert len(reader.tensors) == result.n_tensors == 1 + 6 * 9 + 1 + 1 + 1


def test_unpatched_model_is_a_plain_gguf(tokenizer, tmp_path) -> None:
    model = _tiny()
    result = export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, dtype="f32")
    assert result.rope_freqs is None and result.spec is None
    assert read_rope_factors(tmp_path / "m.gguf") is None
    reader = _reader(tmp_path / "m.gguf")
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB
    vocab = tokenizer.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[vocab["<|endoftext|>"]] == 3  # control
    assert types[len(vocab) :] == [5] * (VOCAB - len(vocab))  # padding rows of the embedding: unused


def test_plain_transformers_drops_the_patch_and_hf_prope_restores_it(tokenizer, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = _tiny()
    ids = list(range(3, 43))
    plain_logits = _hf_logits(model, ids)
    hf_prope.patch_model(model, "freq-mask", keep=[0, 3, 5])
    patched_logits = _hf_logits(model, ids)
    export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, dtype="f32")

    # transformers' own GGUF loader undoes the pair layout (its code, not ours): weights come back exactly...
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    original = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    # ... but it ignores rope_freqs: plain RoPE, the patch silently gone.
    assert hf_prope.get_patch(loaded) is None
    np.testing.assert_allclose(_hf_logits(loaded.eval(), ids), plain_logits, atol=1e-5)

    restored = hf_prope.from_pretrained(tmp_path / "m.gguf")
    assert hf_prope.get_patch(restored) == hf_prope.PatchSpec("freq-mask", keep=(0, 3, 5))
    np.testing.assert_allclose(_hf_logits(restored, ids), patched_logits, atol=1e-5)
    assert np.abs(patched_logits - plain_logits).mean() > 0.05


def test_a_mask_from_another_writer_comes_back_as_the_patch(tmp_path) -> None:
    from hf_prope.gguf import spec_from_factors

    inv = [10000 ** (-i / 8) for i in range(8)]
    s = STOPPED_FACTOR
    assert spec_from_factors([1.0] * 8, inv) is None
    assert spec_from_factors([1.0] * 2 + [s] * 6, inv) == hf_prope.PatchSpec("p-rope", p=0.25)
    assert spec_from_factors([s] * 8, inv) == hf_prope.PatchSpec("nope")
    assert spec_from_factors([1.0, s, 1.0] + [s] * 5, inv) == hf_prope.PatchSpec(
        "freq-mask", mask=(True, False, True) + (False,) * 5
    )
    # A recorded spec that stops other pairs than the factors do is not believed.
    assert spec_from_factors([1.0] * 2 + [s] * 6, inv, hf_prope.PatchSpec("p-rope", p=0.5)) == hf_prope.PatchSpec(
        "p-rope", p=0.25
    )


def test_llama3_scaling_multiplies_into_the_factors(tokenizer, tmp_path) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = _tiny(rope_parameters=dict(llama3))
    hf_prope.patch_model(model, "p-rope", p=0.5)
    export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, dtype="f32")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](_tiny(rope_parameters=dict(llama3)).config, "cpu")
    plain = 1.0 / (500000.0 ** (np.arange(0, 16, 2) / 16))
    expected = [plain[i] / scaled[i].item() if i < 4 else STOPPED_FACTOR for i in range(8)]
    assert expected[3] > 1.5  # the scaling reaches a rotating pair, so the test sees it
    assert read_rope_factors(tmp_path / "m.gguf") == pytest.approx(expected, rel=1e-5)
    with pytest.warns(UserWarning, match="does not restore"):
        hf_prope.from_pretrained(tmp_path / "m.gguf")


def test_a_native_proportional_model_without_hf_prope_record_exports(tokenizer, tmp_path) -> None:
    from hf_prope.rope_types import has_native_proportional

    if not has_native_proportional():
        pytest.skip("transformers < 5.5 has no 'proportional' rope type")
    # Built as someone else's p-RoPE checkpoint would be: the rope type alone, no hf-prope record in the config.
    model = _tiny(rope_parameters={"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    # Read as what it is: p-RoPE over the full RoPE of the same theta (as Gemma 4's own).
    assert hf_prope.get_patch(model) == hf_prope.PatchSpec("p-rope", p=0.25)
    export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, dtype="f32")
    assert read_rope_factors(tmp_path / "m.gguf") == pytest.approx([1, 1] + [float(np.float32(STOPPED_FACTOR))] * 6)
    ids = list(range(3, 43))
    restored = hf_prope.from_pretrained(tmp_path / "m.gguf")
    assert hf_prope.get_patch(restored) == hf_prope.PatchSpec("p-rope", p=0.25)
    np.testing.assert_allclose(_hf_logits(restored, ids), _hf_logits(model, ids), atol=1e-5)


@pytest.mark.parametrize("dtype,torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_matrices_and_f32_norms(dtype, torch_dtype, tokenizer, tmp_path) -> None:
    model = _tiny()
    hf_prope.patch_model(model, "p-rope", p=0.5)
    export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, dtype=dtype)
    reader = _reader(tmp_path / "m.gguf")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == dtype.upper() and kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["rope_freqs.weight"] == "F32"
    loaded, _ = hf_prope.gguf.load_gguf(tmp_path / "m.gguf")
    original = model.state_dict()
    for key, value in loaded.state_dict().items():
        want = original[key] if original[key].ndim == 1 else original[key].to(torch_dtype).float()
        assert torch.equal(value, want), key
    assert hf_prope.get_patch(loaded) == hf_prope.PatchSpec("p-rope", p=0.5)


def test_lora_adapters_are_merged_and_the_model_is_left_alone(tokenizer, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = _tiny()
    hf_prope.patch_model(model, "p-rope", p=0.25)
    config = LoraConfig(
        r=4, target_modules=["q_proj", "k_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)  # a trained head
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    export_gguf(peft_model, tmp_path / "m.gguf", tokenizer=tokenizer, dtype="f32")
    after = peft_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, merged[key], rtol=0, atol=1e-6)
    assert not torch.equal(
        loaded["model.layers.0.self_attn.q_proj.weight"],
        before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"],
    )
    assert torch.equal(loaded["lm_head.weight"], 1.5 * model.lm_head.original_module.weight)


def test_mistral_exports_and_warns_about_its_window(tokenizer, tmp_path) -> None:
    model = _tiny("mistral", sliding_window=32)
    hf_prope.patch_model(model, "p-rope", p=0.5)
    with pytest.warns(UserWarning, match="sliding window of 32"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    assert _field(_reader(tmp_path / "m.gguf"), "general.architecture") == "llama"


# -- refusals ---------------------------------------------------------------------------------------


def _assert_nothing_written(tmp_path) -> None:
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"])
def test_architectures_whose_graph_ignores_factors_are_refused(model_type, tokenizer, tmp_path) -> None:
    model = _tiny(model_type)
    hf_prope.patch_model(model, "p-rope", p=0.25)
    with pytest.raises(
        GGUFExportError, match=f"llama.cpp's {model_type} graph passes no frequency factors.*llama, mistral"
    ):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer)
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: hf_prope.patch_model(_tiny(), "p-rope", p=0.25, layers=[0, 1]), "applies only to some layers"),
        (lambda: hf_prope.patch_model(_tiny(), "head-mask", head_keep=HEAD_KEEP), "each key/value head its own"),
        (
            lambda: hf_prope.patch_model(
                _tiny(
                    rope_parameters={
                        "rope_type": "yarn",
                        "rope_theta": 10000.0,
                        "factor": 4.0,
                        "original_max_position_embeddings": 64,
                    }
                ),
                "p-rope",
                p=0.5,
            ),
            "'yarn'",
        ),
        (
            lambda: hf_prope.patch_model(
                _tiny(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), "p-rope", p=0.5
            ),
            "'dynamic'",
        ),
    ],
    ids=["layer-selective", "per-head", "yarn", "dynamic"],
)
def test_patches_a_gguf_cannot_carry_are_refused(build, match, tokenizer, tmp_path) -> None:
    with pytest.raises(GGUFExportError, match=match):
        export_gguf(build(), tmp_path / "m.gguf", tokenizer=tokenizer)
    _assert_nothing_written(tmp_path)


def test_bad_arguments_and_tokenizers_are_refused_before_writing(tokenizer, tmp_path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = _tiny()
    with pytest.raises(ValueError, match="dtype must be one of f16, f32, bf16"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, dtype="q4")
    with pytest.raises(ValueError, match="must end in .gguf"):
        export_gguf(model, tmp_path / "m.bin", tokenizer=tokenizer)
    word_level = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    )
    with pytest.raises(GGUFExportError, match="byte-level BPE"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer=word_level)
    with pytest.raises(GGUFExportError, match="No tokenizer found"):
        export_gguf(model, tmp_path / "m.gguf")
    small = _tiny(vocab_size=300)
    with pytest.raises(GGUFExportError, match="tokens but the model's embedding has 300 rows"):
        export_gguf(small, tmp_path / "m.gguf", tokenizer=tokenizer)
    _assert_nothing_written(tmp_path)


# -- the command ----------------------------------------------------------------------------------


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hf_prope", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_cli_exports_a_saved_folder_and_reexports_a_gguf(tokenizer, tmp_path) -> None:
    model = _tiny()
    hf_prope.patch_model(model, "p-rope", p=0.25)
    hf_prope.save_pretrained(model, tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")

    done = _cli("export", str(tmp_path / "saved"), "--gguf", str(tmp_path / "a.gguf"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "p-RoPE, p=0.25" in done.stdout and "rope_freqs: 8 factors" in done.stdout
    assert read_rope_factors(tmp_path / "a.gguf") == pytest.approx([1, 1] + [float(np.float32(STOPPED_FACTOR))] * 6)

    # A GGUF in, a GGUF out: the patch comes back from rope_freqs, the vocabulary is copied as is, and --patch re-patches.
    done = _cli(
        "export",
        str(tmp_path / "a.gguf"),
        "--gguf",
        str(tmp_path / "b.gguf"),
        "--patch",
        "freq-mask",
        "--keep",
        "0,3",
        "--dtype",
        "f32",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    a, b = _reader(tmp_path / "a.gguf"), _reader(tmp_path / "b.gguf")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre"):
        assert _field(a, key) == _field(b, key), key
    s = float(np.float32(STOPPED_FACTOR))
    assert read_rope_factors(tmp_path / "b.gguf") == pytest.approx([1, s, s, 1, s, s, s, s])

    done = _cli("export", str(tmp_path / "saved"), "--gguf", str(tmp_path / "c.gguf"), "--p", "0.5", cwd=tmp_path)
    assert done.returncode == 2 and "--p and --keep go with --patch" in done.stderr
    assert not (tmp_path / "c.gguf").exists()


# -- llama.cpp itself -------------------------------------------------------------------------------

# Measured (llama-cpp-python 0.3.36, 2 CPU cores): tiny models, f32 file and f32 KV cache, max |d logit|
# 2.3e-6 to 2.9e-6, against a plain-RoPE file's mean |d| of 0.010 (llama3 scaling) to 0.20.
TINY_MAX = 2e-5


@needs_llama_cpp
@pytest.mark.parametrize(
    "case",
    ["p-rope", "freq-mask", "unpatched", "llama3+p-rope", "mistral"],
)
def test_llama_cpp_runs_the_export_as_transformers_runs_the_patched_model(case, tokenizer, tmp_path) -> None:
    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    model = (
        _tiny("mistral", sliding_window=None)
        if case == "mistral"
        else _tiny(rope_parameters=llama3)
        if "llama3" in case
        else _tiny()
    )
    ids = [int(i) for i in torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(0))]
    plain = copy.deepcopy(model)
    if case == "freq-mask":
        hf_prope.patch_model(model, "freq-mask", keep=[0, 3, 5])
    elif case != "unpatched":
        hf_prope.patch_model(model, "p-rope", p=0.25)
    want = _hf_logits(model, ids)
    export_gguf(model, tmp_path / "patched.gguf", tokenizer=tokenizer, dtype="f32")
    got = llama_cpp_logits(tmp_path / "patched.gguf", ids, f32_cache=True)
    assert np.abs(got - want).max() < TINY_MAX
    if case != "unpatched":
        # What llama.cpp's own converter writes (plain RoPE) is visibly another model.
        export_gguf(plain, tmp_path / "plain.gguf", tokenizer=tokenizer, dtype="f32")
        plain_d = np.abs(llama_cpp_logits(tmp_path / "plain.gguf", ids, f32_cache=True) - want).mean()
        assert plain_d > 100 * TINY_MAX


@needs_llama_cpp
@pytest.mark.real_model
def test_llama_cpp_runs_exported_smollm2_with_its_patch(tmp_path) -> None:
    from pydoc_data.topics import topics

    from hf_prope.models import embedded_gguf_path, load_embedded

    model, tok = load_embedded("smollm2-135m")
    ids = tok(topics["assert"] + topics["bltin-code-objects"])["input_ids"][:192]
    plain_logits = _hf_logits(model, ids)
    export_gguf(model, tmp_path / "plain.gguf", dtype="f16")  # vocabulary copied from the embedded file
    plain_cpp = llama_cpp_logits(tmp_path / "plain.gguf", ids)
    assert np.abs(plain_cpp - plain_logits).mean() < 0.02
    reader = _reader(tmp_path / "plain.gguf")
    assert _field(reader, "tokenizer.ggml.pre") == "smollm"
    assert _field(reader, "tokenizer.ggml.tokens") == _field(
        _reader(embedded_gguf_path("smollm2-135m")), "tokenizer.ggml.tokens"
    )

    for name, params in [("p-rope", {"p": 0.25}), ("freq-mask", {"keep": [0, 1, 2, 5, 9, 14, 20, 31]})]:
        hf_prope.patch_model(model, name, **params)
        want = _hf_logits(model, ids)
        export_gguf(model, tmp_path / f"{name}.gguf", dtype="f16")
        got = llama_cpp_logits(tmp_path / f"{name}.gguf", ids)
        # f16 matrices and llama.cpp's f16 KV cache: measured mean 0.0067, max 0.065 at 256 tokens.
        assert np.abs(got - want).mean() < 0.02 and np.abs(got - want).max() < 0.25, name
        assert np.mean(got.argmax(-1) == want.argmax(-1)) > 0.97
        # The plain GGUF (what llama.cpp's converter writes for this model) is not this model.
        assert np.abs(plain_cpp - want).mean() > 1.0
        assert math.isfinite(float(got.sum()))
        hf_prope.unpatch_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        restored = hf_prope.from_pretrained(tmp_path / "freq-mask.gguf")
    assert hf_prope.get_patch(restored) == hf_prope.PatchSpec("freq-mask", keep=(0, 1, 2, 5, 9, 14, 20, 31))


# -- the model card's Serving section -----------------------------------------------------------------


def _serving(model, save_method: str = "merged") -> dict[str, str]:
    from hf_prope.model_card import serving_table
    from hf_prope.state import patch_state

    return dict(serving_table(patch_state(model), save_method=save_method, name="me/m"))


def test_card_serving_rows_follow_the_patch(tmp_path) -> None:
    from huggingface_hub import ModelCard

    from hf_prope.rope_types import has_native_proportional

    llama = hf_prope.patch_model(_tiny(), "p-rope", p=0.25)
    rows = _serving(llama)
    llama_cpp = rows["llama.cpp (and Ollama, LM Studio, llama-cpp-python)"]
    assert "hf-prope export me/m --gguf" in llama_cpp and "silently writes plain RoPE" in llama_cpp
    if has_native_proportional():
        assert rows["transformers (no hf-prope)"].startswith("exact") and "silently plain RoPE" in rows["SGLang"]
    # A non-prefix mask needs hf-prope's own rope type: plain transformers and vLLM refuse it, loudly.
    masked = _serving(hf_prope.patch_model(_tiny(), "freq-mask", keep=[0, 3]))
    assert masked["transformers (no hf-prope)"].startswith("refuses") and masked["vLLM"].startswith("refuses")
    assert "hf-prope export" in masked["llama.cpp (and Ollama, LM Studio, llama-cpp-python)"]
    # Architectures and patches llama.cpp cannot carry are named as such.
    gemma = _serving(hf_prope.patch_model(_tiny("gemma3_text"), "p-rope", p=0.25, layer_types=["full_attention"]))
    assert "gemma3_text graph passes no frequency factors" in gemma["llama.cpp"]
    selective = _serving(hf_prope.patch_model(_tiny(), "p-rope", p=0.25, layers=[0, 1]))
    assert "layer-selective" in selective["llama.cpp"]
    per_head = _serving(hf_prope.patch_model(_tiny(), "head-mask", head_keep=HEAD_KEEP))
    assert "per-head mask cannot be carried" in per_head["llama.cpp"] and per_head["vLLM"].startswith("refuses")
    assert per_head["transformers (no hf-prope)"].startswith("refuses") and per_head["mlx-lm"].startswith("refuses")
    # mlx-lm: exact for a native prefix, refused otherwise (tests/test_mlx_lm.py runs mlx-lm itself).
    native = "exact" if has_native_proportional() else "refuses"  # before 5.5 every patch is hf-prope's rope type
    assert rows["mlx-lm"].startswith(native) and gemma["mlx-lm"].startswith(native)
    assert masked["mlx-lm"].startswith("refuses")
    gemma2 = _serving(hf_prope.patch_model(_tiny("gemma2"), "p-rope", p=0.25))
    assert gemma2["mlx-lm"].startswith("fails loudly")
    # Adapters: PEFT with hf-prope restores the patch; every engine that loads them on the base without it drops it.
    from peft import LoraConfig, get_peft_model

    adapter = get_peft_model(
        hf_prope.patch_model(_tiny(), "p-rope", p=0.25), LoraConfig(r=2, target_modules=["q_proj"])
    )
    adapter_rows = _serving(adapter, "adapter")
    assert any("silently drops the patch" in v for v in adapter_rows.values())
    assert any(k.startswith("PEFT with hf-prope") and v.startswith("exact") for k, v in adapter_rows.items())
    # ... and the card carries the table.
    out = hf_prope.save_pretrained(llama, tmp_path / "saved", repo_id="me/m")
    card = ModelCard.load(out / "README.md").text
    assert "## Serving" in card and "hf-prope export me/m --gguf model.gguf" in card


@needs_llama_cpp
def test_cli_check_compares_llama_cpp_with_transformers(tokenizer, tmp_path) -> None:
    model = _tiny()
    hf_prope.save_pretrained(model, tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    done = _cli(
        "export",
        str(tmp_path / "saved"),
        "--gguf",
        str(tmp_path / "a.gguf"),
        "--patch",
        "p-rope",
        "--p",
        "0.25",
        "--dtype",
        "f32",
        "--check",
        "40",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "mean |d logit|" in line]
    assert len(lines) == 2 and "a.gguf" in lines[0] and "plain-RoPE" in lines[1]
    means = [float(line.split("mean |d logit|")[1].split()[0]) for line in lines]
    assert means[0] < 0.002 and means[1] > 10 * max(means[0], 1e-4)  # f16 KV cache: about 1e-3 here


def test_cli_check_without_llama_cpp_fails_before_writing(tmp_path) -> None:
    if HAS_LLAMA_CPP:
        pytest.skip("llama-cpp-python is installed here")
    done = _cli("export", "smollm2-135m", "--gguf", str(tmp_path / "a.gguf"), "--check", "16", cwd=tmp_path)
    assert done.returncode == 2 and "pip install llama-cpp-python" in done.stderr
    assert not (tmp_path / "a.gguf").exists()


@needs_llama_cpp
def test_llama_quantize_keeps_rope_freqs(tokenizer, tmp_path) -> None:
    import ctypes

    import llama_cpp

    model = _tiny()
    plain = copy.deepcopy(model)
    hf_prope.patch_model(model, "p-rope", p=0.25)
    export_gguf(model, tmp_path / "f16.gguf", tokenizer=tokenizer)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert (
        llama_cpp.llama_model_quantize(
            str(tmp_path / "f16.gguf").encode(), str(tmp_path / "q8.gguf").encode(), ctypes.byref(params)
        )
        == 0
    )
    kinds = {t.name: t.tensor_type.name for t in _reader(tmp_path / "q8.gguf").tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["rope_freqs.weight"] == "F32"
    assert read_rope_factors(tmp_path / "q8.gguf") == read_rope_factors(tmp_path / "f16.gguf")
    ids = list(range(3, 51))
    got, want = llama_cpp_logits(tmp_path / "q8.gguf", ids), _hf_logits(model, ids)
    # Q8_0 noise here: mean 0.021, against 0.21 from the model without the patch
    assert np.abs(got - want).mean() < 0.25 * np.abs(got - _hf_logits(plain, ids)).mean()


@pytest.mark.real_model
def test_cli_exports_an_adapter_on_the_embedded_smollm2_with_its_own_vocabulary(tmp_path) -> None:
    """The retrofit flow: a LoRA adapter saved on the embedded SmolLM2, exported by the command."""
    from peft import LoraConfig, get_peft_model

    from hf_prope.models import embedded_gguf_path, load_embedded

    model, tok = load_embedded("smollm2-135m")
    hf_prope.patch_model(model, "p-rope", p=0.25)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = "smollm2-135m"  # as the lora recipe records it
    hf_prope.save_pretrained(peft_model, tmp_path / "adapter", tokenizer=tok)
    done = _cli("export", str(tmp_path / "adapter"), "--gguf", str(tmp_path / "a.gguf"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    reader = _reader(tmp_path / "a.gguf")
    assert _field(reader, "tokenizer.ggml.pre") == "smollm"  # the base file's own, not a guess from the tokenizer
    assert _field(reader, "tokenizer.ggml.merges") == _field(
        _reader(embedded_gguf_path("smollm2-135m")), "tokenizer.ggml.merges"
    )
    assert read_rope_factors(tmp_path / "a.gguf") == pytest.approx([1.0] * 8 + [float(np.float32(STOPPED_FACTOR))] * 24)
    # The adapter is in the file: its q_proj differs from the base's by the LoRA delta.
    from_gguf = hf_prope.from_pretrained(tmp_path / "a.gguf")
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(
        from_gguf.model.layers[0].self_attn.q_proj.weight,
        merged.model.layers[0].self_attn.q_proj.weight.to(torch.float16).float(),
    )
