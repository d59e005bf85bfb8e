"""Perplexity by context length, for a model unchanged and under p-RoPE (and trained adapters).

The paper's long-context argument: low frequencies rotate slowly, so over a short window they
act as semantic channels, but far enough out even they turn, and a model that relies on them
drifts. This recipe scores the same held-out tokens cut into windows of each length (each
window from scratch), for each variant, including lengths past the model's training length::

    hf-prope run eval --config smollm2_135m_eval
    hf-prope run eval --config smollm2_135m_long_eval dataset=$HELDOUT trained=[out/smollm2-p50-quick/adapter]

Each variant is a p (or a trained save) under each context extension (``extensions``: YaRN,
dynamic NTK, linear interpolation, an attention temperature alone; :mod:`hf_prope.context_extension`).
``windows=documents`` cuts every window inside one long document; ``passkey_lengths`` adds
passkey retrieval by length and depth (:mod:`hf_prope.passkey`). It writes ``results.json``,
``perplexity_by_context.png`` (and ``passkey.png``) to ``output_dir`` and prints the tables.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .base import (
    DataArguments,
    ModelArguments,
    Recipe,
    check_writable,
    is_main_process,
    pyplot,
    save_figure,
)

PLOT_FILE = "perplexity_by_context.png"
PASSKEY_PLOT_FILE = "passkey.png"


@dataclass
class ContextEvalArguments:
    """Variants, context lengths, and where the results go."""

    p: list[float] = field(
        default_factory=lambda: [1.0, 0.75, 0.5, 0.25],
        metadata={"help": "p-RoPE fractions to evaluate; 1.0 is the unchanged model, 0.0 is NoPE."},
    )
    layer_types: list[str] | None = field(
        default=None, metadata={"help": "Apply p-RoPE only to layers of these types (e.g. full_attention)."}
    )
    trained: list[str] | None = field(
        default=None,
        metadata={
            "help": "Folders (or Hub ids) saved by the lora recipe / hf_prope.save_pretrained to evaluate "
            "too; adapters are put on this recipe's model."
        },
    )
    contexts: list[int] = field(
        default_factory=lambda: [256, 512, 1024, 2048, 4096, 8192],
        metadata={"help": "Window lengths in tokens."},
    )
    eval_tokens: int = field(
        default=16384,
        metadata={
            "help": "Tokens scored at every length: the last eval_tokens of the data (windows=tail), or the first "
            "eval_tokens of each long document (windows=documents)."
        },
    )
    windows: Literal["tail", "documents"] = field(
        default="tail",
        metadata={
            "help": "tail: the last eval_tokens of all the data, documents joined; documents: every document of at "
            "least eval_tokens tokens gives its first eval_tokens, so no window spans two documents."
        },
    )
    max_documents: int | None = field(
        default=None, metadata={"help": "windows=documents: use at most this many long documents (in data order)."}
    )
    extensions: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "Context extensions to evaluate every variant under: none, yarn:S, dynamic:S, linear:S or "
            "temperature:S (YaRN's attention temperature 0.1 ln S + 1 alone); S = target / training length."
        },
    )
    passkey_lengths: list[int] | None = field(
        default=None, metadata={"help": "Passkey retrieval at these prompt lengths (tokens); unset: no passkey test."}
    )
    passkey_depths: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        metadata={"help": "Where the key sits in the filler: 0 = at the start, 1 = just before the question."},
    )
    passkey_trials: int = field(default=2, metadata={"help": "Prompts (different keys) per length and depth."})
    passkey_seed: int = field(default=0, metadata={"help": "Fixes the keys: the same prompts on every machine."})
    batch_size: int = field(default=1, metadata={"help": "Windows per forward pass."})
    device: str = field(default="auto", metadata={"help": "auto (the GPU when there is one), cpu, cuda, cuda:1..."})
    output_dir: str = field(default="out/eval", metadata={"help": "Where results.json and the plot go."})

    def __post_init__(self) -> None:
        from hf_prope.context_extension import ContextExtension

        self.parsed_extensions = [ContextExtension.parse(e) for e in self.extensions or ["none"]]
        labels = [e.label if e else "none" for e in self.parsed_extensions]
        if len(set(labels)) != len(labels):
            raise ValueError(f"extensions lists the same extension twice: {self.extensions}.")
        if self.passkey_lengths is not None:
            if not self.passkey_lengths or min(self.passkey_lengths) < 64:
                raise ValueError(
                    f"passkey_lengths must be prompt lengths of at least 64 tokens, got {self.passkey_lengths}."
                )
            bad_depths = [d for d in self.passkey_depths if not 0.0 <= d <= 1.0]
            if bad_depths or not self.passkey_depths:
                raise ValueError(f"passkey_depths must be fractions in [0, 1], got {self.passkey_depths}.")
            if self.passkey_trials < 1:
                raise ValueError(f"passkey_trials must be at least 1, got {self.passkey_trials}.")
        import torch

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"device={self.device!r} is not a device torch knows ({e}); use auto, cpu or cuda.") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r}: torch sees no GPU on this machine; use device=cpu or auto.")
        if self.max_documents is not None and self.windows != "documents":
            raise ValueError("max_documents applies to windows=documents; set windows=documents or unset it.")
        if not self.contexts or min(self.contexts) < 2:
            raise ValueError(f"contexts must be window lengths of at least 2 tokens, got {self.contexts}.")
        if max(self.contexts) > self.eval_tokens:
            raise ValueError(
                f"The longest context ({max(self.contexts)}) exceeds eval_tokens={self.eval_tokens}; raise eval_tokens "
                "to at least the longest context."
            )
        bad = [p for p in self.p if not 0.0 <= p <= 1.0]
        if bad or not (self.p or self.trained):
            raise ValueError(f"p must list fractions in [0, 1] (1.0 = unchanged), got {self.p}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}.")


def _label(p: float) -> str:
    from hf_prope.spec import PatchSpec, label_of

    return "NoPE" if p == 0.0 else label_of(PatchSpec("p-rope", p=p))


class ContextEvalRecipe(Recipe):
    """``hf-prope run eval``: held-out perplexity at several context lengths, per variant."""

    name = "eval"
    description = "perplexity by context length of a model, unchanged and under p-RoPE, with a plot"
    default_config = "smollm2_135m_eval"
    arguments = {"model_args": ModelArguments, "data_args": DataArguments, "eval_args": ContextEvalArguments}

    model_args: ModelArguments
    data_args: DataArguments
    eval_args: ContextEvalArguments

    def setup(self) -> None:
        """Every check (folder, trained saves, data, model, every variant, text length) before any forward pass."""
        from hf_prope.context_extension import extended_rope_parameters
        from hf_prope.data import join_documents, long_documents, tokenize_documents
        from hf_prope.files import local_path
        from hf_prope.passkey import passkey_prompt
        from hf_prope.patching import check_patch
        from hf_prope.spec import PatchSpec
        from hf_prope.state import original_rope_parameters

        ea = self.eval_args
        self.started = time.perf_counter()
        self.out = Path(ea.output_dir).expanduser().resolve()
        if is_main_process():
            check_writable(self.out)
        where: dict[str, Any] = {"layer_types": tuple(ea.layer_types)} if ea.layer_types else {}
        self.variants = [(_label(p), None if p == 1.0 else PatchSpec("p-rope", p=p, **where)) for p in ea.p]
        for path in ea.trained or []:
            found = local_path(path)
            if found is not None and not found.is_dir():
                raise FileNotFoundError(f"trained: no folder {path!r} (expected a save of the lora recipe).")
        dataset = self.data_args.load()
        self.say(f"Loading {self.model_args.model} ...")
        self.model, self.tokenizer = self.model_args.load()
        self.model.to(ea.device)
        for _, spec in self.variants:
            if spec is not None:
                check_patch(self.model, spec)
        self.trained = [(path, self._fetch_trained(path)) for path in ea.trained or []]
        for ext in ea.parsed_extensions:
            if ext is not None:
                extended_rope_parameters(self.model.config, ext, original_rope_parameters(self.model.config))
        if ea.passkey_lengths:
            for length in ea.passkey_lengths:  # too short a length fails here, before any forward pass
                for depth in ea.passkey_depths:
                    passkey_prompt(self.tokenizer, length, depth, seed=ea.passkey_seed)
        if ea.windows == "documents":
            docs = tokenize_documents(dataset, self.tokenizer, text_column=self.data_args.text_column)
            self.documents = long_documents(docs, ea.eval_tokens, max_documents=ea.max_documents)
            self.say(f"Scoring the first {ea.eval_tokens:,} tokens of {len(self.documents)} documents of {len(docs)}.")
            return
        ids = join_documents(
            tokenize_documents(dataset, self.tokenizer, text_column=self.data_args.text_column),
            self.tokenizer.eos_token_id,
        )
        if ids.numel() < ea.eval_tokens:
            raise ValueError(
                f"The data has {ids.numel()} tokens but eval_tokens={ea.eval_tokens}; use more text or lower eval_tokens."
            )
        self.documents = [ids[-ea.eval_tokens :]]

    def _fetch_trained(self, path: str) -> Path:
        """A trained save as a local folder (a Hub id is downloaded now), checked against this recipe's model."""
        from hf_prope.files import local_path
        from hf_prope.patch_record import check_base_matches, read_patch_record
        from hf_prope.state import patch_state

        folder = local_path(path)
        if folder is None:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path))
        if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"trained: {path!r} holds neither a model (config.json) nor an adapter (adapter_config.json); "
                "expected a save of the lora recipe or of hf_prope.save_pretrained."
            )
        record = read_patch_record(folder)
        if record is not None and (folder / "adapter_config.json").is_file():
            check_base_matches(record, patch_state(self.model))
        return folder

    def _scores(self, model: Any, label: str) -> dict[str, Any]:
        """Perplexity at every context (and passkey accuracy) of ``model`` as it is now."""
        from hf_prope.data import document_windows
        from hf_prope.evaluation import windows_perplexity
        from hf_prope.passkey import passkey_accuracy

        ea = self.eval_args
        out: dict[str, Any] = {
            "perplexity": {
                context: windows_perplexity(
                    model,
                    document_windows(self.documents, context),
                    batch_size=ea.batch_size,
                    progress=f"{label} @ {context}",
                )
                for context in ea.contexts
            }
        }
        if ea.passkey_lengths:
            out["passkey"] = passkey_accuracy(
                model,
                self.tokenizer,
                lengths=ea.passkey_lengths,
                depths=ea.passkey_depths,
                trials=ea.passkey_trials,
                seed=ea.passkey_seed,
                progress=f"{label}: passkey",
            )
        return out

    def _rows(self, model: Any, label: str, spec: Any) -> list[dict[str, Any]]:
        """One row per context extension of ``model`` (patched as it should be); the model is left unextended."""
        from hf_prope.context_extension import extend_context

        rows = []
        try:
            for ext in self.eval_args.parsed_extensions:
                extend_context(model, ext)
                name = label if ext is None else (ext.label if label == "RoPE" else f"{label} + {ext.label}")
                rows.append(
                    {
                        "variant": name,
                        "spec": spec.to_dict() if spec else None,
                        "extension": ext.to_dict() if ext else None,
                        **self._scores(model, name),
                    }
                )
        finally:
            extend_context(model, None)
        return rows

    def run(self) -> dict[str, Any]:
        import hf_prope
        from hf_prope.patching import patch_model, unpatch_model
        from hf_prope.state import get_patch

        self.setup()
        rows = []
        for label, spec in self.variants:
            if spec is None:
                unpatch_model(self.model)
            else:
                patch_model(self.model, spec)
            rows += self._rows(self.model, label, spec)
        unpatch_model(self.model)
        for path, folder in self.trained:
            # An adapter goes on (a copy of) this recipe's model; a full save is its own base.
            base = {"base_model": copy.deepcopy(self.model)} if (folder / "adapter_config.json").is_file() else {}
            trained = hf_prope.from_pretrained(folder, **base).to(self.eval_args.device).eval()
            name = Path(path).parent.name if Path(path).name in ("adapter", "merged") else Path(path).name
            rows += self._rows(trained, f"trained: {name}", get_patch(trained))
            del trained
        limit = getattr(self.model.config, "max_position_embeddings", None)
        ea = self.eval_args
        self.summary = {
            "model": self.model_args.model,
            "dataset": self.data_args.dataset,
            "eval_tokens": ea.eval_tokens,
            "windows": ea.windows,
            "documents": len(self.documents) if ea.windows == "documents" else None,
            "contexts": ea.contexts,
            "training_length": limit,
            "layer_types": ea.layer_types,
            "extensions": [e.to_dict() if e else None for e in ea.parsed_extensions],
            "rows": rows,
            "seconds": round(time.perf_counter() - self.started, 1),
            "settings": self.settings(),
        }
        self.write_results(self.out, self.summary, format_table(self.summary), PLOT_FILE)
        if ea.passkey_lengths and is_main_process():
            plot_passkey(self.summary, self.out / PASSKEY_PLOT_FILE)
        return self.summary

    def plot(self, path: Path) -> None:
        from matplotlib import ticker

        plt = pyplot()
        s = self.summary
        contexts = s["contexts"]
        base = original_row(s)
        fig, axes = plt.subplots(1, 2 if base else 1, figsize=(12 if base else 6.5, 4.8), squeeze=False)
        left = axes[0][0]
        for row in s["rows"]:
            left.plot(contexts, [row["perplexity"][c] for c in contexts], marker="o", label=row["variant"])
        left.set_ylabel("held-out perplexity (log scale)")
        left.set_yscale("log")
        left.set_title(
            f"{s['model']}: perplexity by context length\n(last {s['eval_tokens']:,} tokens of "
            f"{s['dataset']}, each window from scratch)"
        )
        if base:
            right = axes[0][1]
            for row in s["rows"]:
                right.plot(
                    contexts,
                    [row["perplexity"][c] / base["perplexity"][c] for c in contexts],
                    marker="o",
                    label=row["variant"],
                )
            right.set_ylabel("perplexity / unchanged model's (log scale)")
            right.set_yscale("log")
            right.set_title("relative to the unchanged model at the same length")
        for ax in axes[0]:
            ax.set_xscale("log", base=2)
            ax.set_xticks(contexts)
            ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%d"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel("context length (tokens per window)")
            if s["training_length"]:
                ax.axvline(s["training_length"], color="grey", linestyle="--", linewidth=1)
                ax.annotate(
                    "training length",
                    (s["training_length"], ax.get_ylim()[1]),
                    rotation=90,
                    va="top",
                    ha="right",
                    fontsize=8,
                    color="grey",
                )
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, path)


