"""What every recipe shares: the class shape, model loading, the output folder, rank-0 writes."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import torch


@dataclass
class ModelArguments:
    """Which model to load."""

    model: str = field(
        default="smollm2-135m",
        metadata={"help": "An embedded name (smollm2-135m, gemma-3-270m), a local .gguf file, a local model "
                  "folder, or a Hub model id."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a Hub model."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Dtype of the loaded weights (use bf16=true for mixed precision)."}
    )


@dataclass
class DataArguments:
    """Where the text comes from and how it is cut."""

    dataset: str = field(
        default="python-docs",
        metadata={"help": "python-docs (CPython's documentation, always available), a local .txt/.md/.json/.jsonl/"
                  ".csv/.parquet file or a folder of them, or a Hub dataset name."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Config name of a Hub dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a Hub dataset to read."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text (JSON/CSV/Hub data)."})

    def load(self) -> Any:
        """The ``datasets.Dataset`` these settings name (missing files and empty data raise here)."""
        from hf_prope.data import load_text_dataset

        return load_text_dataset(
            self.dataset, text_column=self.text_column, config_name=self.dataset_config, split=self.dataset_split
        )


@dataclass
class PatchArguments:
    """The hf-prope patch, flattened so that ``p=0.25`` is an override (see ``hf_prope.PatchSpec``)."""

    patch: str = field(default="p-rope", metadata={"help": "p-rope, freq-mask, nope or rope."})
    p: float | None = field(default=0.25, metadata={"help": "p-rope: fraction of frequency pairs that rotate."})
    rotate: Literal["highest", "lowest"] | None = field(
        default=None, metadata={"help": "p-rope: which end keeps rotating (highest = the paper's p-RoPE)."}
    )
    keep: list[int] | None = field(default=None, metadata={"help": "freq-mask: indices of pairs that rotate."})
    max_wavelength: float | None = field(default=None, metadata={"help": "freq-mask: longest wavelength kept."})
    layers: list[int] | None = field(default=None, metadata={"help": "Patch only these layer indices."})
    layer_types: list[str] | None = field(
        default=None, metadata={"help": "Patch only layers of these types (e.g. full_attention on Gemma 3)."}
    )

    def spec(self) -> Any:
        """The :class:`hf_prope.PatchSpec` these settings describe (validated)."""
        from hf_prope.spec import make_spec

        params = {f.name: getattr(self, f.name) for f in fields(PatchArguments) if f.name != "patch"}
        if self.patch != "p-rope" and params["p"] == PatchArguments.p:
            params["p"] = None  # the default p belongs to p-rope; other patches take none
        return make_spec(self.patch, **{k: v for k, v in params.items() if v is not None})


def load_model(args: ModelArguments) -> tuple[Any, Any]:
    """Model and tokenizer from an embedded name, a GGUF file, a local folder or the Hub; eval mode.

    For a folder or Hub id the config is read first, so an unsupported model type fails
    before any weights are fetched.
    """
    from hf_prope import models
    from hf_prope.registry import get_architecture

    dtype = getattr(torch, args.dtype)
    path = Path(args.model).expanduser()
    if args.model in models.EMBEDDED_MODELS or (path.is_file() and path.suffix == ".gguf"):
        model, tokenizer = models.load_model(str(path) if path.is_file() else args.model, dtype=dtype)
        get_architecture(model.config.model_type)
        return model, tokenizer
    if not path.is_dir() and (path.suffix == ".gguf" or args.model.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"No model file or folder at {args.model!r}.")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True} if path.is_dir() else {"revision": args.model_revision}
    source = str(path) if path.is_dir() else args.model
    get_architecture(AutoConfig.from_pretrained(source, **kwargs).model_type)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    return model.eval(), tokenizer


def check_patch_fits(model: Any, spec: Any) -> None:
    """Apply ``spec`` and take it off again: raises (layers, layer types, head size) before any real work."""
    from hf_prope.patching import patch_model, unpatch_model

    patch_model(model, spec)
    unpatch_model(model)


def has_accelerator() -> bool:
    """Whether torch sees a GPU (or another accelerator) on this machine."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def check_writable(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` if needed and prove it can be written, before any work is done."""
    path = Path(folder).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".hf-prope-write-test-{uuid.uuid4().hex[:8]}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"The output folder {path} cannot be written ({err.strerror}); choose another output_dir.") from None
    return path


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file through a temporary name in the same folder, so readers never see half of it."""
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")


def previous_run(out: Path, names: Sequence[str]) -> list[Path]:
    """What a recipe's earlier run left in ``out`` (among the outputs ``names``)."""
    return [p for p in (out / name for name in names) if p.exists()]


