"""The from-scratch ablation recipe: each variant's model has the frequencies its name promises, and the
recipe's figures are those of the models it trained.

Oracles: rotation angles *measured* on the built model's rotary module (atan2 of its sin/cos at
position 1) against the paper's formula ``theta^(-2i/d)`` masked as the variant's name says,
written out here; perplexities recomputed from transformers' own causal-LM loss on the saved
models reloaded; the token stream recomputed from the saved tokenizer; statistics recomputed
from the per-run figures; a second run for resume and determinism.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

import hf_prope
from hf_prope.data import python_docs_text
from hf_prope.recipes import AblationRecipe, get_recipe
from hf_prope.recipes.ablation import (
    DEFAULT_VARIANTS,
    ScratchModelArguments,
    build_model,
    parse_variant,
    train_bpe_tokenizer,
)

HEAD_DIM = 16  # 8 pairs: p=0.25 -> 2 rotate, p=0.75 -> 6
BLOCK = 32
LONG = 64
LONG_WINDOWS = 4


def expected_frequencies(name: str, theta: float, head_dim: int = HEAD_DIM) -> torch.Tensor:
    """The paper's rule, written out: pair i turns at theta^(-2i/d); p-RoPE keeps int(p*d//2) of them turning."""
    pairs = head_dim // 2
    freq = torch.tensor([theta ** (-2 * i / head_dim) for i in range(pairs)], dtype=torch.float64)
    if name.startswith("nope"):
        return torch.zeros(pairs, dtype=torch.float64)
    if name.startswith("p-rope-"):
        p = float(name.split("@")[0].split("-")[2])
        r = int(p * head_dim // 2)
        keep = torch.zeros(pairs, dtype=torch.bool)
        if name.split("@")[0].endswith("-lowest"):
            keep[pairs - r :] = True
        else:
            keep[:r] = True
        freq = torch.where(keep, freq, torch.zeros_like(freq))
    return freq


def measured_frequencies(model) -> dict[str | None, torch.Tensor]:
    """Angle per token of each pair, read from what the rotary module hands the attention at position 1."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    rotary = inner.model.rotary_emb
    layer_types = (
        sorted(set(getattr(inner.config, "layer_types", None) or []))
        if inner.config.model_type == "gemma3_text"
        else [None]
    )
    x = torch.zeros(1, 1, HEAD_DIM)
    out = {}
    for layer_type in layer_types:
        args = (x, torch.tensor([[1]])) + ((layer_type,) if layer_type else ())
        cos, sin = rotary(*args)
        out[layer_type] = torch.atan2(sin[0, 0, : HEAD_DIM // 2].double(), cos[0, 0, : HEAD_DIM // 2].double())
    return out


def tiny_args(model_type: str = "llama", **extra) -> ScratchModelArguments:
    return ScratchModelArguments(
        model_type=model_type,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        head_dim=HEAD_DIM,
        intermediate_size=48,
        vocab_size=300,
        **extra,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer([python_docs_text()[:20_000]], 300)


# ------------------------------------------------------------------------------------------------
# each variant's model has the intended frequencies


VARIANTS = [*DEFAULT_VARIANTS, "p-rope-0.5@1m", "nope@500k", "rope@2.5e4"]


@pytest.mark.parametrize("model_type", ["llama", "gemma", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_rotates_exactly_the_frequencies_its_name_promises(model_type, name, tokenizer) -> None:
    variant = parse_variant(name, 10_000.0)
    theta = 500_000.0 if "@500k" in name else 1e6 if "@1m" in name else 25_000.0 if "@2.5e4" in name else 10_000.0
    model = build_model(tiny_args(model_type), variant, tokenizer, seed=0, max_positions=LONG)
    for layer_type, angles in measured_frequencies(model).items():
        torch.testing.assert_close(
            angles,
            expected_frequencies(name, theta),
            rtol=1e-6,
            atol=1e-7,
            msg=f"{name} on {model_type} ({layer_type})",
        )
    # hf-prope's own report agrees with the measurement on every layer.
    torch.testing.assert_close(
        hf_prope.layer_frequencies(model).double(),
        expected_frequencies(name, theta).expand(2, -1),
        rtol=1e-6,
        atol=1e-7,
    )


def test_building_variants_leaves_no_class_patch_behind(tokenizer) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    earlier = hf_prope.apply_patch_to_class("llama", "p-rope", p=0.5)  # a user's own class patch survives
    try:
        build_model(tiny_args(), parse_variant("nope", 1e4), tokenizer, seed=0, max_positions=LONG)
        assert hf_prope.class_patches() == {"llama": earlier.spec}
    finally:
        hf_prope.revert_class_patches()
    build_model(tiny_args(), parse_variant("p-rope-0.25", 1e4), tokenizer, seed=0, max_positions=LONG)
    assert hf_prope.class_patches() == {}
    plain = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=HEAD_DIM,
            intermediate_size=48,
            vocab_size=300,
        )
    )
    assert (measured_frequencies(plain)[None] > 0).all()


def test_same_seed_gives_every_variant_the_same_initial_weights(tokenizer) -> None:
    models = [
        build_model(tiny_args(), parse_variant(n, 1e4), tokenizer, seed=3, max_positions=LONG) for n in DEFAULT_VARIANTS
    ]
    first = models[0].state_dict()
    for model in models[1:]:
        for key, value in model.state_dict().items():
            if "inv_freq" not in key:
                assert torch.equal(value, first[key]), key
    other = build_model(tiny_args(), parse_variant("rope", 1e4), tokenizer, seed=4, max_positions=LONG)
    assert not torch.equal(other.model.embed_tokens.weight, models[0].model.embed_tokens.weight)


def test_variant_names() -> None:
    assert parse_variant("rope", 1e4).spec is None and parse_variant("rope@500k", 1e4).theta == 500_000.0
    assert parse_variant("p-rope-0.75-lowest", 1e4).spec == hf_prope.PatchSpec("p-rope", p=0.75, rotate="lowest")
    assert parse_variant("p-rope-0.25@1M", 1e4).theta == 1e6
    assert parse_variant("nope", 1e4).label == "NoPE"
    assert parse_variant("p-rope-0.75-lowest", 1e4).label == "highest 25% dropped (θ=10k)"
    for bad in ("rope500k", "p-rope", "p-rope-1.5", "p-rope-0.5-highest", "yarn", "rope@-3"):
        with pytest.raises(ValueError, match="variant|Variant|p must"):
            parse_variant(bad, 1e4)


# ------------------------------------------------------------------------------------------------
# the recipe end to end on a tiny budget


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text(python_docs_text()[:40_000])
    return path


def overrides(text_file: Path, out: Path, **extra) -> dict:
    values = {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "head_dim": HEAD_DIM,
        "intermediate_size": 48,
        "vocab_size": 300,
        "dataset": str(text_file),
        "variants": ["rope", "nope", "p-rope-0.25", "p-rope-0.75-lowest"],
        "seeds": [0, 1],
        "block_size": BLOCK,
        "long_eval_window": LONG,
        "long_eval_windows": LONG_WINDOWS,
        "eval_batch_size": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 3e-3,
        "max_steps": 6,
        "logging_steps": 2,
        "eval_steps": 3,
        "save_steps": 3,
        "report_to": "none",
        "disable_tqdm": True,
        "save_models": True,
        "output_dir": str(out),
    }
    values.update(extra)
    return values


def loss_perplexity(model, ids: torch.Tensor, window: int, n: int) -> float:
    windows = ids[-window * n :].reshape(n, window)
    model.eval()
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


@pytest.fixture(scope="module")
def ablation(text_file, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ablation") / "out"
    summary = AblationRecipe.from_config(None, overrides(text_file, out)).run()
    return {"out": out, "summary": summary}


def test_recipe_figures_are_those_of_the_models_it_saved(ablation, text_file) -> None:
    from transformers import AutoTokenizer

    out, summary = ablation["out"], ablation["summary"]
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    ids = torch.tensor(tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"])
    heldout = LONG * LONG_WINDOWS
    assert summary["heldout"]["tokens"] == heldout
    for name, entry in summary["variants"].items():
        for i, seed in enumerate(entry["seeds"]):
            model = hf_prope.from_pretrained(out / "runs" / name / f"seed{seed}" / "model")
            # The saved, reloaded model has the variant's frequencies (measured, against the formula).
            torch.testing.assert_close(
                measured_frequencies(model)[None], expected_frequencies(name, 1e4), rtol=1e-6, atol=1e-7
            )
            assert entry["perplexity"]["runs"][i] == pytest.approx(
                loss_perplexity(model, ids, BLOCK, heldout // BLOCK), rel=1e-5
            )
            assert entry["perplexity_long"]["runs"][i] == pytest.approx(
                loss_perplexity(model, ids, LONG, LONG_WINDOWS), rel=1e-5
            )


def test_statistics_and_paired_ratios_recomputed_from_the_runs(ablation) -> None:
    out, summary = ablation["out"], ablation["summary"]
    ref = summary["variants"]["rope"]
    for name, entry in summary["variants"].items():
        runs = [json.loads((out / "runs" / name / f"seed{s}" / "run.json").read_text()) for s in (0, 1)]
        values = [r["perplexity"] for r in runs]
        assert entry["perplexity"]["runs"] == values
        assert entry["perplexity"]["mean"] == pytest.approx(statistics.fmean(values))
        assert entry["perplexity"]["sd"] == pytest.approx(statistics.stdev(values))
        ratios = [v / r for v, r in zip(entry["perplexity_long"]["runs"], ref["perplexity_long"]["runs"])]
        assert entry["perplexity_long_vs_reference"]["mean"] == pytest.approx(statistics.fmean(ratios))
        assert entry["rotating_pairs"] == int((expected_frequencies(name, 1e4) != 0).sum())
        assert len(runs[0]["train_loss"]) == 3 and [s for s, _ in runs[0]["eval_loss"]] == [3, 6]
        assert entry["train_loss"][0][1] == pytest.approx(statistics.fmean(r["train_loss"][0][1] for r in runs))
    assert ref["perplexity_vs_reference"]["mean"] == 1.0 and ref["perplexity_vs_reference"]["sd"] == 0.0
    # NoPE and RoPE start from the same weights and see the same blocks, yet train to different models.
    assert summary["variants"]["nope"]["perplexity"]["runs"] != ref["perplexity"]["runs"]


def test_outputs_table_and_plot(ablation) -> None:
    out, summary = ablation["out"], ablation["summary"]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["results.json", "results.md", "results.png", "runs", "tokenizer"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "| NoPE | 0/8 |" in table and "| p=0.25 (θ=10k) | 2/8 |" in table and "highest 25% dropped" in table
    rope = summary["variants"]["rope"]["perplexity"]
    assert f"| RoPE (θ=10k) | 8/8 | {rope['mean']:.2f} ± {rope['sd']:.2f} | 1.000 ± 0.000 |" in table
    assert not list((out / "runs").glob("*/*/checkpoint-*")), "finished runs keep no checkpoints"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["variants"].keys() == summary["variants"].keys()
    assert on_disk["settings"]["tokenizer"] == "bpe"  # a key with "token" in its name is a setting like any other


def test_resume_keeps_finished_runs_and_retrains_the_rest_identically(ablation, text_file, tmp_path) -> None:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(ablation["out"], out)
    (out / "runs" / "nope" / "seed1" / "run.json").unlink()
    shutil.rmtree(out / "runs" / "nope" / "seed1" / "model")
    (out / "results.json").unlink()
    with pytest.raises(FileExistsError, match="resume=true"):
        AblationRecipe.from_config(None, overrides(text_file, out)).setup()
    summary = AblationRecipe.from_config(None, overrides(text_file, out, resume=True, overwrite=False)).run()
    # The retrained run is the same training (CPU, same seed): the figures repeat.
    before = ablation["summary"]["variants"]
    for name, entry in summary["variants"].items():
        assert entry["perplexity"]["runs"] == pytest.approx(before[name]["perplexity"]["runs"], rel=1e-6)
    assert (out / "runs" / "nope" / "seed1" / "run.json").is_file()


def test_gemma_style_model_trains(text_file, tmp_path) -> None:
    values = overrides(
        text_file,
        tmp_path / "out",
        model_type="gemma",
        variants=["rope", "p-rope-0.75"],
        seeds=[0],
        max_steps=2,
        save_models=False,
    )
    del values["eval_steps"]  # no evaluation during training: curves are training loss only
    summary = AblationRecipe.from_config(None, values).run()
    assert summary["variants"]["rope"]["eval_loss"] == []
    assert summary["variants"]["p-rope-0.75"]["rotating_pairs"] == 6
    assert all(math.isfinite(e["perplexity_long"]["mean"]) for e in summary["variants"].values())


# ------------------------------------------------------------------------------------------------
# bad input: a clear error before anything is written


@pytest.mark.parametrize(
    "extra, error, match",
    [
        ({"variants": ["rope", "yarn"]}, ValueError, "Unknown variant 'yarn'"),
        ({"reference": "nope", "variants": ["rope"]}, ValueError, "reference='nope' is not among"),
        ({"long_eval_window": 48}, ValueError, "multiple of block_size"),
        ({"seeds": [1, 1]}, ValueError, "distinct"),
        ({"variants": ["rope", "p-rope-0.1"]}, ValueError, "rotates 0 pairs, the same as NoPE"),
        ({"max_steps": -1}, ValueError, "Set max_steps"),
        ({"model_type": "gpt2"}, Exception, "gpt2"),
        ({"head_dim": 15}, ValueError, "head_dim must be even"),
        ({"tokenizer": "./no-such-folder"}, FileNotFoundError, "No tokenizer folder"),
        ({"long_eval_windows": 1000}, ValueError, "training blocks"),
    ],
)
def test_bad_input_fails_before_anything_is_written(extra, error, match, text_file, tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        AblationRecipe.from_config(None, overrides(text_file, out, **extra)).run()
    assert not out.exists() or not any(out.iterdir())


def test_registered_and_default_config_parses() -> None:
    recipe_cls = get_recipe("ablation")
    recipe = recipe_cls.from_config(recipe_cls.default_config)
    assert [v.name for v in map(lambda n: parse_variant(n, 1e4), recipe.ablation_args.variants)] == DEFAULT_VARIANTS
    assert recipe.training_args.max_steps > 0 and recipe.ablation_args.seeds == [0, 1, 2]


def test_two_processes_with_torchrun_through_the_cli(text_file, tmp_path) -> None:
    """DDP on CPU (gloo): both ranks train, evaluation windows are shared out, only rank 0 writes."""
    import os
    import subprocess
    import sys

    from transformers import AutoTokenizer

    out = tmp_path / "out"
    values = overrides(text_file, out, variants=["rope", "nope"], seeds=[0], max_steps=3, eval_steps=3)
    args = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in values.items()]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "hf_prope",
        "run",
        "ablation",
        *args,
    ]
    # CPU and gloo whatever the machine: with one GPU visible, two processes would share it.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("| NoPE | 0/8 |") == 1  # the table is printed once, by rank 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["training"]["world_size"] == 2 and summary["training"]["tokens_per_step"] == 2 * 2 * BLOCK
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    ids = torch.tensor(tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"])
    for name in ("rope", "nope"):
        model = hf_prope.from_pretrained(out / "runs" / name / "seed0" / "model")
        expected = loss_perplexity(model, ids, LONG, LONG_WINDOWS)  # 4 windows scored 2 + 2 by the ranks
        assert summary["variants"][name]["perplexity_long"]["mean"] == pytest.approx(expected, rel=1e-5)
