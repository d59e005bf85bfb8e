"""Recipes: whole jobs (train, evaluate, publish) configured by YAML files; installed as ``hf_prope.recipes``.

Each recipe is a class with ``setup`` / ``run`` (and, for training, ``train`` / ``evaluate`` /
``save`` / ``push``), registered by name in :data:`RECIPES`::

    hf-prope run lora --config smollm2_135m_p_rope_lora p=0.25 max_steps=200
    torchrun --nproc_per_node 8 -m hf_prope run lora --config ...

or from Python (a recipe is built from named settings objects; ``from_config`` makes them)::

    from hf_prope.recipes import get_recipe
    recipe = get_recipe("lora").from_config("smollm2_135m_p_rope_lora", {"max_steps": 20})
    summary = recipe.run()
"""

from __future__ import annotations

from hf_prope.suggestions import closest

from .ablation import AblationRecipe
from .analyze import AnalyzeRecipe
from .base import Recipe
from .config import config_path, packaged_configs, parse_config
from .context_eval import ContextEvalRecipe
from .lora import LoRARecipe
from .training import TrainingRecipe

RECIPES: dict[str, type[Recipe]] = {
    recipe.name: recipe for recipe in (LoRARecipe, ContextEvalRecipe, AnalyzeRecipe, AblationRecipe)
}


def get_recipe(name: str) -> type[Recipe]:
    """The recipe class registered as ``name`` (``lora``, ``eval``, ``analyze``, ``ablation``)."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; recipes: {', '.join(RECIPES)}." + closest(name, list(RECIPES)))
    return RECIPES[name]


__all__ = [
    "RECIPES",
    "Recipe",
    "TrainingRecipe",
    "LoRARecipe",
    "ContextEvalRecipe",
    "AnalyzeRecipe",
    "AblationRecipe",
    "get_recipe",
    "parse_config",
    "config_path",
    "packaged_configs",
]
