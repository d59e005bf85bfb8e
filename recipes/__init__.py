"""Recipes (LoRA retrofit, evaluation) land here; installed as ``hf_prope.recipes``."""
