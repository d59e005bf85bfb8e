"""What every recipe shares: the class shape, the model/data/patch settings, rank-0 output, plots.

A recipe is a class built with named settings objects (``LoRARecipe(model_args=...,
data_args=..., ...)``, or :meth:`Recipe.from_config` from a YAML file and overrides);
``setup()`` checks everything, creating nothing, and ``run()`` works. The training layer
two recipes share is in :mod:`hf_prope.recipes.training`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from hf_prope.distributed import rank_and_world
from hf_prope.files import atomic_path, check_writable, write_atomic, write_json
from hf_prope.spec import PATCH_NAMES

__all__ = [
    "ModelArguments",
    "DataArguments",
    "PatchArguments",
    "Recipe",
    "SECRET_KEYS",
    "RESULTS_FILE",
    "is_main_process",
    "barrier",
    "start_deepspeed_comm",
    "pyplot",
    "save_figure",
    "check_writable",
    "write_atomic",
    "write_json",
]


@dataclass
class ModelArguments:
    """Which model to load."""

    model: str = field(
        default="smollm2-135m",
        metadata={
            "help": "An embedded name (smollm2-135m, gemma-3-270m), a local .gguf file, a local model "
            "folder, or a Hub model id."
        },
    )
    model_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a Hub model."})
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "Dtype of the loaded weights (use bf16=true for mixed precision)."}
    )

    def load(self) -> tuple[Any, Any]:
        """Model (eval mode) and tokenizer, through :func:`hf_prope.models.load_model`."""
        from hf_prope.models import load_model

        return load_model(self.model, dtype=getattr(torch, self.dtype), revision=self.model_revision)


@dataclass
class DataArguments:
    """Where the text comes from and how it is cut."""

    dataset: str = field(
        default="python-docs",
        metadata={
            "help": "python-docs (CPython's documentation, always available), a local .txt/.md/.json/.jsonl/"
            ".csv/.parquet file or a folder of them, or a Hub dataset name."
        },
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

    patch: str = field(default="p-rope", metadata={"help": "one of " + ", ".join(PATCH_NAMES) + "."})
    p: float | None = field(default=0.25, metadata={"help": "p-rope: fraction of frequency pairs that rotate."})
    rotate: Literal["highest", "lowest"] | None = field(
        default=None, metadata={"help": "p-rope: which end keeps rotating (highest = the paper's p-RoPE)."}
    )
    keep: list[int] | None = field(default=None, metadata={"help": "freq-mask: indices of pairs that rotate."})
    max_wavelength: float | None = field(
        default=None,
        metadata={
            "help": "freq-mask: longest wavelength kept. head-mask with select=2-norm...: longest wavelength a head "
            "may keep (give the training length: every kept pair then turns within it)."
        },
    )
    pairs: int | None = field(default=None, metadata={"help": "head-mask: pairs per head that rotate (instead of p)."})
    select: Literal["highest", "2-norm", "2-norm-drift", "2-norm-shared"] | None = field(
        default=None,
        metadata={
            "help": "head-mask: which pairs each head keeps. highest (default: p-RoPE), 2-norm (each KV head the "
            "pairs of largest query-key norm product, measured on the training text before training; MHA2MLA), "
            "2-norm-drift (that product times how far the pair turns over a training block), "
            "2-norm-shared (one such set for every head, a freq-mask)."
        },
    )
    layers: list[int] | None = field(default=None, metadata={"help": "Patch only these layer indices."})
    layer_types: list[str] | None = field(
        default=None, metadata={"help": "Patch only layers of these types (e.g. full_attention on Gemma 3)."}
    )
    patch_file: str | None = field(
        default=None,
        metadata={
            "help": "A patch file (JSON, PatchSpec.save; e.g. the head_mask.json `hf-prope analyze ... "
            "head_mask_p=0.25` writes): the patch, instead of patch= and its parameters."
        },
    )

    def spec(self) -> Any:
        """The :class:`hf_prope.PatchSpec` these settings describe (validated)."""
        from pathlib import Path

        from hf_prope.spec import PatchSpec, make_spec, patch_parameters

        if self.patch_file is not None:
            changed = [
                f.name
                for f in fields(PatchArguments)
                if f.name not in ("patch_file", "p") and getattr(self, f.name) != f.default
            ]
            if changed:
                raise ValueError(
                    f"patch_file={self.patch_file} is the whole patch; leave out {', '.join(changed)} (or the file)."
                )
            return PatchSpec.load(Path(self.patch_file))

        if self.select is not None and self.patch != "head-mask":
            raise ValueError(f"select={self.select} chooses a head-mask's pairs; it goes with patch=head-mask.")
        skip = ("patch", "patch_file", "select")
        params = {f.name: getattr(self, f.name) for f in fields(PatchArguments) if f.name not in skip}
        if self.calibrates:
            params["select"] = "highest"  # the budget, checked now; the pairs are chosen by calibrate()
            params["max_wavelength"] = None  # calibrate()'s: it limits the choice
            if self.max_wavelength is not None:
                from hf_prope.analysis import check_max_wavelength

                check_max_wavelength(self.max_wavelength)  # before the model loads
        elif self.patch == "head-mask" and self.max_wavelength is not None:
            raise ValueError(
                "max_wavelength with patch=head-mask limits the pairs select=2-norm, 2-norm-drift or 2-norm-shared "
                "chooses from; give one of those select= (or patch=freq-mask for one mask by wavelength)."
            )
        elif self.select is not None:
            params["select"] = self.select
        if params["p"] == PatchArguments.p and ("p" not in patch_parameters(self.patch) or self.pairs is not None):
            params["p"] = None  # the default p belongs to p-rope (and a head-mask's budget); other patches take none
        return make_spec(self.patch, **{k: v for k, v in params.items() if v is not None})

    @property
    def calibrates(self) -> bool:
        """Whether the patch is chosen from the model's own statistics (``select=2-norm...``) by :meth:`calibrate`."""
        return self.patch == "head-mask" and self.select in ("2-norm", "2-norm-drift", "2-norm-shared")

    def calibrate(
        self, model: Any, tokenizer: Any, ids: Any, *, context_length: int | None = None, progress: bool = True
    ) -> Any:
        """The patch chosen on ``ids`` (training tokens, never the held-out ones) by ``select``'s rule."""
        from hf_prope import analysis

        p = self.p if self.pairs is None else None
        if self.max_wavelength is not None:  # too few pairs left: say so before the measuring run
            frequencies = analysis.layer_frequencies(model, original=True)
            r = self.pairs if self.pairs is not None else analysis.rotated_pairs(float(p), 2 * frequencies.shape[1])
            analysis.allowed_pairs(frequencies, self.max_wavelength, r, shared=self.select == "2-norm-shared")
        usage = analysis.frequency_usage(model, tokenizer, ids, progress=progress)
        return analysis.head_mask(
            usage,
            p=p,
            pairs=self.pairs,
            select=self.select,  # type: ignore[arg-type]
            context_length=context_length,
            max_wavelength=self.max_wavelength,
        )


