"""Recipe configs: YAML files, command-line overrides, unknown keys, and the packaged configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import TrainingArguments

from hf_prope.recipes import RECIPES, LoRARecipe, get_recipe, packaged_configs, parse_config
from hf_prope.recipes.base import ModelArguments, PatchArguments
from hf_prope.recipes.lora import LoraArguments, LoraRecipeArguments

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "recipes" / "configs"


def _lora(config=None, overrides=()):
    return LoRARecipe.from_config(config, overrides)


def test_yaml_then_overrides_with_types(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    # YAML 1.1 reads 5e-4 as a string: the parser's float type must mend it.
    cfg.write_text("model: smollm2-135m\np: 0.5\nlearning_rate: 5e-4\nlora_target_modules: [q_proj]\nmax_steps: 7\n")
    recipe = _lora(
        cfg,
        [
            "p=0.25",
            "--lora_target_modules",
            "[q_proj, v_proj]",
            "lora_mlp=true",
            "--no_control",
            "--bf16",
            "--max-steps=9",
            "layer_types=full_attention,sliding_attention",
        ],
    )
    assert recipe.patch_args.p == 0.25 and isinstance(recipe.patch_args.p, float)
    assert recipe.lora_args.lora_target_modules == ["q_proj", "v_proj"]
    assert recipe.lora_args.target_modules() == ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    assert recipe.lora_args.lora_mlp is True
    assert recipe.recipe_args.control is False
    assert recipe.training_args.bf16 is True
    assert recipe.training_args.max_steps == 9
    assert recipe.training_args.learning_rate == pytest.approx(5e-4)
    assert recipe.patch_args.layer_types == ["full_attention", "sliding_attention"]
    assert recipe.model_args.model == "smollm2-135m"


def test_patch_spec_from_flat_keys() -> None:
    from hf_prope import PatchSpec

    assert _lora(None, ["p=0.75", "rotate=lowest"]).patch_args.spec() == PatchSpec("p-rope", p=0.75, rotate="lowest")
    assert _lora(None, ["patch=nope", "layers=[1,3]"]).patch_args.spec() == PatchSpec("nope", layers=(1, 3))
    assert _lora(None, ["patch=freq-mask", "keep=[0,2]"]).patch_args.spec() == PatchSpec("freq-mask", keep=(0, 2))
    with pytest.raises(ValueError, match="needs exactly one of keep"):
        _lora(None, ["patch=freq-mask"]).patch_args.spec()


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora_rank=8", "'lora_r'"),
        ("max_step=3", "Unknown config key 'max_step'. Did you mean 'max_steps'"),
        ("max_steps=many", "max_steps: cannot read 'many' as int"),
        ("rotate=middle", "rotate must be one of highest, lowest, got 'middle'"),
        ("lora_mlp=perhaps", "lora_mlp: cannot read 'perhaps' as true/false"),
        ("block_size=1", "block_size must be at least 2"),
        ("nonsense", "write key=value or --key value"),
    ],
)
def test_bad_keys_and_values(override, message) -> None:
    with pytest.raises(ValueError) as err:
        _lora(None, [override])
    assert message in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rat: 1.0e-4\n")
    with pytest.raises(ValueError, match="Did you mean 'learning_rate'"):
        _lora(cfg)


def test_missing_config_file_suggests_packaged() -> None:
    with pytest.raises(FileNotFoundError, match="Did you mean 'smollm2_135m_eval'"):
        _lora("smollm2_135m_evl")


def test_registry() -> None:
    assert set(RECIPES) == {"lora", "eval", "analyze", "ablation"}
    # analyze needs no config file: its defaults are the dataclasses' own.
    assert all(cls.default_config in packaged_configs() for cls in RECIPES.values() if cls.default_config)
    assert get_recipe("lora") is LoRARecipe
    with pytest.raises(ValueError, match="Did you mean 'eval'"):
        get_recipe("evall")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_packaged_configs_start_with_their_command_and_parse(path) -> None:
    first = path.read_text().splitlines()[0]
    recipe_name = first.split()[3] if first.startswith("# hf-prope run ") else None
    assert recipe_name in RECIPES, f"{path.name} must start with '# hf-prope run RECIPE --config ...'"
    assert f"--config recipes/configs/{path.name}" in first
    if "deepspeed:" in path.read_text():
        import transformers
        from packaging.version import Version

        from hf_prope.recipes.config import DEEPSPEED_MIN_TRANSFORMERS

        if Version(transformers.__version__) < Version(DEEPSPEED_MIN_TRANSFORMERS):
            with pytest.raises(ValueError, match=f"transformers >= {DEEPSPEED_MIN_TRANSFORMERS}"):
                get_recipe(recipe_name).from_config(path)
            return
    recipe = get_recipe(recipe_name).from_config(path)
    if recipe_name == "lora":
        recipe.patch_args.spec()  # the patch is valid
        assert recipe.training_args.max_steps > 0
    if recipe_name == "ablation":
        from hf_prope.recipes.ablation import parse_variant

        assert all(parse_variant(v, 1e4) for v in recipe.ablation_args.variants)
        assert recipe.training_args.max_steps > 0
    assert path.stem in packaged_configs()


def test_parse_config_returns_dataclasses() -> None:
    model, patch, lora, recipe, training = parse_config(
        (ModelArguments, PatchArguments, LoraArguments, LoraRecipeArguments, TrainingArguments),
        None,
        {"lora_r": "4", "output_dir": "x"},
    )
    assert lora.lora_r == 4 and training.output_dir == "x" and model.model == "smollm2-135m"
