"""The ``hf-prope`` command's argument parser, and its help printed before torch is imported.

Importing torch alone takes 1.5 s on a 2-core machine, hf_prope's own import 5 s. A help request
to the ``hf-prope`` command is answered from here, called first thing by ``hf_prope/__init__``:
the parser, :func:`parser`, lives here (argparse only), and the lists it shows that live in
heavy modules (the benchmarks, the recipes) are read from their source with :mod:`ast`, so each
stays written in one place. ``hf-prope run RECIPE --help`` lists the recipe's keys from its
settings dataclasses (``TrainingArguments`` among them): that one imports transformers.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_HELP = ("-h", "--help")
# Commands whose help the light path prints (``run RECIPE --help`` is not among them).
_LIGHT_COMMANDS = ("zero-shot", "export", "bench", "analyze", "run")


MAIN_JOB = ["run", "lora", "--config", "smollm2_135m_quick"]


def help_requested(argv: list[str] | None = None) -> bool:
    """Whether this process is the ``hf-prope`` command asked only for help or its version."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or Path(argv[0]).name != "hf-prope":
        return False
    args = argv[1:]
    if len(args) == 1 and args[0] in (*_HELP, "--version"):
        return True
    if args[:1] == ["run"]:
        return len(args) == 1 or (len(args) == 2 and args[1] in _HELP)
    return len(args) == 2 and args[0] in _LIGHT_COMMANDS and args[1] in _HELP


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"cannot find the {name} package")
    return Path(next(iter(spec.submodule_search_locations)))


