"""Which frequencies a model uses, its positional heads, and a checked suggestion of p, as a report.

::

    hf-prope analyze smollm2-135m --out report/
    hf-prope analyze gemma-3-270m --out report-gemma/ --context_length 1024

writes to the output folder ``report.json`` (every measurement), ``summary.md`` (what a person
reads first, with the pictures), ``frequency_usage.png`` (layer x frequency pair, query and
key, and the whole-model profile), ``frequency_usage_layer<L>.png`` (head x pair for one
layer), ``positional_heads.png`` (diagonal and previous-token attention per layer and head,
before and after the highest frequencies are removed) and ``perplexity_vs_p.png`` (the check
of the suggestion: zero-shot perplexity against p).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hf_prope.analysis import (
    DEFAULT_GRID,
    DEFAULT_THRESHOLD,
    DEFAULT_TOLERANCE,
    DEFAULT_WINDOW,
    DEFAULT_WINDOWS,
    check_max_wavelength,
)

from .base import (
    DataArguments,
    ModelArguments,
    Recipe,
    check_writable,
    pyplot,
    save_figure,
    write_atomic,
    write_json,
)

REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.md"
USAGE_PLOT = "frequency_usage.png"
HEADS_PLOT = "positional_heads.png"
PPL_PLOT = "perplexity_vs_p.png"
HEAD_MASK_FILE = "head_mask.json"


@dataclass
class AnalysisArguments:
    """What to measure, how much text, and where the report goes."""

    window: int = field(
        default=DEFAULT_WINDOW, metadata={"help": "Tokens per window the model reads (each from scratch)."}
    )
    n_windows: int = field(default=DEFAULT_WINDOWS, metadata={"help": "Windows measured, from the end of the text."})
    context_length: int | None = field(
        default=None,
        metadata={
            "help": "Context the suggestion of p must hold at (default: window); also the window of the "
            "perplexity check."
        },
    )
    tolerance: float = field(
        default=DEFAULT_TOLERANCE,
        metadata={
            "help": "Largest share of the attention-logit scale the stopped pairs may move (see "
            "hf_prope.analysis.suggest_p)."
        },
    )
    threshold: float = field(
        default=DEFAULT_THRESHOLD,
        metadata={"help": "A head is positional when its mean attention on one position exceeds this."},
    )
    remove_highest: float = field(
        default=0.25,
        metadata={
            "help": "The intervention: fraction of the highest frequencies removed when re-measuring the "
            "positional heads (0 = skip)."
        },
    )
    layer: int | None = field(
        default=None,
        metadata={
            "help": "Layer of the head x pair heat map (default: the one with most positional heads, else the "
            "middle one)."
        },
    )
    grid: list[float] = field(
        default_factory=lambda: list(DEFAULT_GRID), metadata={"help": "Values of p tried (1 = RoPE)."}
    )
    check: bool = field(default=True, metadata={"help": "Measure zero-shot perplexity over the grid (the check)."})
    head_mask_p: float | None = field(
        default=None,
        metadata={
            "help": "Also choose a per-KV-head mask keeping this fraction of pairs by MHA2MLA's 2-norm rule, "
            f"written as {HEAD_MASK_FILE} (a patch file: patch_model, patch_file= of the recipes) and marked "
            "on the head x pair heat map."
        },
    )
    head_mask_select: Literal["2-norm", "2-norm-drift"] = field(
        default="2-norm",
        metadata={
            "help": "How head_mask_p's pairs are chosen: 2-norm (the query-key norm product), 2-norm-drift (that "
            "product times how far the pair turns over context_length)."
        },
    )
    head_mask_max_wavelength: float | None = field(
        default=None,
        metadata={
            "help": "head_mask_p: choose only pairs whose wavelength is at most this many tokens (give the training "
            "length: every kept pair then completes a turn within it)."
        },
    )
    output_dir: str = field(default="report", metadata={"help": "Where the report goes."})

    def __post_init__(self) -> None:
        if self.window < 2 or self.n_windows < 1:
            raise ValueError(
                f"Need window >= 2 and n_windows >= 1, got window={self.window}, n_windows={self.n_windows}."
            )
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"context_length must be at least 2 tokens, got {self.context_length}.")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1 (a share of attention), got {self.threshold}.")
        if not 0.0 <= self.remove_highest < 1.0:
            raise ValueError(f"remove_highest must be in [0, 1), got {self.remove_highest}.")
        if self.tolerance <= 0:
            raise ValueError(f"tolerance must be positive, got {self.tolerance}.")
        if not self.grid or any(not 0.0 <= p <= 1.0 for p in self.grid):
            raise ValueError(f"grid must list values of p in [0, 1], got {self.grid}.")
        if self.head_mask_p is not None and not 0.0 <= self.head_mask_p <= 1.0:
            raise ValueError(
                f"head_mask_p must be in [0, 1] (the fraction of pairs each head keeps), got {self.head_mask_p}."
            )
        if self.head_mask_max_wavelength is not None:
            if self.head_mask_p is None:
                raise ValueError("head_mask_max_wavelength limits the pairs of a head mask; give head_mask_p= too.")
            check_max_wavelength(self.head_mask_max_wavelength)


class AnalyzeRecipe(Recipe):
    """``hf-prope analyze MODEL --out DIR``: frequency usage, positional heads, a checked p."""

    name = "analyze"
    description = "which frequencies a model uses, its positional heads and a checked suggestion of p (report)"
    default_config = None
    arguments = {"model_args": ModelArguments, "data_args": DataArguments, "analysis_args": AnalysisArguments}

    model_args: ModelArguments
    data_args: DataArguments
    analysis_args: AnalysisArguments

    @property
    def context(self) -> int:
        return self.analysis_args.context_length or self.analysis_args.window

    def setup(self) -> None:
        """Every check (folder, data, model, layer, text length) before any measurement; creates nothing."""
        from hf_prope.data import token_windows, tokenize_dataset
        from hf_prope.state import get_patch

        aa = self.analysis_args
        self.started = time.perf_counter()
        self.out = check_writable(aa.output_dir)
        dataset = self.data_args.load()
        self.say(f"Loading {self.model_args.model} ...")
        self.model, self.tokenizer = self.model_args.load()
        n_layers = int(self.model.config.num_hidden_layers)
        if aa.layer is not None and not 0 <= aa.layer < n_layers:
            raise ValueError(
                f"layer {aa.layer} out of range: this model has {n_layers} decoder layers (indices 0..{n_layers - 1})."
            )
        if get_patch(self.model) is not None:
            raise ValueError("The model carries an hf-prope patch; analyse the original model (its patch is recorded).")
        self.ids = tokenize_dataset(dataset, self.tokenizer, text_column=self.data_args.text_column)
        token_windows(self.tokenizer, self.ids, window=aa.window, n_windows=aa.n_windows)
        if aa.check:
            token_windows(self.tokenizer, self.ids, window=self.context, n_windows=aa.n_windows)

    def run(self) -> dict[str, Any]:
        from hf_prope import analysis
        from hf_prope.spec import PatchSpec

        self.setup()
        aa = self.analysis_args
        common = {"window": aa.window, "n_windows": aa.n_windows, "progress": True}
        self.say(f"Measuring query/key norms per frequency pair on {aa.n_windows} x {aa.window} tokens ...")
        usage = analysis.frequency_usage(self.model, self.tokenizer, self.ids, **common)
        intervention = PatchSpec("p-rope", p=1 - aa.remove_highest, rotate="lowest") if aa.remove_highest else None
        self.say("Measuring diagonal and previous-token attention ...")
        heads = analysis.positional_heads(
            self.model, self.tokenizer, self.ids, threshold=aa.threshold, intervention=intervention, **common
        )
        scopes: list[list[str] | None] = [None]
        if usage.layer_types and len(set(usage.layer_types)) > 1:
            scopes += [[t] for t in sorted(set(usage.layer_types))]
        suggestions = [
            analysis.suggest_p(
                usage, context_length=self.context, tolerance=aa.tolerance, layer_types=scope, grid=aa.grid, heads=heads
            )
            for scope in scopes
        ]
        curves: list[dict[str, Any]] = []
        if aa.check:
            for scope, suggestion in zip(scopes, suggestions):
                where = f"{scope[0]} layers" if scope else "every layer"
                self.say(
                    f"Checking: zero-shot perplexity over p on {where}, {aa.n_windows} x {self.context} tokens ..."
                )
                rows = analysis.perplexity_by_p(
                    self.model,
                    self.tokenizer,
                    self.ids,
                    [*aa.grid, suggestion.p],
                    layer_types=scope,
                    window=self.context,
                    n_windows=aa.n_windows,
                    progress=True,
                )
                suggestion.check = analysis.mark_suggestion(rows, suggestion)
                curves.append({"layer_types": scope, "rows": rows})
        head_spec = None
        if aa.head_mask_p is not None:
            head_spec = analysis.head_mask(
                usage,
                p=aa.head_mask_p,
                select=aa.head_mask_select,
                context_length=self.context,
                max_wavelength=aa.head_mask_max_wavelength,
            )
        self.usage, self.heads, self.suggestions, self.curves = usage, heads, suggestions, curves
        self.layer = aa.layer if aa.layer is not None else _busiest_layer(heads, usage.layers)
        self.summary = {
            "model": self.model_args.model,
            "model_type": usage.model_type,
            "layer": self.layer,
            "dataset": self.data_args.dataset,
            "window": aa.window,
            "n_windows": aa.n_windows,
            "context_length": self.context,
            "usage": usage.to_dict(),
            "positional_heads": heads.to_dict(),
            "suggestions": [s.to_dict() for s in suggestions],
            "perplexity_by_p": curves,
            "head_mask": head_spec.to_dict() if head_spec is not None else None,
            "seconds": round(time.perf_counter() - self.started, 1),
            "settings": self.settings(),
        }
        self.write()
        return self.summary

    def write(self) -> None:
        write_report(self.out, self.summary)


def write_report(out: Path, summary: dict[str, Any]) -> None:
    """The pictures, then ``report.json`` and ``summary.md`` that point at them, from a report's values.

    ``write_report(folder, json.load(open(folder / "report.json")))`` redraws a report.
    """
    from hf_prope.analysis import FrequencyUsage, PositionalHeads, Suggestion
    from hf_prope.spec import PatchSpec

    head_spec = PatchSpec.from_dict(summary["head_mask"]) if summary.get("head_mask") else None
    usage = FrequencyUsage.from_dict(summary["usage"])
    heads = PositionalHeads.from_dict(summary["positional_heads"])
    suggestions = [Suggestion.from_dict(s) for s in summary["suggestions"]]
    model, layer = summary["model"], summary["layer"]
    layer_plot = f"frequency_usage_layer{layer}.png"
    plot_usage(usage, model, out / USAGE_PLOT, suggestions[0])
    plot_layer(usage, model, layer, out / layer_plot, heads, head_spec)
    plot_heads(heads, model, out / HEADS_PLOT)
    files = [USAGE_PLOT, layer_plot, HEADS_PLOT]
    if head_spec is not None:
        head_spec.save(out / HEAD_MASK_FILE)
        files.append(HEAD_MASK_FILE)
    if summary["perplexity_by_p"]:
        plot_perplexity(summary["perplexity_by_p"], suggestions, model, summary["context_length"], out / PPL_PLOT)
        files.append(PPL_PLOT)
    summary["files"] = [REPORT_FILE, SUMMARY_FILE, *files]
    write_json(out / REPORT_FILE, summary)
    text = summary_markdown(summary, usage, heads, suggestions, layer_plot)
    write_atomic(out / SUMMARY_FILE, text)
    print("\n" + text, flush=True)
    print(f"Wrote {', '.join(summary['files'])} to {out}", flush=True)


def _busiest_layer(heads: Any, layers: list[int]) -> int:
    counts: dict[int, int] = {}
    for h in heads.heads:
        counts[h["layer"]] = counts.get(h["layer"], 0) + 1
    if counts:
        return max(sorted(counts), key=lambda layer: counts[layer])
    return layers[len(layers) // 2]


# ---------------------------------------------------------------------------------------------
# Pictures


def _pair_axis(ax: Any, n_pairs: int) -> None:
    ax.set_xlabel("frequency pair (0 = highest frequency, fastest rotation)")
    step = max(1, n_pairs // 8)
    ax.set_xticks(list(range(0, n_pairs, step)) + [n_pairs - 1])


def _wavelength_note(usage: Any) -> str:
    freq = usage.original_frequencies
    parts = []
    for i in range(freq.shape[0]):
        lo, hi = float(freq[i, 0]), float(freq[i, -1])
        parts.append((round(2 * math.pi / lo, 1), round(2 * math.pi / hi)))
    unique = sorted(set(parts))
    return "; ".join(f"wavelength {a:g} .. {b:,} tokens" for a, b in unique)


def plot_usage(usage: Any, model: str, path: Path, suggestion: Any | None = None) -> None:
    """Layer x pair heat maps (query, key: share of the layer's norm) and the whole-model profile."""
    plt = pyplot()
    n = usage.n_pairs
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, which in zip(axes[:2], ("query", "key")):
        share = usage.layer_share(which).numpy() * 100
        image = ax.imshow(
            share,
            aspect="auto",
            cmap="viridis",
            interpolation="nearest",
            origin="lower",
            extent=(-0.5, n - 0.5, -0.5, len(usage.layers) - 0.5),
        )
        ax.set_yticks(range(len(usage.layers)))
        ax.set_yticklabels([str(i) for i in usage.layers], fontsize=6 if len(usage.layers) > 20 else 8)
        ax.set_ylabel("decoder layer")
        _pair_axis(ax, n)
        ax.set_title(f"{which}: share of each layer's {which} norm per pair")
        bar = fig.colorbar(image, ax=ax)
        bar.set_label(f"% of the layer's {which} norm (heads averaged)")
    ax = axes[2]
    for which, colour in (("query", "tab:blue"), ("key", "tab:orange")):
        ax.plot(range(n), usage.model_share(which).numpy() * 100, label=which, color=colour)
    ax.axhline(100 / n, color="grey", linestyle=":", linewidth=1, label="uniform")
    if suggestion is not None and suggestion.rotated_pairs < n:
        ax.axvline(
            suggestion.rotated_pairs - 0.5,
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label=f"suggested cut: p={suggestion.p:g}\n(pairs right of it stop rotating)",
        )
    _pair_axis(ax, n)
    ax.set_ylabel("% of the whole model's norm")
    ax.set_title("whole model (layers averaged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(
        f"{model}: where the query/key norm sits, by RoPE frequency pair (before rotation; "
        f"{usage.tokens:,} tokens)\n{_wavelength_note(usage)}",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, path)


def plot_layer(
    usage: Any, model: str, layer: int, path: Path, heads: Any | None = None, head_spec: Any | None = None
) -> None:
    """Head x pair heat maps of one layer, query and key; positional query heads are named.

    With ``head_spec`` (a head-mask), the pairs each head keeps rotating are boxed.
    """
    plt = pyplot()
    n = usage.n_pairs
    kept = None
    if head_spec is not None and head_spec.head_keep is not None:
        kept = head_spec.head_keep[layer]
    kinds = {h["head"]: h["kind"] for h in (heads.heads if heads is not None else []) if h["layer"] == layer}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    for ax, which in zip(axes, ("query", "key")):
        share = usage.head_share(layer, which).numpy() * 100
        image = ax.imshow(
            share,
            aspect="auto",
            cmap="viridis",
            interpolation="nearest",
            origin="lower",
            extent=(-0.5, n - 0.5, -0.5, share.shape[0] - 0.5),
        )
        ax.set_yticks(range(share.shape[0]))
        if which == "query" and kinds:
            ax.set_yticklabels(
                [f"{h} ({kinds[h]})" if h in kinds else str(h) for h in range(share.shape[0])], fontsize=8
            )
        ax.set_ylabel(f"{which} head" if which == "query" else "key/value head")
        _pair_axis(ax, n)
        title = f"{which}: share of each head's norm per pair"
        if kept is not None:
            group = share.shape[0] // len(kept)  # query head h uses KV head h // group
            for row in range(share.shape[0]):
                for pair in kept[row // group if which == "query" else row]:
                    ax.add_patch(
                        plt.Rectangle((pair - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.2)
                    )
            title += f"\nboxed: kept rotating ({head_spec.label})"
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax).set_label(f"% of the head's {which} norm")
    lt = f" ({usage.layer_types[usage.layers.index(layer)]})" if usage.layer_types else ""
    fig.suptitle(
        f"{model}, layer {layer}{lt}: query/key norm by head and RoPE frequency pair ({usage.tokens:,} tokens)",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, path)


def plot_heads(heads: Any, model: str, path: Path) -> None:
    """Diagonal and previous-token attention per layer x head, before and after the intervention."""
    plt = pyplot()
    panels = [("diagonal (same token)", heads.diagonal), ("previous token", heads.previous)]
    if heads.diagonal_after is not None:
        removed = 1 - heads.intervention["p"] if heads.intervention.get("p") is not None else None
        label = f"highest {removed:.0%} of frequencies removed" if removed is not None else "after intervention"
        panels += [(f"diagonal, {label}", heads.diagonal_after), (f"previous token, {label}", heads.previous_after)]
    cols = 2
    rows = len(panels) // cols
    n_layers, n_heads = heads.diagonal.shape
    fig, axes = plt.subplots(
        rows, cols, figsize=(6 + 0.35 * n_heads * cols, 1.2 + rows * (1 + 0.16 * n_layers)), squeeze=False
    )
    for ax, (title, values) in zip(axes.flat, panels):
        image = ax.imshow(
            values.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1, origin="lower", interpolation="nearest"
        )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("query head")
        ax.set_ylabel("decoder layer")
        ax.set_yticks(range(n_layers))
        ax.set_yticklabels([str(i) for i in heads.layers], fontsize=6 if n_layers > 20 else 8)
        ax.set_xticks(range(n_heads))
        fig.colorbar(image, ax=ax).set_label("mean attention on that position")
        for h in heads.heads:
            kind_matches = ("diagonal" in title) == (h["kind"] == "diagonal")
            if kind_matches:
                ax.scatter([h["head"]], [heads.layers.index(h["layer"])], s=40, facecolors="none", edgecolors="cyan")
    fig.suptitle(
        f"{model}: positional heads (circled: above {heads.threshold:g} before the intervention; "
        f"{heads.tokens:,} tokens)",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, path)


def plot_perplexity(curves: list[dict[str, Any]], suggestions: list[Any], model: str, context: int, path: Path) -> None:
    """Zero-shot perplexity against p, per scope, with the suggestions marked."""
    from matplotlib import ticker

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for curve, suggestion in zip(curves, suggestions):
        rows = curve["rows"]
        label = f"p-RoPE on {curve['layer_types'][0]} layers" if curve["layer_types"] else "p-RoPE on every layer"
        line = ax.plot([r["p"] for r in rows], [r["perplexity"] for r in rows], marker="o", label=label)[0]
        chosen = next(r for r in rows if r["p"] == suggestion.p)
        ax.scatter(
            [chosen["p"]],
            [chosen["perplexity"]],
            s=160,
            marker="*",
            color=line.get_color(),
            zorder=5,
            edgecolors="black",
            label=f"suggested: p={suggestion.p:g} ({chosen['ratio_to_rope']:.3f} x RoPE)",
        )
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("p (fraction of frequency pairs that keep rotating; 1 = RoPE, 0 = NoPE)")
    ax.set_ylabel("zero-shot perplexity (log scale)")
    ax.set_title(f"{model}: checking the suggestion (no training;\nlast windows of {context} tokens of the text)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# The summary


def summary_markdown(summary: dict[str, Any], usage: Any, heads: Any, suggestions: list[Any], layer_plot: str) -> str:
    """A short report in markdown: the figures that answer "which p?", then the pictures."""
    q_bands = usage.band_shares(4, "query")
    k_bands = usage.band_shares(4, "key")
    lines = [
        f"# RoPE frequency analysis: {summary['model']}",
        "",
        f"{summary['model_type']}, {len(usage.layers)} layers, {usage.query.shape[1]} query heads, "
        f"{usage.key.shape[1]} key/value heads, {usage.n_pairs} frequency pairs per head. Text: "
        f"{summary['dataset']}, last {summary['n_windows']} windows of {summary['window']} tokens "
        f"({usage.tokens:,} tokens).",
        "",
        "## Which frequencies carry the norm",
        "",
        "Share of the query / key norm (before rotation) in each quarter of the pairs, whole model:",
        "",
        "| pairs | highest quarter | 2nd | 3rd | lowest quarter |",
        "|---|---|---|---|---|",
        "| query | " + " | ".join(f"{x:.1%}" for x in q_bands) + " |",
        "| key | " + " | ".join(f"{x:.1%}" for x in k_bands) + " |",
        "",
        "Top query pairs: " + ", ".join(f"{t['pair']} ({t['share']:.1%})" for t in usage.top_pairs(5)) + ".",
        "Top key pairs: " + ", ".join(f"{t['pair']} ({t['share']:.1%})" for t in usage.top_pairs(5, "key")) + ".",
        "",
        "## Positional heads",
        "",
    ]
    if heads.heads:
        after = heads.intervention is not None
        lines += [
            f"Heads whose mean attention on one relative position exceeds {heads.threshold:g}"
            + (" (and after removing the highest frequencies):" if after else ":"),
            "",
            "| layer | head | kind | share | after intervention |" if after else "| layer | head | kind | share |",
            "|---|---|---|---|---|" if after else "|---|---|---|---|",
        ]
        for h in heads.heads:
            row = f"| {h['layer']} | {h['head']} | {h['kind']} | {h['share']:.2f} |"
            lines.append(row + (f" {h['share_after']:.2f} |" if after else ""))
    else:
        strongest_d = float(heads.diagonal.max())
        strongest_p = float(heads.previous.max())
        lines.append(
            f"No head exceeds {heads.threshold:g} (strongest diagonal {strongest_d:.2f}, strongest previous-token "
            f"{strongest_p:.2f})."
        )
    lines += ["", "## Suggested p", ""]
    for s in suggestions:
        where = f"on {', '.join(s.layer_types)} layers" if s.layer_types else "on every layer"
        lines.append(f"**p = {s.p:g} {where}** (context {s.context_length} tokens). " + " ".join(s.evidence))
        if s.check:
            lines += ["", "| p | perplexity | x RoPE |", "|---|---|---|"]
            for row in s.check:
                mark = " (suggested)" if row["suggested"] else ""
                lines.append(f"| {row['p']:g}{mark} | {row['perplexity']:.2f} | {row['ratio_to_rope']:.3f} |")
        lines.append("")
    if summary.get("head_mask"):
        from hf_prope.spec import PatchSpec

        spec = PatchSpec.from_dict(summary["head_mask"])
        assert spec.head_keep is not None
        lines += [
            "## Per-head mask",
            "",
            f"{spec.describe()}: each key/value head keeps the pairs of largest mean |q_i| x mean |k_i| (MHA2MLA's "
            f"2-norm; its query heads summed). Written as `{HEAD_MASK_FILE}`; patch with "
            f'`hf_prope.patch_model(model, "{HEAD_MASK_FILE}")` or train with `patch_file={HEAD_MASK_FILE}`. '
            f"Layer {summary['layer']} keeps: "
            + "; ".join(f"KV head {h}: {list(k)}" for h, k in enumerate(spec.head_keep[summary["layer"]]))
            + ".",
            "",
        ]
    lines += [
        "## Pictures",
        "",
        f"![frequency usage]({USAGE_PLOT})",
        "",
        f"![layer {summary['layer']}: query/key norm by head and pair]({layer_plot})",
        "",
        f"![positional heads]({HEADS_PLOT})",
        "",
    ]
    if summary.get("perplexity_by_p"):
        lines += [f"![perplexity vs p]({PPL_PLOT})", ""]
    lines.append(f"({summary['seconds']:.0f} s; every figure is in {REPORT_FILE}.)")
    return "\n".join(lines) + "\n"
