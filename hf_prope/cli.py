"""The ``hf-prope`` command.

``hf-prope`` with no arguments runs the main job, ``hf-prope zero-shot`` with its defaults:
load the embedded SmolLM2-135M, measure its zero-shot perplexity on CPython's documentation
text under RoPE and p-RoPE variants, and print the table beside the project's reference
figures. Subcommands leave room for later jobs (``run``, ``analyze``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

# Reference figures (BRIEF section 4): last 16 windows of 512 tokens of python_docs_text(),
# measured on Python 3.11 (the text changes between Python minor versions).
REFERENCE_PROTOCOL = {"window": 512, "n_windows": 16}
# Kept as the BRIEF writes them (strings) so the table shows their precision, not more.
REFERENCES: dict[tuple[str, bool], dict[str, str]] = {
    # (model, patch only full_attention layers) -> variant label -> perplexity
    ("smollm2-135m", False): {
        "RoPE": "9.87", "p=0.75": "9.90", "p=0.5": "10.41", "p=0.25": "50.4", "NoPE": "197.7",
        "highest 25% dropped": "89.2",
    },
    ("gemma-3-270m", False): {
        "RoPE": "26.29", "p=0.75": "26.18", "p=0.5": "139.1", "p=0.25": "196.3", "NoPE": "1696",
        "highest 25% dropped": "188.5",
    },
    ("gemma-3-270m", True): {"RoPE": "26.29", "p=0.75": "26.28", "p=0.5": "26.21", "p=0.25": "26.99", "NoPE": "34.54"},
}


def _variants(layer_types: list[str] | None) -> list[tuple[str, Any]]:
    from .spec import PatchSpec

    where: dict[str, Any] = {"layer_types": tuple(layer_types)} if layer_types else {}
    return [
        ("RoPE", None),
        ("p=0.75", PatchSpec("p-rope", p=0.75, **where)),
        ("p=0.5", PatchSpec("p-rope", p=0.5, **where)),
        ("p=0.25", PatchSpec("p-rope", p=0.25, **where)),
        ("NoPE", PatchSpec("nope", **where)),
        # The paper's control: same number of rotating pairs as p=0.75, but the slowest ones.
        ("highest 25% dropped", PatchSpec("p-rope", p=0.75, rotate="lowest", **where)),
    ]


def _references(args: argparse.Namespace) -> dict[str, str]:
    if (args.window, args.n_windows) != tuple(REFERENCE_PROTOCOL.values()):
        return {}
    full_only = args.layer_types == ["full_attention"]
    if args.layer_types and not full_only:
        return {}
    return REFERENCES.get((args.model, full_only), {})


def _format_table(rows: list[dict[str, Any]], refs: dict[str, str]) -> str:
    header = f"{'variant':<22}{'perplexity':>12}{'x RoPE':>9}{'reference':>12}"
    lines = [header, "-" * len(header)]
    for row in rows:
        ratio = f"{row['ratio_to_rope']:.3f}" if row["ratio_to_rope"] is not None else "-"
        ref = refs.get(row["variant"], "-")
        lines.append(f"{row['variant']:<22}{row['perplexity']:>12.2f}{ratio:>9}{ref:>12}")
    return "\n".join(lines)


def _zero_shot(args: argparse.Namespace) -> int:
    from .data import python_docs_text
    from .evaluation import zero_shot_table
    from .models import load_model

    started = time.perf_counter()
    print(f"Loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(args.model)
    rows = zero_shot_table(
        model, tokenizer, _variants(args.layer_types), window=args.window, n_windows=args.n_windows,
        text=python_docs_text(), batch_size=args.batch_size,
    )
    refs = _references(args)
    where = f"p-RoPE on {', '.join(args.layer_types)} layers only" if args.layer_types else "patch on every layer"
    print(
        f"\nZero-shot perplexity of {args.model} on the Python docs (pydoc_data.topics, Python "
        f"{platform.python_version()}), last {args.n_windows} windows of {args.window} tokens; {where}."
    )
    print(_format_table(rows, refs))
    if refs:
        print("reference: the project's measurement (BRIEF section 4, Python 3.11), same protocol.")
    seconds = time.perf_counter() - started
    print(f"({seconds:.0f} s)")
    if args.out:
        result = {
            "model": args.model,
            "window": args.window,
            "n_windows": args.n_windows,
            "layer_types": args.layer_types,
            "text": "python_docs_text",
            "python": platform.python_version(),
            "seconds": round(seconds, 1),
            "rows": [{**row, "reference": _float_or_none(refs.get(row["variant"]))} for row in rows],
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.out}")
    return 0


def _float_or_none(text: str | None) -> float | None:
    return float(text) if text is not None else None


def _at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="hf-prope",
        description="p-RoPE for Hugging Face transformers. With no command: the zero-shot perplexity table "
        "of the embedded SmolLM2-135M under RoPE and p-RoPE variants (a few minutes on CPU).",
    )
    parser.add_argument("--version", action="version", version=f"hf-prope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    zs = sub.add_parser(
        "zero-shot",
        help="perplexity of a model, unchanged and under p-RoPE variants, with no training",
        description="Patch a model in place with RoPE, p=0.75, p=0.5, p=0.25, NoPE and the highest 25% of "
        "frequencies dropped, and measure its perplexity on the Python docs text after each.",
    )
    zs.add_argument(
        "--model", default="smollm2-135m",
        help="smollm2-135m or gemma-3-270m (shipped in PyPI packages), a local .gguf file or a local model "
        "directory (default: %(default)s)",
    )
    zs.add_argument("--window", type=_at_least(2), default=512, help="tokens per window (default: %(default)s)")
    zs.add_argument("--n-windows", type=_at_least(1), default=16, help="number of windows, from the end of the text (default: %(default)s)")
    zs.add_argument(
        "--layer-types", nargs="+", metavar="TYPE",
        help="patch only layers of these types, e.g. full_attention on Gemma 3 (default: every layer)",
    )
    zs.add_argument("--batch-size", type=_at_least(1), default=1, help="windows per forward pass (default: %(default)s)")
    zs.add_argument("--out", metavar="FILE", help="also write the table as JSON to FILE")
    zs.set_defaults(func=_zero_shot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-prope`` and ``python -m hf_prope``; returns the exit status."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # No command = the main job; parse it as `zero-shot` so its defaults live in one place.
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["zero-shot", *argv]
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, ImportError, FileNotFoundError) as err:
        # Bad input or a missing package: a one-line message, not a traceback.
        print(f"hf-prope: error: {err}", file=sys.stderr)
        return 2