def original_row(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The unchanged model's row (no patch, no extension, not a trained save), if there is one."""
    return next(
        (
            r
            for r in summary["rows"]
            if r["spec"] is None and not r.get("extension") and not r["variant"].startswith("trained")
        ),
        None,
    )


def format_table(summary: dict[str, Any]) -> str:
    """Perplexity per variant (rows) and context length (columns), each beside the original's; then passkey."""
    contexts = summary["contexts"]
    base = original_row(summary)
    width = max(len(r["variant"]) for r in summary["rows"]) + 2
    cell = 18 if base else 10
    head = f"{'variant':<{width}}" + "".join(f"{c:>{cell}}" for c in contexts)
    lines = [head, "-" * len(head)]
    for row in summary["rows"]:
        cells = []
        for c in contexts:
            value = row["perplexity"][c]
            ratio = f" ({100 * (value / base['perplexity'][c] - 1):+.1f}%)" if base and row is not base else ""
            cells.append(f"{f'{value:.2f}{ratio}':>{cell}}")
        lines.append(f"{row['variant']:<{width}}" + "".join(cells))
    if summary["training_length"]:
        lines.append(f"(the model was trained on up to {summary['training_length']} tokens)")
    keyed = [r for r in summary["rows"] if "passkey" in r]
    if keyed:
        pk = keyed[0]["passkey"]
        lines += ["", f"passkey accuracy by length (mean over depths {pk['depths']}, {pk['trials']} keys each)"]
        head = f"{'variant':<{width}}" + "".join(f"{n:>10}" for n in pk["lengths"])
        lines += [head, "-" * len(head)]
        for row in keyed:
            acc = row["passkey"]["accuracy"]
            lines.append(f"{row['variant']:<{width}}" + "".join(f"{sum(a) / len(a):>10.2f}" for a in acc))
    return "\n".join(lines)


def plot_passkey(summary: dict[str, Any], path: Path) -> None:
    """The needle heat map: passkey accuracy by prompt length (x) and key depth (y), one panel per variant."""
    plt = pyplot()
    rows = [r for r in summary["rows"] if "passkey" in r]
    cols = min(3, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    image = None
    for ax, row in zip(axes.flat, rows):
        pk = row["passkey"]
        grid = [[pk["accuracy"][i][j] for i in range(len(pk["lengths"]))] for j in range(len(pk["depths"]))]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
        ax.set_xticks(range(len(pk["lengths"])), [f"{n:,}" for n in pk["lengths"]], fontsize=8)
        ax.set_yticks(range(len(pk["depths"])), [f"{d:.0%}" for d in pk["depths"]], fontsize=8)
        for j, line in enumerate(grid):
            for i, value in enumerate(line):
                ax.text(i, j, f"{value:.0%}", ha="center", va="center", fontsize=7)
        limit = summary.get("training_length")
        if limit:
            beyond = [i for i, n in enumerate(pk["lengths"]) if n > limit]
            if beyond:
                ax.axvline(beyond[0] - 0.5, color="black", linestyle="--", linewidth=1)
        ax.set_title(row["variant"], fontsize=9)
        ax.set_xlabel("prompt length (tokens)", fontsize=8)
        ax.set_ylabel("key depth", fontsize=8)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy (greedy, exact)")
    first = rows[0]["passkey"]
    fig.suptitle(
        f"{summary['model']}: passkey retrieval, {first['trials']} key{'s' if first['trials'] > 1 else ''} per cell "
        f"(seed {first['seed']})"
        + (
            f"; dashed: past the training length {summary['training_length']}" if summary.get("training_length") else ""
        ),
        fontsize=10,
    )
    save_figure(fig, path)
