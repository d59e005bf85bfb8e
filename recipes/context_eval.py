"""Perplexity by context length, for a model unchanged and under p-RoPE (and trained adapters).

The paper's long-context argument: low frequencies rotate slowly, so over a short window they
act as semantic channels, but far enough out even they turn, and a model that relies on them
drifts. This recipe scores the same held-out tokens cut into windows of each length (each
window from scratch), for each variant, including lengths past the model's training length::

    hf-prope run eval --config smollm2_135m_eval

It writes ``results.json`` and ``perplexity_by_context.png`` to ``output_dir`` and prints the table.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        default=16384, metadata={"help": "Tokens scored at every length: the last eval_tokens of the data."}
    )
    batch_size: int = field(default=1, metadata={"help": "Windows per forward pass."})
    output_dir: str = field(default="out/eval", metadata={"help": "Where results.json and the plot go."})

    def __post_init__(self) -> None:
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
        from hf_prope.data import tokenize_dataset
        from hf_prope.files import local_path
        from hf_prope.patching import check_patch
        from hf_prope.spec import PatchSpec

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
        for _, spec in self.variants:
            if spec is not None:
                check_patch(self.model, spec)
        self.trained = [(path, self._fetch_trained(path)) for path in ea.trained or []]
        ids = tokenize_dataset(dataset, self.tokenizer, text_column=self.data_args.text_column)
        if ids.numel() < ea.eval_tokens:
            raise ValueError(
                f"The data has {ids.numel()} tokens but eval_tokens={ea.eval_tokens}; use more text or lower eval_tokens."
            )
        self.ids = ids[-ea.eval_tokens :]

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

    def _scores(self, model: Any, label: str) -> dict[int, float]:
        from hf_prope.evaluation import perplexity

        out = {}
        for context in self.eval_args.contexts:
            n = self.eval_args.eval_tokens // context
            out[context] = perplexity(
                model,
                self.ids,
                window=context,
                n_windows=n,
                batch_size=self.eval_args.batch_size,
                progress=f"{label} @ {context}",
            )
        return out

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
            rows.append(
                {
                    "variant": label,
                    "spec": spec.to_dict() if spec else None,
                    "perplexity": self._scores(self.model, label),
                }
            )
        unpatch_model(self.model)
        for path, folder in self.trained:
            # An adapter goes on (a copy of) this recipe's model; a full save is its own base.
            base = {"base_model": copy.deepcopy(self.model)} if (folder / "adapter_config.json").is_file() else {}
            trained = hf_prope.from_pretrained(folder, **base).eval()
            spec = get_patch(trained)
            name = Path(path).parent.name if Path(path).name in ("adapter", "merged") else Path(path).name
            label = f"trained: {name}"
            rows.append(
                {"variant": label, "spec": spec.to_dict() if spec else None, "perplexity": self._scores(trained, label)}
            )
            del trained
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.summary = {
            "model": self.model_args.model,
            "dataset": self.data_args.dataset,
            "eval_tokens": self.eval_args.eval_tokens,
            "contexts": self.eval_args.contexts,
            "training_length": limit,
            "layer_types": self.eval_args.layer_types,
            "rows": rows,
            "seconds": round(time.perf_counter() - self.started, 1),
            "settings": self.settings(),
        }
        self.write_results(self.out, self.summary, format_table(self.summary), PLOT_FILE)
        return self.summary

    def plot(self, path: Path) -> None:
        from matplotlib import ticker

        plt = pyplot()
        s = self.summary
        contexts = s["contexts"]
        base = next((r for r in s["rows"] if r["spec"] is None and not r["variant"].startswith("trained")), None)
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


def format_table(summary: dict[str, Any]) -> str:
    """Perplexity per variant (rows) and context length (columns)."""
    contexts = summary["contexts"]
    width = max(len(r["variant"]) for r in summary["rows"]) + 2
    head = f"{'variant':<{width}}" + "".join(f"{c:>10}" for c in contexts)
    lines = [head, "-" * len(head)]
    for row in summary["rows"]:
        lines.append(f"{row['variant']:<{width}}" + "".join(f"{row['perplexity'][c]:>10.2f}" for c in contexts))
    if summary["training_length"]:
        lines.append(f"(the model was trained on up to {summary['training_length']} tokens)")
    return "\n".join(lines)
