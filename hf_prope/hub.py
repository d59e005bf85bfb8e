"""Save, push and load patched models so the patch is never lost.

Two ways to share a patched model:

* ``save_method="merged"``: full safetensors weights (a LoRA merged in) and a config that
  carries the patch; plain ``from_pretrained`` rebuilds it (and, where the patch is native
  ``"proportional"``, without hf-prope installed).
* ``save_method="adapter"``: the PEFT adapter files, plus :data:`PATCH_FILE` (the patch spec,
  the patched ``rope_parameters`` and what the base model must look like) beside them. PEFT
  itself records only the base model's name, and would rebuild it with plain RoPE: same
  shapes, no error, wrong model. :func:`from_pretrained` rebuilds base -> patch -> adapter.

Local saves are atomic (written to a temporary folder, then renamed into place); a push is
one commit made only after the token has been checked.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ._version import __version__
from .patching import CONFIG_KEY, _find_parts, _unwrap, get_patch, patch_model, restore_patch
from .spec import PatchSpec

PATCH_FILE = "hf_prope_patch.json"
BASE_CONFIG_FILE = "hf_prope_base_config.json"
PATCH_FILE_VERSION = 1
SaveMethod = Literal["auto", "merged", "adapter"]


class PatchMismatchError(ValueError):
    """An adapter's recorded base model does not match the base model given."""


# ---------------------------------------------------------------------------------------------
# What an adapter needs to travel with


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _base_fingerprint(model: nn.Module) -> dict[str, Any]:
    parts = _find_parts(model)
    config = parts.config
    n_pairs = int(next(b for n, b in parts.rotaries[0].named_buffers() if n.endswith("inv_freq")).shape[-1])
    return {
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or [type(parts.model).__name__]),
        "head_dim": 2 * n_pairs,
        "num_hidden_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
    }


def patch_record(model: nn.Module) -> dict[str, Any]:
    """The JSON an adapter carries: spec, patched rope parameters, original ones, base fingerprint."""
    spec = get_patch(model)
    config = _unwrap(model).config
    state = getattr(config, CONFIG_KEY, None) or {}
    return {
        "format_version": PATCH_FILE_VERSION,
        "hf_prope_version": __version__,
        "spec": spec.to_dict() if spec is not None else None,
        "rope_parameters": copy.deepcopy(config.rope_parameters),
        "original_rope_parameters": copy.deepcopy(state.get("original_rope_parameters", config.rope_parameters)),
        "base_model": _base_fingerprint(model),
    }


