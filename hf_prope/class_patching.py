"""Class-level patching: every model of a type built from now on carries a patch.

``apply_patch_to_class("llama", "p-rope", p=0.25)`` wraps the architecture's base model
class's ``__init__`` (the class named in :mod:`hf_prope.registry`), so ``from_pretrained``,
``from_config`` and direct construction all build patched models; ``revert()`` restores the
class.

A model built under a class patch never changes the config object its caller passed: the
outermost model of the architecture's modeling module under construction (``LlamaForCausalLM``,
``LlamaModel`` built alone...) takes a copy of it, which the base model inside shares and
patches. Writing into the caller's object would leak the patch (and its record of the original
rope parameters) into every model later built from it, rope scaling set on it afterwards
included. And the per-architecture facade (``apply_patch_to_llama``, ``apply_p_rope_to_llama``...),
made here once for every architecture by :func:`make_arch_functions`, Liger-Kernel style: with
``model=`` it patches that built model, without it patches the class.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .patching import patch_model, patch_while_building
from .registry import get_architecture
from .spec import PatchSpec, make_spec
from .state import unwrap


@dataclass
class ClassPatch:
    """A class-level patch in force; ``revert()`` restores the class (built models keep theirs)."""

    model_type: str
    spec: PatchSpec
    cls: type
    original_init: Callable[..., None]
    # Every other model class of the modeling module whose __init__ was wrapped to copy the config.
    copying: dict[type, Callable[..., None]] = field(default_factory=dict, repr=False)

    def revert(self) -> None:
        if _CLASS_PATCHES.get(self.model_type) is self:
            self.cls.__init__ = self.original_init  # type: ignore[method-assign]
            for cls, init in self.copying.items():
                cls.__init__ = init  # type: ignore[method-assign]
            del _CLASS_PATCHES[self.model_type]


_CLASS_PATCHES: dict[str, ClassPatch] = {}
_BUILDING = threading.local()  # how many wrapped model constructors are running in this thread


def _model_classes(module: Any) -> list[type]:
    """The model classes a modeling module defines (each with its own ``__init__`` taking a config)."""
    from transformers import PreTrainedModel

    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, PreTrainedModel)
        and obj.__module__ == module.__name__
        and "__init__" in obj.__dict__
    ]


def _isolating(init: Callable[..., None], after: Callable[[nn.Module], None] | None = None) -> Callable[..., None]:
    """``init`` that, when it is the outermost model construction, builds from a copy of the caller's config."""

    def __init__(self: nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
        depth = getattr(_BUILDING, "depth", 0)
        if depth == 0:
            config = copy.deepcopy(config)
        _BUILDING.depth = depth + 1
        try:
            init(self, config, *args, **kwargs)
        finally:
            _BUILDING.depth = depth
        if after is not None:
            after(self)

    __init__.__wrapped__ = init  # type: ignore[attr-defined]
    return __init__


def apply_patch_to_class(model_type: str, spec: PatchSpec | str, /, **params: Any) -> ClassPatch:
    """Patch every ``model_type`` model built from now on (e.g. by ``from_pretrained``).

    Replaces any earlier class-level patch of that type. Undo with ``.revert()`` or
    :func:`revert_class_patches`.
    """
    spec_obj = make_spec(spec, **params)
    arch = get_architecture(model_type)
    cls = arch.base_model_class
    previous = _CLASS_PATCHES.get(model_type)
    if previous is not None:
        previous.revert()
    original_init = cls.__init__
    copying = {c: c.__init__ for c in _model_classes(importlib.import_module(arch.modeling_module)) if c is not cls}
    cls.__init__ = _isolating(original_init, lambda model: patch_while_building(model, spec_obj))  # type: ignore[method-assign]
    for c, init in copying.items():
        c.__init__ = _isolating(init)  # type: ignore[method-assign]
    patch = ClassPatch(model_type, spec_obj, cls, original_init, copying)
    _CLASS_PATCHES[model_type] = patch
    return patch


def revert_class_patches(model_type: str | None = None) -> None:
    """Undo class-level patches (all, or one model type's)."""
    for mt in [model_type] if model_type else list(_CLASS_PATCHES):
        if mt in _CLASS_PATCHES:
            _CLASS_PATCHES[mt].revert()


@contextlib.contextmanager
def class_patched(model_type: str, spec: PatchSpec | str | None, /, **params: Any) -> Iterator[None]:
    """Models of ``model_type`` built inside the block are patched; afterwards any earlier class patch is back.

    ``spec=None`` patches nothing (the block builds plain models). For building several variants
    in turn (the ablation recipe) without disturbing a class patch the caller had in force.
    """
    if spec is None:
        yield
        return
    previous = class_patches().get(model_type)
    patch = apply_patch_to_class(model_type, spec, **params)
    try:
        yield
    finally:
        patch.revert()
        if previous is not None:
            apply_patch_to_class(model_type, previous)
        elif model_type in class_patches():
            revert_class_patches(model_type)


def class_patches() -> dict[str, PatchSpec]:
    """Model types with a class-level patch in force, and their specs."""
    return {mt: cp.spec for mt, cp in _CLASS_PATCHES.items()}


def make_arch_functions(model_type: str, name: str | None = None) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``apply_patch_to_<name>`` and ``apply_p_rope_to_<name>`` for one architecture (Liger-style)."""
    name = name or model_type

    def apply_patch(spec: PatchSpec | str = "p-rope", /, *, model: nn.Module | None = None, **params: Any) -> Any:
        if model is not None:
            mt = getattr(getattr(unwrap(model), "config", None), "model_type", None)
            if mt != model_type:
                raise ValueError(f"This function patches {model_type} models; the model given is {mt!r}.")
            return patch_model(model, spec, **params)
        return apply_patch_to_class(model_type, spec, **params)

    def apply_p_rope(
        p: float,
        *,
        rotate: str = "highest",
        layers: list[int] | None = None,
        layer_types: list[str] | None = None,
        model: nn.Module | None = None,
    ) -> Any:
        extra: dict[str, Any] = {"p": p, "rotate": rotate}
        if layers is not None:
            extra["layers"] = layers
        if layer_types is not None:
            extra["layer_types"] = layer_types
        return apply_patch("p-rope", model=model, **extra)

    apply_patch.__name__ = f"apply_patch_to_{name}"
    apply_patch.__doc__ = (
        f"Patch {model_type} models. With ``model=``, patch that already-built model (see ``patch_model``); "
        f"without, patch the class so {model_type} models built afterwards are patched; returns a ClassPatch "
        "whose ``revert()`` undoes it."
    )
    apply_p_rope.__name__ = f"apply_p_rope_to_{name}"
    apply_p_rope.__doc__ = (
        f"p-RoPE for {model_type}: rotate only the highest fraction ``p`` of frequencies (``rotate='lowest'`` "
        "for the paper's control). With ``model=``, patch that model; without, patch the class."
    )
    return apply_patch, apply_p_rope
