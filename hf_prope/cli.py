"""The ``hf-prope`` command.

``hf-prope`` with no arguments runs the main job: a short retrofit of the embedded SmolLM2-135M
to p-RoPE p=0.5 by layer-wise attention transfer then self-distillation on CPython's documentation text (``run lora --config
smollm2_135m_quick``), which prints perplexity of the original, the patched model before and
after training, at 512 and 2048 tokens. Other commands:

* ``hf-prope run RECIPE --config FILE_OR_NAME [key=value | --key value ...]``: a recipe
  (``lora``, ``eval``); ``hf-prope run RECIPE --help`` lists its keys.
* ``hf-prope analyze MODEL [--out DIR] [key=value ...]``: which frequencies the model uses, its
  positional heads and a checked suggestion of p, as PNG heat maps, JSON and a markdown summary
  (the ``analyze`` recipe; ``hf-prope analyze --help`` lists its keys).
* ``hf-prope zero-shot``: perplexity under RoPE and p-RoPE variants with no training, beside
  the project's reference figures.
* ``hf-prope export MODEL --gguf OUT.gguf [--dtype f16|bf16|f32] [--patch p-rope --p 0.25]``: a GGUF
  file that llama.cpp runs with the model's patch (:mod:`hf_prope.gguf`); MODEL is loaded
  with its recorded patch, ``--patch`` patches it first.
* ``hf-prope bench [--only NAME,...] [--device cuda] [--profile]``: speed
  and memory against transformers' native path, measured side by side (:mod:`hf_prope.benchmarks`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli_help import MAIN_JOB, parser, zero_shot_variants

# Reference figures (BRIEF section 4): last 16 windows of 512 tokens of python_docs_text(),
# measured on Python 3.11 (the text changes between Python minor versions).
REFERENCE_PROTOCOL = {"window": 512, "n_windows": 16}
# Kept as the BRIEF writes them (strings) so the table shows their precision, not more.
REFERENCES: dict[tuple[str, bool], dict[str, str]] = {
    # (model, patch only full_attention layers) -> variant label -> perplexity
    ("smollm2-135m", False): {
        "RoPE": "9.87",
        "p=0.75": "9.90",
        "p=0.5": "10.41",
        "p=0.25": "50.4",
        "NoPE": "197.7",
        "highest 25% dropped": "89.2",
    },
    ("gemma-3-270m", False): {
        "RoPE": "26.29",
        "p=0.75": "26.18",
        "p=0.5": "139.1",
        "p=0.25": "196.3",
        "NoPE": "1696",
        "highest 25% dropped": "188.5",
    },
    ("gemma-3-270m", True): {"RoPE": "26.29", "p=0.75": "26.28", "p=0.5": "26.21", "p=0.25": "26.99", "NoPE": "34.54"},
}


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
    from .files import check_writable, write_json
    from .models import load_model

    started = time.perf_counter()
    out = check_writable(Path(args.out).parent) / Path(args.out).name if args.out else None
    print(f"Loading {args.model} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(args.model)
    # zero_shot_table checks every variant against the model before its first forward pass.
    rows = zero_shot_table(
        model,
        tokenizer,
        zero_shot_variants(args.layer_types),
        window=args.window,
        n_windows=args.n_windows,
        text=python_docs_text(),
        batch_size=args.batch_size,
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
    if out is not None:
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
        write_json(out, result)
        print(f"Wrote {out}")
    return 0


def _float_or_none(text: str | None) -> float | None:
    return float(text) if text is not None else None


def _bench(args: argparse.Namespace) -> int:
    from .benchmarks import run

    run(
        [b.strip() for b in args.only.split(",") if b.strip()],
        device=args.device,
        repeats=args.repeats,
        quick=args.quick,
        out=args.out,
        profile=args.profile,
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from .gguf import export_gguf, vocabulary_for
    from .hub import from_pretrained
    from .models import is_embedded_source, load_model
    from .patching import patch_model

    params: dict[str, Any] = {}
    if args.p is not None:
        params["p"] = args.p
    if args.keep is not None:
        try:
            params["keep"] = [int(k) for k in args.keep.split(",") if k.strip()]
        except ValueError:
            raise ValueError(f"--keep takes comma-separated pair indices, got {args.keep!r}.") from None
    if params and args.patch is None:
        raise ValueError("--p and --keep go with --patch (e.g. --patch p-rope --p 0.25).")
    if args.patch is not None:
        from .spec import make_spec

        make_spec(args.patch, **params)  # a bad patch fails before the model is loaded
    if not args.gguf.endswith(".gguf"):
        raise ValueError(f"--gguf must name a .gguf file, got {args.gguf!r}.")
    if args.check is not None:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            raise ImportError("--check runs llama.cpp through llama-cpp-python: pip install llama-cpp-python")
    started = time.time()
    if is_embedded_source(args.model):
        # Loaded with the patch its rope_freqs carries; the export copies the file's own llama.cpp vocabulary.
        model, hf_tokenizer = load_model(args.model)
        tokenizer: Any = None
    else:
        from transformers import AutoTokenizer

        model = from_pretrained(args.model, revision=args.revision)
        hf_tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
        # An adapter on an embedded base: the base's own GGUF vocabulary (its exact pre-tokenizer).
        tokenizer = vocabulary_for(model, hf_tokenizer)
    if args.patch is not None:
        patch_model(model, args.patch, **params)  # checks against this model before changing anything

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"writing {args.gguf}: {done}/{total} tensors", file=sys.stderr, flush=True)

    result = export_gguf(model, args.gguf, tokenizer=tokenizer, dtype=args.dtype, progress=progress)
    what = result.spec.describe() if result.spec is not None else "no patch (plain RoPE)"
    factors = "no rope_freqs tensor" if result.rope_freqs is None else f"rope_freqs: {len(result.rope_freqs)} factors"
    print(
        f"Wrote {result.path} ({result.architecture}, {result.dtype}, {result.n_tensors} tensors; {what}; {factors}) "
        f"in {time.time() - started:.0f} s."
    )
    if args.check is not None:
        _check_export(model, result.path, args.check, hf_tokenizer)
    return 0


def _check_export(model: Any, path: Path, n_tokens: int, tokenizer: Any) -> None:
    from .data import python_docs_text
    from .gguf import check_in_llama_cpp

    ids = tokenizer(python_docs_text())["input_ids"][-n_tokens:]
    report = check_in_llama_cpp(model, path, ids)

    def line(label: str, r: dict[str, float]) -> str:
        return (
            f"  {label:<44} mean |d logit| {r['mean_abs_logit_diff']:.4f}   max {r['max_abs_logit_diff']:.3f}   "
            f"argmax agreement {r['argmax_agreement']:.3f}"
        )

    print(f"llama.cpp against transformers (fp32), last {report['tokens']} tokens of CPython's docs:")
    print(line(f"this file ({path.name})", report))
    if "plain_rope" in report:
        print(line("a plain-RoPE GGUF of the same weights", report["plain_rope"]))


def _pop_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """The value of ``--config``/``-c``/``--config=`` (the last one wins) and the other arguments."""
    config, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ValueError(f"{argv[i]} needs a config file or a packaged config name.")
            config, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--config="):
            config = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    return config, rest


def _run_recipe(argv: list[str]) -> int:
    """``run RECIPE [--config FILE] [overrides]``; parsed here because overrides are free-form keys."""
    from hf_prope.extras import require

    # Before anything is parsed, loaded or trained: a run must not fail at its plot after minutes of work.
    require("recipes", "hf-prope run")
    from hf_prope.recipes import RECIPES, get_recipe

    if not argv or argv[0] in ("-h", "--help"):
        from hf_prope.cli_help import run_help
        from hf_prope.recipes import packaged_configs

        print(run_help({n: (c.description, c.default_config) for n, c in RECIPES.items()}, packaged_configs()))
        return 0 if argv else 2
    recipe_cls = get_recipe(argv[0])
    rest = argv[1:]
    if "-h" in rest or "--help" in rest:
        from transformers import HfArgumentParser

        help_parser = HfArgumentParser(recipe_cls.settings_types(), prog=f"hf-prope run {recipe_cls.name}")
        print(help_parser.format_help())
        return 0
    config, rest = _pop_config(rest)
    recipe = recipe_cls.from_config(config or recipe_cls.default_config, rest)
    recipe.run()
    from hf_prope.distributed import end_process_group

    end_process_group()
    return 0


def _analyze(argv: list[str]) -> int:
    """``analyze MODEL [--out DIR] [overrides]`` is ``run analyze model=MODEL output_dir=DIR [overrides]``."""
    if not argv or argv[0] in ("-h", "--help"):
        from hf_prope.cli_help import analyze_help

        print(analyze_help())
        return 0 if argv else 2
    model, rest = argv[0], argv[1:]
    if model.startswith("-") or "=" in model:
        raise ValueError(f"hf-prope analyze needs the model first (e.g. hf-prope analyze smollm2-135m), got {model!r}.")
    overrides, i = [f"model={model}"], 0
    while i < len(rest):
        if rest[i] in ("--out", "-o"):
            if i + 1 >= len(rest):
                raise ValueError(f"{rest[i]} needs a folder.")
            overrides.append(f"output_dir={rest[i + 1]}")
            i += 2
            continue
        overrides.append(f"output_dir={rest[i].split('=', 1)[1]}" if rest[i].startswith("--out=") else rest[i])
        i += 1
    return _run_recipe(["analyze", *overrides])


_COMMANDS = {"zero-shot": _zero_shot, "export": _export, "bench": _bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-prope`` and ``python -m hf_prope``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv:
            print(f"hf-prope: the main job: hf-prope {' '.join(MAIN_JOB)}", file=sys.stderr, flush=True)
            return _run_recipe(MAIN_JOB[1:])
        if argv[0] == "run":
            return _run_recipe(argv[1:])
        if argv[0] == "analyze":
            return _analyze(argv[1:])
        args = parser().parse_args(argv)
        if args.command is None:
            parser().print_help()
            return 2
        return int(_COMMANDS[args.command](args))
    except (ValueError, ImportError, OSError) as err:
        # Bad input, a missing package or file, an unwritable folder: one line, not a traceback.
        print(f"hf-prope: error: {err}", file=sys.stderr)
        return 2