def is_main_process() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def start_deepspeed_comm() -> None:
    """DeepSpeed's communication layer on the process group already formed (gloo on CPU processes).

    accelerate starts it only for GPU runs; without it ZeRO-3's loading sees one process and
    rejects the batch size Trainer filled in for all of them.
    """
    from deepspeed import comm

    if not torch.distributed.is_initialized() and "RANK" not in os.environ:
        raise ValueError(
            "deepspeed= needs a launcher that starts its processes: torchrun --nproc_per_node N -m hf_prope run "
            "lora ... (N=1 for one process), accelerate launch, or deepspeed. Nothing was loaded or written."
        )
    if not comm.is_initialized():
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        comm.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display is needed or used)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Save a figure as PNG (atomically), then close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        pyplot().close(fig)


RESULTS_FILE = "results.json"
# Settings that hold credentials: never written to results.json (matched by name, exactly).
SECRET_KEYS = frozenset({"hub_token", "token", "hf_token", "push_to_hub_token", "api_key"})


class Recipe:
    """A recipe is configured by named settings dataclasses, then ``setup()`` checks everything and ``run()`` works.

    Subclasses set :attr:`name` and :attr:`arguments` (attribute name -> settings dataclass,
    e.g. ``{"model_args": ModelArguments, ...}``) and implement ``setup`` and ``run``; each
    settings object becomes the attribute of that name. ``from_config`` builds one from a YAML
    file and overrides; extra keyword arguments (``callbacks=`` for training recipes) go to the
    constructor.
    """

    name: ClassVar[str]
    arguments: ClassVar[dict[str, type]]
    description: ClassVar[str] = ""
    default_config: ClassVar[str | None] = None  # what `hf-prope run NAME` uses without --config

    def __init__(self, *positional: Any, **settings: Any) -> None:
        expected = self.arguments
        missing = [k for k in expected if k not in settings]
        unknown = [k for k in settings if k not in expected]
        wrong = [k for k, t in expected.items() if k in settings and not isinstance(settings[k], t)]
        if positional or missing or unknown or wrong:
            want = ", ".join(f"{k}={t.__name__}(...)" for k, t in expected.items())
            raise TypeError(f"{type(self).__name__} takes the named settings {want}.")
        self.args: dict[str, Any] = {k: settings[k] for k in expected}
        for key, value in self.args.items():
            setattr(self, key, value)

    @classmethod
    def settings_types(cls) -> list[type]:
        """The settings dataclasses, in the order the command line's help lists them."""
        return list(cls.arguments.values())

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike[str] | None = None,
        overrides: Sequence[str] | dict[str, Any] = (),
        **extra: Any,
    ) -> Recipe:
        from .config import parse_config

        values = parse_config(cls.settings_types(), config, overrides, defaults=cls.machine_defaults())
        return cls(**dict(zip(cls.arguments, values)), **extra)

    @classmethod
    def machine_defaults(cls) -> dict[str, Any]:
        """Settings this machine implies, which a config file or override may still change."""
        return {}

    def settings(self) -> dict[str, Any]:
        """Every setting of the recipe as plain JSON values, credentials (:data:`SECRET_KEYS`) left out."""
        out: dict[str, Any] = {}
        for arg in self.args.values():
            values = arg.to_dict() if hasattr(arg, "to_dict") else asdict(arg)
            out.update({k: v for k, v in values.items() if k not in SECRET_KEYS})
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
