"""Save, push and load patched models so the patch is never lost.

Two ways to share a patched model:

* ``save_method="merged"``: full safetensors weights (a LoRA merged in) and a config that
  carries the patch; plain ``from_pretrained`` rebuilds it (and, where the patch is native
  ``"proportional"``, without hf-prope installed).
* ``save_method="adapter"``: the PEFT adapter files, plus the patch record
  (:mod:`hf_prope.patch_record`) beside them. :func:`from_pretrained` rebuilds
  base -> patch -> adapter.

Local saves are atomic (:func:`hf_prope.files.atomic_path`); a push is one commit made only
after the token has been checked. The record and the card are written by
:mod:`hf_prope.patch_record` and :mod:`hf_prope.model_card`; this module moves files.

PEFT's own save and load (``PeftModel.save_pretrained``, the Trainer's and TRL's saves,
``PeftModel.from_pretrained``) keep the patch too once hf_prope is imported:
:mod:`hf_prope.peft_integration`.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

from torch import nn

from .distributed import fsdp_modules
from .files import atomic_path, check_writable, local_path, recover
from .gguf import check_exportable, check_gguf_type, export_gguf, vocabulary_for
from .model_card import model_card
from .models import is_embedded_source, load_pretrained
from .patch_record import (
    BASE_CONFIG_FILE,
    PATCH_FILE,
    PatchMismatchError,
    check_base_matches,
    find_record,
    read_patch_record,
    recorded_spec,
    write_adapter_record,
)
from .patching import patch_model, unpatch_model
from .peft_integration import hf_prope_saving
from .state import PatchState, is_peft_model, patch_state

SaveMethod = Literal["auto", "merged", "adapter"]

__all__ = [
    "save_pretrained",
    "push_to_hub",
    "from_pretrained",
    "check_token",
    "PatchMismatchError",
    "PATCH_FILE",
    "BASE_CONFIG_FILE",
    "SaveMethod",
]


# ---------------------------------------------------------------------------------------------
# Writing a folder


def _resolve_method(model: nn.Module, save_method: SaveMethod) -> str:
    if save_method not in ("auto", "merged", "adapter"):
        raise ValueError(f"save_method must be 'merged', 'adapter' or 'auto', got {save_method!r}.")
    if save_method == "auto":
        return "adapter" if is_peft_model(model) else "merged"
    if save_method == "adapter" and not is_peft_model(model):
        raise ValueError("save_method='adapter' needs a PEFT model (get_peft_model); use save_method='merged'.")
    if save_method == "merged" and is_peft_model(model) and fsdp_modules(model):
        # Merging works on a copy (the caller keeps the adapter), and FSDP2 refuses to copy a wrapped model.
        raise ValueError(
            "save_method='merged' of an FSDP-wrapped PEFT model: FSDP cannot copy it to merge the adapter into. Save "
            "the adapter (save_method='adapter', inside hf_prope.distributed.gathered(..., model=model)), then merge "
            "from hf_prope.from_pretrained(<that folder>) in one process."
        )
    return save_method


def _write_folder(
    model: nn.Module,
    state: PatchState,
    folder: Path,
    method: str,
    *,
    tokenizer: Any,
    repo_id: str | None,
    license: str | None,
    eval_results: dict[str, float] | None,
    gguf: str | None = None,
) -> None:
    if method == "adapter":
        base_name = next(iter(model.peft_config.values())).base_model_name_or_path
        # PEFT's "auto" embedding check fetches the base's config.json from the Hub when the base name is
        # not a folder; an embedded model's name is on no Hub, and its vocabulary is never resized.
        extra = {"save_embedding_layers": False} if base_name and is_embedded_source(str(base_name)) else {}
        with hf_prope_saving():
            model.save_pretrained(folder, safe_serialization=True, **extra)
        for adapter in {p.parent for p in folder.rglob("adapter_config.json")}:
            write_adapter_record(adapter, state)
    else:
        merged = model
        if is_peft_model(model):
            merged = copy.deepcopy(model).merge_and_unload()  # the caller keeps their adapter
        merged.save_pretrained(folder, safe_serialization=True)
        base_name = getattr(state.parts.config, "_name_or_path", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if gguf is not None:
        export_gguf(model, folder / GGUF_FILE, tokenizer=vocabulary_for(model, tokenizer), dtype=gguf)  # type: ignore[arg-type]
    card = model_card(
        state,
        save_method=method,
        repo_id=repo_id,
        base_model=base_name,
        license=license,
        eval_results=eval_results,
        gguf_file=GGUF_FILE if gguf is not None else None,
    )
    card.save(folder / "README.md")


GGUF_FILE = "model.gguf"


def _check_gguf(model: nn.Module, gguf: str | None, tokenizer: Any) -> None:
    if gguf is None:
        return
    check_gguf_type(gguf, setting="gguf", unset=" (or None for no GGUF file)")
    check_exportable(model, tokenizer=vocabulary_for(model, tokenizer))


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    *,
    save_method: SaveMethod = "auto",
    tokenizer: Any = None,
    license: str | None = None,
    eval_results: dict[str, float] | None = None,
    repo_id: str | None = None,
    gguf: str | None = None,
) -> Path:
    """Save a patched model (merged weights or a PEFT adapter), the patch, a model card and the tokenizer.

    ``save_method="auto"`` saves an adapter for a PEFT model and full weights otherwise.
    ``gguf="f16"`` (or ``"bf16"``, ``"f32"``) also writes ``model.gguf``, the model with LoRA
    merged as a llama.cpp file that carries the patch (:func:`hf_prope.gguf.export_gguf`;
    Llama and Mistral, a patch on every layer: checked before anything is written).
    The folder is written elsewhere first and renamed into place, so ``save_directory`` is
    always either the previous save or the complete new one. Returns the folder.
    """
    method = _resolve_method(model, save_method)
    state = patch_state(model)  # a supported model, before anything is written
    _check_gguf(model, gguf, tokenizer)
    target = check_writable(save_directory)
    with atomic_path(target, folder=True) as tmp:
        _write_folder(
            model,
            state,
            tmp,
            method,
            tokenizer=tokenizer,
            repo_id=repo_id,
            license=license,
            eval_results=eval_results,
            gguf=gguf,
        )
    return target


# ---------------------------------------------------------------------------------------------
# Hub


def check_token(api: Any) -> None:
    """Prove the token of ``api`` (a ``huggingface_hub.HfApi``) is accepted, before any upload.

    ``PermissionError`` when there is no token or the Hub rejects it (HTTP 401/403);
    ``ConnectionError`` when the Hub cannot be reached or fails to answer: then the token was
    not checked, and the message says so rather than blaming it. The token is never echoed.
    """
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    endpoint = getattr(api, "endpoint", None) or "the Hub"
    try:
        api.whoami()
    except (LocalTokenNotFoundError, ValueError) as err:  # no token found, or token=False: none to use
        raise PermissionError(
            "The Hugging Face token is missing or was rejected (checked before uploading anything): no usable token "
            "was found. Pass token=, set HF_TOKEN, or run `hf auth login`."
        ) from err
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise PermissionError(
                "The Hugging Face token is missing or was rejected (checked before uploading anything): the Hub "
                f"answered HTTP {status}. Pass token=, set HF_TOKEN, or run `hf auth login`."
            ) from err
        raise ConnectionError(
            f"The Hub at {endpoint} failed to answer the token check (HTTP {status}); the token was not checked and "
            "nothing was uploaded. Try again later."
        ) from err
    except Exception as err:  # noqa: BLE001 - the transport's own errors (httpx, OSError): no answer at all
        raise ConnectionError(
            f"Could not reach the Hub at {endpoint} to check the token ({type(err).__name__}: {err}); this is a "
            "network failure, not a rejected token. Nothing was uploaded. Check the connection (or HF_ENDPOINT) "
            "and try again."
        ) from err


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    tokenizer: Any = None,
    save_method: SaveMethod = "auto",
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    license: str | None = None,
    eval_results: dict[str, float] | None = None,
    gguf: str | None = None,
) -> Any:
    """Push a patched model to the Hub in one commit; returns the ``CommitInfo``.

    The token (``token=``, else ``HF_TOKEN`` or the saved login) is checked before any
    upload. ``revision`` is a branch (created if missing); ``create_pr`` opens a pull request.
    ``gguf`` adds ``model.gguf`` to the commit, as in :func:`save_pretrained`.
    """
    from huggingface_hub import HfApi

    method = _resolve_method(model, save_method)
    state = patch_state(model)
    _check_gguf(model, gguf, tokenizer)
    api = HfApi(token=token)
    check_token(api)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    spec = state.spec
    message = commit_message or f"Upload {method} model with hf-prope patch: {spec.describe() if spec else 'none'}"
    with tempfile.TemporaryDirectory(prefix="hf-prope-push-") as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        _write_folder(
            model,
            state,
            folder,
            method,
            tokenizer=tokenizer,
            repo_id=repo_id,
            license=license,
            eval_results=eval_results,
            gguf=gguf,
        )
        try:
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                revision=revision,
                commit_message=message,
                create_pr=create_pr,
            )
        except (PermissionError, ValueError):
            raise
        except Exception as err:  # noqa: BLE001 - the transport's own errors (httpx, OSError, HfHubHTTPError)
            # A Hub commit lands whole or not at all, so the repo still holds its previous state.
            raise ConnectionError(
                f"Uploading to {repo_id!r} failed before the commit completed ({type(err).__name__}: {err}); "
                "the repo is unchanged. Run push_to_hub again to retry."
            ) from err


# ---------------------------------------------------------------------------------------------
# Loading


def _local_folder(path_or_repo: str | os.PathLike[str], revision: str | None, token: str | None) -> Path:
    folder = local_path(path_or_repo)
    if folder is not None:
        recover(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"No saved model or adapter folder at {os.fspath(path_or_repo)!r}.")
        return folder
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_repo), revision=revision, token=token))


def from_pretrained(
    path_or_repo: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | None = None,
    base_model: str | os.PathLike[str] | nn.Module | None = None,
    is_trainable: bool = False,
    **model_kwargs: Any,
) -> nn.Module:
    """Load a saved patched model or adapter, with its patch.

    ``path_or_repo`` is a local folder, a Hub repo id (with ``revision``) or a local ``.gguf`` file
    (the patch restored from its ``rope_freqs``, see :func:`hf_prope.gguf.load_gguf`). A full
    model comes back with the patch its config records (per-layer hooks included). An adapter
    folder, whoever wrote it (:func:`save_pretrained`, or PEFT's, the Trainer's or TRL's own save
    with hf_prope imported), is loaded on its base with the patch its record names: the base is
    the one PEFT recorded unless ``base_model`` (a name, a folder or an already-loaded model,
    patched in place) is given; it must match the recorded architecture and head size. An adapter
    with no record (saved without hf_prope imported) is loaded on that base as it is.
    ``model_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype=``).
    """
    dtype = model_kwargs.pop("dtype", None)  # None: transformers' default (a GGUF dequantises to float32)
    if str(path_or_repo).endswith(".gguf") and Path(path_or_repo).expanduser().is_file():
        if base_model is not None:
            raise ValueError("base_model= is for adapter folders; a .gguf file is a whole model. Drop base_model=.")
        return load_pretrained(Path(path_or_repo).expanduser(), dtype=dtype)
    folder = _local_folder(path_or_repo, revision, token)
    if not (folder / "adapter_config.json").is_file():
        if base_model is not None:
            raise ValueError(
                f"base_model= is for adapter folders, but {os.fspath(path_or_repo)!r} holds a full model (no "
                "adapter_config.json), which is its own base. Drop base_model=, or pass the adapter's folder."
            )
        read_patch_record(folder)  # a record beside full weights must still be valid
        return load_pretrained(folder, dtype=dtype, **model_kwargs)

    from peft import PeftConfig, PeftModel

    record = find_record(folder)
    if isinstance(base_model, nn.Module):
        base = base_model
    else:
        name = base_model or PeftConfig.from_pretrained(folder).base_model_name_or_path
        if is_embedded_source(str(name)):  # an embedded name or a GGUF file (the recipes record these)
            base = load_pretrained(str(name), dtype=dtype)
        else:
            base = load_pretrained(str(name), token=token, dtype=dtype, **model_kwargs)
    if record is not None:
        check_base_matches(record, patch_state(base))
        spec = recorded_spec(record)
        if spec is not None:
            patch_model(base, spec)
        else:
            unpatch_model(base)
    return PeftModel.from_pretrained(base, folder, is_trainable=is_trainable)