def read_patch_record(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Read and validate :data:`PATCH_FILE` from a folder, or ``None`` if there is none."""
    path = Path(folder) / PATCH_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(record, dict):
        raise ValueError(f"{path} must hold a JSON object.")
    for key in ("format_version", "spec", "rope_parameters", "base_model"):
        if key not in record:
            raise ValueError(f"{path} is missing the field {key!r}.")
    if record["format_version"] != PATCH_FILE_VERSION:
        raise ValueError(f"{path}: field 'format_version' is {record['format_version']!r}; expected {PATCH_FILE_VERSION}.")
    if record["spec"] is not None:
        try:
            PatchSpec.from_dict(record["spec"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: field 'spec' is invalid: {err}") from err
    if not isinstance(record["rope_parameters"], dict):
        raise ValueError(f"{path}: field 'rope_parameters' must be an object.")
    return record


def check_base_matches(record: dict[str, Any], base: nn.Module) -> None:
    """Refuse a base model whose architecture or head size differs from the one the adapter was trained on."""
    want = record["base_model"]
    got = _base_fingerprint(base)
    for key in ("model_type", "head_dim", "num_hidden_layers", "hidden_size"):
        if key in want and want[key] != got[key]:
            raise PatchMismatchError(
                f"The adapter was saved from a {want['model_type']} base with {key}={want[key]}, but the base model "
                f"given has {key}={got[key]} ({got['model_type']}). Load it on the base it was trained on."
            )


# ---------------------------------------------------------------------------------------------
# Model card


def _license_of(path: str | None) -> str | None:
    if path and Path(path, "README.md").is_file():
        from huggingface_hub import ModelCard

        try:
            return ModelCard.load(Path(path, "README.md")).data.license
        except Exception:  # noqa: BLE001 - a malformed base card must not block saving
            return None
    return None


def _is_packaged_model(name: str) -> bool:
    from .models import EMBEDDED_MODELS

    return name in EMBEDDED_MODELS or name.endswith(".gguf")


def model_card(
    model: nn.Module,
    *,
    save_method: str,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    eval_results: dict[str, float] | None = None,
) -> Any:
    """A ``huggingface_hub.ModelCard`` describing the patch, how to load it, and results if given."""
    from huggingface_hub import ModelCard, ModelCardData

    spec = get_patch(model)
    config = _unwrap(model).config
    base_model = base_model or getattr(config, "_name_or_path", None) or None
    if base_model and (os.path.isabs(base_model) or base_model.startswith(".") or _is_packaged_model(base_model)):
        base_model = None  # a local path or a model packaged with hf-prope means nothing on the Hub
    license = license or _license_of(getattr(config, "_name_or_path", None))
    tags = ["p-rope", "hf-prope", "rope", config.model_type]
    if save_method == "adapter":
        tags += ["lora", "peft"]
    data = ModelCardData(
        base_model=base_model,
        library_name="peft" if save_method == "adapter" else "transformers",
        tags=tags,
        pipeline_tag="text-generation",
        license=license,
    )
    name = repo_id or "this model"
    words = spec.describe() if spec is not None else "no hf-prope patch (plain RoPE)"
    rope = json.dumps(config.rope_parameters, indent=2, sort_keys=True)
    native = "proportional" in json.dumps(config.rope_parameters)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        f"A {config.model_type} model whose rotary position embeddings are patched with "
        "[hf-prope](https://pypi.org/project/hf-prope/) (p-RoPE, Barbero et al., ICLR 2025: *Round and Round "
        "We Go! What makes Rotary Positional Encodings useful?*).",
        "",
        f"**Patch:** {words}.",
        "",
        "```json",
        json.dumps(spec.to_dict() if spec else None, indent=2, sort_keys=True),
        "```",
        "",
        "`rope_parameters` of the patched model:",
        "",
        "```json",
        rope,
        "```",
        "",
        "## Load it",
        "",
        "With hf-prope (restores the patch, and the adapter on its base):",
        "",
        "```python",
        "import hf_prope",
        f'model = hf_prope.from_pretrained("{name}")',
        "```",
        "",
        "Without hf-prope:",
        "",
    ]
    if save_method == "adapter" and native:
        lines += [
            "```python",
            "import json",
            "from huggingface_hub import hf_hub_download",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            f'record = json.load(open(hf_hub_download("{name}", "{PATCH_FILE}")))',
            f'base = AutoModelForCausalLM.from_pretrained("{base_model or "<base model>"}", '
            'rope_parameters=record["rope_parameters"])',
            f'model = PeftModel.from_pretrained(base, "{name}")',
            "```",
            "",
            "Do **not** use `AutoPeftModelForCausalLM.from_pretrained` alone: it rebuilds the base with plain RoPE "
            "(same shapes, no error, a different model).",
        ]
    elif save_method == "adapter":
        lines += [
            "This patch uses hf-prope's own rope type, which plain transformers cannot build; install hf-prope. "
            "Loading the adapter with PEFT alone (`AutoPeftModelForCausalLM.from_pretrained`) silently gives a "
            "plain-RoPE model.",
        ]
    elif native:
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM",
            f'model = AutoModelForCausalLM.from_pretrained("{name}")   # native "proportional" rope type',
            "```",
        ]
    else:
        lines += ["This patch uses hf-prope's own rope type: `pip install hf-prope` and `import hf_prope` first."]
    if eval_results:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in eval_results.items()]
    return ModelCard("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Local save (atomic)


def _resolve_method(model: nn.Module, save_method: SaveMethod) -> str:
    if save_method not in ("auto", "merged", "adapter"):
        raise ValueError(f"save_method must be 'merged', 'adapter' or 'auto', got {save_method!r}.")
    if save_method == "auto":
        return "adapter" if _is_peft(model) else "merged"
    if save_method == "adapter" and not _is_peft(model):
        raise ValueError("save_method='adapter' needs a PEFT model (get_peft_model); use save_method='merged'.")
    return save_method


def _write_folder(
    model: nn.Module,
    folder: Path,
    method: str,
    *,
    tokenizer: Any,
    repo_id: str | None,
    license: str | None,
    eval_results: dict[str, float] | None,
) -> None:
    if method == "adapter":
        base_name = next(iter(model.peft_config.values())).base_model_name_or_path
        # PEFT's "auto" embedding check fetches the base's config.json from the Hub when the base name is
        # not a folder; an embedded model's name is on no Hub, and its vocabulary is never resized.
        extra = {"save_embedding_layers": False} if base_name and _is_packaged_model(str(base_name)) else {}
        model.save_pretrained(folder, safe_serialization=True, **extra)
        (folder / PATCH_FILE).write_text(json.dumps(patch_record(model), indent=2, sort_keys=True) + "\n")
        (folder / BASE_CONFIG_FILE).write_text(_unwrap(model).config.to_json_string())
    else:
        merged = model
        if _is_peft(model):
            merged = copy.deepcopy(model).merge_and_unload()  # the caller keeps their adapter
        merged.save_pretrained(folder, safe_serialization=True)
        base_name = getattr(_unwrap(model).config, "_name_or_path", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    card = model_card(
        model, save_method=method, repo_id=repo_id, base_model=base_name, license=license, eval_results=eval_results
    )
    card.save(folder / "README.md")


def _replace_dir(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``: readers see the old folder or the complete new one.

    Two renames; if the process dies between them, :func:`_recover` puts the old one back.
    """
    old = target.with_name(f".{target.name}.hf-prope-old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _recover(target: Path) -> None:
    old = target.with_name(f".{target.name}.hf-prope-old")
    if old.exists() and not target.exists():
        os.replace(old, target)


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    *,
    save_method: SaveMethod = "auto",
    tokenizer: Any = None,
    license: str | None = None,
    eval_results: dict[str, float] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Save a patched model (merged weights or a PEFT adapter), the patch, a model card and the tokenizer.

    ``save_method="auto"`` saves an adapter for a PEFT model and full weights otherwise.
    The folder is written elsewhere first and renamed into place, so ``save_directory`` is
    always either the previous save or the complete new one. Returns the folder.
    """
    method = _resolve_method(model, save_method)
    _find_parts(model)  # a supported model, before anything is written
    target = Path(save_directory).resolve()
    _recover(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(target.parent, os.W_OK):
        raise PermissionError(f"Cannot write to {target.parent}.")
    tmp = target.with_name(f".{target.name}.hf-prope-tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        _write_folder(
            model, tmp, method, tokenizer=tokenizer, repo_id=repo_id, license=license, eval_results=eval_results
        )
        _replace_dir(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Hub


def _check_token(api: Any) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.whoami()
    except (HfHubHTTPError, OSError, ValueError) as err:
        # Never echo the token: the message names only where it came from.
        raise PermissionError(
            "The Hugging Face token is missing or was rejected (checked before uploading anything). Pass token=, "
            "set HF_TOKEN, or run `hf auth login`."
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
) -> Any:
    """Push a patched model to the Hub in one commit; returns the ``CommitInfo``.

    The token (``token=``, else ``HF_TOKEN`` or the saved login) is checked before any
    upload. ``revision`` is a branch (created if missing); ``create_pr`` opens a pull request.
    """
    from huggingface_hub import HfApi

    method = _resolve_method(model, save_method)
    _find_parts(model)
    api = HfApi(token=token)
    _check_token(api)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    spec = get_patch(model)
    message = commit_message or f"Upload {method} model with hf-prope patch: {spec.describe() if spec else 'none'}"
    with tempfile.TemporaryDirectory(prefix="hf-prope-push-") as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        _write_folder(
            model, folder, method, tokenizer=tokenizer, repo_id=repo_id, license=license, eval_results=eval_results
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


def _local_folder(path_or_repo: str | os.PathLike[str], revision: str | None, token: str | None) -> Path:
    if Path(path_or_repo).is_dir():
        _recover(Path(path_or_repo))
        return Path(path_or_repo)
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
    """Load a model saved by :func:`save_pretrained` / :func:`push_to_hub`, with its patch.

    ``path_or_repo`` is a local folder or a Hub repo id (with ``revision``). For an adapter,
    the base model is the one recorded by PEFT unless ``base_model`` (a name, a folder or an
    already-loaded model) is given; it must match the recorded architecture and head size.
    ``model_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype=``).
    """
    from transformers import AutoModelForCausalLM

    folder = _local_folder(path_or_repo, revision, token)
    record = read_patch_record(folder)
    if record is None or not (folder / "adapter_config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(folder, **model_kwargs)
        return restore_patch(model)

    from peft import PeftConfig, PeftModel

    if isinstance(base_model, nn.Module):
        base = base_model
    else:
        name = base_model or PeftConfig.from_pretrained(folder).base_model_name_or_path
        if _is_packaged_model(str(name)):
            from .models import load_model  # an embedded name or a GGUF file (the recipes record these)

            base, _ = load_model(str(name), **{k: v for k, v in model_kwargs.items() if k == "dtype"})
        else:
            base = AutoModelForCausalLM.from_pretrained(name, token=token, **model_kwargs)
    check_base_matches(record, base)
    if record["spec"] is not None:
        patch_model(base, PatchSpec.from_dict(record["spec"]))
    return PeftModel.from_pretrained(base, folder, is_trainable=is_trainable)


def warn_if_patch_missing(model: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Warn when an adapter folder carries a patch that ``model`` does not have (the silent-revert trap)."""
    try:
        record = read_patch_record(folder)
    except ValueError:
        return
    if record is None or record["spec"] is None:
        return
    want = PatchSpec.from_dict(record["spec"])
    if get_patch(model) != want:
        warnings.warn(
            f"This adapter was trained on a model patched with hf-prope ({want.describe()}), but the base model it "
            "is being loaded on does not carry that patch, so it computes plain RoPE. Load it with "
            "hf_prope.from_pretrained(...) instead.",
            UserWarning,
            stacklevel=3,
        )


def _install_peft_load_check() -> None:
    """Make ``PeftModel.from_pretrained`` warn about adapters whose patch is not applied.

    Behaviour is otherwise unchanged. For a Hub id, the small patch file is fetched (one
    request; any failure, e.g. offline or no such file, means no warning).
    """
    try:
        from peft import PeftModel
    except ImportError:  # PEFT is a dependency, but keep import of hf_prope robust
        return
    original = PeftModel.from_pretrained.__func__  # type: ignore[attr-defined]
    if getattr(original, "_hf_prope_checked", False):
        return

    def from_pretrained(cls: Any, model: nn.Module, model_id: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(str(model_id)).is_dir():
            warn_if_patch_missing(model, model_id)
        elif not os.environ.get("HF_HUB_OFFLINE"):
            try:
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(
                    str(model_id), PATCH_FILE, revision=kwargs.get("revision"), token=kwargs.get("token")
                )
            except Exception:  # noqa: BLE001 - no patch file (or no network): nothing to warn about
                path = None
            if path is not None:
                warn_if_patch_missing(model, Path(path).parent)
        return original(cls, model, model_id, *args, **kwargs)

    from_pretrained._hf_prope_checked = True  # type: ignore[attr-defined]
    from_pretrained.__wrapped__ = original  # type: ignore[attr-defined]
    from_pretrained.__doc__ = original.__doc__
    PeftModel.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign]