def refuse_previous_run(out: Path, names: Sequence[str], *, resume: bool, overwrite: bool) -> None:
    """An existing run is never mixed with or overwritten by a new one unless the user says which."""
    found = previous_run(out, names)
    if found and not resume and not overwrite:
        raise FileExistsError(
            f"{out} already holds a run ({', '.join(p.name for p in found)}). Pass resume=true to continue "
            "it, overwrite=true to discard it, or choose another output_dir."
        )


def clear_previous_run(out: Path, names: Sequence[str]) -> None:
    """Delete an earlier run's outputs (call only once every check of the new run has passed)."""
    for p in previous_run(out, names):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def is_main_process() -> bool:
    from hf_prope.evaluation import rank_and_world

    return rank_and_world()[0] == 0


def barrier() -> None:
    from hf_prope.evaluation import rank_and_world

    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display is needed or used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Save a figure as PNG through a temporary name, then close it."""
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    pyplot().close(fig)
    tmp.replace(path)


RESULTS_FILE = "results.json"


class Recipe:
    """A recipe is configured by dataclasses, then ``setup()`` checks everything and ``run()`` works.

    Subclasses set :attr:`name` and :attr:`arguments` and implement ``setup`` and ``run``;
    ``from_config`` builds one from a YAML file and overrides.
    """

    name: ClassVar[str]
    arguments: ClassVar[tuple[type, ...]]
    description: ClassVar[str] = ""
    default_config: ClassVar[str | None] = None  # what `hf-prope run NAME` uses without --config

    def __init__(self, *args: Any) -> None:
        if len(args) != len(self.arguments) or not all(isinstance(a, t) for a, t in zip(args, self.arguments)):
            raise TypeError(f"{type(self).__name__} takes {', '.join(t.__name__ for t in self.arguments)}.")
        self.args = args

    @classmethod
    def from_config(cls, config: str | os.PathLike[str] | None = None, overrides: Sequence[str] | dict[str, Any] = ()) -> "Recipe":
        from .config import parse_config

        return cls(*parse_config(cls.arguments, config, overrides, defaults=cls.machine_defaults()))

    @classmethod
    def machine_defaults(cls) -> dict[str, Any]:
        """Settings this machine implies, which a config file or override may still change."""
        return {}

    def settings(self) -> dict[str, Any]:
        """Every setting of the recipe as plain JSON values (tokens removed)."""
        out: dict[str, Any] = {}
        for arg in self.args:
            values = arg.to_dict() if hasattr(arg, "to_dict") else asdict(arg)
            out.update({k: v for k, v in values.items() if "token" not in k})
        return out

    def say(self, text: str) -> None:
        """A progress line on stderr, from the main process only."""
        if is_main_process():
            print(text, file=sys.stderr, flush=True)

    def write_results(self, out: Path, summary: dict[str, Any], table: str, plot_file: str) -> None:
        """``results.json``, the plot and the table, from the main process only."""
        if not is_main_process():
            return
        write_json(out / RESULTS_FILE, summary)
        self.plot(out / plot_file)
        print("\n" + table, flush=True)
        print(f"\nWrote {out / RESULTS_FILE} and {out / plot_file}", flush=True)

    def plot(self, path: Path) -> None:
        raise NotImplementedError

    def setup(self) -> None:
        raise NotImplementedError

    def run(self) -> dict[str, Any]:
        raise NotImplementedError