def benchmark_names() -> list[str]:
    """The keys of :data:`hf_prope.benchmarks.RUNNERS`, in order, read from its source."""
    tree = ast.parse((Path(__file__).parent / "benchmarks.py").read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and target.id == "RUNNERS" and isinstance(node.value, ast.Dict):
            return [k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    raise RuntimeError("hf_prope/benchmarks.py has no RUNNERS dict")


def recipe_summaries() -> dict[str, tuple[str, str | None]]:
    """Recipe name -> (description, default config), from the recipe classes' source."""
    out: dict[str, tuple[str, str | None]] = {}
    for path in sorted(_package_dir("hf_prope.recipes").glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if not isinstance(node, ast.ClassDef):
                continue
            attrs = {
                t.id: s.value.value
                for s in node.body
                if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant)
                for t in s.targets
                if isinstance(t, ast.Name)
            }
            if isinstance(attrs.get("name"), str) and isinstance(attrs.get("description"), str):
                out[attrs["name"]] = (attrs["description"], attrs.get("default_config"))
    return out


def packaged_config_names() -> list[str]:
    """The packaged recipe configs (``recipes/configs/*.yaml``), as :func:`hf_prope.recipes.packaged_configs`."""
    return sorted(p.name[:-5] for p in (_package_dir("hf_prope.recipes") / "configs").glob("*.yaml"))


def _descriptions(recipes: dict[str, tuple[str, str | None]]) -> list[tuple[str, str]]:
    return [(name, recipes[name][0]) for name in sorted(recipes)]


def run_help(recipes: dict[str, tuple[str, str | None]], configs: list[str]) -> str:
    lines = ["usage: hf-prope run RECIPE [--config FILE_OR_NAME] [key=value | --key value ...]", "", "recipes:"]
    lines += [f"  {name:<10}{desc} (default config: {recipes[name][1]})" for name, desc in _descriptions(recipes)]
    lines += ["", f"packaged configs: {', '.join(configs)}", "", "hf-prope run RECIPE --help lists its keys."]
    return "\n".join(lines)


def analyze_help() -> str:
    return (
        "usage: hf-prope analyze MODEL [--out DIR] [key=value | --key value ...]\n\n"
        "MODEL: smollm2-135m, gemma-3-270m, a local .gguf file, a local model folder or a Hub model id.\n"
        "DIR: where report.json, summary.md and the PNG heat maps go (default: report).\n"
        "hf-prope run analyze --help lists every key."
    )


def print_help(argv: list[str] | None = None) -> int:
    """Print what ``hf-prope ARGS`` asks for (help or version) and return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["run"]:
        print(run_help(recipe_summaries(), packaged_config_names()))
        return 0 if len(args) > 1 else 2
    if args[:1] == ["analyze"]:
        print(analyze_help())
        return 0
    try:
        parser().parse_args(args)
    except SystemExit as done:  # argparse's way to end after --help / --version
        return int(done.code or 0)
    return 0


def zero_shot_variants(layer_types: list[str] | None) -> list[tuple[str, Any]]:
    """The zero-shot command's variants, (label, patch or None), the paper's control last."""
    from .spec import PatchSpec, label_of

    where: dict[str, Any] = {"layer_types": tuple(layer_types)} if layer_types else {}
    specs = [
        None,
        PatchSpec("p-rope", p=0.75, **where),
        PatchSpec("p-rope", p=0.5, **where),
        PatchSpec("p-rope", p=0.25, **where),
        PatchSpec("nope", **where),
        # The paper's control: same number of rotating pairs as p=0.75, but the slowest ones.
        PatchSpec("p-rope", p=0.75, rotate="lowest", **where),
    ]
    return [(label_of(spec), spec) for spec in specs]


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


def parser(benchmarks: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``hf-prope`` argument parser (argparse only: this module prints its help before torch is imported).

    ``benchmarks``: the benchmark names, by default those of :data:`hf_prope.benchmarks.RUNNERS`.
    """
    from ._version import __version__
    from .spec import PATCH_NAMES

    parser = argparse.ArgumentParser(
        prog="hf-prope",
        description="p-RoPE for Hugging Face transformers. With no command: the main job, a short retrofit "
        f"({' '.join(MAIN_JOB)}) of the embedded SmolLM2-135M to p-RoPE p=0.5 by layer-wise transfer then self-distillation, "
        "printing perplexity of the original and of the patched model before and after, at 512 and 2048 tokens "
        "(about 11 minutes on 2 CPU cores).",
    )
    parser.add_argument("--version", action="version", version=f"hf-prope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "run",
        help="run a recipe: hf-prope run {lora,eval,analyze,ablation} [--config FILE] [key=value ...] (see hf-prope run --help)",
        add_help=False,
    )
    sub.add_parser(
        "analyze",
        add_help=False,
        help="hf-prope analyze MODEL [--out DIR] [key=value ...]: frequency usage, positional heads and a "
        "suggested p, as a report with heat maps (see hf-prope analyze --help)",
    )
    zs = sub.add_parser(
        "zero-shot",
        help="perplexity of a model, unchanged and under p-RoPE variants, with no training",
        description=f"Patch a model in place with each of {', '.join(label for label, _ in zero_shot_variants(None))} (the "
        "paper's control), and measure its perplexity on the Python docs text after each.",
    )
    zs.add_argument(
        "--model",
        default="smollm2-135m",
        help="smollm2-135m or gemma-3-270m (shipped in PyPI packages), a local .gguf file, a local model "
        "directory or a Hub model id (default: %(default)s)",
    )
    zs.add_argument("--window", type=_at_least(2), default=512, help="tokens per window (default: %(default)s)")
    zs.add_argument(
        "--n-windows",
        type=_at_least(1),
        default=16,
        help="number of windows, from the end of the text (default: %(default)s)",
    )
    zs.add_argument(
        "--layer-types",
        nargs="+",
        metavar="TYPE",
        help="patch only layers of these types, e.g. full_attention on Gemma 3 (default: every layer)",
    )
    zs.add_argument(
        "--batch-size", type=_at_least(1), default=1, help="windows per forward pass (default: %(default)s)"
    )
    zs.add_argument("--out", metavar="FILE", help="also write the table as JSON to FILE")

    export = sub.add_parser(
        "export",
        help="write a model, with its patch, as a GGUF file that llama.cpp runs exactly",
        description="Load MODEL with its recorded patch (a folder or Hub repo saved by hf-prope, adapters merged; an "
        "embedded name; a .gguf file), optionally patch it, and write a llama.cpp GGUF whose rope_freqs tensor "
        "stops the pairs the patch stops. Llama and Mistral models with a patch on every layer; anything else is "
        "refused with the reason, and nothing is written.",
    )
    export.add_argument("model", metavar="MODEL", help="smollm2-135m, a local .gguf file, a model folder or a Hub id")
    export.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    export.add_argument(
        "--dtype", default="f16", choices=["f16", "bf16", "f32"], help="matrix precision (default: %(default)s)"
    )
    export.add_argument("--patch", choices=PATCH_NAMES, help="patch the model first with this patch")
    export.add_argument("--p", type=float, help="with --patch p-rope: the fraction of frequency pairs that rotate")
    export.add_argument(
        "--keep", help="with --patch freq-mask: comma-separated indices of the pairs that rotate (0 = highest)"
    )
    export.add_argument("--revision", help="Hub revision of MODEL")
    export.add_argument(
        "--check",
        type=_at_least(2),
        metavar="N",
        help="then run the file in llama.cpp (needs llama-cpp-python) on the last N tokens of CPython's docs and "
        "compare its logits with the model's in transformers, and with a plain-RoPE GGUF of the same weights",
    )

    if benchmarks is None:
        benchmarks = benchmark_names()

    bench = sub.add_parser(
        "bench",
        help="speed and memory of hf-prope against transformers' native path, side by side",
        description="Median of interleaved repeats; prints each ratio against the native path measured in the same "
        "run, and its target. Benchmarks: rotary (rotary application alone), train (a training step of a "
        "SmolLM2-shaped model), decode (KV-cache decoding), patch (patch_model latency and memory on SmolLM2), "
        "recipe (the LoRA recipe against a plain Trainer + PEFT script), head_mask (a per-KV-head mask: rotary and training step), cli (the start-up of hf-prope --help and of each command's help).",
    )
    bench.add_argument(
        "--only", default=",".join(benchmarks), help=f"comma-separated, of {', '.join(benchmarks)} (default: all)"
    )
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    bench.add_argument("--repeats", type=_at_least(1), default=5, help="repeats per variant (default: %(default)s)")
    bench.add_argument("--quick", action="store_true", help="small shapes, for a smoke test (figures not meaningful)")
    bench.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators per variant")
    bench.add_argument("--out", metavar="FILE", help="also write the table as JSON to FILE")
    return parser
