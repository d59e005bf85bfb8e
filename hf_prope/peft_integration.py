"""PEFT's own save and load, made to keep the patch (installed by ``import hf_prope``).

Users of TRL, the Trainer and plain PEFT never call :func:`hf_prope.save_pretrained`: they save
with ``PeftModel.save_pretrained`` (which ``Trainer.save_model``, the Trainer's ``checkpoint-N``
folders, TRL's trainers and ``push_to_hub`` all go through) and load with
``PeftModel.from_pretrained`` / ``AutoPeftModelForCausalLM.from_pretrained``. Those paths know
nothing of the patch, so an adapter trained on a p-RoPE base would load back as plain RoPE with
no error. With hf_prope imported:

* **Saving**: when the base carries an hf-prope patch, every adapter folder PEFT writes also
  gets the patch record (:mod:`hf_prope.patch_record`: the JSON file, the base config, and the
  record in the weights' safetensors metadata), on the main process only.
* **Loading**: after PEFT has loaded an adapter, its record is read from files already on this
  machine (the folder, or what PEFT's own download left in the Hugging Face cache; never a
  request). An unpatched base of the recorded architecture gets the recorded patch, in place
  (what the adapter was trained with); a base that carries another patch, or a different
  architecture, is left as it is, with a warning that says what differs and how to fix it.

``HF_PROPE_PEFT_CHECK`` (read at import) chooses: ``1`` (the default) as above, ``warn`` to
record on save but only warn on load, ``0`` to leave PEFT untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from .patch_record import (
    ADAPTER_WEIGHTS_FILE,
    PATCH_FILE,
    PatchMismatchError,
    check_base_matches,
    find_record,
    read_patch_record,
    record_from_safetensors,
    recorded_spec,
    write_adapter_record,
)
from .patching import patch_model
from .state import get_patch, patch_state

logger = logging.getLogger("hf_prope")

ENV_VAR = "HF_PROPE_PEFT_CHECK"
MODES = ("restore", "warn", "off")

__all__ = ["ENV_VAR", "MODES", "install_peft_hooks", "peft_mode", "reconcile", "hf_prope_saving"]


def peft_mode() -> str:
    """What ``HF_PROPE_PEFT_CHECK`` asks for: ``restore`` (default), ``warn`` or ``off``."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value == "warn":
        return "warn"
    if value in ("", "1", "true", "yes", "on", "restore"):
        return "restore"
    raise ValueError(f"{ENV_VAR}={value!r} is not understood; use 1 (restore the patch), warn, or 0 (off).")


# ---------------------------------------------------------------------------------------------
# Saving

_OWN_SAVE = {"depth": 0}


@contextlib.contextmanager
def hf_prope_saving() -> Iterator[None]:
    """While :func:`hf_prope.save_pretrained` calls PEFT's save: it writes the record itself."""
    _OWN_SAVE["depth"] += 1
    try:
        yield
    finally:
        _OWN_SAVE["depth"] -= 1


def _adapter_folders(model: nn.Module, save_directory: str, selected: list[str] | None) -> list[Path]:
    names = selected if selected is not None else list(model.peft_config)
    return [Path(save_directory) / name if name != "default" else Path(save_directory) for name in names]


def _record_after_save(model: nn.Module, bound: inspect.BoundArguments) -> None:
    args = bound.arguments
    if not args.get("is_main_process", True) or _OWN_SAVE["depth"]:
        return
    if get_patch(model) is None:
        return  # an unpatched base: PEFT's folder is left exactly as PEFT wrote it
    state = patch_state(model)
    for folder in _adapter_folders(model, args["save_directory"], args.get("selected_adapters")):
        if (folder / "adapter_config.json").is_file():
            write_adapter_record(folder, state)


# ---------------------------------------------------------------------------------------------
# Loading


def _local_adapter_folder(model_id: Any, kwargs: dict[str, Any]) -> Path | None:
    path = Path(os.fspath(model_id)).expanduser()
    if not path.is_dir():
        return None
    sub = kwargs.get("subfolder")
    return path / sub if sub else path


def _cached_record(repo_id: str, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """A Hub adapter's patch record from the local Hugging Face cache only (no request), if it is there.

    The record file when something fetched it; else the metadata of the adapter weights, which
    PEFT's own load has just put in the cache.
    """
    from huggingface_hub import try_to_load_from_cache

    sub = kwargs.get("subfolder")
    common = {"revision": kwargs.get("revision"), "cache_dir": kwargs.get("cache_dir")}
    for name in (PATCH_FILE, ADAPTER_WEIGHTS_FILE):
        try:
            found = try_to_load_from_cache(repo_id, f"{sub}/{name}" if sub else name, **common)
        except Exception:  # noqa: BLE001 - not a repo id, no cache: nothing known locally
            return None
        if not isinstance(found, str):
            continue
        if name == PATCH_FILE:
            try:
                return read_patch_record(Path(found).parent)
            except ValueError:
                return None
        return record_from_safetensors(found)
    return None


def adapter_record(model_id: Any, kwargs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The patch record of an adapter named as PEFT takes it (a folder or a Hub id), from local files only."""
    kwargs = kwargs or {}
    folder = _local_adapter_folder(model_id, kwargs)
    try:
        if folder is not None:
            return find_record(folder)
        return _cached_record(str(model_id), kwargs)
    except ValueError:  # a hand-edited, invalid record: hf_prope.from_pretrained names the field
        return None


def reconcile(model: nn.Module, record: dict[str, Any] | None, *, mode: str = "restore", stacklevel: int = 3) -> bool:
    """Give ``model`` (a base, or a PEFT model on it) the patch an adapter's ``record`` names, or warn.

    Returns whether the model was patched. Only an unpatched base whose architecture matches
    the record is patched (``mode="restore"``); in every other disagreement the model is left
    as it is and a ``UserWarning`` says what differs.
    """
    if record is None:
        return False
    want = recorded_spec(record)
    have = get_patch(model)
    if want == have:
        return False
    fix = "Load it with hf_prope.from_pretrained(...), which applies the recorded patch"
    if want is None:
        warnings.warn(
            f"This adapter was trained on an unpatched base, but the base model it is loaded on carries the hf-prope "
            f"patch {have.describe()}; it was kept. Call hf_prope.unpatch_model(model) for the model the adapter "
            "was trained on.",
            UserWarning,
            stacklevel=stacklevel,
        )
        return False
    try:
        check_base_matches(record, patch_state(model))
    except PatchMismatchError as err:
        warnings.warn(
            f"{err} The adapter's hf-prope patch ({want.describe()}) was not applied.",
            UserWarning,
            stacklevel=stacklevel,
        )
        return False
    if have is None and mode == "restore":
        patch_model(model, want)
        logger.info("hf-prope: applied the adapter's recorded patch (%s) to its base model.", want.describe())
        return True
    if have is None:
        message = (
            f"This adapter was trained on a model patched with hf-prope ({want.describe()}), but the base model it "
            f"is being loaded on does not carry that patch, so it computes plain RoPE. {fix}, or unset "
            f"{ENV_VAR}=warn to let PeftModel.from_pretrained apply it."
        )
    else:
        message = (
            f"This adapter was trained with the hf-prope patch {want.describe()}, but the base model it is loaded on "
            f"carries {have.describe()}; the base's patch was kept. {fix}, or call "
            "hf_prope.patch_model(model, hf_prope.get_patch(...)) with the adapter's patch."
        )
    warnings.warn(message, UserWarning, stacklevel=stacklevel)
    return False


# ---------------------------------------------------------------------------------------------
# Installing


def _wrap_save(original: Any) -> Any:
    signature = inspect.signature(original)

    def save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        result = original(self, *args, **kwargs)
        _record_after_save(self, bound)
        return result

    return save_pretrained


_LOADING = {"depth": 0}  # PeftModel.from_pretrained calls load_adapter: reconcile once, at the outermost call


@contextlib.contextmanager
def _outermost() -> Iterator[bool]:
    _LOADING["depth"] += 1
    try:
        yield _LOADING["depth"] == 1
    finally:
        _LOADING["depth"] -= 1


def _wrap_load(original: Any, mode: str) -> Any:
    def from_pretrained(cls: Any, model: nn.Module, model_id: Any, *args: Any, **kwargs: Any) -> Any:
        with _outermost() as outermost:
            loaded = original(cls, model, model_id, *args, **kwargs)
        if outermost:
            reconcile(loaded, adapter_record(model_id, kwargs), mode=mode, stacklevel=3)
        return loaded

    return from_pretrained


def _wrap_load_adapter(original: Any, mode: str) -> Any:
    """``PeftModel.load_adapter`` and transformers' own ``model.load_adapter`` (``from_pretrained(adapter)``)."""

    def load_adapter(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with _outermost() as outermost:
            result = original(self, *args, **kwargs)
        model_id = args[0] if args else kwargs.get("model_id", kwargs.get("peft_model_id"))
        if outermost and model_id is not None:
            where = {**kwargs, **(kwargs.get("adapter_kwargs") or {})}  # transformers passes revision etc. there
            reconcile(self, adapter_record(model_id, where), mode=mode, stacklevel=3)
        return result

    return load_adapter


def _install(owner: type, name: str, wrapper: Any, *, classmethod_: bool = False) -> None:
    current = owner.__dict__[name]
    function = current.__func__ if classmethod_ else current
    if getattr(function, "_hf_prope_wrapped", False):
        return
    wrapped = wrapper(function)
    wrapped._hf_prope_wrapped = True  # type: ignore[attr-defined]
    wrapped.__wrapped__ = function  # type: ignore[attr-defined]
    wrapped.__doc__ = function.__doc__
    wrapped.__name__ = function.__name__
    setattr(owner, name, classmethod(wrapped) if classmethod_ else wrapped)


def install_peft_hooks() -> str:
    """Make PEFT's own save write the patch record and its load apply it (see the module docstring).

    Called by ``import hf_prope``; idempotent. Returns the mode in force (``"off"`` when
    ``HF_PROPE_PEFT_CHECK=0`` or PEFT cannot be imported).
    """
    mode = peft_mode()
    if mode == "off":
        return mode
    try:
        from peft import PeftModel
    except ImportError:  # PEFT is a dependency, but keep import of hf_prope robust
        return "off"
    _install(PeftModel, "save_pretrained", _wrap_save)
    _install(PeftModel, "from_pretrained", lambda f: _wrap_load(f, mode), classmethod_=True)
    _install(PeftModel, "load_adapter", lambda f: _wrap_load_adapter(f, mode))
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:
        return mode
    _install(PeftAdapterMixin, "load_adapter", lambda f: _wrap_load_adapter(f, mode))
    return mode
